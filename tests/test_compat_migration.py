"""The README's migration instructions for the public CoLab code, applied to stand-ins laid out
like its ``common.py`` / ``utilities.py``: functions DEFINED in the modules and called by name by
a ``train`` in the same module (and, as the reference's sampler does, ``one_hot2dist`` imported
inside a function at call time). The originals raise, so a call that misses colabx fails."""

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import colabx.compat
from colabx.models import UNet, task_generator

README = Path(__file__).resolve().parents[1] / "README.md"

COMMON_PY = '''
from utilities import hessian_vector_product_Unet, one_hot2dist
{top}

def train(args, y, z, q, masks, f, g, vector, x):
    loss = calculate_loss(args, y, z, q, loss_masks=masks)
    vals = calcualte_loss_val(args, y, z, criterionbce=None)
    hvp = hessian_vector_product_Unet(f, g, vector, x, y, q, None, args, masks, 0)
    return loss, vals, hvp


def calculate_loss(args, targets, output, taskGenerated, detach=False, criterion=None,
                   losstype=0, logging=None, loss_masks=None, BGcls=0):
    raise AssertionError("the original calculate_loss was called")


def calcualte_loss_val(args, target_varval, outputval, criterionbce):
    raise AssertionError("the original calcualte_loss_val was called")
{end}
'''

UTILITIES_PY = '''
def hessian_vector_product_Unet(model, samplemodel, vector, inputnor_var, target_var,
                                taskGenerated, criterion, args, loss_mask, BGclsindex, r=1e-2):
    from common import calculate_loss  # noqa: F401  (the reference imports it at call time)
    raise AssertionError("the original hessian_vector_product_Unet was called")


def one_hot2dist(seg, resolution=None):
    raise AssertionError("the original one_hot2dist was called")
{end}
'''

SAMPLING_PY = '''
def getsamples(seg):
    from utilities import one_hot2dist
    return one_hot2dist(seg)
'''


def _readme_block(first_line: str) -> str:
    """The README's fenced python block whose first line is ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if b.splitlines()[0].strip() == first_line]
    assert len(found) == 1, f"README: no single python block starting with {first_line!r}"
    return found[0]


def _install(tmp_path, monkeypatch, common_top="", common_end="", utilities_end=""):
    (tmp_path / "common.py").write_text(COMMON_PY.format(top=common_top, end=common_end))
    (tmp_path / "utilities.py").write_text(UTILITIES_PY.format(end=utilities_end))
    (tmp_path / "sampling.py").write_text(SAMPLING_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("common", "utilities", "sampling"):
        monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.fixture
def clean_modules():
    yield
    for name in ("common", "utilities", "sampling"):
        sys.modules.pop(name, None)


def _inputs():
    args = types.SimpleNamespace(NumsClass=2, taskcls=2, deepsupervision=True, downsampling=2,
                                 vanilla=False, manuallabel=False)
    torch.manual_seed(0)
    f = UNet(1, 3, 3, base_features=2, num_pool=2, deep_supervision=True)
    g = task_generator(1, 2, 3, base_features=2, num_pool=2)
    x = torch.randn(1, 1, 8, 8, 8)
    y = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    y[:, 2:5, 3:6, 2:6] = 1
    z = [t.detach().requires_grad_() for t in f(x)]
    q = torch.softmax(g(x), 1)
    masks = [torch.ones(1, 1, 8, 8, 8), torch.ones(1, 1, 4, 4, 4)]
    vector = [torch.randn_like(p) for p in f.parameters()]
    return args, y, z, [q, F.avg_pool3d(q, 2)], masks, f, g, vector, x


def _check_colabx_is_called():
    import common
    import sampling

    a = _inputs()
    loss, vals, hvp = common.train(*a)
    b = _inputs()
    want_loss = colabx.compat.calculate_loss(b[0], b[1], b[2], b[3], loss_masks=b[4])
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    assert len(vals) == 10
    want_vals = colabx.compat.calcualte_loss_val(b[0], b[1], b[2])
    torch.testing.assert_close(vals[0], want_vals[0], rtol=0, atol=0)
    assert len(hvp) == len(list(b[6].parameters()))
    seg = np.zeros((1, 6, 6, 6), np.int32)
    seg[0, 2:4, 2:4, 2:4] = 1
    np.testing.assert_array_equal(sampling.getsamples(seg), colabx.compat.one_hot2dist(seg))


def test_the_documented_patch_call_reaches_every_call(tmp_path, monkeypatch, clean_modules):
    _install(tmp_path, monkeypatch)
    import common  # noqa: F401  (train.py imports the reference's modules first)
    exec(_readme_block("# train.py, after its own imports: replaces the functions in common "
                       "and utilities"), {})
    _check_colabx_is_called()


def test_the_documented_end_of_module_imports_reach_every_call(tmp_path, monkeypatch,
                                                                 clean_modules):
    _install(tmp_path, monkeypatch,
             common_end=_readme_block("# or at the END of common.py, after its own definitions"),
             utilities_end=_readme_block("# and at the END of utilities.py"))
    _check_colabx_is_called()


def test_an_import_at_the_top_of_common_is_overridden_by_its_definitions(
        tmp_path, monkeypatch, clean_modules):
    """The former README advice: the module's own definitions win, the originals run."""
    _install(tmp_path, monkeypatch, common_top="from colabx.compat import calculate_loss, "
                                               "calcualte_loss_val")
    with pytest.raises(AssertionError, match="the original calculate_loss was called"):
        _check_colabx_is_called()


def test_the_documented_train_import_is_colabx_train():
    ns: dict = {}
    block = _readme_block("# train.py: replaces `from common import train, ...`")
    exec("\n".join(line for line in block.splitlines() if "from common" not in line), ns)
    assert ns["train"] is colabx.compat.train
