"""rms_norm against the float64 reference, including the eps=None rule."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_output_close, assert_stats_close, make_input

DTYPES = [np.float16, np.float32, np.float64]
CASES = [
    ((6, 10), (10,)),
    ((4, 5, 8), (8,)),
    ((4, 5, 8), (5, 8)),
    ((3, 4, 5, 6), (6,)),
    ((3, 4, 5, 6), (4, 5, 6)),
    ((3, 4, 5, 6), (3, 4, 5, 6)),
    ((17,), (17,)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("shape,ns", CASES)
def test_reference(rng, shape, ns, eps, with_weight, dtype):
    x = make_input(rng, shape, dtype)
    w = (1 + 0.5 * rng.standard_normal(ns)).astype(dtype) if with_weight else None
    y, stats = rn.rms_norm(x, ns, w, eps, return_stats=True)
    want, rstd = ref.rms_norm(x, ns, w, eps)
    assert_output_close(y, want, dtype)
    assert isinstance(stats, rn.Stats)
    assert stats.mean is None, "rms_norm has no mean statistic"
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")
    assert stats.rstd.shape == x.shape[: x.ndim - len(ns)]
    ref.call_with_out(rn.rms_norm, x, ns, w, eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_eps_rule(rng, dtype):
    # Values ~1e-4: mean(x^2) ~1e-8 is comparable to float32 eps (1.19e-7), so the default eps
    # decides the result for float16/float32 input, while float64's eps (2.2e-16) does not.
    x = (1e-4 * (1 + rng.random((4, 16)))).astype(dtype)
    y = rn.rms_norm(x, (16,))
    eps = np.finfo(np.float64 if dtype == np.float64 else np.float32).eps
    want, _ = ref.rms_norm(x, (16,), eps=float(eps))
    assert_output_close(y, want, dtype)
    # And it is not the float64 eps / 1e-5 / 1e-6 for float32.
    if dtype != np.float64:
        other, _ = ref.rms_norm(x, (16,), eps=float(np.finfo(np.float64).eps))
        assert not np.allclose(y.astype(np.float64), other, rtol=1e-2)


def test_rms_does_not_subtract_the_mean():
    x = np.array([[3.0, 4.0, 3.0, 4.0]], np.float64)
    y = rn.rms_norm(x, (4,), eps=0.0)
    np.testing.assert_allclose(y, x / np.sqrt(12.5), rtol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_row_gives_zero(dtype):
    x = np.zeros((3, 7), dtype)
    y = rn.rms_norm(x, (7,))
    np.testing.assert_array_equal(y, 0)


def test_mixed_parameter_dtypes(rng):
    x = make_input(rng, (4, 6), np.float16)
    w64 = 1 + 0.1 * rng.standard_normal(6)
    y = rn.rms_norm(x, (6,), w64)
    assert y.dtype == np.float16
    want, _ = ref.rms_norm(x, (6,), w64)
    assert_output_close(y, want, np.float16)


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    tail=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_shapes(lead, tail, dtype, seed):
    rng = np.random.default_rng(seed)
    x = make_input(rng, tuple(lead) + tuple(tail), dtype)
    y = rn.rms_norm(x, tuple(tail))
    want, _ = ref.rms_norm(x, tuple(tail))
    assert_output_close(y, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ns", [((3001, 67), (67,)), ((7, 33, 1031), (33, 1031)),
                                      ((2, 300001), (300001,))])
def test_large_parallel_path(rng, shape, ns, dtype):
    x = make_input(rng, shape, dtype)
    w = (1 + 0.5 * rng.standard_normal(ns)).astype(np.float32)
    y, stats = rn.rms_norm(x, ns, w, return_stats=True)
    want, rstd = ref.rms_norm(x, ns, w)
    assert_output_close(y, want, dtype)
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")
