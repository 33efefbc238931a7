"""Pure-PyTorch twins of colabx's fused ops: the test oracle and the benchmark baseline.

Written for clarity, exactly the math of docs/design.md; never used on the fast path.
"""
