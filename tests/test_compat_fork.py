"""colabx.compat.one_hot2dist and colabx.distance_transform in forked workers whose parent had
used torch's intra-op (OpenMP) pool: the reference's sampler computes its distance maps in a
``fork`` multiprocessing pool, and a forked child that enters an OpenMP parallel region blocks
forever. Each worker job builds its inputs with NumPy only, so a hang can only come from colabx.
"""

import multiprocessing as mp
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import colabx.compat
from colabx import distance_transform
from colabx.compat import (
    calcualte_loss_val,
    calculate_loss,
    hessian_vector_product_Unet,
    one_hot2dist,
)
from colabx.compat import utilities as utilities_module
from colabx.compat.twins import one_hot2dist_reference
from colabx.models import UNet, task_generator
from colabx.ops.distance_transform import fork_safe_intraop, in_forked_child

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork start method (Linux)")

TIMEOUT_S = 60


def _seg(seed: int) -> np.ndarray:
    """[2, 48, 40, 36] int32: a box (channel 0) and its complement (channel 1), large enough
    for torch to parallelise elementwise ops over it (> 32768 elements)."""
    seg = np.zeros((2, 48, 40, 36), np.int32)
    o = 4 + seed
    seg[0, o:o + 20, 10:30, 8:24] = 1
    seg[1] = 1 - seg[0]
    return seg


def _one_hot2dist_job(seed: int) -> np.ndarray:
    return one_hot2dist(_seg(seed))


def _distance_transform_job(seed: int) -> np.ndarray:
    mask = torch.from_numpy(_seg(seed))  # int32: distance_transform converts it with torch
    return distance_transform(mask, signed=True).numpy()


def _loss_inputs(seed: int):
    """calculate_loss / calcualte_loss_val inputs, made from NumPy arrays (no torch op)."""
    rng = np.random.default_rng(seed)
    args = types.SimpleNamespace(NumsClass=2, taskcls=2, deepsupervision=False, downsampling=1,
                                 vanilla=False, manuallabel=False)
    y = torch.from_numpy(rng.integers(0, 2, (2, 40, 40, 32)))
    z = torch.from_numpy(rng.normal(size=(2, 3, 40, 40, 32)).astype(np.float32))
    q = torch.from_numpy(np.full((2, 2, 40, 40, 32), 0.5, np.float32))
    return args, y, z, q


def _losses_job(seed: int) -> tuple[float, ...]:
    args, y, z, q = _loss_inputs(seed)
    z.requires_grad_()
    loss = calculate_loss(args, y, z, q)
    vals = calcualte_loss_val(args, y, z)
    return float(loss.detach()), float(vals[0].detach()), float(vals[3].detach())


def _hvp_job(seed: int) -> list[np.ndarray]:
    f, g, args, x, y, vector, q = _HVP
    grads = hessian_vector_product_Unet(f, g, vector, x, y, q, None, args, None, 0)
    return [t.detach().numpy() for t in grads]


def _hvp_setup():
    torch.manual_seed(0)
    args = types.SimpleNamespace(NumsClass=2, taskcls=2, deepsupervision=True, downsampling=2,
                                 vanilla=False, manuallabel=False)
    f = UNet(1, 3, 3, base_features=4, num_pool=2, deep_supervision=True)
    g = task_generator(1, 2, 3, base_features=4, num_pool=2)
    x = torch.randn(1, 1, 32, 32, 32)
    y = (x[:, 0] > 1).long()
    q = torch.softmax(g(x), 1)  # with its graph to g: the product backpropagates into g
    return f, g, args, x, y, [torch.randn_like(p) for p in f.parameters()], [q, F.avg_pool3d(q, 2)]


_HVP = _hvp_setup()  # built before any fork (no torch op of the test runs in a worker)


def _forked_child_flag(_: int) -> bool:
    return in_forked_child()


@pytest.fixture
def parent_used_torch_threads():
    """The parent's intra-op pool is started, as it always is during training."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    float((torch.randn(2_000_000) + 1).sum())
    float((torch.randn(256, 256) @ torch.randn(256, 256)).sum())
    yield
    torch.set_num_threads(n)


def _map_in_fork_pool(fn, items):
    pool = mp.get_context("fork").Pool(2)
    try:
        return pool.map_async(fn, items).get(timeout=TIMEOUT_S)
    finally:
        pool.terminate()
        pool.join()


def test_one_hot2dist_in_a_fork_pool_after_the_parent_used_torch_threads(
        parent_used_torch_threads):
    got = _map_in_fork_pool(_one_hot2dist_job, [0, 1, 2])
    for seed, d in enumerate(got):
        np.testing.assert_array_equal(d, one_hot2dist_reference(_seg(seed)))


def test_distance_transform_in_a_fork_pool_after_the_parent_used_torch_threads(
        parent_used_torch_threads):
    got = _map_in_fork_pool(_distance_transform_job, [0, 1])
    for seed, d in enumerate(got):
        want = one_hot2dist_reference(_seg(seed).astype(np.float32))
        np.testing.assert_allclose(d, want, rtol=1e-6, atol=1e-5)


def test_the_losses_and_the_meta_gradient_in_a_fork_pool_after_the_parent_used_torch_threads(
        parent_used_torch_threads):
    got = _map_in_fork_pool(_losses_job, [0, 1])
    for seed, values in enumerate(got):
        np.testing.assert_allclose(values, _losses_job(seed), rtol=1e-5)
    (child,) = _map_in_fork_pool(_hvp_job, [0])
    for a, b in zip(child, _hvp_job(0), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()))


class _Cases(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        return _one_hot2dist_job(i), _distance_transform_job(i)


def test_both_in_forked_dataloader_workers(parent_used_torch_threads):
    loader = torch.utils.data.DataLoader(_Cases(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=TIMEOUT_S)
    for i, (a, b) in enumerate(loader):
        np.testing.assert_array_equal(np.asarray(a), one_hot2dist_reference(_seg(i)))
        want = one_hot2dist_reference(_seg(i).astype(np.float32))
        np.testing.assert_allclose(np.asarray(b), want, rtol=1e-6, atol=1e-5)


def test_the_fork_flag_is_set_in_forked_children_only_and_the_guard_restores_threads():
    assert not in_forked_child()
    assert _map_in_fork_pool(_forked_child_flag, [0]) == [True]
    n = torch.get_num_threads()
    with fork_safe_intraop():  # not a forked child: unchanged
        assert torch.get_num_threads() == n
    assert torch.get_num_threads() == n


@pytest.fixture
def distance_cache(tmp_path):
    colabx.compat.cache_distance_maps(tmp_path / "dist")
    yield tmp_path / "dist"
    colabx.compat.cache_distance_maps(None)


def _no_edt(*args, **kwargs):
    raise AssertionError("recomputed instead of read from the cache")


def test_distance_cache_across_two_fork_pool_epochs(parent_used_torch_threads, distance_cache,
                                                    monkeypatch):
    """As the reference's sampler: a fresh fork pool per epoch, one map per sampled case. The
    first epoch's workers write the cache; the second epoch reads it (the EDT is disabled in
    the parent, so forked workers inherit the disabled EDT)."""
    first = _map_in_fork_pool(_one_hot2dist_job, [0, 1, 0])
    assert len(list(distance_cache.glob("*.npy"))) == 2  # cases 0 and 1
    monkeypatch.setattr(utilities_module, "_one_hot2dist", _no_edt)
    second = _map_in_fork_pool(_one_hot2dist_job, [1, 0])
    np.testing.assert_array_equal(second[0], first[1])
    np.testing.assert_array_equal(second[1], one_hot2dist_reference(_seg(0)))
    assert second[1].dtype == np.int32


def test_distance_cache_keys_on_content_dtype_and_resolution(distance_cache):
    seg = _seg(0)
    a = one_hot2dist(seg)
    one_hot2dist(seg.astype(np.float32))
    r = one_hot2dist(seg.astype(np.float32), resolution=(1.0, 2.0, 1.5))
    changed = seg.copy()
    changed[0, 30, 30, 30] = 1
    c = one_hot2dist(changed)
    assert len(list(distance_cache.glob("*.npy"))) == 4
    np.testing.assert_array_equal(one_hot2dist(seg), a)  # read back
    np.testing.assert_array_equal(c, one_hot2dist_reference(changed))
    want = one_hot2dist_reference(seg.astype(np.float32), (1.0, 2.0, 1.5))
    np.testing.assert_allclose(r, want, rtol=1e-6, atol=1e-5)
