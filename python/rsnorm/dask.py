"""Normalization of Dask arrays, chunk by chunk, with the rsnorm kernels.

Batch norm and :func:`standardize` need statistics over the whole array: every chunk's
``rsnorm.moments`` (count, mean and ``M2 = Σ(x − mean)²`` per channel, float64) is merged by a
Dask tree reduction with the exact merge ``Moments.merge`` (Chan et al.), in the fixed order of the
chunks, so the result does not depend on the scheduler. The normalization is then a lazy
``map_blocks`` that calls ``rsnorm.batch_norm`` on each chunk with the global statistics passed
as running statistics (eval mode), so each chunk is normalized by the same kernel as an in-memory
array. Layer, RMS, group and instance norm need no cross-chunk reduction: each chunk is
normalized directly, provided the normalized axes are whole in every chunk; when they are not,
the array is rechunked along those axes (``rechunk=True``, the default) or a ``ValueError`` names
the axes (``rechunk=False``).

Everything stays lazy and runs on any Dask scheduler: threads, processes, synchronous or a
``dask.distributed`` cluster. Arguments, defaults and errors follow the rsnorm functions of the
same names. NumPy inputs are accepted and wrapped as one-chunk Dask arrays.

Larger-than-memory arrays: a lazy ``y`` whose graph also holds the statistics keeps every chunk of
``x`` in memory between the statistics pass and the normalize pass (the chunks feed both). Pass
``compute_stats=True`` (or compute :func:`moments` first) so that the statistics are computed
in one streaming pass and ``y`` reads ``x`` again, chunk by chunk, with bounded memory; see
``examples/out_of_core.py``. Training batch norm with running statistics always computes them
right away, since it updates the running statistics in place.

Install with the extra ``rsnorm[dask]``.
"""

from __future__ import annotations

import functools
import math
import numbers
import uuid

import dask
import dask.array as da
import numpy as np

import rsnorm as _rn
from rsnorm._types import Moments, Stats
from rsnorm.distributed import (  # mpi4py is imported there only when a communicator is needed
    _check_running,
    _local_moments,
    _update_running,
)

__all__ = [
    "batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "moments",
    "rms_norm",
    "standardize",
]

_F64 = np.float64
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# The reduction's output per channel: its count, mean and M2, carried in one structured array so
# that one pass over x yields all three.
_MOMENTS_DTYPE = np.dtype([("count", _F64), ("mean", _F64), ("m2", _F64)])


# ---------------------------------------------------------------------------------------------
# argument handling
# ---------------------------------------------------------------------------------------------

def _as_dask(x) -> da.Array:
    if isinstance(x, da.Array):
        arr = x
    elif isinstance(x, np.ndarray):
        arr = da.from_array(x, chunks=x.shape or ())
    else:
        raise TypeError(f"x must be a dask.array.Array or numpy.ndarray, got {type(x).__name__}")
    if arr.dtype not in _FLOATS:
        raise TypeError(
            f"x has dtype {arr.dtype}; accepted dtypes are float16, float32 and float64"
        )
    if any(isinstance(s, float) and math.isnan(s) for s in arr.shape):
        raise _rn.RsnormError(
            f"x has unknown chunk sizes (shape {arr.shape}); call x.compute_chunk_sizes() first"
        )
    return arr


def _channel_axis(x, axis, min_ndim=2) -> int:
    if x.ndim < min_ndim:
        raise _rn.ShapeError(f"x must have at least {min_ndim} dimensions, got shape {x.shape}")
    if not isinstance(axis, numbers.Integral) or not -x.ndim <= axis < x.ndim:
        raise _rn.RsnormError(f"axis {axis} is out of range for an input of shape {x.shape}")
    return int(axis) % x.ndim


def _check_eps(eps, name="eps"):
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise _rn.RsnormError(f"{name} must be a finite number >= 0, got {eps!r}")


def _vector(v, name, c):
    """A per-channel parameter as a float64-readable NumPy array of shape (c,), or None."""
    if v is None:
        return None
    if isinstance(v, da.Array):
        v = v.compute()
    v = np.asarray(v)
    if v.dtype not in _FLOATS:
        raise TypeError(f"{name} has dtype {v.dtype}; accepted dtypes are float16, float32 and "
                        "float64")
    if v.shape != (c,):
        raise _rn.ShapeError(f"{name} must have shape ({c},) (one value per channel), got "
                             f"{v.shape}")
    return v


def _per_channel(v, x, ax):
    """A (C,) vector as a dask array shaped to broadcast against x, chunked like x's channels,
    so that ``map_blocks`` hands each chunk of x its own slice."""
    if v is None:
        return None
    shape = tuple(-1 if i == ax else 1 for i in range(x.ndim))
    if isinstance(v, da.Array):
        return v.rechunk((x.chunks[ax],)).reshape(tuple(x.shape[ax] if s == -1 else 1
                                                         for s in shape))
    v = np.ascontiguousarray(v).reshape([x.shape[ax] if s == -1 else 1 for s in shape])
    return da.from_array(v, chunks=tuple(x.chunks[ax] if i == ax else (1,)
                                         for i in range(x.ndim)))


def _whole(x, axes, rechunk, what):
    """x with each of ``axes`` in one chunk: rechunked, or a ValueError when rechunk=False."""
    split = [a for a in axes if x.numblocks[a] > 1]
    if not split:
        return x
    if not rechunk:
        raise _rn.RsnormError(
            f"{what} normalizes over axes {tuple(axes)}, but x is split into several chunks "
            f"along axes {tuple(split)} (chunks {x.chunks}); rechunk them whole "
            "(x.rechunk({axis: -1})) or pass rechunk=True"
        )
    return x.rechunk({a: -1 for a in split})


def _stats_dtype(x_dtype):
    return np.dtype(_F64) if x_dtype == np.dtype(_F64) else np.dtype(np.float32)


# ---------------------------------------------------------------------------------------------
# moments: the reduction
# ---------------------------------------------------------------------------------------------

def _flatten(parts):
    if isinstance(parts, (list, tuple)):
        for p in parts:
            yield from _flatten(p)
    else:
        yield parts


def _moments_chunk(x, axis=None, keepdims=None, *, ax, computing_meta=False):
    if computing_meta:
        return x
    m = _local_moments(x, ax)
    return {"count": int(m.count), "mean": m.mean, "m2": m.m2}


def _moments_combine(parts, axis=None, keepdims=None):
    # The nested lists come in block order along the reduced axes: a fixed merge order.
    merged = Moments.merge(*[Moments(p["count"], p["mean"], p["m2"]) for p in _flatten(parts)])
    return {"count": int(merged.count), "mean": merged.mean, "m2": merged.m2}


def _moments_aggregate(parts, axis=None, keepdims=None, computing_meta=False):
    if computing_meta:
        return np.empty((0,), _MOMENTS_DTYPE)
    m = _moments_combine(parts)
    out = np.empty(np.shape(m["mean"]), _MOMENTS_DTYPE)
    out["count"] = m["count"]
    out["mean"] = m["mean"]
    out["m2"] = m["m2"]
    return out


def _moments_array(x: da.Array, ax: int, split_every=None) -> da.Array:
    red = tuple(i for i in range(x.ndim) if i != ax)
    # Keys unique to this call: the same statistics submitted again inside another graph (e.g.
    # computed now for the running statistics, after a lazy y that held them) would otherwise
    # reach a dask.distributed scheduler under the same keys with differently fused tasks, which
    # it warns "can cause failures and deadlocks" (dask/dask#9888).
    name = f"rsnorm-moments-{uuid.uuid4().hex[:12]}"
    return da.reduction(
        x, functools.partial(_moments_chunk, ax=ax), _moments_aggregate, axis=red,
        combine=_moments_combine, concatenate=False, dtype=_MOMENTS_DTYPE,
        meta=np.empty((0,), _MOMENTS_DTYPE), split_every=split_every, name=name,
    )


def moments(x, axis=1, *, split_every=None) -> Moments:
    """Per-channel moments of a Dask array over every axis but ``axis``, lazily.

    Returns ``Moments(count, mean, m2)``: ``count`` (an int, from the shape) values per channel,
    and ``mean`` and ``m2 = Σ(x − mean)²`` as lazy float64 Dask arrays of shape (C,), chunked
    like x's channel axis. Each chunk's ``rsnorm.moments`` is merged exactly (Chan et al.) in a
    fixed tree (``split_every`` chunks per node), so results are the same on any scheduler.
    ``dask.compute(m.mean, m.m2)`` reads x once.
    """
    x = _as_dask(x)
    ax = _channel_axis(x, axis, min_ndim=1)
    r = _moments_array(x, ax, split_every)
    count = math.prod(d for i, d in enumerate(x.shape) if i != ax)
    return Moments(int(count), r["mean"], r["m2"])


# ---------------------------------------------------------------------------------------------
# batch norm and standardize: global statistics, then a per-chunk normalize
# ---------------------------------------------------------------------------------------------

def _bn_eval(x, mean, var, w, b, eps, ax, out=None):
    """``rsnorm.batch_norm`` in eval mode with the given statistics."""
    if x.ndim == 2 and ax == 1:
        # A (rows, C) table seen as one (1, rows, C) channels-last sample: the same values
        # bitwise, but the core's 2-D path (one-element planes) is slower today (2x, 2026-11).
        o = None if out is None else out[None]
        return _rn.batch_norm(x[None], mean, var, w, b, False, eps=eps, axis=-1, out=o)[0]
    return _rn.batch_norm(x, mean, var, w, b, False, eps=eps, axis=ax, out=out)


def _bn_block(xb, mean, var, *params, eps, ax, has_weight, has_bias):
    it = iter(params)
    w = next(it).ravel() if has_weight else None
    b = next(it).ravel() if has_bias else None
    return _bn_eval(xb, mean.ravel(), var.ravel(), w, b, eps, ax)


def _normalize(x, ax, mean, var, weight, bias, eps):
    args = [_per_channel(v, x, ax) for v in (mean, var, weight, bias)]
    fn = functools.partial(_bn_block, eps=eps, ax=ax, has_weight=weight is not None,
                           has_bias=bias is not None)
    return da.map_blocks(fn, x, *[a for a in args if a is not None], dtype=x.dtype,
                         meta=np.empty((0,) * x.ndim, x.dtype), token="rsnorm-batch-norm")


def _stats(mean, var, eps, x_dtype):
    dt = _stats_dtype(x_dtype)
    rstd = 1.0 / (np.sqrt(var + eps) if isinstance(var, np.ndarray) else da.sqrt(var + eps))
    return Stats(mean.astype(dt), rstd.astype(dt))


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, return_stats=False, num_batches_tracked=None,
               momentum_convention="torch", compute_stats=False, split_every=None):
    """Batch normalization of a Dask array per channel (``axis``) over all other axes::

        y = (x − mean_c)/sqrt(var_c + eps)·weight_c + bias_c

    As ``rsnorm.batch_norm``: training, or eval without running statistics, uses the statistics
    of the whole array (mean and biased variance from :func:`moments`); eval with running
    statistics uses them. Training with running statistics updates them in place with the
    unbiased variance (PyTorch's convention, or ``momentum_convention="onnx"``); this computes the
    statistics now (one pass over x). The channel axis and every other axis may be chunked
    freely. ``compute_stats=True`` computes the statistics now in every case (bounded memory for
    larger-than-memory x, see the module docs). Returns a lazy Dask array in x's dtype, and with
    ``return_stats=True`` also ``Stats(mean, rstd)`` (float64 for float64 x, else float32).
    """
    x = _as_dask(x)
    ax = _channel_axis(x, axis)
    c = x.shape[ax]
    _check_eps(eps)
    if momentum_convention not in ("torch", "onnx"):
        raise _rn.RsnormError(
            f"momentum_convention must be 'torch' or 'onnx', got {momentum_convention!r}"
        )
    if (running_mean is None) != (running_var is None):
        raise _rn.RsnormError("running_mean and running_var must be given together")
    weight = _vector(weight, "weight", c)
    bias = _vector(bias, "bias", c)
    if running_mean is not None:
        for v, name in ((running_mean, "running_mean"), (running_var, "running_var")):
            if not isinstance(v, np.ndarray):
                raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place)")
            _vector(v, name, c)
    if training:
        _check_running(running_mean, running_var, num_batches_tracked, momentum)
    update = training and running_mean is not None

    if training or running_mean is None:
        m = moments(x, ax, split_every=split_every)
        if training and m.count == 1:
            raise _rn.RsnormError(
                "Expected more than 1 value per channel when training, got input size "
                f"{tuple(x.shape)}"
            )
        # An empty x: empty output, running statistics untouched, as rsnorm.batch_norm does.
        update = update and m.count > 0
        mean, m2 = m.mean, m.m2
        if update or compute_stats:
            mean, m2 = dask.compute(mean, m2)
        var = m2 / m.count if m.count > 0 else m2 * np.nan
        if update:
            _update_running(running_mean, running_var, Moments(m.count, mean, m2), momentum,
                            num_batches_tracked, momentum_convention)
    else:
        # A snapshot: the lazy graph must not see later in-place updates of the caller's arrays.
        mean = np.array(running_mean, _F64)
        var = np.array(running_var, _F64)
    y = _normalize(x, ax, mean, var, weight, bias, eps)
    return (y, _stats(mean, var, eps, x.dtype)) if return_stats else y


def standardize(x, axis=-1, *, ddof=0, eps=0.0, return_stats=False, compute_stats=False,
                split_every=None):
    """Per-feature z-score of a Dask array: features along ``axis`` (default the last, as in a
    (samples, features) table), statistics over all other axes::

        y = (x − mean_f) / sqrt(var_f + eps),   var_f = Σ(x − mean_f)² / (count − ddof)

    Features whose variance is 0 (with ``eps=0``) are only centered, as scikit-learn's
    ``StandardScaler`` does, instead of becoming NaN. Chunks may split any axis. Lazy; with
    ``compute_stats=True`` the statistics are computed now so ``y`` streams over x with bounded
    memory. ``return_stats=True`` also returns ``Stats(mean, rstd)`` with the ``rstd`` applied.
    """
    x = _as_dask(x)
    ax = _channel_axis(x, axis, min_ndim=1)
    _check_eps(eps)
    if not isinstance(ddof, numbers.Integral) or ddof < 0:
        raise _rn.RsnormError(f"ddof must be a non-negative integer, got {ddof!r}")
    if x.ndim == 1:  # one feature: treat the samples as a column
        y, st = standardize(x[:, None], -1, ddof=ddof, eps=eps, return_stats=True,
                            compute_stats=compute_stats, split_every=split_every)
        return (y[:, 0], st) if return_stats else y[:, 0]
    m = moments(x, ax, split_every=split_every)
    mean, m2 = m.mean, m.m2
    if compute_stats:
        mean, m2 = dask.compute(mean, m2)
    d = m.count - ddof
    var = m2 / d if d > 0 else m2 * np.nan
    if eps == 0:
        var = np.where(var == 0, 1.0, var) if isinstance(var, np.ndarray) else da.where(
            var == 0, 1.0, var)
    y = _normalize(x, ax, mean, var, None, None, eps)
    return (y, _stats(mean, var, eps, x.dtype)) if return_stats else y


# ---------------------------------------------------------------------------------------------
# per-row norms: no cross-chunk statistics when the normalized axes are whole
# ---------------------------------------------------------------------------------------------

def _map(fn, x, *args, token):
    return da.map_blocks(fn, x, *args, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype),
                         token=token)


def _normalized_axes(x, normalized_shape):
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(
        normalized_shape)
    k = len(shape)
    if k == 0 or k > x.ndim or tuple(x.shape[x.ndim - k:]) != tuple(int(s) for s in shape):
        raise _rn.ShapeError(
            f"normalized_shape {shape} does not match the trailing dimensions of x {x.shape}"
        )
    return shape, tuple(range(x.ndim - k, x.ndim))


def _param(v, name, shape):
    if v is None:
        return None
    if isinstance(v, da.Array):
        v = v.compute()
    v = np.asarray(v)
    if v.shape != tuple(shape):
        raise _rn.ShapeError(f"{name} must have shape {tuple(shape)}, got {v.shape}")
    return v


def _layer_block(xb, *, shape, weight, bias, eps):
    return _rn.layer_norm(xb, shape, weight, bias, eps)


def _rms_block(xb, *, shape, weight, eps):
    return _rn.rms_norm(xb, shape, weight, eps)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, rechunk=True):
    """Layer normalization of a Dask array over its trailing ``normalized_shape`` dims::

        y = (x − mean)/sqrt(var + eps)·weight + bias   (per row of the trailing dims)

    Each chunk is normalized by ``rsnorm.layer_norm``; chunks must hold whole rows, so the
    trailing axes are rechunked into one chunk if needed (``rechunk=False``: a ``ValueError``
    instead). The leading axes may be chunked freely. Lazy; result in x's dtype.
    """
    x = _as_dask(x)
    shape, axes = _normalized_axes(x, normalized_shape)
    _check_eps(eps)
    weight, bias = _param(weight, "weight", shape), _param(bias, "bias", shape)
    x = _whole(x, axes, rechunk, "layer_norm")
    fn = functools.partial(_layer_block, shape=shape, weight=weight, bias=bias, eps=eps)
    return _map(fn, x, token="rsnorm-layer-norm")


def rms_norm(x, normalized_shape, weight=None, eps=None, *, rechunk=True):
    """RMS normalization of a Dask array over its trailing ``normalized_shape`` dims::

        y = x / sqrt(mean(x²) + eps)·weight

    (``eps=None``: the float32 machine epsilon for float16/float32 x, float64's for float64).
    Chunks must hold whole rows; see :func:`layer_norm` for ``rechunk``. Lazy.
    """
    x = _as_dask(x)
    shape, axes = _normalized_axes(x, normalized_shape)
    if eps is not None:
        _check_eps(eps)
    weight = _param(weight, "weight", shape)
    x = _whole(x, axes, rechunk, "rms_norm")
    fn = functools.partial(_rms_block, shape=shape, weight=weight, eps=eps)
    return _map(fn, x, token="rsnorm-rms-norm")


def _group_block(xb, *params, channels_per_group, eps, ax, has_weight, has_bias):
    it = iter(params)
    w = next(it).ravel() if has_weight else None
    b = next(it).ravel() if has_bias else None
    g = xb.shape[ax] // channels_per_group if xb.shape[ax] else 1
    return _rn.group_norm(xb, g, w, b, eps, axis=ax)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, rechunk=True):
    """Group normalization of a Dask array (batch axis 0, channels on ``axis``)::

        y = (x − mean_ng)/sqrt(var_ng + eps)·weight_c + bias_c

    statistics per sample n and group g of ``C/num_groups`` consecutive channels, over those
    channels and all spatial axes. The batch axis may be chunked freely, the channel axis at
    group boundaries (other channel chunkings are rechunked to one chunk); the spatial axes are
    rechunked whole (``rechunk=False``: a ``ValueError`` instead). Lazy.
    """
    x = _as_dask(x)
    ax = _channel_axis(x, axis)
    if ax == 0:
        raise _rn.RsnormError("group_norm: the channel axis cannot be the batch axis 0")
    c = x.shape[ax]
    if not isinstance(num_groups, numbers.Integral) or num_groups <= 0 or c % num_groups:
        raise _rn.RsnormError(
            f"num_groups must be a positive divisor of the {c} channels, got {num_groups!r}"
        )
    _check_eps(eps)
    weight, bias = _vector(weight, "weight", c), _vector(bias, "bias", c)
    per_group = c // num_groups
    spatial = [i for i in range(1, x.ndim) if i != ax]
    if any(b % per_group for b in x.chunks[ax]):
        spatial.append(ax)  # chunks that cut a group: make the channel axis whole too
    x = _whole(x, spatial, rechunk, "group_norm")
    params = [_per_channel(v, x, ax) for v in (weight, bias)]
    fn = functools.partial(_group_block, channels_per_group=per_group, eps=eps, ax=ax,
                           has_weight=weight is not None, has_bias=bias is not None)
    return _map(fn, x, *[p for p in params if p is not None], token="rsnorm-group-norm")


def _instance_block(xb, *params, eps, ax, use_input_stats, has_weight, has_bias):
    it = iter(params)
    rm = rv = None
    if not use_input_stats:
        rm, rv = next(it).ravel(), next(it).ravel()
    w = next(it).ravel() if has_weight else None
    b = next(it).ravel() if has_bias else None
    return _rn.instance_norm(xb, rm, rv, w, b, use_input_stats, eps=eps, axis=ax)


_INSTANCE_DTYPE = np.dtype([("mean", _F64), ("var", _F64)])


def _instance_moments_block(xb, *, ax, computing_meta=False):
    """Per-(n, c) mean and unbiased variance over the spatial axes, float64 two-pass."""
    if computing_meta:
        return np.empty((0, 0), _INSTANCE_DTYPE)
    xm = np.moveaxis(xb, ax, 1).astype(_F64)
    xm = xm.reshape(xm.shape[0], xm.shape[1], -1)
    s = xm.shape[2]
    mean = xm.mean(axis=2)
    out = np.empty(mean.shape, _INSTANCE_DTYPE)
    out["mean"] = mean
    out["var"] = ((xm - mean[:, :, None]) ** 2).sum(axis=2) / (s - 1) if s > 1 else np.nan
    return out


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, rechunk=True):
    """Instance normalization of a Dask array: per sample (axis 0) and channel (``axis``), over
    the spatial axes::

        y = (x − mean_nc)/sqrt(var_nc + eps)·weight_c + bias_c

    As ``rsnorm.instance_norm``: with ``use_input_stats=False`` the running statistics are used;
    with running statistics and ``use_input_stats=True`` they are updated in place with the batch
    averages of the per-instance means and unbiased variances (computed now, one pass over x).
    The batch and channel axes may be chunked freely; the spatial axes are rechunked whole
    (``rechunk=False``: a ``ValueError`` instead). Lazy.
    """
    x = _as_dask(x)
    ax = _channel_axis(x, axis, min_ndim=3)
    if ax == 0:
        raise _rn.RsnormError("instance_norm: the channel axis cannot be the batch axis 0")
    c = x.shape[ax]
    _check_eps(eps)
    if (running_mean is None) != (running_var is None):
        raise _rn.RsnormError("running_mean and running_var must be given together")
    if not use_input_stats and running_mean is None:
        raise _rn.RsnormError("use_input_stats=False needs running_mean and running_var")
    weight, bias = _vector(weight, "weight", c), _vector(bias, "bias", c)
    if running_mean is not None:
        for v, name in ((running_mean, "running_mean"), (running_var, "running_var")):
            if use_input_stats and not isinstance(v, np.ndarray):
                raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place)")
            _vector(v, name, c)
    spatial = [i for i in range(1, x.ndim) if i != ax]
    x = _whole(x, spatial, rechunk, "instance_norm")

    if use_input_stats and running_mean is not None:
        st = da.map_blocks(
            functools.partial(_instance_moments_block, ax=ax), x, drop_axis=spatial,
            dtype=_INSTANCE_DTYPE, meta=np.empty((0, 0), _INSTANCE_DTYPE),
            chunks=(x.chunks[0], x.chunks[ax]), token="rsnorm-instance-moments",
        )
        inst_mean, inst_var = dask.compute(st["mean"], st["var"])
        m = float(momentum)
        running_mean[...] = (1 - m) * running_mean.astype(_F64) + m * inst_mean.mean(axis=0)
        running_var[...] = (1 - m) * running_var.astype(_F64) + m * inst_var.mean(axis=0)

    vecs = []
    if not use_input_stats:
        vecs += [np.array(running_mean, _F64), np.array(running_var, _F64)]
    vecs += [v for v in (weight, bias) if v is not None]
    fn = functools.partial(_instance_block, eps=eps, ax=ax, use_input_stats=use_input_stats,
                           has_weight=weight is not None, has_bias=bias is not None)
    return _map(fn, x, *[_per_channel(v, x, ax) for v in vecs], token="rsnorm-instance-norm")
