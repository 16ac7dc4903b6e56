"""Plain float64 NumPy reference formulas for the statistics ops, and comparison helpers.

Every formula here is written the obvious way (two passes, float64 throughout) so that it can be
checked by eye against SPEC.md §1; none of it shares code with rsnorm. The functions never modify
their arguments: updated running statistics are returned as new float64 arrays.
"""

from __future__ import annotations

import numpy as np

F16, F32, F64 = np.float16, np.float32, np.float64
FLOAT_DTYPES = (F16, F32, F64)


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _chan_shape(ndim, axis):
    """Shape that broadcasts a per-channel vector along `axis`."""
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return tuple(shape)


def _affine(y, weight, bias, shape):
    if weight is not None:
        y = y * f64(weight).reshape(shape)
    if bias is not None:
        y = y + f64(bias).reshape(shape)
    return y


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, axis=1, num_batches_tracked=None,
               momentum_convention="torch"):
    """Returns (y, mean, rstd, new_running_mean, new_running_var) in float64.

    mean/rstd are the statistics used to normalize (batch statistics in training or when no
    running statistics are given, else the running ones).
    """
    x = f64(x)
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = _chan_shape(x.ndim, ax)
    n = int(np.prod([d for i, d in enumerate(x.shape) if i != ax]))
    use_batch = training or running_mean is None
    if use_batch:
        mean = x.mean(axis=red)
        var = ((x - mean.reshape(shape)) ** 2).mean(axis=red)
    else:
        mean = f64(running_mean).copy()
        var = f64(running_var).copy()
    rstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean.reshape(shape)) * rstd.reshape(shape)
    y = _affine(y, weight, bias, shape)
    new_rm = None if running_mean is None else f64(running_mean).copy()
    new_rv = None if running_var is None else f64(running_var).copy()
    if training and running_mean is not None:
        if momentum_convention == "torch":
            if momentum is None:
                factor = 1.0 / (int(num_batches_tracked) + 1)
            else:
                factor = momentum
            unbiased = var * n / (n - 1)
            new_rm = (1 - factor) * new_rm + factor * mean
            new_rv = (1 - factor) * new_rv + factor * unbiased
        elif momentum_convention == "onnx":
            new_rm = new_rm * momentum + mean * (1 - momentum)
            new_rv = new_rv * momentum + var * (1 - momentum)
        else:
            raise AssertionError(momentum_convention)
    return y, mean, rstd, new_rm, new_rv


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, axis=1):
    """Returns (y, mean[N, C], rstd[N, C], new_running_mean, new_running_var) in float64.

    Running statistics follow PyTorch: the per-instance means and unbiased variances are averaged
    over the batch, then blended with `momentum`.
    """
    x = f64(x)
    ax = axis % x.ndim
    xm = np.moveaxis(x, ax, 1)  # (N, C, *spatial)
    n, c = xm.shape[:2]
    red = tuple(range(2, xm.ndim))
    s = int(np.prod(xm.shape[2:]))
    bshape = (n, c) + (1,) * (xm.ndim - 2)
    new_rm = None if running_mean is None else f64(running_mean).copy()
    new_rv = None if running_var is None else f64(running_var).copy()
    if use_input_stats:
        mean = xm.mean(axis=red)
        var = ((xm - mean.reshape(bshape)) ** 2).mean(axis=red)
        if running_mean is not None:
            new_rm = (1 - momentum) * new_rm + momentum * mean.mean(axis=0)
            new_rv = (1 - momentum) * new_rv + momentum * (var * s / (s - 1)).mean(axis=0)
    else:
        mean = np.broadcast_to(f64(running_mean), (n, c)).copy()
        var = np.broadcast_to(f64(running_var), (n, c)).copy()
    rstd = 1.0 / np.sqrt(var + eps)
    y = (xm - mean.reshape(bshape)) * rstd.reshape(bshape)
    y = _affine(y, weight, bias, (1, c) + (1,) * (xm.ndim - 2))
    return np.moveaxis(y, 1, ax), mean, rstd, new_rm, new_rv


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, axis=1):
    """Returns (y, mean[N, G], rstd[N, G]) in float64; groups are contiguous channel blocks."""
    x = f64(x)
    ax = axis % x.ndim
    xm = np.moveaxis(x, ax, 1)  # (N, C, *spatial)
    n, c = xm.shape[:2]
    g = xm.reshape(n, num_groups, -1)
    mean = g.mean(axis=2)
    var = ((g - mean[:, :, None]) ** 2).mean(axis=2)
    rstd = 1.0 / np.sqrt(var + eps)
    y = ((g - mean[:, :, None]) * rstd[:, :, None]).reshape(xm.shape)
    y = _affine(y, weight, bias, (1, c) + (1,) * (xm.ndim - 2))
    return np.moveaxis(y, 1, ax), mean, rstd


def _norm_axes(x, normalized_shape):
    k = len(tuple(normalized_shape))
    return tuple(range(x.ndim - k, x.ndim))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Returns (y, mean, rstd) in float64; stats have shape x.shape[:-k]."""
    x = f64(x)
    red = _norm_axes(x, normalized_shape)
    mean = x.mean(axis=red, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=red, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean) * rstd
    if weight is not None:
        y = y * f64(weight)
    if bias is not None:
        y = y + f64(bias)
    lead = x.shape[: x.ndim - len(red)]
    return y, mean.reshape(lead), rstd.reshape(lead)


def rms_eps_default(dtype):
    """SPEC: eps=None means finfo(float32).eps for float16/float32, finfo(float64).eps for f64."""
    return float(np.finfo(F64 if np.dtype(dtype) == F64 else F32).eps)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """Returns (y, rstd) in float64. `x` keeps its dtype here only to pick the default eps."""
    if eps is None:
        eps = rms_eps_default(np.asarray(x).dtype)
    x = f64(x)
    red = _norm_axes(x, normalized_shape)
    ms = (x * x).mean(axis=red, keepdims=True)
    rstd = 1.0 / np.sqrt(ms + eps)
    y = x * rstd
    if weight is not None:
        y = y * f64(weight)
    lead = x.shape[: x.ndim - len(red)]
    return y, rstd.reshape(lead)


def moments(x, axis=1):
    """Returns (count, mean[C], m2[C]) with m2 = sum((x - mean)^2), float64 two-pass."""
    x = f64(x)
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    count = int(np.prod([d for i, d in enumerate(x.shape) if i != ax]))
    mean = x.mean(axis=red)
    shape = _chan_shape(x.ndim, ax)
    m2 = ((x - mean.reshape(shape)) ** 2).sum(axis=red)
    return count, mean, m2


# ----------------------------------------------------------------------------------------------
# Comparison helpers
# ----------------------------------------------------------------------------------------------

def stats_dtype(x_dtype):
    """SPEC: statistics are float64 for float64 input, else float32."""
    return np.dtype(F64) if np.dtype(x_dtype) == F64 else np.dtype(F32)


def ulp_error(y, ref):
    """|y - ref| in units of the spacing of `ref` rounded to y's dtype (ref is float64)."""
    y = np.asarray(y)
    ref = np.asarray(ref, dtype=F64)
    spacing = np.spacing(np.abs(ref.astype(y.dtype))).astype(F64)
    return np.abs(y.astype(F64) - ref) / spacing


def assert_output_close(y, ref, dtype, scale=None):
    """Compare an op's output (in `dtype`) with its float64 reference.

    float64: rtol/atol 1e-12. float32: 3e-6 (a few float32 roundings on values of order 1).
    float16: within 2 float16 ulp of the reference, with an absolute floor of 1e-6 * scale for
    outputs so close to 0 that the float16 spacing is smaller than the float32 rounding of the
    terms that cancel there (`scale`: magnitude of those terms, default 1).
    """
    y = np.asarray(y)
    assert y.dtype == np.dtype(dtype), (y.dtype, dtype)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    if np.dtype(dtype) == F64:
        np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    elif np.dtype(dtype) == F32:
        np.testing.assert_allclose(y, ref, rtol=3e-6, atol=3e-6)
    else:
        scale = 1.0 if scale is None else np.asarray(scale, dtype=F64)
        err = np.abs(y.astype(F64) - ref)
        allowed = 2 * np.spacing(np.abs(ref.astype(F16))).astype(F64) + 1e-6 * scale
        bad = ~(err <= allowed)
        assert not bad.any(), (
            f"{bad.sum()} of {bad.size} float16 outputs off by more than 2 ulp; worst: "
            f"got {y[bad][:5]}, want {ref[bad][:5]}"
        )


def assert_stats_close(got, ref, x_dtype, name="stat"):
    """Statistics (mean, rstd) in the documented dtype, close to the float64 reference."""
    got = np.asarray(got)
    assert got.dtype == stats_dtype(x_dtype), (name, got.dtype, stats_dtype(x_dtype))
    assert got.shape == np.shape(ref), (name, got.shape, np.shape(ref))
    if got.dtype == F64:
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-13, err_msg=name)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7, err_msg=name)


def assert_bitwise_equal(a, b, msg=""):
    """Same dtype, shape and bytes (so NaN payloads and the sign of zero count too)."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (msg, a.dtype, b.dtype, a.shape, b.shape)
    a_bytes = np.ascontiguousarray(a).tobytes()
    b_bytes = np.ascontiguousarray(b).tobytes()
    if a_bytes != b_bytes:
        differ = np.ascontiguousarray(a).view(np.uint8) != np.ascontiguousarray(b).view(np.uint8)
        raise AssertionError(f"not bitwise equal {msg}: {int(differ.sum())} bytes differ")


# ----------------------------------------------------------------------------------------------
# Test data helpers
# ----------------------------------------------------------------------------------------------

# Shapes (N, C, *spatial) for rank 3, 4 and 5 inputs (1-D, 2-D, 3-D spatial).
SPATIAL_SHAPES = {3: (4, 6, 9), 4: (3, 6, 5, 4), 5: (2, 6, 3, 4, 3)}


def make_input(rng, shape, dtype, loc=0.3, scale=1.5):
    """Normal data with a non-zero mean, in `dtype` (the reference reads these exact values)."""
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def channels_last(x_nc):
    """A C-contiguous channels-last copy of an (N, C, *spatial) array, for axis=-1."""
    return np.ascontiguousarray(np.moveaxis(x_nc, 1, -1))


def call_with_out(fn, x, *args, **kwargs):
    """Call fn once without and once with `out=`; check `out` is filled and returned as is."""
    y = fn(x, *args, **kwargs)
    y = y[0] if isinstance(y, tuple) else y
    out = np.full(x.shape, np.nan, dtype=x.dtype)
    got = fn(x, *args, out=out, **kwargs)
    got_y = got[0] if isinstance(got, tuple) else got
    assert got_y is out, "out= must return the given array itself"
    assert_bitwise_equal(out, y, "out= result differs from the allocated result")
    return y
