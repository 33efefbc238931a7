"""FastDivmod (csrc/common/fast_divmod.h): the CUDA kernels' index division by a per-launch
divisor, run through its host build against Python's integer division."""

import numpy as np
import pytest

from colabx import _backend


def _divmod(divisor: int, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = np.ascontiguousarray(n, dtype=np.int32)
    q, r = np.empty_like(n), np.empty_like(n)
    _backend.ext()._fast_divmod(divisor, n.ctypes.data, q.ctypes.data, r.ctypes.data, n.size)
    return q, r


def _numerators(divisor: int, rng: np.random.Generator) -> np.ndarray:
    """Every n up to a few multiples of d (capped), the values around the first and the last 40
    multiples of d below 2^31, and random ones over the whole range."""
    top = 2**31 - 1
    low = np.arange(min(4 * divisor + 64, 50_000))
    last = top // divisor
    k = np.unique(np.concatenate([np.arange(1, min(last, 40) + 1),
                                  np.arange(max(1, last - 40), last + 1)])).astype(np.int64)
    near = (k[:, None] * divisor + np.arange(-2, 3)[None, :]).ravel()
    near = near[(near >= 0) & (near <= top)]
    rand = rng.integers(0, top, size=20_000, endpoint=True)
    return np.concatenate([low, near, rand, [top]]).astype(np.int32)


DIVISORS = [*range(1, 300), 320, 511, 512, 513, 1000, 4096, 6561, 65535, 65536, 65537,
            1_000_003, 2**24 - 1, 2**24 + 1, 2**30 - 1, 2**30, 2**30 + 1, 2**31 - 2, 2**31 - 1]


@pytest.mark.parametrize("divisor", DIVISORS)
def test_quotient_and_remainder_match_integer_division(divisor):
    n = _numerators(divisor, np.random.default_rng(divisor))
    q, r = _divmod(divisor, n)
    wide = n.astype(np.int64)
    np.testing.assert_array_equal(q, wide // divisor)
    np.testing.assert_array_equal(r, wide % divisor)


def test_random_divisors():
    rng = np.random.default_rng(7)
    for divisor in rng.integers(1, 2**31 - 1, size=200):
        n = rng.integers(0, 2**31 - 1, size=5000, endpoint=True).astype(np.int32)
        q, _ = _divmod(int(divisor), n)
        np.testing.assert_array_equal(q, n.astype(np.int64) // int(divisor))


@pytest.mark.parametrize("divisor", [0, -3, 2**31])
def test_divisor_out_of_range_is_refused(divisor):
    with pytest.raises(ValueError, match="divisor must be in 1..2"):
        _divmod(divisor, np.zeros(1, dtype=np.int32))
