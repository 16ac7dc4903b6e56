"""instance_norm against the float64 reference, with and without running statistics."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn
from reference import SPATIAL_SHAPES, assert_output_close, assert_stats_close, make_input

DTYPES = [np.float16, np.float32, np.float64]


def _data(rng, rank, axis, dtype):
    x = make_input(rng, SPATIAL_SHAPES[rank], dtype)
    return ref.channels_last(x) if axis == -1 else x


def _scale(x, mean, rstd, w, b, axis):
    xm = np.moveaxis(ref.f64(x), axis % x.ndim, 1)
    n, c = xm.shape[:2]
    bs = (n, c) + (1,) * (xm.ndim - 2)
    t = np.abs((xm - mean.reshape(bs)) * rstd.reshape(bs))
    cs = (1, c) + (1,) * (xm.ndim - 2)
    if w is not None:
        t = t * np.abs(ref.f64(w)).reshape(cs)
    if b is not None:
        t = t + np.abs(ref.f64(b)).reshape(cs)
    return np.moveaxis(t, 1, axis % x.ndim) + 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("rank", [3, 4, 5])
def test_input_stats(rng, rank, axis, affine, dtype):
    x = _data(rng, rank, axis, dtype)
    c = x.shape[axis]
    w = (1 + 0.5 * rng.standard_normal(c)).astype(dtype) if affine else None
    b = (0.5 * rng.standard_normal(c)).astype(dtype) if affine else None
    y, stats = rn.instance_norm(x, None, None, w, b, eps=0.01, axis=axis, return_stats=True)
    want, mean, rstd, _, _ = ref.instance_norm(x, None, None, w, b, eps=0.01, axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, axis))
    assert isinstance(stats, rn.Stats)
    assert stats.mean.shape == (x.shape[0], c)
    assert_stats_close(stats.mean, mean, dtype, "mean")
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")
    ref.call_with_out(rn.instance_norm, x, None, None, w, b, eps=0.01, axis=axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("rank", [3, 4, 5])
def test_running_stats_are_updated(rng, rank, axis, dtype):
    x = _data(rng, rank, axis, dtype)
    c = x.shape[axis]
    rm = (0.1 * rng.standard_normal(c)).astype(np.float32)
    rv = (0.5 + rng.random(c)).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    y = rn.instance_norm(x, rm, rv, momentum=0.25, axis=axis)
    want, mean, rstd, new_rm, new_rv = ref.instance_norm(x, rm0, rv0, momentum=0.25, axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, None, None, axis))
    # As PyTorch: batch average of per-instance means and unbiased variances.
    np.testing.assert_allclose(rm, new_rm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, new_rv, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_use_running_stats(rng, axis, dtype):
    x = _data(rng, 4, axis, dtype)
    c = x.shape[axis]
    w = (1 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    b = (0.5 * rng.standard_normal(c)).astype(np.float32)
    rm = (0.1 * rng.standard_normal(c)).astype(np.float32)
    rv = (0.5 + rng.random(c)).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    y = ref.call_with_out(rn.instance_norm, x, rm, rv, w, b, use_input_stats=False, eps=0.1,
                          axis=axis)
    want, mean, rstd, _, _ = ref.instance_norm(x, rm, rv, w, b, use_input_stats=False, eps=0.1,
                                               axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, axis))
    ref.assert_bitwise_equal(rm, rm0)
    ref.assert_bitwise_equal(rv, rv0)


def test_defaults_and_positional_order(rng):
    x = make_input(rng, (2, 3, 7), np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    w = np.array([1.0, 2.0, 0.5])
    b = np.array([0.0, -1.0, 1.0])
    # instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    y = rn.instance_norm(x, rm, rv, w, b, True, 0.5, 0.01)
    want, _, _, new_rm, new_rv = ref.instance_norm(x, np.zeros(3), np.ones(3), w, b, True, 0.5,
                                                   0.01)
    assert_output_close(y, want, np.float64)
    np.testing.assert_allclose(rm, new_rm, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(rv, new_rv, rtol=1e-13)
    y = rn.instance_norm(x)
    want, *_ = ref.instance_norm(x, eps=1e-5)
    assert_output_close(y, want, np.float64)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 3, 1), (5, 3, 1, 1, 1)])
def test_one_spatial_element_with_input_stats(shape):
    # HOSTILE 3: whatever the batch size.
    x = np.ones(shape, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(rn.RsnormError, match="Expected more than 1 spatial element"):
        rn.instance_norm(x)
    with pytest.raises(rn.RsnormError, match="Expected more than 1 spatial element"):
        rn.instance_norm(x, rm, rv)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    # With running statistics instead of input statistics it is well defined.
    y = rn.instance_norm(x, rm, rv, use_input_stats=False)
    np.testing.assert_allclose(y, 1 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_stats_dtype(rng):
    for dtype in DTYPES:
        x = make_input(rng, (2, 3, 4), dtype)
        _, stats = rn.instance_norm(x, return_stats=True)
        assert stats.mean.dtype == ref.stats_dtype(dtype)
        assert stats.rstd.dtype == ref.stats_dtype(dtype)
        assert stats.rstd.shape == (2, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_large_parallel_path(rng, axis, dtype):
    x = make_input(rng, (5, 37, 29, 31), dtype)
    if axis == -1:
        x = ref.channels_last(x)
    rm = np.zeros(37, np.float64)
    rv = np.ones(37, np.float64)
    y, stats = rn.instance_norm(x, rm, rv, axis=axis, return_stats=True)
    want, mean, rstd, new_rm, new_rv = ref.instance_norm(x, np.zeros(37), np.ones(37), axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, None, None, axis))
    assert_stats_close(stats.mean, mean, dtype, "mean")
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")
    np.testing.assert_allclose(rm, new_rm, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv, new_rv, rtol=1e-12)
