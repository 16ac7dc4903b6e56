"""layer_norm against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_output_close, assert_stats_close, make_input

DTYPES = [np.float16, np.float32, np.float64]
CASES = [  # (x shape, normalized_shape)
    ((6, 10), (10,)),
    ((4, 5, 8), (8,)),
    ((4, 5, 8), (5, 8)),
    ((3, 4, 5, 6), (6,)),
    ((3, 4, 5, 6), (5, 6)),
    ((3, 4, 5, 6), (4, 5, 6)),
    ((3, 4, 5, 6), (3, 4, 5, 6)),
    ((17,), (17,)),
]


def _scale(x, mean, rstd, w, b, k):
    lead = x.shape[: x.ndim - k] + (1,) * k
    t = np.abs((ref.f64(x) - mean.reshape(lead)) * rstd.reshape(lead))
    if w is not None:
        t = t * np.abs(ref.f64(w))
    if b is not None:
        t = t + np.abs(ref.f64(b))
    return t + 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["none", "weight", "bias", "both"])
@pytest.mark.parametrize("shape,ns", CASES)
def test_reference(rng, shape, ns, affine, dtype):
    x = make_input(rng, shape, dtype)
    w = (1 + 0.5 * rng.standard_normal(ns)).astype(dtype) if affine in ("weight", "both") else None
    b = (0.5 * rng.standard_normal(ns)).astype(dtype) if affine in ("bias", "both") else None
    y, stats = rn.layer_norm(x, ns, w, b, 1e-3, return_stats=True)
    want, mean, rstd = ref.layer_norm(x, ns, w, b, 1e-3)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, len(ns)))
    assert isinstance(stats, rn.Stats)
    assert_stats_close(stats.mean, mean, dtype, "mean")
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")
    ref.call_with_out(rn.layer_norm, x, ns, w, b, 1e-3)


@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.5, 10.0])
def test_eps_enters_variance(rng, eps):
    x = make_input(rng, (5, 12), np.float64)
    y, stats = rn.layer_norm(x, (12,), eps=eps, return_stats=True)
    want, _, rstd = ref.layer_norm(x, (12,), eps=eps)
    assert_output_close(y, want, np.float64)
    np.testing.assert_allclose(stats.rstd, rstd, rtol=1e-13)


def test_default_eps_is_1e_5(rng):
    x = (0.01 * rng.standard_normal((4, 8))).astype(np.float64)  # var ~1e-4: eps matters
    want, *_ = ref.layer_norm(x, (8,), eps=1e-5)
    assert_output_close(rn.layer_norm(x, (8,)), want, np.float64)


def test_normalized_shape_as_list_or_tuple(rng):
    x = make_input(rng, (3, 4, 5), np.float32)
    a = rn.layer_norm(x, (4, 5))
    b = rn.layer_norm(x, [4, 5])
    ref.assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_element_gives_bias_exactly(rng, dtype):
    # HOSTILE 5: normalized_shape (1,) -> x - mean = 0 exactly, y = bias exactly.
    x = make_input(rng, (6, 1), dtype)
    w = np.array([2.5], dtype)
    b = np.array([0.375], dtype)
    y = rn.layer_norm(x, (1,), w, b)
    np.testing.assert_array_equal(y, np.full((6, 1), 0.375, dtype))
    y0 = rn.layer_norm(x, (1,))
    np.testing.assert_array_equal(y0, np.zeros((6, 1), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_dtype_and_shape(rng, dtype):
    x = make_input(rng, (2, 3, 4, 5), dtype)
    for ns in [(5,), (4, 5), (3, 4, 5), (2, 3, 4, 5)]:
        _, stats = rn.layer_norm(x, ns, return_stats=True)
        lead = x.shape[: 4 - len(ns)]
        assert stats.mean.shape == lead and stats.rstd.shape == lead
        assert stats.mean.dtype == ref.stats_dtype(dtype)
        assert stats.rstd.dtype == ref.stats_dtype(dtype)


def test_mixed_parameter_dtypes(rng):
    x = make_input(rng, (4, 6), np.float32)
    w64 = 1 + 0.1 * rng.standard_normal(6)  # not representable in float32: read exactly
    b16 = (0.5 * rng.standard_normal(6)).astype(np.float16)
    y = rn.layer_norm(x, (6,), w64, b16)
    assert y.dtype == np.float32
    want, *_ = ref.layer_norm(x, (6,), w64, b16)
    assert_output_close(y, want, np.float32)


@given(
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    tail=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_shapes(lead, tail, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + tuple(tail)
    x = make_input(rng, shape, dtype)
    w = (1 + 0.5 * rng.standard_normal(tail)).astype(np.float32)
    y = rn.layer_norm(x, tuple(tail), w, None, 0.01)
    want, mean, rstd = ref.layer_norm(x, tuple(tail), w, None, 0.01)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, None, len(tail)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ns", [((3001, 67), (67,)), ((7, 33, 1031), (33, 1031)),
                                      ((2, 300001), (300001,))])
def test_large_parallel_path(rng, shape, ns, dtype):
    x = make_input(rng, shape, dtype)
    w = (1 + 0.5 * rng.standard_normal(ns)).astype(np.float32)
    b = (0.5 * rng.standard_normal(ns)).astype(np.float32)
    y, stats = rn.layer_norm(x, ns, w, b, return_stats=True)
    want, mean, rstd = ref.layer_norm(x, ns, w, b)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, len(ns)))
    assert_stats_close(stats.mean, mean, dtype, "mean")
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")
