"""Backward GPU ops for batch, layer, RMS and group norm.

With ``g = dy * weight`` and ``xhat = (x - mean) * rstd`` per normalization group of n elements:

    dx      = rstd * (g - sum(g) / n - xhat * sum(g * xhat) / n)   (LN, GN, BN training)
    dx      = rstd * (g - xhat * sum(g * xhat) / n), xhat = x * rstd  (RMS)
    dx      = g * rstd                                              (BN eval: an affine map)
    dweight = sum over all but the channel/feature axes of dy * xhat;  dbias = sum of dy

All sums are float32 workgroup trees in a fixed order (bitwise reproducible). For groups the
fused forward kernel takes (up to 4 chunks), the group sums and dx come from one kernel
(grad_fused.wgsl) with the same bits as the separate passes; dweight/dbias are column sums
(coalesced column kernels for layer norm and channels-last layouts).
"""

from __future__ import annotations

import numpy as np

# Grads: the CPU ops' gradient tuple, so both paths' results pass the same isinstance checks.
from .._grads import Grads
from . import _device
from ._array import GPUArray, asarray, shape_error, value_error
from ._engine import (
    Data,
    check_eps,
    check_param,
    check_size,
    check_x,
    collect,
    grad_apply_pass,
    grad_fused_pass,
    map_channels,
    map_grouped,
    map_rows,
    norm_axis,
    param_buffer,
    red_channels,
    red_grouped,
    red_rows,
    running_stats_pass,
    stats_pass,
    sum_pass,
    use_fused,
)
from ._ops import (
    _check_momentum,
    _grouped_dims,
    _prod,
    _rows,
    _run,
    check_not_batch_axis,
    rms_eps,
)


def _prep(grad_y, x):
    host = check_x(x)
    if check_x(grad_y, "grad_y") != host:
        raise TypeError("grad_y and x must both be NumPy arrays or both device arrays")
    if tuple(grad_y.shape) != tuple(x.shape):
        raise shape_error(
            f"grad_y must have the shape of x {tuple(x.shape)}, got {tuple(grad_y.shape)}")
    if np.dtype(grad_y.dtype) != np.dtype(x.dtype):
        raise TypeError(f"grad_y has dtype {grad_y.dtype} but x has dtype {x.dtype}")
    check_size(x)
    return host


def _check_stats(stats, shape, need_mean: bool):
    if stats is None:
        return None
    mean, rstd = stats[0], stats[1]
    items = [("stats.rstd", rstd)] + ([("stats.mean", mean)] if need_mean else [])
    for name, a in items:
        if a is None:
            raise value_error(f"{name} is missing")
        check_param(a, shape, name)
    return stats


def _stats_arrays(ctx, stats, need_mean: bool):
    def up(a):
        if a is None:
            return None
        if isinstance(a, GPUArray):
            a._live_buffer(ctx)
            return a
        return asarray(np.ascontiguousarray(a, dtype=np.float32).reshape(-1))

    mean = up(stats[0]) if need_mean else None
    return mean, up(stats[1])


def _empty_grads(x, host, pshape, weight, bias):
    def zeros(shape):
        z = np.zeros(shape, x.dtype)
        return z if host else asarray(z)

    dx = np.empty(x.shape, x.dtype) if host else asarray(np.empty(x.shape, x.dtype))
    return Grads(dx, zeros(pshape) if weight is not None else None,
                 zeros(pshape) if bias is not None else None)


def _result(ctx, host, dx, gw, gb, weight, bias, pshape):
    res, _ = collect(ctx, host, [dx, gw if weight is not None else None,
                                 gb if bias is not None else None])
    dxv, gwv, gbv = res
    if gwv is not None:
        gwv = gwv.reshape(pshape)
    if gbv is not None:
        gbv = gbv.reshape(pshape)
    return Grads(dxv, gwv, gbv)


def _rowwise_backward(grad_y, x, normalized_shape, weight, bias, eps, stats, rms: bool):
    host = _prep(grad_y, x)
    ns, R, F, sshape = _rows(x, normalized_shape)
    check_param(weight, ns, "weight")
    check_param(bias, ns, "bias")
    eps = check_eps(eps)
    _check_stats(stats, sshape, not rms)
    if x.size == 0:
        return _empty_grads(x, host, ns, weight, bias)
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        dy = Data(ctx, grad_y, host)
        enc = _device.Encoder(ctx)
        lo = None
        if stats is None:
            _, _, rstd, mean, lo = stats_pass(enc, data, red_rows(R, F), int(rms), eps)
        else:
            mean, rstd = _stats_arrays(ctx, stats, not rms)
        if rms:
            mean = lo = None
        wb = param_buffer(ctx, weight)
        gmap = map_rows(F)
        red = red_rows(R, F)
        gw = gb = None
        if weight is not None or bias is not None:
            # Column sums over the rows: the (R, F, 1) view reduced per "channel" = feature.
            _, gw, gb = sum_pass(enc, data, dy, red_channels(R, F, 1), gmap, mean, rstd, None,
                                 not rms, grads_shape=(F,), lo=lo)
        dx = data.like()
        if use_fused(red):
            grad_fused_pass(enc, data, dy, dx, red, gmap, mean, rstd, wb, not rms, F, eps, lo=lo)
        else:
            sums, _, _ = sum_pass(enc, data, dy, red, gmap, mean, rstd, wb, not rms, lo=lo)
            grad_apply_pass(enc, data, dy, dx, gmap, mean, rstd, sums, wb, int(rms), F, eps,
                            lo=lo)
        enc.submit()
        return _result(ctx, host, dx, gw, gb, weight, bias, ns)

    return _run(ctx, body)


def layer_norm_backward(grad_y, x, normalized_shape, weight=None, bias=None, eps=1e-5,
                        stats=None):
    """Gradients of :func:`rsnorm.gpu.layer_norm`: ``Grads(x, weight, bias)``."""
    return _rowwise_backward(grad_y, x, normalized_shape, weight, bias, eps, stats, rms=False)


def rms_norm_backward(grad_y, x, normalized_shape, weight=None, eps=None, stats=None):
    """Gradients of :func:`rsnorm.gpu.rms_norm`: ``Grads(x, weight)``."""
    if eps is None and isinstance(x, (np.ndarray, GPUArray)):
        eps = rms_eps(x.dtype)
    return _rowwise_backward(grad_y, x, normalized_shape, weight, None, eps, stats, rms=True)


def group_norm_backward(grad_y, x, num_groups, weight=None, bias=None, eps=1e-5, stats=None, *,
                        axis=1):
    """Gradients of :func:`rsnorm.gpu.group_norm`: ``Grads(x, weight, bias)``."""
    host = _prep(grad_y, x)
    if x.ndim < 2:
        raise shape_error(f"group_norm expects an input of rank >= 2, got shape {tuple(x.shape)}")
    ax = norm_axis(axis, x.ndim)
    N, S1, C, I = _grouped_dims(x, ax, "group_norm")
    if not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups, bool):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    G = int(num_groups)
    if G <= 0:
        raise value_error(f"num_groups must be positive, got {G}")
    if C % G:
        raise value_error(f"the number of channels C={C} is not divisible by num_groups G={G}")
    check_param(weight, (C,), "weight")
    check_param(bias, (C,), "bias")
    eps = check_eps(eps)
    _check_stats(stats, (N, G), True)
    if x.size == 0:
        return _empty_grads(x, host, (C,), weight, bias)
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        dy = Data(ctx, grad_y, host)
        enc = _device.Encoder(ctx)
        red = red_grouped(N, S1, C, I, G)
        lo = None
        if stats is None:
            _, _, rstd, mean, lo = stats_pass(enc, data, red, 0, eps)
        else:
            mean, rstd = _stats_arrays(ctx, stats, True)
        wb = param_buffer(ctx, weight)
        gmap = map_grouped(S1, C, I, G)
        gw = gb = None
        if weight is not None or bias is not None:
            _, gw, gb = sum_pass(enc, data, dy, red_channels(N * S1, C, I), gmap, mean, rstd,
                                 None, True, grads_shape=(C,), lo=lo)
        dx = data.like()
        n = S1 * (C // G) * I
        if use_fused(red):
            grad_fused_pass(enc, data, dy, dx, red, gmap, mean, rstd, wb, True, n, eps, lo=lo)
        else:
            sums, _, _ = sum_pass(enc, data, dy, red, gmap, mean, rstd, wb, True, lo=lo)
            grad_apply_pass(enc, data, dy, dx, gmap, mean, rstd, sums, wb, 0, n, eps, lo=lo)
        enc.submit()
        return _result(ctx, host, dx, gw, gb, weight, bias, (C,))

    return _run(ctx, body)


def batch_norm_backward(grad_y, x, running_mean=None, running_var=None, weight=None, bias=None,
                        training=False, momentum=0.1, eps=1e-5, stats=None, *, axis=1,
                        momentum_convention="torch", num_batches_tracked=None):
    """Gradients of :func:`rsnorm.gpu.batch_norm`: ``Grads(x, weight, bias)``. Training (or no
    running statistics) differentiates through the batch statistics; eval is the affine map
    ``dx = dy * weight * rstd(running_var)``. ``momentum`` and the running-update arguments are
    accepted for signature compatibility and unused, but validated as on the CPU."""
    del num_batches_tracked
    host = _prep(grad_y, x)
    if momentum_convention not in ("torch", "onnx"):
        raise value_error(
            f"momentum_convention must be 'torch' or 'onnx', got {momentum_convention!r}")
    # None (the cumulative average) is valid here whatever the convention, as on the CPU.
    _check_momentum(momentum, allow_none=True)
    if x.ndim < 2:
        raise shape_error(f"batch_norm expects an input of rank >= 2, got shape {tuple(x.shape)}")
    ax = norm_axis(axis, x.ndim)
    check_not_batch_axis(x, ax, "batch_norm")
    C = int(x.shape[ax])
    O = _prod(x.shape[:ax])
    I = _prod(x.shape[ax + 1 :])
    for name, p in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_param(p, (C,), name)
    if (running_mean is None) != (running_var is None):
        raise value_error("running_mean and running_var must be given together")
    eps = check_eps(eps)
    batch_stats = bool(training) or running_mean is None
    if training and O * I == 1:
        # The CPU's rule and message (HOSTILE 1): one value per channel has no batch variance.
        raise value_error("Expected more than 1 value per channel when training, got input size "
                          f"{tuple(int(d) for d in x.shape)}")
    _check_stats(stats, (C,), True)
    if x.size == 0:
        return _empty_grads(x, host, (C,), weight, bias)
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        dy = Data(ctx, grad_y, host)
        enc = _device.Encoder(ctx)
        lo = None
        if stats is not None:
            mean, rstd = _stats_arrays(ctx, stats, True)
        elif batch_stats:
            _, _, rstd, mean, lo = stats_pass(enc, data, red_channels(O, C, I), 0, eps)
        else:
            _, mean, rstd, _, _ = running_stats_pass(
                enc, ctx, param_buffer(ctx, running_mean), param_buffer(ctx, running_var), C, eps)
        wb = param_buffer(ctx, weight)
        gmap = map_channels(C, I)
        # One reduction per channel without w serves dx (scaled by w in grad_apply), dweight
        # and dbias.
        sums, gw, gb = sum_pass(enc, data, dy, red_channels(O, C, I), gmap, mean, rstd, None,
                                True, grads_shape=(C,), lo=lo)
        dx = data.like()
        grad_apply_pass(enc, data, dy, dx, gmap, mean, rstd, sums, wb, 0 if batch_stats else 2,
                        O * I, eps, w_on_sums=True, lo=lo)
        enc.submit()
        return _result(ctx, host, dx, gw, gb, weight, bias, (C,))

    return _run(ctx, body)
