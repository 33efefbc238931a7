"""colabx.compat.train (the reference's ``common.train`` on colabx's meta step) against the
reference-style epoch of colabx.compat.twins.train_reference: one epoch on tiny patches."""

import copy
import re
import sys
import types

import numpy as np
import pytest
import torch

import colabx.compat
from colabx.compat.twins import one_hot2dist_reference, train_reference
from colabx.models import UNet, task_generator

N, SIZE = 4, 16  # patches per epoch (2 iterations of 2), patch edge


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks gain nothing from a second thread, and on a loaded 2-core machine OpenMP's
    waiting makes them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _args(**kw):
    args = types.SimpleNamespace(
        NumsClass=2, taskcls=2, deepsupervision=True, downsampling=2, vanilla=False,
        manuallabel=False, distdetach=True, threshold_sub=1.0, threshold_dev=4.0, batch_size=2,
        numIteration=N // 2, taskupdate=1, print_freq=1, tensorboard=False)
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def _sampling_results(manual: bool):
    """The sampler's (images, labels, signed distances, order): a box per patch, the last patch
    without ROI; with ``manuallabel`` an organ (1) around the lesion (2)."""
    rng = np.random.default_rng(0)
    y = np.zeros((N, SIZE, SIZE, SIZE), np.int64)
    for i in range(N - 1):
        c = rng.integers(5, SIZE - 5, 3)
        if manual:
            y[i, c[0] - 5:c[0] + 5, c[1] - 5:c[1] + 4, c[2] - 4:c[2] + 5] = 1
        y[i, c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 2, c[2] - 2:c[2] + 3] = 2 if manual else 1
    x = rng.normal(size=(N, 1, SIZE, SIZE, SIZE)) + y[:, None]
    roi = (y == 2) if manual else (y > 0)
    dist = np.stack([one_hot2dist_reference(r[None].astype(np.int32))[0] for r in roi])
    return x, y, dist.astype(np.float64), list(range(N))


def _epoch(fn, dtype, args, *, near_tie=False, **kw):
    """One epoch of ``fn`` from a fixed initialisation; (Δθ, Δω) as float64 vectors, the log.
    ``near_tie``: the generator's context logits differ by ~1e-12, which softmax rounds away."""
    torch.manual_seed(0)
    f0 = UNet(1, args.NumsClass + args.taskcls - 1, 3, base_features=4, num_pool=2,
              deep_supervision=args.deepsupervision).to(dtype)
    g0 = task_generator(1, args.taskcls, 3, base_features=4, num_pool=2).to(dtype)
    if near_tie:
        with torch.no_grad():
            head = g0.seg_outputs[-1]
            head.weight.zero_()  # a 1x1 conv without bias
            head.weight[1] = 1e-12
    f, g = copy.deepcopy(f0), copy.deepcopy(g0)
    opt = torch.optim.SGD(f.parameters(), lr=1e-2, weight_decay=3e-5, momentum=0.99,
                          nesterov=True)
    opt_arch = torch.optim.Adam(g.parameters(), lr=3e-4)
    lines: list[str] = []
    log = types.SimpleNamespace(info=lambda m: lines.append(str(m)))
    fn(_sampling_results(args.manuallabel), None, f, g, None, opt, opt_arch, 1e-2, 3, log,
       args, **kw)

    def delta(a, b):
        return torch.cat([(p - q).detach().flatten() for p, q in
                          zip(a.parameters(), b.parameters(), strict=True)]).double()

    return delta(f, f0), delta(g, g0), lines


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _without_times(lines):
    return [re.sub(r"Time \S+ \(\S+\)", "Time", s) for s in lines]


MODES = {
    "colab-deep-mask": {},
    "colab-deep-nomask": dict(distdetach=False),
    "colab-single-level": dict(deepsupervision=False),
    "colab-taskupdate2": dict(taskupdate=2, print_freq=2),
    "vanilla": dict(vanilla=True),
    "manuallabel": dict(manuallabel=True),
}


@pytest.mark.parametrize("mode", MODES)
def test_train_is_the_reference_epoch_in_float64(mode):
    """Per-sample mode, float64: the same updates of θ and ω (1e-9: only the rounding of two
    algebraically equal computations differs) and the same log, times aside."""
    args = _args(**MODES[mode])
    rf, rg, rlog = _epoch(train_reference, torch.float64, args)
    cf, cg, clog = _epoch(colabx.compat.train, torch.float64, args)
    assert float(rf.norm()) > 0
    assert _rel(cf, rf) < 1e-9
    if args.vanilla or args.manuallabel:  # the generator is not trained
        assert float(rg.norm()) == 0 and float(cg.norm()) == 0
    else:
        assert float(rg.norm()) > 0 and _rel(cg, rg) < 1e-9
    assert _without_times(clog) == _without_times(rlog)
    assert any(s.startswith("Epoch: [3][0/2]") for s in clog)
    if args.deepsupervision and not args.vanilla:
        assert sum("Task 1 portion" in s for s in clog) == 2 * 2 * len(range(0, 2,
                                                                          args.print_freq))


def test_task_portion_log_lines_follow_the_softmax_as_the_reference():
    """The "Task 1 portion" lines count the argmax of the generator's softmax probabilities, the
    background class that of its logits, as in the reference: with near-tied logits they
    differ, and both match the reference's."""
    args = _args()
    _, _, rlog = _epoch(train_reference, torch.float32, args, near_tie=True)
    _, _, clog = _epoch(colabx.compat.train, torch.float32, args, near_tie=True)
    portions = [s for s in clog if "Task 1 portion" in s]
    assert portions and portions == [s for s in rlog if "Task 1 portion" in s]
    assert "Task 1 portion0 1.0" in portions  # the softmax ties: argmax is the first class
    bg = [s for s in clog if "average BG class" in s]
    assert bg == [s for s in rlog if "average BG class" in s]


@pytest.mark.parametrize("mode", ["colab-deep-mask", "colab-single-level"])
def test_train_in_float32_is_within_float32_noise_of_the_reference(mode):
    """Per-sample mode, float32, against the float64 reference epoch: colabx's updates are at
    least as close as the float32 reference's own (measured: θ 1.5e-5 vs 5.1e-5, ω 2.6e-4
    vs 3.1e-3 with deep supervision)."""
    args = _args(**MODES[mode])
    rf64, rg64, _ = _epoch(train_reference, torch.float64, args)
    rf32, rg32, _ = _epoch(train_reference, torch.float32, args)
    cf32, cg32, _ = _epoch(colabx.compat.train, torch.float32, args)
    assert _rel(cf32, rf64) < 1e-4 and _rel(cg32, rg64) < 1e-2
    assert _rel(cf32, rf64) <= 1.5 * _rel(rf32, rf64) + 1e-6
    assert _rel(cg32, rg64) <= 1.5 * _rel(rg32, rg64) + 1e-5


def test_batched_meta_mode_trains_both_networks_close_to_the_per_sample_epoch():
    """One generator update per batch instead of per sample: a different algorithm, so only
    sanity: both networks move, finitely, θ about as far as in the per-sample epoch."""
    args = _args()
    pf, pg, _ = _epoch(colabx.compat.train, torch.float64, args)
    bf, bg, log = _epoch(colabx.compat.train, torch.float64, args, meta_mode="batched")
    assert torch.isfinite(bf).all() and torch.isfinite(bg).all()
    assert float(bg.norm()) > 0 and _rel(bf, pf) < 0.5
    assert sum(s.startswith("average BG class is") for s in log) == 2


def test_train_rejects_bad_input():
    args = _args()
    f = UNet(1, 3, 3, base_features=4, num_pool=2)
    g = task_generator(1, 2, 3, base_features=4, num_pool=2)
    opt = torch.optim.SGD(f.parameters(), lr=1e-2)
    log = types.SimpleNamespace(info=lambda m: None)
    with pytest.raises(ValueError, match="meta_mode must be one of"):
        colabx.compat.train(_sampling_results(False), None, f, g, None, opt, opt, 1e-2, 0, log,
                            args, meta_mode="sample")
    x, y, d, order = _sampling_results(False)
    with pytest.raises(ValueError, match="4 patches needed"):
        colabx.compat.train((x[:3], y[:3], d[:3], order), None, f, g, None, opt, opt, 1e-2, 0,
                            log, args)
    with pytest.raises(ValueError, match="must be"):
        colabx.compat.train((x[:, 0], y, d, order), None, f, g, None, opt, opt, 1e-2, 0, log,
                            args)


def test_one_forward_serves_the_steps_only_for_sample_independent_networks():
    """The inner steps and the plain update share f's forward on the batch only where a
    sample's output does not depend on the others (no batch norm or dropout in training)."""
    from colabx.compat.train import _samples_independent

    conv = torch.nn.Conv3d(1, 2, 3)
    assert _samples_independent(torch.nn.Sequential(conv, torch.nn.InstanceNorm3d(2),
                                                    torch.nn.Dropout3d(0.0)))
    bn = torch.nn.Sequential(conv, torch.nn.BatchNorm3d(2))
    assert not _samples_independent(bn)
    assert _samples_independent(bn.eval())
    assert not _samples_independent(torch.nn.Sequential(conv, torch.nn.Dropout3d(0.2)))


def test_batch_norm_network_still_runs_the_reference_epoch():
    """A network with batch norm gets a forward per step, as the reference runs it."""
    args = _args()

    def with_batch_norm(net):
        for m in list(net.modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, torch.nn.InstanceNorm3d):
                    setattr(m, child_name, torch.nn.BatchNorm3d(child.num_features))
        return net

    def run(fn):
        torch.manual_seed(0)
        f = with_batch_norm(UNet(1, 3, 3, base_features=4, num_pool=2)).double()
        g = task_generator(1, 2, 3, base_features=4, num_pool=2).double()
        f0 = copy.deepcopy(f)
        opt = torch.optim.SGD(f.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
        opt_arch = torch.optim.Adam(g.parameters(), lr=3e-4)
        fn(_sampling_results(False), None, f, g, None, opt, opt_arch, 1e-2, 0,
           types.SimpleNamespace(info=lambda m: None), args)
        return torch.cat([(p - q).detach().flatten()
                          for p, q in zip(f.parameters(), f0.parameters(), strict=True)])

    ref, ours = run(train_reference), run(colabx.compat.train)
    assert float(ref.norm()) > 0 and _rel(ours, ref) < 1e-9


def test_tensorboard_scalars_in_the_reference_order(monkeypatch):
    """The epoch's averages go to ``tensorboard_logger`` under the reference's names and in its
    order (the Dice diagnostic before the BCE one)."""
    from colabx.compat.twins import EpochMeters

    logged = []
    stub = types.ModuleType("tensorboard_logger")
    stub.log_value = lambda name, value, step: logged.append((name, step))
    monkeypatch.setitem(sys.modules, "tensorboard_logger", stub)
    EpochMeters().log_tensorboard(types.SimpleNamespace(tensorboard=True), 7)
    expected = ["train_loss", "train_lossval", "train_acc", "trainval_acc",
                "train_lossvaldsc", "train_lossvalbce", "train_lossvalpbce", "train_lossvalnbce",
                "train_lossvalpz", "train_lossvalnz", "train_lossvalprc", "train_lossvalsen",
                "train_lossvalspe"]
    assert logged == [(name, 7) for name in expected]
