"""The custom ops' schemas are written out because torch < 2.7 cannot infer them from the
annotations (postponed, i.e. strings, and builtin generics such as ``list[int]``); on a torch that
can, the written schema must be the inferred one, so the two never drift apart."""

from __future__ import annotations

import pytest
import torch
from torch.torch_version import TorchVersion

from colabx.ops import context_labels, dice_ce_loss, distance_transform

OPS = [
    context_labels._fwd,
    context_labels._bwd,
    dice_ce_loss._dce_fwd,
    dice_ce_loss._dce_bwd,
    dice_ce_loss._bce_fwd,
    dice_ce_loss._bce_bwd,
    distance_transform._distance_transform_op,
]


@pytest.mark.skipif(TorchVersion(torch.__version__) < "2.7",
                    reason="this torch cannot infer schemas from postponed annotations")
@pytest.mark.parametrize("op", OPS, ids=lambda op: op._name)
def test_written_schema_is_the_inferred_one(op):
    inferred = torch.library.infer_schema(op._init_fn, mutates_args=())
    assert str(op._opoverload._schema) == f"colabx::{op._name}{inferred}"
