"""The three fused CoLab ops; each module holds one op's autograd, dispatch and fake kernel."""
