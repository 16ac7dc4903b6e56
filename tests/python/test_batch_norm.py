"""batch_norm against the float64 reference: training, eval, running statistics, conventions."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn
from reference import SPATIAL_SHAPES, assert_output_close, assert_stats_close, make_input

DTYPES = [np.float16, np.float32, np.float64]
RANKS = [2, 3, 4, 5]


def _shape(rank):
    return (7, 5) if rank == 2 else SPATIAL_SHAPES[rank]


def _data(rng, rank, axis, dtype):
    x = make_input(rng, _shape(rank), dtype)
    if axis == -1:
        x = ref.channels_last(x)
    return x


def _params(rng, c, dtype=np.float32):
    w = (1 + 0.5 * rng.standard_normal(c)).astype(dtype)
    b = (0.5 * rng.standard_normal(c)).astype(dtype)
    rm = (0.2 * rng.standard_normal(c)).astype(dtype)
    rv = (0.5 + rng.random(c)).astype(dtype)
    return w, b, rm, rv


def _scale(x, mean, rstd, w, b, axis):
    """Magnitude of the terms that cancel in the affine output (for the float16 floor)."""
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    xhat = np.abs((ref.f64(x) - mean.reshape(shape)) * rstd.reshape(shape))
    if w is not None:
        xhat = xhat * np.abs(ref.f64(w)).reshape(shape)
    if b is not None:
        xhat = xhat + np.abs(ref.f64(b)).reshape(shape)
    return xhat + 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("rank", RANKS)
def test_training_with_running_stats(rng, rank, axis, dtype, affine):
    x = _data(rng, rank, axis, dtype)
    c = x.shape[axis]
    w, b, rm, rv = _params(rng, c)
    if not affine:
        w = b = None
    rm0, rv0 = rm.copy(), rv.copy()
    y, stats = rn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-3,
                             axis=axis, return_stats=True)
    want, mean, rstd, new_rm, new_rv = ref.batch_norm(x, rm0, rv0, w, b, training=True,
                                                      momentum=0.3, eps=1e-3, axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, axis))
    assert_stats_close(stats.mean, mean, dtype, "mean")
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")
    # Updated in place, in their own dtype, with the unbiased batch variance.
    assert rm.dtype == np.float32 and rv.dtype == np.float32
    np.testing.assert_allclose(rm, new_rm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, new_rv, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("rank", RANKS)
def test_training_without_running_stats(rng, rank, axis, dtype):
    x = _data(rng, rank, axis, dtype)
    w, b, _, _ = _params(rng, x.shape[axis], dtype)
    y = ref.call_with_out(rn.batch_norm, x, None, None, w, b, training=True, axis=axis)
    want, mean, rstd, _, _ = ref.batch_norm(x, None, None, w, b, training=True, axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, axis))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("rank", RANKS)
def test_eval_uses_running_stats(rng, rank, axis, dtype, affine):
    x = _data(rng, rank, axis, dtype)
    w, b, rm, rv = _params(rng, x.shape[axis])
    if not affine:
        w = b = None
    rm0, rv0 = rm.copy(), rv.copy()
    y = ref.call_with_out(rn.batch_norm, x, rm, rv, w, b, training=False, eps=0.25, axis=axis)
    want, mean, rstd, _, _ = ref.batch_norm(x, rm, rv, w, b, training=False, eps=0.25, axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, axis))
    # Eval never touches the running statistics.
    ref.assert_bitwise_equal(rm, rm0)
    ref.assert_bitwise_equal(rv, rv0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_stats_are_the_running_stats(rng, dtype):
    # Interpretation of SPEC "stats = what backward needs": in eval that is the running mean and
    # 1/sqrt(running_var + eps).
    x = make_input(rng, (4, 3, 5), dtype)
    _, _, rm, rv = _params(rng, 3)
    _, stats = rn.batch_norm(x, rm, rv, eps=0.1, return_stats=True)
    assert_stats_close(stats.mean, ref.f64(rm), dtype, "mean")
    assert_stats_close(stats.rstd, 1 / np.sqrt(ref.f64(rv) + 0.1), dtype, "rstd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_eval_without_running_stats_uses_batch_stats(rng, axis, dtype):
    x = _data(rng, 4, axis, dtype)
    y, stats = rn.batch_norm(x, training=False, axis=axis, return_stats=True)
    want, mean, rstd, _, _ = ref.batch_norm(x, training=True, axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, None, None, axis))
    assert_stats_close(stats.mean, mean, dtype, "mean")
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")


@pytest.mark.parametrize("dtype", DTYPES)
def test_return_stats_shape_and_dtype(rng, dtype):
    x = make_input(rng, (3, 4, 2, 5), dtype)
    y, stats = rn.batch_norm(x, training=True, return_stats=True)
    assert isinstance(stats, rn.Stats)
    assert y.dtype == dtype and y.shape == x.shape
    assert stats.mean.shape == (4,) and stats.rstd.shape == (4,)
    assert stats.mean.dtype == ref.stats_dtype(dtype) and stats.rstd.dtype == ref.stats_dtype(dtype)
    y_cl, stats_cl = rn.batch_norm(ref.channels_last(x), training=True, axis=-1,
                                   return_stats=True)
    assert stats_cl.mean.shape == (4,)
    # Channels-last is the same computation on a permuted array.
    np.testing.assert_allclose(stats_cl.mean, stats.mean, rtol=1e-6)
    np.testing.assert_allclose(np.moveaxis(y_cl, -1, 1).astype(np.float64),
                               y.astype(np.float64), rtol=4e-3 if dtype == np.float16 else 1e-5,
                               atol=4e-3 if dtype == np.float16 else 1e-5)


def test_momentum_none_is_cumulative_average(rng):
    rm = np.zeros(4, np.float64)
    rv = np.ones(4, np.float64)
    nbt = np.array(0, dtype=np.int64)
    batch_means, batch_vars = [], []
    for k in range(1, 4):
        x = make_input(rng, (5 + k, 4, 3), np.float64, loc=k)
        rn.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
        assert nbt.shape == () and nbt.dtype == np.int64
        assert int(nbt) == k, "num_batches_tracked must be incremented in place"
        batch_means.append(x.mean(axis=(0, 2)))
        batch_vars.append(x.var(axis=(0, 2), ddof=1))
        # Factor 1/k each step is the plain average of all batches seen (the initial value has
        # weight 0 after the first step).
        np.testing.assert_allclose(rm, np.mean(batch_means, axis=0), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(rv, np.mean(batch_vars, axis=0), rtol=1e-12)


def test_momentum_none_respects_existing_count(rng):
    x = make_input(rng, (6, 3, 4), np.float32)
    rm = np.full(3, 2.0, np.float32)
    rv = np.full(3, 3.0, np.float32)
    nbt = np.array(4, dtype=np.int64)
    _, _, _, new_rm, new_rv = ref.batch_norm(x, rm, rv, training=True, momentum=None,
                                             num_batches_tracked=4)
    rn.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    assert int(nbt) == 5
    np.testing.assert_allclose(rm, new_rm, rtol=1e-6)
    np.testing.assert_allclose(rv, new_rv, rtol=1e-6)


def test_num_batches_tracked_incremented_with_float_momentum(rng):
    # Like PyTorch's buffer: every training call with running stats counts.
    x = make_input(rng, (6, 3), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    nbt = np.array(7, dtype=np.int64)
    rn.batch_norm(x, rm, rv, training=True, momentum=0.1, num_batches_tracked=nbt)
    assert int(nbt) == 8
    rn.batch_norm(x, rm, rv, training=False, num_batches_tracked=nbt)
    assert int(nbt) == 8, "eval must not count a batch"


def test_momentum_none_without_counter_is_an_error(rng):
    x = make_input(rng, (6, 3), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(rn.RsnormError, match="num_batches_tracked"):
        rn.batch_norm(x, rm, rv, training=True, momentum=None)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.9, 1.0])
@pytest.mark.parametrize("convention", ["torch", "onnx"])
def test_momentum_conventions(rng, momentum, convention):
    x = make_input(rng, (8, 3, 4), np.float64)
    _, _, rm, rv = _params(rng, 3, np.float64)
    rm0, rv0 = rm.copy(), rv.copy()
    y = rn.batch_norm(x, rm, rv, training=True, momentum=momentum,
                      momentum_convention=convention)
    want, _, _, new_rm, new_rv = ref.batch_norm(x, rm0, rv0, training=True, momentum=momentum,
                                                momentum_convention=convention)
    assert_output_close(y, want, np.float64)
    np.testing.assert_allclose(rm, new_rm, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rv, new_rv, rtol=1e-12, atol=1e-15)


def test_onnx_convention_is_biased_and_reversed(rng):
    x = make_input(rng, (4, 2, 3), np.float64)
    n = 12
    rm, rv = np.zeros(2), np.zeros(2)
    rn.batch_norm(x, rm, rv, training=True, momentum=0.9, momentum_convention="onnx")
    _, mean, _, _, _ = ref.batch_norm(x, training=True, eps=1e-5)
    biased = ((x - mean[None, :, None]) ** 2).mean(axis=(0, 2))
    np.testing.assert_allclose(rm, 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(rv, 0.1 * biased, rtol=1e-12)
    rm2, rv2 = np.zeros(2), np.zeros(2)
    rn.batch_norm(x, rm2, rv2, training=True, momentum=0.1)
    np.testing.assert_allclose(rv2, 0.1 * biased * n / (n - 1), rtol=1e-12)


@pytest.mark.parametrize("stat_dtype", [np.float16, np.float32, np.float64])
def test_running_stats_updated_in_their_dtype(rng, stat_dtype):
    x = make_input(rng, (6, 3, 5), np.float32)
    rm = np.array([0.1, -0.2, 0.3], stat_dtype)
    rv = np.array([1.0, 0.5, 2.0], stat_dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    rn.batch_norm(x, rm, rv, training=True)
    _, _, _, new_rm, new_rv = ref.batch_norm(x, rm0, rv0, training=True)
    assert rm.dtype == stat_dtype and rv.dtype == stat_dtype
    rtol = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-12}[stat_dtype]
    np.testing.assert_allclose(rm, new_rm, rtol=rtol, atol=rtol * 0.1)
    np.testing.assert_allclose(rv, new_rv, rtol=rtol)


@pytest.mark.parametrize("pdtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameter_dtypes_are_read_exactly(rng, dtype, pdtype):
    x = make_input(rng, (5, 3, 4), dtype)
    w, b, rm, rv = _params(rng, 3, pdtype)
    y = rn.batch_norm(x, rm, rv, w, b)
    assert y.dtype == dtype
    want, *_ = ref.batch_norm(x, rm, rv, w, b)
    assert_output_close(y, want, dtype)


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1, 1), (1, 4, 1)])
@pytest.mark.parametrize("with_running", [False, True])
def test_one_value_per_channel_in_training(shape, with_running):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    rm = np.array([0.5, 1.0, 1.5, 2.0], np.float32) if with_running else None
    rv = np.array([1.0, 2.0, 3.0, 4.0], np.float32) if with_running else None
    nbt = np.array(3, np.int64)
    with pytest.raises(rn.RsnormError, match="Expected more than 1 value per channel when training"):
        rn.batch_norm(x, rm, rv, training=True, num_batches_tracked=nbt if with_running else None)
    if with_running:
        np.testing.assert_array_equal(rm, [0.5, 1.0, 1.5, 2.0])
        np.testing.assert_array_equal(rv, [1.0, 2.0, 3.0, 4.0])
        assert int(nbt) == 3
    # Channels-last with one value per channel too.
    with pytest.raises(rn.RsnormError, match="Expected more than 1 value per channel when training"):
        rn.batch_norm(np.moveaxis(x, 1, -1).copy(), rm, rv, training=True, axis=-1)
    # Eval of the same input is fine.
    if with_running:
        y = rn.batch_norm(x, rm, rv, training=False)
        assert y.shape == x.shape


def test_two_values_per_channel_is_enough():
    x = np.array([[1.0, 2.0], [3.0, 6.0]], np.float64)
    rm, rv = np.zeros(2), np.ones(2)
    y = rn.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=0.0)
    np.testing.assert_allclose(y, [[-1, -1], [1, 1]], rtol=1e-15)
    np.testing.assert_allclose(rm, [2.0, 4.0], rtol=1e-15)
    np.testing.assert_allclose(rv, [2.0, 8.0], rtol=1e-15)  # unbiased: n-1 = 1


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3)])
def test_empty_batch_in_training(shape):
    x = np.zeros(shape, np.float32)
    rm = np.array([0.1, 0.2, 0.3], np.float32)
    rv = np.array([1.0, 2.0, 3.0], np.float32)
    y = rn.batch_norm(x, rm, rv, training=True)
    assert y.shape == shape and y.dtype == np.float32
    np.testing.assert_array_equal(rm, np.array([0.1, 0.2, 0.3], np.float32))
    np.testing.assert_array_equal(rv, np.array([1.0, 2.0, 3.0], np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_with_running_stats_training(rng, dtype):
    x = make_input(rng, (4, 3, 6), dtype)
    rm1, rv1 = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm2, rv2 = rm1.copy(), rv1.copy()
    y = rn.batch_norm(x, rm1, rv1, training=True)
    out = np.empty_like(x)
    got = rn.batch_norm(x, rm2, rv2, training=True, out=out)
    assert got is out
    ref.assert_bitwise_equal(out, y)
    ref.assert_bitwise_equal(rm1, rm2)
    ref.assert_bitwise_equal(rv1, rv2)


def test_out_with_return_stats(rng):
    x = make_input(rng, (4, 3, 6), np.float32)
    out = np.empty_like(x)
    got, stats = rn.batch_norm(x, training=True, out=out, return_stats=True)
    assert got is out
    assert stats.mean.shape == (3,)


def test_defaults_match_pytorch_signature(rng):
    # training=False, momentum=0.1, eps=1e-5 by default; positional order as torch.
    x = make_input(rng, (4, 3, 5), np.float64)
    w, b, rm, rv = _params(rng, 3, np.float64)
    y = rn.batch_norm(x, rm, rv, w, b)
    want, *_ = ref.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
    assert_output_close(y, want, np.float64)
    y2 = rn.batch_norm(x, rm, rv, w, b, True, 0.5, 0.01)
    want2, *_ = ref.batch_norm(x, None, None, w, b, training=True, eps=0.01)
    assert_output_close(y2, want2, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_large_parallel_path(rng, axis, dtype):
    # Above the parallel threshold, odd channel count, N*H*W not a multiple of 8.
    x = make_input(rng, (6, 37, 29, 31), dtype)
    if axis == -1:
        x = ref.channels_last(x)
    w, b, rm, rv = _params(rng, 37)
    rm0, rv0 = rm.copy(), rv.copy()
    y, stats = rn.batch_norm(x, rm, rv, w, b, training=True, axis=axis, return_stats=True)
    want, mean, rstd, new_rm, new_rv = ref.batch_norm(x, rm0, rv0, w, b, training=True,
                                                      axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, axis))
    assert_stats_close(stats.mean, mean, dtype, "mean")
    assert_stats_close(stats.rstd, rstd, dtype, "rstd")
    np.testing.assert_allclose(rm, new_rm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, new_rv, rtol=1e-6, atol=1e-7)
    y = rn.batch_norm(x, rm0, rv0, w, b, axis=axis)
    want, mean, rstd, _, _ = ref.batch_norm(x, rm0, rv0, w, b, axis=axis)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, axis))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_two_dimensional_input(rng, dtype):
    # BatchNorm1d's (N, C) layout, above the parallel threshold.
    x = make_input(rng, (5003, 37), dtype)
    w, b, rm, rv = _params(rng, 37)
    rm0, rv0 = rm.copy(), rv.copy()
    y = rn.batch_norm(x, rm, rv, w, b, training=True)
    want, mean, rstd, new_rm, new_rv = ref.batch_norm(x, rm0, rv0, w, b, training=True)
    assert_output_close(y, want, dtype, _scale(x, mean, rstd, w, b, 1))
    np.testing.assert_allclose(rm, new_rm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, new_rv, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(256, 1024), (300, 70), (259, 70), (301, 33), (1000, 100),
                                   (5000, 64), (2, 3)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nc_training_paths_agree_bitwise(shape, dtype):
    """(N, C) training: the fused per-channel-block path (C-contiguous, N small enough for L2),
    the row-block path (larger N) and the column walk (Fortran order) are one canonical sum."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    c = shape[1]
    w, b = np.linspace(0.5, 2, c), np.linspace(-1, 1, c)
    runs = []
    for arr in (x, np.asfortranarray(x)):
        rm, rv = np.zeros(c), np.ones(c)
        y, st = rn.batch_norm(arr, rm, rv, w, b, training=True, return_stats=True)
        runs.append((y, st.mean, st.rstd, rm, rv))
    for got, want in zip(runs[0], runs[1]):
        ref.assert_bitwise_equal(got, want)
    y_ref = ref.batch_norm(x, None, None, w, b, training=True)
    y_ref = y_ref[0] if isinstance(y_ref, tuple) else y_ref
    ref.assert_output_close(runs[0][0], y_ref, dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(600, 21), (37, 5, 1), (300, 1), (263, 40)])
def test_one_value_per_plane_any_layout_bitwise(rng, dtype, training, shape):
    # One value per plane in layouts without contiguous samples (Fortran order, reversed,
    # sliced): channel-group sums and the row-by-row apply of those layouts must give bitwise
    # the C-contiguous result, for row blocks of 256 with a tail, channel groups of 8/16 with
    # a tail, and an output of another layout (out= in Fortran order).
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    c = shape[1]
    rm, rv = np.linspace(-1, 1, c).astype(dtype), np.linspace(0.5, 2, c).astype(dtype)
    w, b = np.linspace(0.5, 1.5, c).astype(dtype), np.linspace(-1, 1, c).astype(dtype)

    def run(v, out=None):
        y = rn.batch_norm(v, rm.copy(), rv.copy(), w, b, training, out=out)
        return np.ascontiguousarray(y)

    want = run(np.ascontiguousarray(x))
    wide = np.zeros((shape[0], 2 * c) + shape[2:], dtype)
    wide[:, ::2] = x
    for v in (np.asfortranarray(x), x[::-1][::-1], wide[:, ::2],
              np.ascontiguousarray(x[::-1])[::-1]):
        ref.assert_bitwise_equal(run(v), want, "layout")
        ref.assert_bitwise_equal(run(v, out=np.asfortranarray(np.empty_like(x))), want, "out")
    # And the values against the float64 formula.
    x64 = x.astype(np.float64)
    if training:
        m, var = x64.mean(axis=0), x64.var(axis=0)
    else:
        m, var = rm.astype(np.float64), rv.astype(np.float64)
    sh = (1, c) + (1,) * (len(shape) - 2)
    y64 = (x64 - m.reshape(sh)) / np.sqrt(var.reshape(sh) + 1e-5) * w.reshape(sh).astype(
        np.float64) + b.reshape(sh).astype(np.float64)
    tol = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(want.astype(np.float64), y64, rtol=tol, atol=tol * 4)
