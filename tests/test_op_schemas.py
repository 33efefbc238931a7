"""The custom ops that ``torch.compile`` traces must register on every torch from the floor
(2.4): torch before 2.7 cannot infer a schema from postponed annotations (strings) or from
builtin generics such as ``list[int]``, so the kernel functions behind them are annotated with
evaluated ``typing`` objects. On this torch the inferred schema is checked to be what the
kernels take."""

from __future__ import annotations

import inspect
import types

import pytest

from colabx.ops import context_labels, dice_ce_loss, distance_transform, roi_bce_loss

OPS = [
    context_labels._forward_op,
    context_labels._backward_op,
    dice_ce_loss._forward_op,
    dice_ce_loss._backward_op,
    roi_bce_loss._forward_op,
    roi_bce_loss._backward_op,
    distance_transform._distance_transform_op,
]


def _generic_aliases(annotation) -> list:
    """Builtin generics (``list[int]``) anywhere inside ``annotation``."""
    found = [annotation] if isinstance(annotation, types.GenericAlias) else []
    for arg in getattr(annotation, "__args__", ()) or ():
        found += _generic_aliases(arg)
    return found


@pytest.mark.parametrize("op", OPS, ids=lambda op: op._name)
def test_kernel_annotations_are_ones_old_torch_reads(op):
    sig = inspect.signature(op._init_fn)
    for name, p in [*sig.parameters.items(), ("return", sig)]:
        ann = p.return_annotation if name == "return" else p.annotation
        assert not isinstance(ann, str), f"{op._name}: {name} has a postponed annotation"
        assert not _generic_aliases(ann), f"{op._name}: {name} uses a builtin generic {ann}"
    assert str(op._opoverload._schema).startswith(f"colabx::{op._name}(")
