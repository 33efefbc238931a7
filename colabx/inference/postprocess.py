"""Component-based post-processing of label maps (the paper's supplement; nnU-Net's variant).

* ``lcc``: keep only the largest connected component of the union of the ROI classes (every
  voxel with label > 0); the ROI voxels outside it become background. Classes inside the kept
  component are unchanged.
* ``lcc_per_class``: for every ROI class separately, keep its largest connected component (what
  nnU-Net's ``remove_all_but_largest_component`` does per class).

Connectivity is full (8 neighbours in 2D, 26 in 3D), as nnU-Net's; of several largest components
of equal size the first in C (raster) order of its first voxel is kept.
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage as ndi

__all__ = ["POSTPROCESSING", "postprocess"]

POSTPROCESSING = ("none", "lcc", "lcc_per_class")


def _largest(mask: np.ndarray) -> np.ndarray:
    structure = ndi.generate_binary_structure(mask.ndim, mask.ndim)
    comp, n = ndi.label(mask, structure=structure)
    if n <= 1:
        return mask
    sizes = np.bincount(comp.ravel())[1:]
    return comp == int(np.argmax(sizes)) + 1


def postprocess(label: np.ndarray, method: str = "lcc") -> np.ndarray:
    """``label`` (integer ``[*S]``, 2D or 3D, 0 = background) after ``method`` (one of
    :data:`POSTPROCESSING`); a new array of the same dtype.

    Raises:
        ValueError: unknown method, or not a 2D/3D integer map.
    """
    if method not in POSTPROCESSING:
        raise ValueError(f"postprocess: must be one of {', '.join(POSTPROCESSING)}, got "
                         f"{method!r}")
    label = np.asarray(label)
    if label.ndim not in (2, 3) or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"postprocess: expected a 2D or 3D integer label map, got "
                         f"{label.dtype} {label.shape}")
    out = label.copy()
    if method == "lcc":
        fg = label > 0
        out[fg & ~_largest(fg)] = 0
    elif method == "lcc_per_class":
        for j in np.unique(label):
            if j > 0:
                m = label == j
                out[m & ~_largest(m)] = 0
    return out
