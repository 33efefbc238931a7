"""``colabx train --cuda-graphs``: the update replayed from a CUDA graph trains as the eager
update does (on a GPU: same weights after iterations with and without generator updates, each
replay on a new batch), and the option is refused where it cannot run."""

from __future__ import annotations

import math

import pytest
import torch

from colabx.train.config import ConfigError, TrainConfig
from colabx.train.trainer import Trainer


@pytest.fixture(autouse=True)
def _nondeterministic_after():
    """deterministic=True turns deterministic algorithms on for the process: off again after."""
    yield
    torch.use_deterministic_algorithms(False)


def _cfg(**kw) -> TrainConfig:
    base = dict(phantom_preset="tiny", mode="colab", epochs=3, iterations=3, batch_size=2,
                base_features=4, max_features=16, num_pool=2, patch_size=[16, 16, 8],
                val_fraction=0.0, num_workers=0, progress=False, snapshot_every=0,
                margin=4.0, tau=4.0, meta_period=2, device="cuda", deterministic=True)
    return TrainConfig(**{**base, **kw})


@pytest.mark.cuda
@pytest.mark.parametrize("mode,extra", [
    ("vanilla", {}),
    ("kmeans", {}),
    ("dilation", {}),
    ("manual", {}),
    ("colab", {"meta_order": "shared"}),  # bf16 autocast, central difference
    ("colab", {"meta_order": "reference"}),
    ("colab", {"amp": "none", "meta_difference": "one_sided", "grad_clip": 0.05}),
    ("colab", {"meta_grad": "exact"}),  # its meta step stays eager
])
def test_captured_iterations_train_as_the_eager_ones(cache, tmp_path, mode, extra):
    nets = {}
    for graphs in (False, True):
        tr = Trainer(_cfg(mode=mode, cuda_graphs=graphs, **extra), tmp_path / str(graphs),
                     echo=lambda s: None)
        start = [p.detach().clone() for p in tr.f.parameters()]
        calls, passes = [], []
        if graphs:
            real, real_pass = Trainer._replayed, Trainer._meta_pass

            def spy(self, name, *args, real=real, calls=calls):
                calls.append((name, name in self.captured))
                return real(self, name, *args)

            tr._replayed = spy.__get__(tr)
            def meta_pass(inputs, tr=tr, real_pass=real_pass, passes=passes):
                passes.append(1)
                return real_pass(tr, inputs)

            tr._meta_pass = meta_pass
        assert tr.run(max_epochs=2) is None  # 6 iterations, generator updates at 3 of them
        if graphs:
            assert tr.captured == {}  # released once training stops
            meta = mode == "colab" and extra.get("meta_grad") != "exact"
            shared = mode == "colab" and extra.get("meta_order") != "reference"
            # the update graph serves every iteration without a generator update, and the
            # reference order's plain update; the meta graph every generator update
            want = {"update": 3 if shared else 6, "meta": 3 if meta else 0}
            for name, n in want.items():
                seen = [hit for key, hit in calls if key == name]
                assert seen == [False, *[True] * (n - 1)][:n], (name, calls)
            # three warm-up calls and the capture: the later updates replayed the graph
            assert len(passes) == (4 if meta else 0)
        moved = max(float((p.detach() - q).abs().max())
                    for p, q in zip(tr.f.parameters(), start, strict=True))
        assert moved > 1e-3
        nets[graphs] = (tr.f, tr.g)
    for eager, captured in zip(nets[False], nets[True], strict=True):
        if eager is None:
            continue
        want = dict(eager.named_parameters())
        for name, p in captured.named_parameters():
            torch.testing.assert_close(p, want[name], rtol=1e-4, atol=1e-5, msg=name)


class _EagerCapture:
    """CapturedStep's contract without a GPU: every call runs the step eagerly. Records the
    steps it was built for."""

    built: list[str] = []

    def __init__(self, step_fn, params, inputs):
        self.step_fn = step_fn
        self.built.append(step_fn.__name__)

    def __call__(self, inputs):
        return self.step_fn(inputs)


@pytest.mark.parametrize("extra", [{"meta_order": "shared"}, {"meta_order": "reference"},
                                   {"meta_difference": "central"}])
def test_the_graph_paths_of_an_iteration_train_as_the_eager_ones(cache, tmp_path, monkeypatch,
                                                                 extra):
    """On the CPU, with the capture replaced by eager calls: the trainer's --cuda-graphs paths
    (the meta passes without host reads, the generator stepped after reading their flag) give
    the weights and logged numbers of its eager paths, bit for bit, also when an update is
    skipped (iteration 2's batch has no ROI in its cases)."""
    import colabx.train.trainer as trainer_module
    from colabx.method.meta_step import MetaStep

    def without_roi_at_2(self, it, batch, real=Trainer.train_iteration):
        if it == 2:
            batch = {**batch, "distance": torch.full_like(batch["distance"], math.inf)}
        return real(self, it, batch)

    runs = {}
    for graphs in (False, True):
        tr = Trainer(_cfg(device="cpu", **extra), tmp_path / str(graphs), echo=lambda s: None)
        tr.train_iteration = without_roi_at_2.__get__(tr)
        eager_steps = []
        if graphs:
            monkeypatch.setattr(trainer_module, "CapturedStep", _EagerCapture)
            monkeypatch.setattr(_EagerCapture, "built", [])

            def counted(*args, real=MetaStep.step, seen=eager_steps, **kw):
                seen.append(1)
                return real(*args, **kw)

            monkeypatch.setattr(MetaStep, "step", counted)
            tr.cfg.cuda_graphs = True  # after the device check, which refuses it on a CPU
        assert tr.run(max_epochs=2) is None  # 6 iterations, generator updates at 0, 2, 4
        if graphs:
            assert tr.captured == {}  # released once training stops
            assert sorted(_EagerCapture.built) == ["_meta_pass", "_update_step"]
            assert eager_steps == []  # every generator update took the graph path
        adam_steps = {int(st["step"]) for st in tr.gen_opt.state.values()}
        assert adam_steps == {2}  # the update without ROI did not step the generator
        runs[graphs] = tr
    eager, graphed = runs[False], runs[True]
    for a, b in ((eager.f, graphed.f), (eager.g, graphed.g)):
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), name
    keys = ("train_loss", "meta_skipped", "meta_l_seg", "meta_l_roi", "meta_v_norm")
    assert [[r[k] for k in keys] for r in eager.log.rows] == \
        [[r[k] for k in keys] for r in graphed.log.rows]
    assert sum(r["meta_skipped"] for r in eager.log.rows) == 1


@pytest.mark.parametrize("world,where", [(1, "device cpu"), (2, "several processes")])
def test_cuda_graphs_is_refused_off_a_single_gpu(cache, tmp_path, world, where):
    from colabx.train.distributed import Dist

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="cuda_graphs: captures one process's iteration on a "
                                         f"CUDA device, but this run is on {where}"):
        Trainer(_cfg(device="cpu", cuda_graphs=True), out, dist=Dist(0, world),
                echo=lambda s: None)
    assert not out.exists()  # nothing left behind


@pytest.mark.parametrize("kw,match", [
    ({"compile": True}, "cuda_graphs: not with --compile"),
    ({"amp": "fp16"}, "cuda_graphs: not with amp fp16"),
])
def test_cuda_graphs_conflicts_are_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(cuda_graphs=True, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_captured_step_replays_loss_and_gradients_of_new_inputs(amp):
    """Each replay computes the outputs and gradients of the inputs it is given (not of the
    capture's), equal to an eager call's up to the rounding of the convolution algorithms (TF32
    in fp32: stale inputs would be O(1) off); the gradients land in the parameters' ``.grad``."""
    from colabx import context_labels, dice_ce_loss
    from colabx.models import UNet
    from colabx.train.cuda_graph import CapturedStep

    net = UNet(1, 3, spatial_dims=3, base_features=4, max_features=16,
               pool_kernel_sizes=[(2, 2, 2)] * 2, deep_supervision=True).cuda()

    def loss_fn(inp):
        with torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None):
            z = net(inp["image"])
        yhat = context_labels(inp["gen"], inp["label"], inp["distance"], 2, 4.0, 4.0,
                              net.output_strides, validate=False)
        return dice_ce_loss(z, yhat, validate=False)

    def batch(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        y = (torch.rand(2, 16, 16, 8, device="cuda", generator=g) > 0.8).long()
        return {"image": torch.randn(2, 1, 16, 16, 8, device="cuda", generator=g),
                "gen": torch.randn(2, 2, 16, 16, 8, device="cuda", generator=g),
                "label": y, "distance": torch.where(y > 0, 0.0, 3.0)}

    def step_fn(inp):  # outputs of any (named) tuple structure come back as they were made
        loss = loss_fn(inp)
        loss.backward()
        return loss, None

    torch.use_deterministic_algorithms(True, warn_only=True)  # off again after the test
    step = CapturedStep(step_fn, net.parameters(), batch(0))
    for seed in (1, 2):
        inp = batch(seed)
        loss, none = step(inp)
        assert none is None
        got = [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
        want_loss = loss_fn(inp)
        want_loss.backward()
        torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-4, atol=1e-6)
        for p, g in zip(net.parameters(), got, strict=True):
            scale = float(p.grad.abs().max())
            torch.testing.assert_close(g, p.grad, rtol=2e-3, atol=2e-3 * scale)
    with pytest.raises(ValueError, match=r"inputs\['image'\]: the graph was captured for "
                                         r"\(2, 1, 16, 16, 8\)"):
        step({**batch(3), "image": torch.zeros(1, 1, 16, 16, 8, device="cuda")})


def test_captured_step_refuses_tensors_off_the_gpu():
    from colabx.train.cuda_graph import CapturedStep

    with pytest.raises(ValueError, match=r"inputs\['image'\]: CUDA graphs capture CUDA "
                                         r"tensors, got one on cpu"):
        CapturedStep(lambda inp: inp["image"].sum(), [], {"image": torch.zeros(2)})
