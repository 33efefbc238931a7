"""Generic U-Net (2D/3D) in the configuration the reference CoLab code trains.

The reference (ZerojumpLine/CoLab, ``Unet.py::Generic_UNet``, a copy of nnU-Net v1's
``generic_UNet.py``) is built in its ``train.py`` with::

    Generic_UNet(in_ch, 30, num_classes + t - 1, len(pools), 2, 2, nn.Conv3d, nn.InstanceNorm3d,
                 {'eps': 1e-5, 'affine': True}, nn.Dropout3d, {'p': 0}, nn.LeakyReLU,
                 {'negative_slope': 1e-2}, deep_supervision, False, lambda x: x,
                 InitWeights_He(1e-2), pools, [[3, 3, 3]] * (len(pools) + 1),
                 False,   # upscale_logits
                 True,    # convolutional_pooling: downsampling by the stage's first conv, strided
                 True)    # convolutional_upsampling: transposed conv, kernel = stride = pool size

and the task generator is the same call with ``t`` outputs and ``deep_supervision=False``.
:class:`UNet` reproduces that network: same layers, same feature counts, same initialisation, and
the same parameter names and registration order (``state_dict`` keys of a reference checkpoint
load unchanged). Dropout (p = 0 in the reference) and ``upscale_logits`` are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IntOrSeq = int | Sequence[int]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TCONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}

#: nnU-Net v1 / CoLab ``Generic_UNet.MAX_NUM_FILTERS_3D`` and ``MAX_FILTERS_2D``.
DEFAULT_MAX_FEATURES = {2: 480, 3: 320}


def _per_axis(v: IntOrSeq, nd: int, name: str) -> tuple[int, ...]:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a sequence of {nd} ints, got bool")
    if isinstance(v, int):
        out = (v,) * nd
    elif isinstance(v, Sequence) and not isinstance(v, str):
        out = tuple(v)
        if len(out) != nd:
            raise ValueError(f"{name} must have one entry per spatial axis ({nd}), got {out}")
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in out):
            raise TypeError(f"{name} must hold ints, got {out}")
    else:
        raise TypeError(f"{name} must be an int or a sequence of {nd} ints, got {type(v).__name__}")
    if any(a < 1 for a in out):
        raise ValueError(f"{name} entries must be >= 1, got {out}")
    return out


def reference_pool_kernel_sizes(
    patch_size: Sequence[int], num_pool: int = 4
) -> list[tuple[int, int, int]]:
    """The reference ``train.py`` rule for 3D pooling kernels.

    ``[2, 2, 1]`` first, then ``[2, 2, 2]``, when ``patch_size[1] != patch_size[2]`` (an
    anisotropic patch, thin along the last axis); ``[2, 2, 2]`` at every stage otherwise. The
    kernels are per tensor axis, in the same order as ``patch_size``.
    """
    if len(patch_size) != 3:
        raise ValueError(f"patch_size must have 3 entries, got {tuple(patch_size)}")
    if num_pool < 1:
        raise ValueError(f"num_pool must be >= 1, got {num_pool}")
    if patch_size[1] != patch_size[2]:
        return [(2, 2, 1)] + [(2, 2, 2)] * (num_pool - 1)
    return [(2, 2, 2)] * num_pool


class ConvNormNonlin(nn.Module):
    """conv (bias) -> InstanceNorm(affine, eps 1e-5) -> LeakyReLU(0.01).

    Attribute names ``conv``, ``instnorm``, ``lrelu`` follow the reference's
    ``ConvDropoutNormNonlin``. Input ``[B, cin, *S]``, output ``[B, cout, *ceil(S / stride)]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int,
        kernel_size: tuple[int, ...],
        stride: tuple[int, ...],
        inplace: bool,
    ) -> None:
        super().__init__()
        self.conv = _CONV[spatial_dims](
            in_channels, out_channels, kernel_size, stride=stride,
            padding=tuple(k // 2 for k in kernel_size), bias=True,
        )
        self.instnorm = _NORM[spatial_dims](out_channels, eps=1e-5, affine=True)
        self.lrelu = nn.LeakyReLU(negative_slope=1e-2, inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lrelu(self.instnorm(self.conv(x)))


class StackedConvLayers(nn.Module):
    """``num_convs`` :class:`ConvNormNonlin` blocks in ``self.blocks``; only the first one has
    ``first_stride`` (the reference's ``StackedConvLayers``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_convs: int,
        spatial_dims: int,
        kernel_size: tuple[int, ...],
        inplace: bool,
        first_stride: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        one = (1,) * spatial_dims
        self.output_channels = out_channels
        self.blocks = nn.Sequential(*[
            ConvNormNonlin(
                in_channels if i == 0 else out_channels, out_channels, spatial_dims, kernel_size,
                first_stride if (i == 0 and first_stride is not None) else one, inplace,
            )
            for i in range(num_convs)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


#: Decoder upsampling of :class:`UNet`.
UPSAMPLING = ("transposed", "linear")


class LinearUpsampling(nn.Module):
    """Upsampling by ``scale`` per axis with (bi/tri)linear interpolation (``align_corners=False``),
    then a 1x1 conv from ``in_channels`` to ``out_channels`` (no bias): the same shapes as the
    transposed conv it replaces, every output voxel a smooth function of its neighbours'.

    Interpolation mixes voxels within a channel with weights summing to 1 and the 1x1 conv
    mixes channels within a voxel, so the two commute; when the conv narrows the channels
    (a U-Net decoder halves them) it runs first, at the coarse resolution, and the
    interpolation then moves half the channels: the same function (to float32 rounding) for
    less work (the CPU preset's task generator, batch 2 at 32x32x16: a forward 14.4 -> 12.0 ms,
    forward + backward 36.7 -> 33.0 ms on 2 threads of this project's AVX-512 machine,
    2026-12-03, commit bbf8750)."""

    def __init__(self, in_channels: int, out_channels: int, scale: tuple[int, ...],
                 spatial_dims: int) -> None:
        super().__init__()
        self.scale = tuple(int(v) for v in scale)
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.conv = _CONV[spatial_dims](in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [n * k for n, k in zip(x.shape[2:], self.scale, strict=True)]
        if self.conv.out_channels < self.conv.in_channels:
            return nn.functional.interpolate(self.conv(x), size=size, mode=self.mode,
                                             align_corners=False)
        return self.conv(nn.functional.interpolate(x, size=size, mode=self.mode,
                                                   align_corners=False))


class UNet(nn.Module):
    """Generic U-Net for 2D ``[B, C, H, W]`` or 3D ``[B, C, D, H, W]`` inputs.

    Encoder: ``num_pool`` stages of ``num_convs_per_stage`` conv-InstanceNorm-LeakyReLU blocks,
    then a bottleneck of the same; the first conv of every stage after the first (bottleneck
    included) downsamples with stride = that stage's pooling kernel (``convolutional_pooling``,
    as the reference runs), or, with ``convolutional_pooling=False``, a max-pool does. Features:
    ``base_features`` doubling per stage, capped at ``max_features``. Decoder: per level, a
    transposed conv (kernel = stride = the pooling kernel, no bias) to the skip's feature count,
    concatenation ``[upsampled, skip]``, then ``num_convs_per_stage`` blocks. Heads: 1x1 convs
    without bias. Init: kaiming normal (a = 0.01) on every (transposed) conv, zero biases;
    InstanceNorm weight 1, bias 0.

    Parameters
    ----------
    in_channels, out_channels : int
        Image channels and output logit channels (``K = c + t - 1`` for the segmentation net,
        ``t`` for the task generator).
    spatial_dims : int
        2 or 3.
    base_features : int
        Features of the first stage (30 in the reference).
    max_features : int, optional
        Feature cap; default 320 for 3D, 480 for 2D (nnU-Net v1's ``MAX_NUM_FILTERS_3D`` /
        ``MAX_FILTERS_2D``).
    num_pool : int, optional
        Number of downsamplings; default ``len(pool_kernel_sizes)``, else 4.
    pool_kernel_sizes : sequence, optional
        One kernel per downsampling, an int or one int per spatial axis (tensor axis order), e.g.
        ``[(2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]``; default 2 on every axis.
    conv_kernel_sizes : sequence, optional
        One odd kernel per stage (``num_pool + 1`` entries, bottleneck last); default 3.
        Padding is ``k // 2``.
    deep_supervision : bool
        Build one head per decoder level and return all of them (finest first). The flag may be
        switched off later (then only the full-resolution head is used); it cannot be switched on
        for a network built without it.
    num_convs_per_stage : int
        Conv blocks per stage, >= 2 (2 in the reference).
    convolutional_pooling : bool
        Strided first conv (True, the reference's setting) or max-pool (False).
    inplace_nonlin : bool
        In-place LeakyReLU (nnU-Net's default; the reference CoLab ``train.py`` passes False:
        the results are identical).
    upsampling : str
        ``"transposed"`` (the reference's transposed convs) or ``"linear"``
        (:class:`LinearUpsampling`: (bi/tri)linear interpolation, then a 1x1 conv), which does
        not imprint the stride-2 checkerboard of a transposed conv whose kernel equals its
        stride (:func:`task_generator`'s default, see there).

    Input spatial sizes must be divisible by :attr:`input_divisor` per axis (ValueError
    otherwise). With ``deep_supervision`` the forward returns a list of ``num_pool`` logit
    tensors, output ``k`` of shape ``[B, out_channels, *(S // output_strides[k])]``, finest first;
    else one ``[B, out_channels, *S]`` tensor. Note InstanceNorm needs more than one voxel per
    channel in training mode, so the bottleneck (``S // input_divisor``) must not be 1 voxel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 3,
        base_features: int = 30,
        max_features: int | None = None,
        num_pool: int | None = None,
        pool_kernel_sizes: Sequence[IntOrSeq] | None = None,
        conv_kernel_sizes: Sequence[IntOrSeq] | None = None,
        deep_supervision: bool = True,
        num_convs_per_stage: int = 2,
        convolutional_pooling: bool = True,
        inplace_nonlin: bool = True,
        upsampling: str = "transposed",
    ) -> None:
        super().__init__()
        if upsampling not in UPSAMPLING:
            raise ValueError(f"upsampling must be one of {UPSAMPLING}, got {upsampling!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("base_features", base_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if num_convs_per_stage < 2:
            raise ValueError(f"num_convs_per_stage must be >= 2, got {num_convs_per_stage}")
        nd = spatial_dims
        if pool_kernel_sizes is not None:
            if num_pool is not None and num_pool != len(pool_kernel_sizes):
                raise ValueError(
                    f"num_pool={num_pool} disagrees with len(pool_kernel_sizes)="
                    f"{len(pool_kernel_sizes)}"
                )
            num_pool = len(pool_kernel_sizes)
        elif num_pool is None:
            num_pool = 4
        if num_pool < 1:
            raise ValueError(f"num_pool must be >= 1, got {num_pool}")
        if pool_kernel_sizes is None:
            pool_kernel_sizes = [2] * num_pool
        pools = [_per_axis(p, nd, f"pool_kernel_sizes[{i}]")
                 for i, p in enumerate(pool_kernel_sizes)]
        if conv_kernel_sizes is None:
            conv_kernel_sizes = [3] * (num_pool + 1)
        if len(conv_kernel_sizes) != num_pool + 1:
            raise ValueError(
                f"conv_kernel_sizes needs num_pool + 1 = {num_pool + 1} entries, got "
                f"{len(conv_kernel_sizes)}"
            )
        kernels = [_per_axis(k, nd, f"conv_kernel_sizes[{i}]")
                   for i, k in enumerate(conv_kernel_sizes)]
        for i, k in enumerate(kernels):
            if any(a % 2 == 0 for a in k):
                raise ValueError(f"conv_kernel_sizes[{i}] must be odd, got {k}")
        if max_features is None:
            max_features = DEFAULT_MAX_FEATURES[nd]
        if max_features < 1:
            raise ValueError(f"max_features must be >= 1, got {max_features}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_dims = nd
        self.num_pool = num_pool
        self.pool_kernel_sizes: list[tuple[int, ...]] = pools
        self.conv_kernel_sizes: list[tuple[int, ...]] = kernels
        self.convolutional_pooling = convolutional_pooling
        self._built_with_ds = bool(deep_supervision)
        self.deep_supervision = bool(deep_supervision)

        # Features per stage (bottleneck last): base, then x2 capped (first stage not capped,
        # as the reference).
        feats = [base_features]
        for _ in range(num_pool):
            feats.append(min(feats[-1] * 2, max_features))
        self.stage_features: list[int] = feats

        n = num_convs_per_stage
        context: list[nn.Module] = []
        td: list[nn.Module] = []
        for d in range(num_pool):
            stride = pools[d - 1] if (d > 0 and convolutional_pooling) else None
            cin = in_channels if d == 0 else feats[d - 1]
            context.append(StackedConvLayers(cin, feats[d], n, nd, kernels[d], inplace_nonlin,
                                             stride))
            if not convolutional_pooling:
                td.append(_POOL[nd](pools[d]))
        stride = pools[-1] if convolutional_pooling else None
        context.append(nn.Sequential(
            StackedConvLayers(feats[num_pool - 1], feats[num_pool], n - 1, nd, kernels[num_pool],
                              inplace_nonlin, stride),
            StackedConvLayers(feats[num_pool], feats[num_pool], 1, nd, kernels[num_pool],
                              inplace_nonlin),
        ))

        localization: list[nn.Module] = []
        tu: list[nn.Module] = []
        below = feats[num_pool]
        for u in range(num_pool):
            lvl = num_pool - 1 - u  # encoder stage of the skip
            skip = feats[lvl]
            tu.append(_TCONV[nd](below, skip, pools[lvl], pools[lvl], bias=False)
                      if upsampling == "transposed" else
                      LinearUpsampling(below, skip, pools[lvl], nd))
            localization.append(nn.Sequential(
                StackedConvLayers(2 * skip, skip, n - 1, nd, kernels[lvl], inplace_nonlin),
                StackedConvLayers(skip, skip, 1, nd, kernels[lvl], inplace_nonlin),
            ))
            below = skip
        heads_at = range(num_pool) if deep_supervision else [num_pool - 1]
        seg = [_CONV[nd](feats[num_pool - 1 - u], out_channels, 1, bias=False) for u in heads_at]

        # Registration order of the reference (its state_dict / named_parameters order).
        self.conv_blocks_localization = nn.ModuleList(localization)
        self.conv_blocks_context = nn.ModuleList(context)
        self.td = nn.ModuleList(td)
        self.tu = nn.ModuleList(tu)
        self.seg_outputs = nn.ModuleList(seg)

        self.apply(_init_he)

    @property
    def input_divisor(self) -> tuple[int, ...]:
        """Per-axis product of the pooling kernels: every input spatial size must be a multiple."""
        out = [1] * self.spatial_dims
        for p in self.pool_kernel_sizes:
            out = [a * b for a, b in zip(out, p, strict=True)]
        return tuple(out)

    @property
    def output_strides(self) -> list[tuple[int, ...]]:
        """Per-axis stride of each output relative to the input, finest first: ``(1, ...)``,
        then the cumulative pooling products (``num_pool`` entries with deep supervision, one
        without). Pass it as ``levels=`` to :func:`colabx.context_labels` to get targets of the
        same shapes as the outputs."""
        strides = [(1,) * self.spatial_dims]
        if self.deep_supervision:
            for p in self.pool_kernel_sizes[: self.num_pool - 1]:
                strides.append(tuple(a * b for a, b in zip(strides[-1], p, strict=True)))
        return strides

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is ``[B, in_channels, *S]`` with each ``S`` a multiple of
        :attr:`input_divisor`."""
        nd = self.spatial_dims
        if x.dim() != nd + 2:
            raise ValueError(
                f"UNet(spatial_dims={nd}) expects a {nd + 2}-D input [B, C, *S], got shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels, got shape {tuple(x.shape)}"
            )
        size = tuple(int(s) for s in x.shape[2:])
        div = self.input_divisor
        bad = [i for i in range(nd) if size[i] % div[i]]
        if bad:
            i = bad[0]
            raise ValueError(
                f"input spatial size {size} is not divisible by the total pooling {div}: axis {i} "
                f"has size {size[i]}, which must be a multiple of {div[i]}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``x [B, in_channels, *S]`` -> logits ``[B, out_channels, *S]``, or with deep
        supervision a list of ``num_pool`` logits, entry ``k`` of spatial size
        ``S // output_strides[k]``, finest first."""
        self.check_input(x)
        ds = self.deep_supervision
        if ds and not self._built_with_ds:
            raise RuntimeError("deep_supervision was switched on for a UNet built without it")
        skips = []
        for d in range(self.num_pool):
            x = self.conv_blocks_context[d](x)
            skips.append(x)
            if not self.convolutional_pooling:
                x = self.td[d](x)
        x = self.conv_blocks_context[-1](x)
        outs = []
        for u in range(self.num_pool):
            x = self.tu[u](x)
            x = torch.cat((x, skips[-(u + 1)]), dim=1)
            x = self.conv_blocks_localization[u](x)
            if ds:
                outs.append(self.seg_outputs[u](x))
        if ds:
            return outs[::-1]
        return self.seg_outputs[-1](x)


def _init_he(module: nn.Module) -> None:
    """The reference's ``InitWeights_He(1e-2)``."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def task_generator(in_channels: int, t: int, spatial_dims: int = 3, **kwargs) -> UNet:
    """CoLab's task generator g_ω: the same U-Net with ``t`` output channels and no deep
    supervision (the reference's ``samplemodel``). ``kwargs`` go to :class:`UNet` (use the
    segmentation network's so both see the same patches); ``deep_supervision`` is not allowed.
    Output ``[B, t, *S]`` logits, the ``gen_logits`` of :func:`colabx.context_labels`.

    ``upsampling`` defaults to ``"transposed"`` as in the reference; the trainer passes
    ``"linear"`` (``--generator-upsampling``): the reference's transposed convs leave a
    stride-2 checkerboard in the generator's context maps that its few updates do not remove
    (measured on the phantom, see ``TrainConfig.generator_upsampling``)."""
    if "deep_supervision" in kwargs:
        raise TypeError("task_generator has no deep supervision; do not pass deep_supervision")
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"t must be an int >= 1, got {t!r}")
    return UNet(in_channels, t, spatial_dims, deep_supervision=False, **kwargs)
