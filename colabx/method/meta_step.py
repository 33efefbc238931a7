"""CoLab's meta step, fast (docs/design.md, "The meta step", steps 1-6).

On a batch ``(x, y, d)`` (images, integer labels, distance to the ROI):

1. ŷ = context_labels(g_ω(x), y, d, levels=f.output_strides with deep supervision), graph to ω
   kept;
2. θ* = θ − α ∇θ L_seg(f_θ(x), ŷ) (L_seg = :func:`colabx.dice_ce_loss` over all deep-supervision
   levels, Dice over channels 1..K−1, default level weights), α = the current learning rate;
3. v = ∇θ* L_ROI(f_θ*(x), y) (L_ROI = :func:`colabx.roi_bce_loss` on channels 1..c−1, full
   resolution);
4. ε = fd_eps/‖v‖, θ± = θ ± εv; the θ+ and θ− forwards (one after the other, or as one
   grouped-convolution U-Net; see ``MetaConfig.theta_pm``) under ``no_grad``, autocast off;
   G± = ∂L_seg(f_θ±(x), ŷ)/∂ŷ from ONE fused loss call on the concatenated ``[z+; z−]``;
5. ONE backward of −α (G+ − G−)/(2ε) through context_labels and g_ω fills the generator's
   ``.grad``;
6. the caller's optimizer (Adam in CoLab) steps ω; :meth:`MetaStep.plain_step` then does the
   ordinary update of θ on labels from the updated ω.

``meta_grad="exact"`` replaces the finite difference of step 4 by the mixed second derivative
itself, ∂/∂ŷ ⟨v, ∇θ L_seg(f_θ(x), ŷ)⟩, by double backward through the pure-PyTorch twin of the
loss (the fused loss has first derivatives only). ``mode="per_sample"`` is the reference code's
semantics: one inner step and one generator update per sample.

The networks are called with :func:`torch.func.functional_call`, which runs the modules' own
forward: InstanceNorm (no running statistics) normalises each sample with its own statistics in
either mode, exactly as the reference's modules do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torch.func import functional_call

from colabx._precision import no_tf32, tf32_unless
from colabx.method.grouped import grouped_unet_forward
from colabx.ops.context_labels import context_labels
from colabx.ops.dice_ce_loss import dice_ce_loss
from colabx.ops.roi_bce_loss import roi_bce_loss
from colabx.twins import dice_ce_loss as _twin

__all__ = ["DIFFERENCES", "META_GRADS", "META_MODES", "ORDERS", "THETA_PM", "GradReducer",
           "InnerPass", "MetaConfig", "MetaStep", "MetaStepInfo", "MetaTensors", "UpdateCounter",
           "current_lr"]

#: The choices of :class:`MetaConfig` (the trainer's options offer the same): ``mode``,
#: ``meta_grad``, ``theta_pm``, iteration ``order`` and finite ``difference``.
META_MODES = ("batched", "per_sample")
META_GRADS = ("fd", "exact")
THETA_PM = ("sequential", "grouped")
ORDERS = ("reference", "shared")
DIFFERENCES = ("central", "one_sided")


@dataclass
class MetaConfig:
    """Options of :class:`MetaStep`.

    num_classes : c >= 2 (background included); the segmentation net has ``K = c + t − 1``
        outputs, the generator ``t``.
    margin, tau : the soft mask of :func:`colabx.context_labels` (defaults 30, 20).
    fd_eps : ε = fd_eps/‖v‖ (0.01, the reference's value).
    mode : ``"batched"`` (default; one inner step and one generator gradient on the batch) or
        ``"per_sample"`` (the reference's semantics; one of each per sample, the optimizer
        stepping after every sample).
    meta_grad : ``"fd"`` (finite difference, default) or ``"exact"`` (double backward).
    theta_pm : how the θ+ and θ− forwards run, always without autograd graph, then ONE fused loss
        call on ``[z+; z−]``: ``"sequential"`` (two functional calls; default) or ``"grouped"``
        (one U-Net with every layer's two parameter sets concatenated and ``groups=2``
        convolutions, :mod:`colabx.method.grouped`). Sequential is faster on the GPU (H200, B=2,
        80³, 30 features, whole meta part: 129 vs 151 ms) and for large nets on the CPU (48³, 30
        features, 4 pools: 1.12 vs 1.96 s); grouped wins for small nets on the CPU (32³, 8
        features, 3 pools: 47 vs 62 ms; measured by 2026-12-03, commit e5ce5ab;
        ``benchmarks/RESULTS.md`` has the runs of the same comparison in its tables).
    amp : autocast the generator, the inner step and the L_ROI forwards in ``amp_dtype``; the θ±
        forwards always run with autocast disabled, in the parameters' dtype.
    meta_amp : autocast (in ``amp_dtype``) of the meta step's own passes alone: the generator's
        forward and backward, and the L_ROI forward and backward at θ*; ``None`` (default):
        as ``amp``. The finite difference compares only f's logits at θ (the inner forward)
        and at θ± on the same labels ŷ, so it never sees these passes' precision: with
        ``amp=False, meta_amp=True`` the inner and θ± forwards stay in the parameters' dtype
        and the one-sided difference is allowed (``colabx train --meta-amp bf16``). In bf16 on
        an AMX CPU a CoLab iteration was 1.1-1.2x faster, and the fd meta-gradient moved by
        16-38 % of its norm from the float32 one (test networks of ``tests/test_meta_amp.py``).
    fd_tf32 : let the θ± forwards (and a one-sided difference's inner forward) use TF32
        convolutions and matmuls as torch's settings allow (default), as every pass of the
        published code runs; ``False``: strict fp32 for them. On an H200 (B=2, 80³, 30
        features; ``colabx bench meta``) strict fp32 made an update iteration 18-22 % slower
        (137 vs 116 ms fp32, 110 vs 89 ms bf16 autocast) for an fd meta-gradient 3.3e-2
        instead of 3.8e-2 (relative) off the float64 one, where the finite difference itself
        is 9.2e-2 off the exact meta-gradient (``benchmarks/RESULTS.md``). No effect on the
        CPU. The exact meta-gradient always runs in full fp32.
    recompute_generator : run the generator forward of step 1 without autograd graph and again,
        with graph, just before the backward of step 5 (one more generator forward per meta
        update), so the generator's activations are not held through f's passes: the same
        gradient, a lower peak. Off by default; turn it on when memory binds. On an H200
        (B=2, 80³, 30 features) the meta part's peak growth falls to 0.60× (2221 vs 3696 MiB)
        for 6 % more time; on the CPU (B=2, 32³, 8 features) 84 vs 95 MiB, 5 % slower.
    order : ``"reference"`` (default): the meta step runs its own inner forward+backward of f
        on labels from the current ω, then the caller's plain update trains θ on labels from
        the updated ω (:meth:`MetaStep.step`, then :meth:`MetaStep.plain_step`).
        ``"shared"``: one forward+backward of f on labels from the current ω
        (:meth:`MetaStep.shared_forward`) gives both the inner step's gradient and the plain
        update's, so an iteration runs f's forward+backward twice instead of three times; the
        plain update then trains on labels one generator update old (ω moves slowly: Adam at
        3e-4, every ``meta_period`` iterations). The generator gradient at a given (θ, ω,
        batch) is the same in both orders (tested to 1e-9 in float64). Batched mode only.
    difference : ``"central"`` (default; the paper's (G(θ+εv) − G(θ−εv))/(2ε)) or
        ``"one_sided"``: (G(θ+εv) − G(θ))/ε with G(θ) = ∂L_seg/∂ŷ taken from the inner forward,
        which saves the θ− forward. Its error is O(ε) where the central one's is O(ε²) on a
        smooth net; both are O(ε) on LeakyReLU U-Nets (measured: within 2× of each other,
        ``tests/test_meta_order.py``). The inner forward must then run in the θ± precision:
        refused with ``amp``; TF32 is turned off for it unless ``fd_tf32``.
    skip_without_roi : skip the generator update when no voxel of the batch (sample, per-sample)
        has a finite distance to an ROI, i.e. its cases have none: d = +inf, so M = 0 and the
        context labels do not depend on ω. A patch without ROI voxels from a case with an ROI is
        not skipped: its d is finite, and L_ROI's gradient through it is a real signal (false
        positives), as in the published code, which has no such skip.
    validate : let the fused ops validate their inputs (a pass over the labels each call).
    """

    num_classes: int
    margin: float = 30.0
    tau: float = 20.0
    fd_eps: float = 0.01
    mode: str = "batched"
    meta_grad: str = "fd"
    theta_pm: str = "sequential"
    amp: bool = False
    amp_dtype: torch.dtype = torch.bfloat16
    meta_amp: bool | None = None
    fd_tf32: bool = True
    recompute_generator: bool = False
    order: str = "reference"
    difference: str = "central"
    skip_without_roi: bool = True
    validate: bool = False

    @property
    def one_sided(self) -> bool:
        """Whether the fd meta-gradient takes the one-sided difference, G(θ) from the inner
        forward (``difference`` applies to ``meta_grad="fd"`` only)."""
        return self.difference == "one_sided" and self.meta_grad == "fd"

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) \
                or self.num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        for name, allowed in (("mode", META_MODES), ("meta_grad", META_GRADS),
                              ("theta_pm", THETA_PM), ("order", ORDERS),
                              ("difference", DIFFERENCES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.fd_eps > 0:
            raise ValueError(f"fd_eps must be > 0, got {self.fd_eps}")
        if self.order == "shared" and self.mode != "batched":
            raise ValueError("order: shared needs mode batched (per_sample takes one inner step "
                             "per sample, the reference's semantics)")
        if self.meta_amp is not None and not isinstance(self.meta_amp, bool):
            raise ValueError(f"meta_amp must be True, False or None, got {self.meta_amp!r}")
        if self.one_sided and self.amp:
            raise ValueError("difference: one_sided reuses G(θ) from the inner forward, which "
                             "runs under autocast here while the θ+ forward runs in fp32: the "
                             "difference would measure the precision change, not the "
                             "perturbation; use central, or turn amp off")


@dataclass
class MetaStepInfo:
    """What one generator update saw: ``skipped`` (no ROI, or ‖v‖ = 0 / not finite), the inner
    loss L_seg(θ, ŷ), L_ROI(θ*), ‖v‖ and ε (0 when not computed)."""

    skipped: bool
    l_seg: float = 0.0
    l_roi: float = 0.0
    v_norm: float = 0.0
    eps: float = 0.0


class MetaTensors(NamedTuple):
    """What :meth:`MetaStep.gradients` computed, as 0-dim tensors on the device, read by
    :meth:`info` (one synchronisation) when the caller chooses: ``usable`` (bool: the generator
    gradient is to be stepped; False where :class:`MetaStepInfo` says skipped), L_seg(θ, ŷ),
    L_ROI(θ*), ‖v‖ and ε."""

    usable: Tensor
    l_seg: Tensor
    l_roi: Tensor
    v_norm: Tensor
    eps: Tensor

    def info(self) -> MetaStepInfo:
        usable, l_seg, l_roi, v_norm, eps = torch.stack(
            [t.detach().to(torch.float64) for t in self]).tolist()
        if not usable:
            return MetaStepInfo(skipped=True, l_seg=l_seg, l_roi=l_roi, v_norm=v_norm)
        return MetaStepInfo(skipped=False, l_seg=l_seg, l_roi=l_roi, v_norm=v_norm, eps=eps)


@dataclass
class InnerPass:
    """The forward of f at θ on labels from the current ω (:meth:`MetaStep.shared_forward`).

    ``loss`` = L_seg(f_θ(x), ŷ); after the caller's backward of it (any gradient scaling undone,
    averaged over processes), f's ``.grad`` is ∇θ L_seg, the inner step's gradient.
    ``labels`` are ŷ per level, with their graph to ω when a meta update follows (else
    detached), ``leaves`` the detached copies the loss saw; with ``difference="one_sided"`` they
    require grad and the backward leaves G(θ) = ∂L_seg/∂ŷ in their ``.grad``."""

    labels: list[Tensor]
    leaves: list[Tensor]
    loss: Tensor


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """α for :meth:`MetaStep.step`: the learning rate of the optimizer's first parameter group."""
    return float(optimizer.param_groups[0]["lr"])


class UpdateCounter:
    """Meta update every ``period`` iterations: ``counter.tick()`` is True on iterations
    0, period, 2·period, ... (then call :meth:`MetaStep.step`; always call ``plain_step``)."""

    def __init__(self, period: int = 1) -> None:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        self.period = period
        self.iteration = 0

    def tick(self) -> bool:
        due = self.iteration % self.period == 0
        self.iteration += 1
        return due


class GradReducer(Protocol):
    """How a data-parallel run combines what the meta step computes on its local batch
    (:class:`colabx.train.distributed.ProcessGroupReducer` for torch.distributed)."""

    def mean_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor, in place, by its mean over the processes."""

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is True on any process."""


def _rows(z, b: int):
    """Row ``b`` of a batch's logits, a tensor or one per level, keeping the batch axis."""
    if isinstance(z, Tensor):
        return z[b:b + 1]
    return [t[b:b + 1] for t in z]


def _shifted(params: dict[str, Tensor], direction: list[Tensor], scale: Tensor | float
             ) -> dict[str, Tensor]:
    """``{name: p + scale · d}`` over all parameters in two multi-tensor ops (on a GPU two
    launches instead of two per parameter tensor); the same arithmetic, rounding for rounding,
    as ``p + scale * d`` per tensor. ``scale``: a Python number or a 0-dim tensor."""
    scaled = torch._foreach_mul(direction, scale)
    return dict(zip(params, torch._foreach_add(list(params.values()), scaled), strict=True))


def _as_list(z) -> list[Tensor]:
    return list(z) if isinstance(z, (list, tuple)) else [z]


class MetaStep:
    """CoLab meta step for a segmentation net ``f`` (:class:`colabx.models.UNet`, ``K = c + t − 1``
    outputs, with or without deep supervision) and a task generator ``g`` (``t`` outputs).

    ``step(x, y, d, lr, gen_optimizer)`` computes the generator gradient (into ``g``'s ``.grad``,
    overwritten) and, when an optimizer is given, steps it; ``plain_step(x, y, d, seg_optimizer)``
    is the ordinary update of θ. ``x [B, C, *S]``, ``y [B, *S]`` int labels, ``d [B, *S]``
    distances (+inf for items without ROI). ``f``'s parameters are never changed by ``step``.
    ``gradients`` and ``update_pass`` compute what ``step`` does without reading the device
    from the host, for CUDA graph capture (``colabx train --cuda-graphs``).

    With a ``reducer`` (data-parallel training, batched mode), each process passes its share of
    the global batch; the inner-step gradient and v are averaged over the processes, so θ*, ε and
    θ± are those of the global batch, and the generator gradient each process leaves in ``.grad``
    is its share: averaging it over the processes (the caller's job, like any parameter gradient)
    gives the single-process gradient of the global batch (equal local batch sizes).
    """

    def __init__(self, f: torch.nn.Module, g: torch.nn.Module, config: MetaConfig,
                 reducer: GradReducer | None = None) -> None:
        self.f, self.g, self.config = f, g, config
        self.reducer = reducer
        self.roi_channels = list(range(1, config.num_classes))

    # -- pieces ------------------------------------------------------------------------------
    def levels(self):
        return self.f.output_strides if getattr(self.f, "deep_supervision", False) else 1

    @property
    def _meta_amp(self) -> bool:
        """Whether the generator's and the L_ROI passes run under autocast."""
        c = self.config
        return c.amp if c.meta_amp is None else c.meta_amp

    def _autocast(self, x: Tensor, enabled: bool):
        if not enabled:
            return torch.autocast(x.device.type, enabled=False)
        return torch.autocast(x.device.type, dtype=self.config.amp_dtype)

    def labels(self, x: Tensor, y: Tensor, d: Tensor):
        """ŷ = context_labels(g(x), y, d) at f's output levels (differentiable to ω)."""
        c = self.config
        with self._autocast(x, self._meta_amp):
            o = self.g(x)
        return context_labels(o, y, d, c.num_classes, c.margin, c.tau, self.levels(),
                              validate=c.validate)

    def _loss(self, z, yhat) -> Tensor:
        return dice_ce_loss(z, yhat, validate=False)

    @contextlib.contextmanager
    def _fd_precision(self, x: Tensor) -> Iterator[None]:
        """The θ± forwards' context: no autograd graph, autocast off, TF32 only with
        ``fd_tf32``."""
        with torch.no_grad(), self._autocast(x, False), tf32_unless(self.config.fd_tf32):
            yield

    def _shifted_logits(self, params: dict, v: dict, scale: Tensor, x: Tensor) -> list[Tensor]:
        """f's logits at θ + scale·v, per level, in the θ± precision."""
        with self._fd_precision(x):
            return _as_list(functional_call(self.f, _shifted(params, list(v.values()), scale),
                                            (x,)))

    def _theta_pm_logits(self, params: dict, v: dict, eps: Tensor, x: Tensor) -> list[Tensor]:
        """Logits of f_θ+ and f_θ− concatenated along the batch: per level ``[2B, K, *S_l]``,
        the first B rows θ+, in the θ± precision."""
        if self.config.theta_pm == "grouped":
            with self._fd_precision(x):
                sets = [_shifted(params, list(v.values()), s) for s in (eps, -eps)]
                return grouped_unet_forward(self.f, sets, x)
        zp = self._shifted_logits(params, v, eps, x)
        zm = self._shifted_logits(params, v, -eps, x)
        return [torch.cat((a, b)) for a, b in zip(zp, zm, strict=True)]

    def _upstream_fd(self, params, v, eps, x, yhat_d: list[Tensor],
                     g0: list[Tensor] | None = None) -> list[Tensor]:
        """(G+ − G−)/(2ε) per level, G± = ∂L_seg(f_θ±(x), ŷ)/∂ŷ, from one fused loss call; or,
        given ``g0`` = G(θ) (one-sided difference), (G+ − G(θ))/ε from the θ+ forward alone.

        The loss of the concatenated batch ``[z+; z−]`` against ``[ŷ; ŷ]`` is (L+ + L−)/2 (CE and
        Dice are per-item sums/means), so its gradient w.r.t. the target rows is G±/2."""
        if g0 is not None:
            zp = self._shifted_logits(params, v, eps, x)
            leaf = [t.clone().requires_grad_() for t in yhat_d]
            with torch.enable_grad():
                gp = torch.autograd.grad(self._loss(zp, leaf), leaf)
            return [(a - b) / eps for a, b in zip(gp, g0, strict=True)]
        z = self._theta_pm_logits(params, v, eps, x)
        leaf = [torch.cat((t, t)).requires_grad_() for t in yhat_d]
        with torch.enable_grad():
            loss = self._loss(z, leaf)
            gl = torch.autograd.grad(loss, leaf)
        b = x.shape[0]
        return [(gr[:b] - gr[b:]) / eps for gr in gl]  # (G+/2 − G−/2)/ε = (G+ − G−)/(2ε)

    def _upstream_exact(self, params, v, x, yhat_d: list[Tensor]) -> list[Tensor]:
        """∂/∂ŷ ⟨v, ∇θ L_seg(f_θ(x), ŷ)⟩ by double backward through the twin loss
        (autocast off, the parameters' dtype)."""
        f = self.f
        leaf = [t.clone().requires_grad_() for t in yhat_d]
        p_req = {n: p.detach().requires_grad_() for n, p in params.items()}
        with torch.enable_grad(), self._autocast(x, False), no_tf32():
            z = _as_list(functional_call(f, p_req, (x,)))
            loss = _twin.dice_ce_loss(z, leaf)
            gth = torch.autograd.grad(loss, list(p_req.values()), create_graph=True)
            h = sum((gt * v[n]).sum() for gt, n in zip(gth, p_req, strict=True))
            return list(torch.autograd.grad(h, leaf))

    def _inner_precision(self, x: Tensor):
        """Autocast and TF32 of f's forward at θ: as configured, except that a one-sided
        difference needs it in the θ± precision (autocast off, TF32 only with ``fd_tf32``)."""
        c = self.config
        if c.one_sided:
            return contextlib.ExitStack(), tf32_unless(c.fd_tf32)
        return self._autocast(x, c.amp), contextlib.nullcontext()

    def _generator_grad(self, x: Tensor, y: Tensor, d: Tensor, lr: float | Tensor,
                        inner: InnerPass | None = None, logits=None, host_checks: bool = True
                        ) -> MetaTensors | None:
        """Steps 1-5 on one batch; the ω-gradient is ACCUMULATED into g's ``.grad``. With
        ``inner`` (order "shared"), steps 1-2 were the caller's: ŷ and G(θ) come from it and
        the inner gradient from f's ``.grad``. With ``logits`` (f's output at θ on ``x``, graph
        kept), step 2 backpropagates through them instead of running f, keeping their graph.

        ``host_checks``: the skip checks (no ROI; ‖v‖ zero or not finite) read the device and
        return early (None: skipped before L_ROI), saving the passes a skipped update does not
        need. Without them nothing is read back: the checks become ``usable``, and an unusable
        update's generator gradient is zero."""
        c = self.config
        if isinstance(lr, Tensor):
            lr = lr.to(d.device, next(self.f.parameters()).dtype)
        keep = None
        if host_checks:
            has_roi = bool(torch.isfinite(d).any())  # an ROI in the batch's cases, maybe not in it
            if self.reducer is not None:
                has_roi = self.reducer.any(has_roi)
            if c.skip_without_roi and not has_roi:
                return None
        elif c.skip_without_roi:
            keep = torch.isfinite(d).any()
        f = self.f
        names = [n for n, _ in f.named_parameters()]
        plist = [p for _, p in f.named_parameters()]
        params = {n: p.detach() for n, p in zip(names, plist, strict=True)}
        one_sided = c.one_sided
        if inner is not None:
            yhat = inner.labels
            yhat_d = [t.detach() for t in yhat]
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in plist]
            l_seg = inner.loss
            g0 = [leaf.grad for leaf in inner.leaves] if one_sided else None
            if one_sided and any(g is None for g in g0):
                raise ValueError("difference: one_sided needs G(θ): the InnerPass came from a "
                                 "shared_forward of another configuration, or its loss was not "
                                 "backpropagated")
        else:
            if c.recompute_generator:                                   # 1. ŷ
                with torch.no_grad():
                    yhat_d = _as_list(self.labels(x, y, d))
            else:  # graph to ω kept until step 5
                yhat = _as_list(self.labels(x, y, d))
                yhat_d = [t.detach() for t in yhat]
            single = not getattr(f, "deep_supervision", False)
            leaves = [t.clone().requires_grad_() for t in yhat_d] if one_sided else yhat_d
            autocast, tf32 = self._inner_precision(x)
            with torch.enable_grad():
                if logits is None:
                    with autocast, tf32:                                # 2. inner step
                        z = f(x)
                else:
                    z = logits
                l_seg = self._loss(z, leaves[0] if single else leaves)
                out = torch.autograd.grad(l_seg, plist + (leaves if one_sided else []),
                                          retain_graph=logits is not None)
            grads, g0 = list(out[:len(plist)]), (list(out[len(plist):]) if one_sided else None)
            if self.reducer is not None:
                self.reducer.mean_(grads)
        with torch.enable_grad():
            star = {n: t.requires_grad_() for n, t in _shifted(params, grads, -lr).items()}
            with self._autocast(x, self._meta_amp):                     # 3. v = ∇θ* L_ROI
                z_star = _as_list(functional_call(f, star, (x,)))[0]
            l_roi = roi_bce_loss(z_star, y, self.roi_channels, validate=c.validate)
            # the coarser deep-supervision heads do not reach L_ROI: their v is 0
            vl = torch.autograd.grad(l_roi, list(star.values()), allow_unused=True,
                                     materialize_grads=True)
        # detach: torch 2.4 materialises unused gradients as zeros that require grad, and the
        # reducer averages v in place
        v = {n: t.detach().to(params[n].dtype) for n, t in zip(names, vl, strict=True)}
        if self.reducer is not None:
            self.reducer.mean_(list(v.values()))
        acc = torch.float64 if plist[0].dtype == torch.float64 else torch.float32
        vnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(
            [t.to(acc) for t in v.values()])))
        eps = (c.fd_eps / vnorm).to(plist[0].dtype) if c.meta_grad == "fd" \
            else vnorm.new_zeros((), dtype=plist[0].dtype)
        # a subnormal ‖v‖ is finite and positive but overflows ε
        usable = (vnorm > 0) & torch.isfinite(vnorm) & torch.isfinite(eps)
        if keep is not None:
            usable = usable & keep
        out = MetaTensors(usable, l_seg.detach(), l_roi.detach(), vnorm, eps)
        if host_checks and not bool(usable):
            return out
        if c.meta_grad == "fd":                                         # 4. θ± = θ ± εv
            up = self._upstream_fd(params, v, eps, x, yhat_d, g0)
        else:
            up = self._upstream_exact(params, v, x, yhat_d)
        up = [(-lr) * u for u in up]                                    # 5. one backward
        if not host_checks:  # an unusable update's ε may be inf: no NaN into the gradient
            up = [torch.where(usable, u, 0.0) for u in up]
        if c.recompute_generator:
            with torch.enable_grad():
                yhat = _as_list(self.labels(x, y, d))
        torch.autograd.backward(yhat, up)
        return out

    # -- public -------------------------------------------------------------------------------
    def shared_forward(self, x: Tensor, y: Tensor, d: Tensor, meta_due: bool = True
                       ) -> InnerPass:
        """Order "shared", first half of an iteration: ŷ from the current ω (graph to ω kept
        when ``meta_due``), z = f(x) and L_seg(z, ŷ), for the caller to backpropagate (f's
        ``.grad`` becomes the gradient of both the inner step and the plain update); then
        :meth:`step` with ``inner=`` the returned pass when ``meta_due``, then the optimizer
        steps of θ and ω."""
        c = self.config
        keep = meta_due and not c.recompute_generator
        with torch.enable_grad() if keep else torch.no_grad():
            labels = _as_list(self.labels(x, y, d))
        one_sided = meta_due and c.one_sided
        leaves = [t.detach().requires_grad_(one_sided) for t in labels]
        autocast, tf32 = self._inner_precision(x)
        with autocast, tf32:
            z = self.f(x)
        single = not getattr(self.f, "deep_supervision", False)
        loss = self._loss(z, leaves[0] if single else leaves)
        return InnerPass(labels=labels, leaves=leaves, loss=loss)

    def step(self, x: Tensor, y: Tensor, d: Tensor, lr: float,
             gen_optimizer: torch.optim.Optimizer | None = None,
             inner: InnerPass | None = None,
             logits: Tensor | Sequence[Tensor] | None = None) -> list[MetaStepInfo]:
        """One meta update of ω at inner learning rate ``lr`` (α, the current LR of θ).

        Batched mode: one gradient on the batch, written to the generator's ``.grad`` (old
        gradients dropped), then ``gen_optimizer.step()`` if given and not skipped. Per-sample
        mode: for each sample the same, the optimizer stepping after each sample; without an
        optimizer the per-sample gradients are summed with ω fixed. Returns one
        :class:`MetaStepInfo` per generator update (one, or B in per-sample mode).

        ``inner`` (order "shared", batched): the pass of :meth:`shared_forward` on this batch,
        its loss already backpropagated so that f's ``.grad`` holds ∇θ L_seg (unscaled and,
        under data parallelism, averaged over the processes); θ is not yet stepped.

        ``logits`` (either order): f's output at θ on ``x`` (per level with deep supervision),
        computed by the caller with autograd on and in the inner step's precision; the inner
        steps backpropagate through it (per sample, through its rows) instead of running f
        again, and leave its graph for the caller's plain update, whose forward it also is (θ
        does not change in a meta step). Only for networks whose samples do not interact
        (no batch norm or dropout in training mode)."""
        if inner is not None and self.config.mode != "batched":
            raise ValueError("inner: a shared forward serves the batched mode only")
        if inner is not None and logits is not None:
            raise ValueError("inner and logits: give one forward of f, not both")
        gparams = list(self.g.parameters())
        if self.config.mode == "batched":
            items = [(x, y, d, logits)]
        else:
            items = [(x[b:b + 1], y[b:b + 1], d[b:b + 1],
                      None if logits is None else _rows(logits, b))
                     for b in range(x.shape[0])]
        for p in gparams:
            p.grad = None
        infos = []
        for xb, yb, db, zb in items:
            if gen_optimizer is not None:
                for p in gparams:
                    p.grad = None
            result = self._generator_grad(xb, yb, db, lr, inner, zb)
            info = MetaStepInfo(skipped=True) if result is None else result.info()
            infos.append(info)
            if gen_optimizer is not None and not info.skipped:
                gen_optimizer.step()
        return infos

    def gradients(self, x: Tensor, y: Tensor, d: Tensor, lr: Tensor,
                  inner: InnerPass | None = None) -> MetaTensors:
        """Batched mode: :meth:`step`'s generator gradient (into g's ``.grad``, old gradients
        dropped) without reading anything back to the host, so that ``colabx train
        --cuda-graphs`` can capture it: ``lr`` (α) is a 0-dim tensor on the device, and the
        skip checks come back as ``usable`` in the returned :class:`MetaTensors` (an unusable
        update leaves a zero gradient: do not step the optimizer then). It runs every pass
        even for an update that :meth:`step` would skip early. ``inner`` as in :meth:`step`.
        Not with a ``reducer`` (whose ROI check is a host decision across processes)."""
        if self.config.mode != "batched":
            raise ValueError("gradients: batched mode only (per_sample steps the optimizer "
                             "between samples)")
        if self.reducer is not None:
            raise ValueError("gradients: not with a reducer; use step")
        for p in self.g.parameters():
            p.grad = None
        return self._generator_grad(x, y, d, lr, inner, host_checks=False)

    def update_pass(self, x: Tensor, y: Tensor, d: Tensor, lr: Tensor
                    ) -> tuple[Tensor | None, MetaTensors]:
        """The device work of an iteration with a generator update, without host reads, for
        CUDA graph capture (batched mode; :meth:`gradients`' conditions). Order "shared":
        :meth:`shared_forward`, the backward of its loss into f's ``.grad`` (the plain update's
        gradient, no loss scaling) and :meth:`gradients` with it; returns ``(loss, tensors)``.
        Order "reference": :meth:`gradients` alone; returns ``(None, tensors)`` (the plain
        update, on labels from the updated ω, is the caller's). Like any backward, the shared
        order's adds to f's ``.grad``: the caller clears it first (``zero_grad``)."""
        if self.config.order == "shared":
            inner = self.shared_forward(x, y, d, meta_due=True)
            inner.loss.backward()
            return inner.loss, self.gradients(x, y, d, lr, inner=inner)
        return None, self.gradients(x, y, d, lr)

    def update_loss(self, x: Tensor, y: Tensor, d: Tensor) -> Tensor:
        """The ordinary update's loss L_seg(f(x), ŷ), ŷ from the current generator without
        gradient, f's forward under autocast per ``config.amp``: the loss of every iteration
        without a generator update, in either order. With ``config.validate`` off (the
        default) it does not synchronise with the host, so ``colabx train --cuda-graphs`` can
        capture it."""
        with torch.no_grad():
            yhat = self.labels(x, y, d)
        with self._autocast(x, self.config.amp):
            z = self.f(x)
        return self._loss(z, yhat)

    def plain_step(self, x: Tensor, y: Tensor, d: Tensor,
                   seg_optimizer: torch.optim.Optimizer) -> float:
        """The ordinary update of θ: :meth:`update_loss`, backward, ``seg_optimizer.step()``.
        Returns the loss."""
        seg_optimizer.zero_grad(set_to_none=True)
        loss = self.update_loss(x, y, d)
        loss.backward()
        seg_optimizer.step()
        return float(loss.detach())

    def __call__(self, *args, **kwargs):
        return self.step(*args, **kwargs)
