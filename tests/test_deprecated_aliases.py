"""Old import paths keep working: each is the moved module itself, and importing it warns."""

from __future__ import annotations

import importlib
import sys

import pytest

ALIASES = [
    ("colabx.meta", "colabx.method.meta_step"),
    ("colabx.train.plan", "colabx.models.plan"),
    ("colabx.train.targets", "colabx.method.targets"),
    ("colabx.train.checkpoint", "colabx.checkpoint"),
    ("colabx.reference.context_labels", "colabx.twins.context_labels"),
    ("colabx.reference.distance_transform", "colabx.twins.distance_transform"),
    ("colabx.reference.meta", "colabx.twins.meta"),
    ("colabx.reference.compat", "colabx.compat.twins"),
]


@pytest.mark.parametrize(("old", "new"), ALIASES)
def test_old_path_is_the_moved_module(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_old_names_resolve():
    with pytest.warns(DeprecationWarning):
        sys.modules.pop("colabx.meta", None)
        from colabx.meta import MetaStep
    from colabx.method import MetaStep as moved

    assert MetaStep is moved
    with pytest.warns(DeprecationWarning):
        sys.modules.pop("colabx.reference.context_labels", None)
        from colabx.reference.context_labels import context_labels_reference
    from colabx.twins.context_labels import context_labels_twin

    assert context_labels_reference is context_labels_twin


def test_dice_ce_loss_alias_keeps_both_losses():
    sys.modules.pop("colabx.reference.dice_ce_loss", None)
    with pytest.warns(DeprecationWarning, match=r"colabx\.twins\.roi_bce_loss"):
        old = importlib.import_module("colabx.reference.dice_ce_loss")
    from colabx.twins import dice_ce_loss, roi_bce_loss

    assert old.dice_ce_loss is dice_ce_loss.dice_ce_loss
    assert old.roi_bce_loss is roi_bce_loss.roi_bce_loss
    assert old.BCE_EPS == roi_bce_loss.BCE_EPS


def test_reference_package_warns():
    sys.modules.pop("colabx.reference", None)
    with pytest.warns(DeprecationWarning, match="colabx.twins"):
        importlib.import_module("colabx.reference")
