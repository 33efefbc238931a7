"""Forward of G copies of a :class:`colabx.models.UNet` with different parameters as ONE network
with grouped convolutions (the meta step's θ+/θ− passes, ``theta_pm="grouped"``).

The G parameter sets are concatenated along the output-channel axis of every layer; every
convolution runs with ``groups=G``, InstanceNorm and LeakyReLU act per channel anyway, and the
decoder's skip concatenation is done per group. Same math as G separate forwards of the module
(InstanceNorm without running statistics: train and eval mode are the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV = (nn.Conv2d, nn.Conv3d)
_TCONV = (nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.InstanceNorm2d, nn.InstanceNorm3d)
_POOL = (nn.MaxPool2d, nn.MaxPool3d)


class _Sets:
    def __init__(self, sets: list[dict[str, Tensor]]):
        self.sets = sets
        self.g = len(sets)

    def cat(self, name: str) -> Tensor:
        return torch.cat([s[name] for s in self.sets], dim=0)


def _conv(m, h, ps: _Sets, name: str) -> Tensor:
    nd = h.dim() - 2
    w = ps.cat(name + ".weight")
    b = ps.cat(name + ".bias") if m.bias is not None else None
    fn = F.conv2d if nd == 2 else F.conv3d
    return fn(h, w, b, m.stride, m.padding, m.dilation, ps.g)


def _tconv(m, h, ps: _Sets, name: str) -> Tensor:
    nd = h.dim() - 2
    w = ps.cat(name + ".weight")
    b = ps.cat(name + ".bias") if m.bias is not None else None
    fn = F.conv_transpose2d if nd == 2 else F.conv_transpose3d
    return fn(h, w, b, m.stride, m.padding, m.output_padding, ps.g, m.dilation)


def _apply(m: nn.Module, h: Tensor, ps: _Sets, name: str) -> Tensor:
    """Run module ``m`` (qualified name ``name``) on the grouped activations ``h``."""
    if isinstance(m, _CONV):
        return _conv(m, h, ps, name)
    if isinstance(m, _TCONV):
        return _tconv(m, h, ps, name)
    if isinstance(m, _NORM):
        if m.track_running_stats:
            raise NotImplementedError("grouped forward: InstanceNorm with running stats")
        w = ps.cat(name + ".weight") if m.affine else None
        b = ps.cat(name + ".bias") if m.affine else None
        return F.instance_norm(h, weight=w, bias=b, eps=m.eps)
    if isinstance(m, nn.LeakyReLU):
        return F.leaky_relu(h, m.negative_slope)
    if isinstance(m, _POOL):
        return m(h)
    children = list(m.named_children())
    if not children:
        raise NotImplementedError(f"grouped forward: unsupported module {type(m).__name__}")
    for cname, child in children:  # Sequential, StackedConvLayers, ConvNormNonlin: in order
        h = _apply(child, h, ps, f"{name}.{cname}" if name else cname)
    return h


def _group_cat(a: Tensor, b: Tensor, g: int) -> Tensor:
    """Per-group channel concatenation of ``[B, g*Ca, *S]`` and ``[B, g*Cb, *S]``."""
    bsz, sp = a.shape[0], a.shape[2:]
    a = a.reshape(bsz, g, -1, *sp)
    b = b.reshape(bsz, g, -1, *sp)
    return torch.cat((a, b), dim=2).reshape(bsz, -1, *sp)


def _ungroup(z: Tensor, g: int) -> Tensor:
    """``[B, g*K, *S]`` -> ``[g*B, K, *S]`` (set-major)."""
    bsz, sp = z.shape[0], z.shape[2:]
    return z.reshape(bsz, g, -1, *sp).transpose(0, 1).reshape(g * bsz, -1, *sp)


def grouped_unet_forward(f, sets: list[dict[str, Tensor]], x: Tensor) -> list[Tensor]:
    """Logits of ``f`` under each parameter set, concatenated along the batch, set-major: per
    output level ``[G·B, K, *S_l]`` (a one-element list without deep supervision)."""
    ps = _Sets(sets)
    g = ps.g
    f.check_input(x)
    h = x.repeat(1, g, *([1] * (x.dim() - 2)))
    skips = []
    for d in range(f.num_pool):
        h = _apply(f.conv_blocks_context[d], h, ps, f"conv_blocks_context.{d}")
        skips.append(h)
        if not f.convolutional_pooling:
            h = f.td[d](h)
    h = _apply(f.conv_blocks_context[-1], h, ps, f"conv_blocks_context.{f.num_pool}")
    outs = []
    ds = f.deep_supervision
    for u in range(f.num_pool):
        h = _tconv(f.tu[u], h, ps, f"tu.{u}")
        h = _group_cat(h, skips[-(u + 1)], g)
        h = _apply(f.conv_blocks_localization[u], h, ps, f"conv_blocks_localization.{u}")
        if ds:
            outs.append(_ungroup(_conv(f.seg_outputs[u], h, ps, f"seg_outputs.{u}"), g))
    if ds:
        return outs[::-1]
    last = len(f.seg_outputs) - 1
    return [_ungroup(_conv(f.seg_outputs[last], h, ps, f"seg_outputs.{last}"), g)]
