"""Post-processing: the largest connected component against an independent flood fill, on random
2D/3D label maps (ties included), and through predict/evaluate."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest

from colabx.inference.postprocess import postprocess


def _components(mask: np.ndarray) -> list[list[tuple[int, ...]]]:
    """Connected components (full connectivity) by breadth-first search, in raster order of
    their first voxel."""
    seen = np.zeros(mask.shape, bool)
    steps = [s for s in itertools.product((-1, 0, 1), repeat=mask.ndim) if any(s)]
    out = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        comp, queue = [], deque([start])
        seen[start] = True
        while queue:
            v = queue.popleft()
            comp.append(v)
            for s in steps:
                w = tuple(a + b for a, b in zip(v, s, strict=True))
                if all(0 <= a < n for a, n in zip(w, mask.shape, strict=True)) and mask[w] \
                        and not seen[w]:
                    seen[w] = True
                    queue.append(w)
        out.append(comp)
    return out


def _keep_largest(mask: np.ndarray) -> np.ndarray:
    comps = _components(mask)
    keep = np.zeros(mask.shape, bool)
    if comps:
        best = max(comps, key=len)  # max keeps the first of equal sizes
        keep[tuple(np.array(best).T)] = True
    return keep


@pytest.mark.parametrize("shape", [(23, 17), (9, 11, 7), (6, 5, 13)], ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_lcc_equals_a_flood_fill(shape, seed):
    rng = np.random.default_rng(seed)
    label = (rng.random(shape) < 0.18) * rng.integers(1, 4, size=shape)
    label = label.astype(np.int16)
    union = _keep_largest(label > 0)
    want = np.where(union, label, 0)
    got = postprocess(label, "lcc")
    assert got.dtype == label.dtype and np.array_equal(got, want)
    per_class = np.zeros_like(label)
    for j in (1, 2, 3):
        keep = _keep_largest(label == j)
        per_class[keep] = j
    assert np.array_equal(postprocess(label, "lcc_per_class"), per_class)
    assert np.array_equal(postprocess(label, "none"), label)


def test_ties_keep_the_first_component_and_empty_maps_stay_empty():
    label = np.zeros((5, 9), np.int64)
    label[0:2, 0:2] = 1
    label[3:5, 7:9] = 2
    assert np.array_equal(postprocess(label, "lcc"), np.where(label == 1, 1, 0))
    assert not postprocess(np.zeros((4, 4, 4), np.int8), "lcc").any()
    with pytest.raises(ValueError, match="postprocess: must be one of none, lcc"):
        postprocess(label, "largest")
    with pytest.raises(ValueError, match="integer label map"):
        postprocess(label.astype(float), "lcc")
