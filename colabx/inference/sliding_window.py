"""Sliding-window inference over a whole volume, as nnU-Net (and the CoLab reference test script).

The image is padded with zeros to at least the patch size, tiled with patches whose start
positions are spread evenly so that consecutive patches overlap by at least ``overlap`` of the
patch (nnU-Net's ``compute_steps_for_sliding_window``), and the patch logits are averaged with a
Gaussian importance map (sigma = patch / 8, peak at index ``patch // 2``, truncated at 4 sigma and
floored at its smallest positive value, exactly the map nnU-Net builds with
``scipy.ndimage.gaussian_filter``). Logits, not probabilities, are averaged, as nnU-Net v2 and the
reference do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from colabx.models.cpu_convolutions import onednn_convolutions

Model = nn.Module | Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]]

__all__ = ["MAX_WINDOWS", "gaussian_importance_map", "sliding_window_logits",
           "sliding_window_steps"]

#: Most windows one call evaluates (a bound on time and on the window list's memory).
MAX_WINDOWS = 200_000


def sliding_window_steps(image_size: Sequence[int], patch_size: Sequence[int],
                         overlap: float = 0.5) -> list[list[int]]:
    """Patch start positions per axis (nnU-Net's rule).

    Along an axis of size ``n >= p`` (patch ``p``), the target step is ``p * (1 - overlap)``;
    ``k = min(ceil((n - p) / step) + 1, n - p + 1)`` starts are spread evenly over
    ``[0, n - p]`` and rounded (``round(i * (n - p) / (k - 1))``, half to even). Every voxel is
    covered; consecutive patches overlap by at least ``overlap * p`` voxels (rounding aside).

    Raises:
        ValueError: sizes of different lengths, a patch larger than the image, or ``overlap``
            outside ``[0, 1)``.
    """
    if len(image_size) != len(patch_size):
        raise ValueError(f"image_size {tuple(image_size)} and patch_size {tuple(patch_size)} "
                         "must have the same number of axes")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    steps = []
    for n, p in zip(image_size, patch_size, strict=True):
        if p > n:
            raise ValueError(f"patch_size {tuple(patch_size)} is larger than the image "
                             f"{tuple(image_size)}; pad the image first")
        target = p * (1.0 - overlap)
        # never more starts than distinct positions: a step below one voxel repeats windows
        k = min(math.ceil((n - p) / target) + 1, n - p + 1)
        actual = (n - p) / (k - 1) if k > 1 else 0.0
        steps.append([int(round(actual * i)) for i in range(k)])
    return steps


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8, *,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """nnU-Net's Gaussian importance map, float32 ``[*patch_size]``, maximum 1, all values > 0.

    Equals ``gaussian_filter(delta at patch // 2, sigma = patch * sigma_scale)`` normalised to a
    maximum of 1 (scipy's kernel is truncated at ``int(4 * sigma + 0.5)`` voxels, where it is 0),
    with zeros replaced by the smallest positive value, as nnU-Net and the CoLab reference do. It is
    computed in closed form (separable) rather than by filtering.
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    axes = []
    for p in patch_size:
        sigma = p * sigma_scale
        x = torch.arange(p, dtype=torch.float64, device=device) - p // 2
        w = torch.exp(-0.5 * (x / sigma) ** 2)
        w[x.abs() > int(4.0 * sigma + 0.5)] = 0.0
        axes.append(w)
    g = axes[0]
    for w in axes[1:]:
        g = g[..., None] * w
    g = g.to(torch.float32)
    positive = g[g > 0]
    return torch.where(g > 0, g, positive.min())


def _check_patch(patch_size: Sequence[int], model: Model) -> tuple[int, ...]:
    try:
        patch = tuple(int(p) for p in patch_size)
    except TypeError as e:
        raise TypeError(f"patch_size must be a sequence of 2 or 3 ints, got {patch_size!r}") from e
    if len(patch) not in (2, 3) or any(p < 1 for p in patch):
        raise ValueError(f"patch_size must be 2 or 3 positive ints (one per spatial axis), got "
                         f"{patch}")
    div = getattr(model, "input_divisor", None)
    if div is not None and any(p % d for p, d in zip(patch, div, strict=True)):
        raise ValueError(f"patch_size {patch} must be a multiple of the model's input_divisor "
                         f"{tuple(div)} along every axis")
    return patch


def _model_device(model: Model, fallback: torch.device) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return fallback


@contextlib.contextmanager
def _eval_mode(model: Model) -> Iterator[None]:
    """Eval mode for the duration, the previous train/eval state of every submodule restored."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _forward(model: Model, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    ctx = (torch.autocast(x.device.type, dtype=amp) if amp is not None
           else contextlib.nullcontext())
    with ctx:
        out = model(x)
    if isinstance(out, (list, tuple)):  # deep supervision: finest (full-resolution) head first
        out = out[0]
    if out.dim() != x.dim() or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
        raise ValueError(f"the model turned a {tuple(x.shape)} tile into {tuple(out.shape)}; "
                         "sliding-window inference needs logits [B, K, *tile] at full resolution")
    return out.float()


def _mirrored_forward(model: Model, x: torch.Tensor, mirror_axes: tuple[int, ...],
                      amp: torch.dtype | None) -> torch.Tensor:
    """Mean of the logits over every combination of flips of ``mirror_axes`` (2^n forwards)."""
    out = _forward(model, x, amp)
    n = len(mirror_axes)
    for mask in range(1, 1 << n):
        dims = [2 + mirror_axes[i] for i in range(n) if mask >> i & 1]
        out = out + torch.flip(_forward(model, torch.flip(x, dims), amp), dims)
    return out / (1 << n) if n else out


def sliding_window_logits(
    model: Model,
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    gaussian: bool = True,
    mirror_axes: Sequence[int] = (),
    batch_size: int | None = None,
    amp: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Whole-image logits of a patch-based network by Gaussian-weighted sliding windows.

    Parameters
    ----------
    model : nn.Module or callable
        Maps ``[b, C, *patch_size]`` to logits ``[b, K, *patch_size]``, or to a list of them
        (deep supervision, finest first: only the first is used). Put in eval mode for the call
        (its previous mode is restored) and run under ``torch.no_grad``, CPU 3D convolutions
        on oneDNN (:func:`~colabx.models.cpu_convolutions.onednn_convolutions`).
    image : Tensor ``[C, *S]`` or ``[B, C, *S]``, 2D or 3D
        Normalised image, any real dtype, on any device: it is moved once to the model's device
        (the device of its first parameter; the image's own device for a parameterless model).
    patch_size : sequence of int
        Tile size per spatial axis (its length, 2 or 3, tells the spatial dimensionality and so
        whether ``image`` is batched); a multiple of ``model.input_divisor`` when the model has one.
    overlap : float
        Minimum fraction of a patch shared by neighbouring tiles, in ``[0, 1)`` (nnU-Net's
        ``tile_step_size = 1 - overlap``).
    gaussian : bool
        Weight each tile by :func:`gaussian_importance_map` (else uniformly).
    mirror_axes : sequence of int
        Spatial axes (0-based, array order) for mirror test-time augmentation: each tile is
        predicted under every combination of flips of these axes and the logits averaged.
    batch_size : int, optional
        Tiles per forward pass. Default: 2 on the CPU, where a batch-1 convolution costs a
        batch-2 one (see :func:`colabx.models.onednn_convolutions`; a 128 × 128 × 64 image in
        48 × 48 × 16 tiles with the CPU preset's U-Net: 4.1 s at 1, 2.4 s at 2, measured on
        2026-12-03 on this project's 2-core AVX-512 machine, commit 5c816d7), else 1. Tiles
        are independent, so it changes speed and memory only.
    amp : torch.dtype or None
        ``torch.float16`` / ``torch.bfloat16``: run the forwards under ``torch.autocast``.
        Accumulation is float32 either way.
    progress : bool
        Show a tqdm bar over the tiles.

    Returns
    -------
    Tensor
        float32 ``[B, K, *S]`` on the model's device (``B = 1`` for a ``[C, *S]`` image).

    Raises
    ------
    ValueError
        Bad shapes, patch size, overlap, mirror axes or batch size, or a model whose output is not
        ``[b, K, *tile]``.
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.is_complex():
        raise TypeError(f"image must be a real tensor, got {image.dtype}")
    patch = _check_patch(patch_size, model)
    nd = len(patch)
    if image.dim() - nd not in (1, 2):
        raise ValueError(f"image shape {tuple(image.shape)} does not fit the {nd}-axis patch_size "
                         f"{patch}: expected [C, *S] or [B, C, *S] with {nd} spatial axes")
    if image.dim() == nd + 1:
        image = image[None]
    axes = tuple(int(a) for a in mirror_axes)
    if any(not 0 <= a < nd for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"mirror_axes must be distinct spatial axes in [0, {nd}), got "
                         f"{tuple(mirror_axes)}")
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if amp is not None and amp not in (torch.float16, torch.bfloat16):
        raise ValueError(f"amp must be None, torch.float16 or torch.bfloat16, got {amp}")

    device = _model_device(model, image.device)
    if batch_size is None:
        batch_size = 2 if device.type == "cpu" else 1
    x = image.to(device=device, dtype=torch.float32, non_blocking=True)
    size = tuple(x.shape[2:])
    pad = [max(p - s, 0) for p, s in zip(patch, size, strict=True)]
    if any(pad):  # centred zero padding, as nnU-Net's pad_nd_image
        flat = [v for d in reversed(pad) for v in (d // 2, d - d // 2)]
        x = torch.nn.functional.pad(x, flat)
    padded = tuple(x.shape[2:])
    steps = sliding_window_steps(padded, patch, overlap)
    count = math.prod(len(s) for s in steps) * x.shape[0]
    if count > MAX_WINDOWS:
        raise ValueError(f"overlap: {overlap} needs {count} sliding windows for image "
                         f"{tuple(size)} and patch {patch} (at most {MAX_WINDOWS}); lower the "
                         "overlap")
    weight = (gaussian_importance_map(patch, device=device) if gaussian
              else torch.ones(patch, device=device))

    windows: list[tuple[slice, ...]] = [()]
    for s, p in zip(steps, patch, strict=True):
        windows = [(*w, slice(v, v + p)) for w in windows for v in s]
    tiles = [(b, w) for b in range(x.shape[0]) for w in windows]

    logits: torch.Tensor | None = None
    norm = torch.zeros(padded, dtype=torch.float32, device=device)
    for w in windows:
        norm[w] += weight

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tiles), desc="sliding window", unit="tile")
    try:
        with _eval_mode(model), torch.no_grad(), onednn_convolutions(device.type == "cpu"):
            for i in range(0, len(tiles), batch_size):
                chunk = tiles[i:i + batch_size]
                batch = torch.stack([x[(b, slice(None), *sl)] for b, sl in chunk])
                out = _mirrored_forward(model, batch, axes, amp)
                if logits is None:
                    logits = torch.zeros((x.shape[0], out.shape[1], *padded),
                                         dtype=torch.float32, device=device)
                out = out * weight  # not in place: the model may return a tensor it keeps
                for (b, sl), o in zip(chunk, out, strict=True):
                    logits[(b, slice(None), *sl)] += o
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    assert logits is not None
    logits /= norm
    crop = tuple(slice(d // 2, d // 2 + s) for d, s in zip(pad, size, strict=True))
    return logits[(slice(None), slice(None), *crop)].contiguous()
