"""group_norm against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn
from reference import SPATIAL_SHAPES, assert_output_close, assert_stats_close, make_input

DTYPES = [np.float16, np.float32, np.float64]


def _data(rng, shape, axis, dtype):
    x = make_input(rng, shape, dtype)
    return ref.channels_last(x) if axis == -1 else x


def _scale(x, mean, rstd, w, b, g, axis):
    xm = np.moveaxis(ref.f64(x), axis % x.ndim, 1)
    n, c = xm.shape[:2]
    t = np.abs((xm.reshape(n, g, -1) - mean[:, :, None]) * rstd[:, :, None]).reshape(xm.shape)
    cs = (1, c) + (1,) * (xm.ndim - 2)
    if w is not None:
        t = t * np.abs(ref.f64(w)).reshape(cs)
    if b is not None:
        t = t + np.abs(ref.f64(b)).reshape(cs)
    return np.moveaxis(t, 1, axis % x.ndim) + 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_reference(rng, rank, axis, groups, affine, dtype):
    shape = (5, 6) if rank == 2 else SPATIAL_SHAPES[rank]
    x = _data(rng, shape, axis, dtype)
    w = (1 + 0.5 * rng.standard_normal(6)).astype(dtype) if affine else None
    b = (0.5 * rng.standard_normal(6)).astype(dtype) if affine else None
    if rank == 2 and groups == 6:
        # One value per group: x - mean == 0 exactly, so y is the bias exactly (HOSTILE 4).
        y = rn.group_norm(x, groups, w, b, axis=axis)
        want = np.broadcast_to(b if affine else np.zeros(6, dtype), x.shape)
        np.testing.assert_array_equal(y, want)
        return
    y, stats = rn.group_norm(x, groups, w, b, 0.01, axis=axis, return_stats=True)
    want, mean, rstd = ref.group_norm(x, groups, w, b, 0.01, axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, groups, axis))
    assert isinstance(stats, rn.Stats)
    assert stats.mean.shape == (x.shape[0], groups)
    assert_stats_close(stats.mean, mean, dtype, "mean")
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")
    ref.call_with_out(rn.group_norm, x, groups, w, b, 0.01, axis=axis)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_group_is_layer_norm_over_all_but_batch(rng, dtype):
    x = make_input(rng, (3, 4, 5, 2), dtype)
    y, stats = rn.group_norm(x, 1, return_stats=True)
    want, mean, rstd = ref.layer_norm(x, (4, 5, 2))
    assert_output_close(y, want, dtype)
    assert_stats_close(stats.mean, mean[:, None], dtype)
    assert_stats_close(stats.rstd, rstd[:, None], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_groups_equal_channels_is_instance_norm(rng, dtype):
    x = make_input(rng, (3, 4, 5, 2), dtype)
    y = rn.group_norm(x, 4)
    want, *_ = ref.instance_norm(x)
    assert_output_close(y, want, dtype)


def test_groups_are_contiguous_channel_blocks():
    # Channels 0,1 form group 0 and 2,3 group 1 (not interleaved 0,2 / 1,3).
    x = np.array([[0.0, 2.0, 10.0, 30.0]], np.float64)
    y, stats = rn.group_norm(x, 2, eps=0.0, return_stats=True)
    np.testing.assert_allclose(y, [[-1, 1, -1, 1]], rtol=1e-15)
    np.testing.assert_allclose(stats.mean, [[1.0, 20.0]], rtol=1e-15)
    np.testing.assert_allclose(stats.rstd, [[1.0, 0.1]], rtol=1e-15)


def test_channels_last_groups_follow_the_channel_axis(rng):
    x = make_input(rng, (2, 6, 3, 4), np.float64)
    y_nc = rn.group_norm(x, 3)
    y_cl = rn.group_norm(ref.channels_last(x), 3, axis=-1)
    np.testing.assert_allclose(np.moveaxis(y_cl, -1, 1), y_nc, rtol=1e-13, atol=1e-13)


def test_default_eps(rng):
    x = (0.003 * rng.standard_normal((2, 4, 3))).astype(np.float64)
    want, *_ = ref.group_norm(x, 2, eps=1e-5)
    assert_output_close(rn.group_norm(x, 2), want, np.float64)


def test_mixed_parameter_dtypes(rng):
    x = make_input(rng, (2, 4, 3), np.float32)
    w = 1 + 0.1 * rng.standard_normal(4)
    b = (0.1 * rng.standard_normal(4)).astype(np.float16)
    y = rn.group_norm(x, 2, w, b)
    assert y.dtype == np.float32
    want, *_ = ref.group_norm(x, 2, w, b)
    assert_output_close(y, want, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_large_parallel_path(rng, axis, dtype):
    x = _data(rng, (5, 30, 37, 41), axis, dtype)
    w = (1 + 0.5 * rng.standard_normal(30)).astype(np.float32)
    b = (0.5 * rng.standard_normal(30)).astype(np.float32)
    y, stats = rn.group_norm(x, 5, w, b, axis=axis, return_stats=True)
    want, mean, rstd = ref.group_norm(x, 5, w, b, axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, 5, axis))
    assert_stats_close(stats.mean, mean, dtype, "mean")
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")
