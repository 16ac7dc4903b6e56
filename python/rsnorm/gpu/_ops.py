"""Forward GPU ops: the CPU names and signatures, computed by the WGSL passes of ``_engine``."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _device
from ._array import GPUArray, shape_error, value_error
from ._engine import (
    Data,
    apply_pass,
    check_eps,
    check_out,
    check_param,
    check_size,
    check_x,
    collect,
    f32_array,
    gstat_host,
    map_channels,
    map_grouped,
    map_rows,
    norm_axis,
    normalize,
    param_buffer,
    red_channels,
    red_grouped,
    red_rows,
    running_stats_pass,
    stats_pass,
)


class Stats(NamedTuple):
    """Per-group statistics for backward: ``mean`` (None for RMS/FRN) and ``rstd``."""

    mean: object
    rstd: object


class Moments(NamedTuple):
    """Per-channel partial statistics: ``count``, float64 ``mean`` and ``m2`` (sum of squared
    deviations). Used when the installed CPU module has no ``rsnorm.Moments``."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def var(self, ddof: int = 0) -> np.ndarray:
        return self.m2 / (self.count - ddof)


def _stats_type():
    try:
        import rsnorm

        return getattr(rsnorm, "Stats", Stats)
    except ImportError:  # pragma: no cover
        return Stats


def make_stats(mean, rstd):
    return _stats_type()(mean, rstd)


def _finish_out(out, y, host: bool):
    if out is not None and host:
        out[...] = y
        return out
    return y


def _prod(shape) -> int:
    return math.prod(int(s) for s in shape)


def _run(ctx, fn):
    """Run an op body under the GPU lock (wgpu-native aborts the process when several threads
    encode and submit at once); a device-loss error marks the device lost for the next call."""
    try:
        with _device._lock:
            return fn()
    except Exception as exc:
        if _device.is_lost_error(exc) and not isinstance(exc, (TypeError, ValueError)):
            _device.mark_lost()
        raise


def _empty_result(x, host, stats_shape, return_stats, rstd_only=False, out=None):
    ctx = None if host else _device.context()
    if host:
        y = out if out is not None else np.empty(x.shape, x.dtype)
        nan = np.full(stats_shape, np.nan, np.float32)
        st = make_stats(None if rstd_only else nan, nan.copy())
    else:
        from ._array import empty

        with _device._lock:
            y = out if out is not None else empty(ctx, x.shape, x.dtype, x._storage)
            st = make_stats(None if rstd_only else f32_array(ctx, stats_shape),
                            f32_array(ctx, stats_shape))
            if _prod(stats_shape):
                nanbytes = np.full(stats_shape, np.nan, np.float32).tobytes()
                if st.mean is not None:
                    ctx.device.queue.write_buffer(st.mean._buffer, 0, nanbytes)
                ctx.device.queue.write_buffer(st.rstd._buffer, 0, nanbytes)
    return (y, st) if return_stats else y


def _empty_with_running_stats(x, out, running_mean, running_var, eps, stats_shape):
    """Empty NumPy input normalized with running statistics (batch norm eval, instance norm
    with ``use_input_stats=False``): the statistics are the running ones, as the CPU op reports
    them, broadcast to ``stats_shape`` (float32, like every GPU op's statistics)."""

    def _np(a):
        return a if isinstance(a, np.ndarray) else a.numpy()

    y = out if out is not None else np.empty(x.shape, x.dtype)
    mean = _np(running_mean).astype(np.float32)
    rstd = (1.0 / np.sqrt(_np(running_var).astype(np.float64) + eps)).astype(np.float32)
    return y, make_stats(np.ascontiguousarray(np.broadcast_to(mean, stats_shape)),
                         np.ascontiguousarray(np.broadcast_to(rstd, stats_shape)))


def _empty_like(x, host, out):
    if out is not None:
        return out
    if host:
        return np.empty(x.shape, x.dtype)
    from ._array import empty

    return empty(_device.context(), x.shape, x.dtype, x._storage)


def _check_running_update(rm, rv):
    for name, a in (("running_mean", rm), ("running_var", rv)):
        if isinstance(a, np.ndarray) and not a.flags.writeable:
            raise value_error(f"{name} is read-only")
    if isinstance(rm, GPUArray) != isinstance(rv, GPUArray):
        raise TypeError("running_mean and running_var must both be NumPy or both device arrays")


def _check_momentum(momentum, allow_none: bool):
    if momentum is None:
        if not allow_none:
            raise value_error("momentum must be a float in [0, 1], got None")
        return None
    m = float(momentum)
    if not (0.0 <= m <= 1.0):
        raise value_error(f"momentum must be in [0, 1], got {momentum}")
    return m


def _host_running_update(rm, rv, m, mean, var_new):
    rm[...] = ((1.0 - m) * rm.astype(np.float64) + m * mean).astype(rm.dtype)
    rv[...] = ((1.0 - m) * rv.astype(np.float64) + m * var_new).astype(rv.dtype)


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, return_stats=False,
               num_batches_tracked=None, momentum_convention="torch"):
    """Batch norm per channel over all other axes; see ``rsnorm.batch_norm``.

    Training normalizes with the biased batch variance and, when running statistics are given,
    updates them in place with the unbiased one (``momentum_convention="onnx"``: ``m * old +
    (1 - m) * batch`` with the biased variance). Device-array running statistics (float32) are
    updated on the device; NumPy ones on the host in float64, in their own dtype.
    """
    host = check_x(x)
    if x.ndim < 2:
        raise shape_error(f"batch_norm expects an input of rank >= 2, got shape {tuple(x.shape)}")
    ax = norm_axis(axis, x.ndim)
    check_not_batch_axis(x, ax, "batch_norm")
    check_size(x)
    C = int(x.shape[ax])
    O = _prod(x.shape[:ax])
    I = _prod(x.shape[ax + 1 :])
    for name, p in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_param(p, (C,), name)
    eps = check_eps(eps)
    if momentum_convention not in ("torch", "onnx"):
        raise value_error(
            f"momentum_convention must be 'torch' or 'onnx', got {momentum_convention!r}")
    if (running_mean is None) != (running_var is None):
        raise value_error("running_mean and running_var must be given together")
    has_running = running_mean is not None
    update = bool(training) and has_running
    m = _check_momentum(momentum, allow_none=momentum_convention == "torch")
    if update:
        _check_running_update(running_mean, running_var)
        nbt_ok = isinstance(num_batches_tracked, np.ndarray) and num_batches_tracked.ndim == 0
        if m is None and not nbt_ok:
            raise value_error(
                "momentum=None (cumulative average) needs num_batches_tracked, a 0-d int64 array"
            )
    n = O * I
    if training and x.size > 0 and n <= 1:
        raise value_error(
            "Expected more than 1 value per channel when training, got input size "
            f"{tuple(x.shape)}"
        )
    check_out(out, x, host)
    if x.size == 0:
        if return_stats and host and has_running and not training:
            return _empty_with_running_stats(x, out, running_mean, running_var, eps, (C,))
        return _empty_result(x, host, (C,), return_stats, out=out)
    batch_stats = bool(training) or not has_running
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        enc = _device.Encoder(ctx)
        if batch_stats:
            gstat, mean, rstd, _, _ = stats_pass(enc, data, red_channels(O, C, I), 0, eps)
        else:
            gstat, mean, rstd, _, _ = running_stats_pass(
                enc, ctx, param_buffer(ctx, running_mean), param_buffer(ctx, running_var), C,
                eps)
        y = data.like(out)
        apply_pass(enc, data, y, map_channels(C, I), gstat, 0,
                   param_buffer(ctx, weight), param_buffer(ctx, bias))
        mom = m
        if update and m is None:
            mom = 1.0 / (int(num_batches_tracked) + 1)
        device_update = update and isinstance(running_mean, GPUArray)
        if device_update:
            conv = 0 if momentum_convention == "torch" else 1
            enc.dispatch("bn_running", "f32", {"WG": _device.SMALL_WG},
                         _device.pack([(C, "u"), (mom, "f"), (conv, "u"), (0, "u")]),
                         [gstat, running_mean._live_buffer(ctx), running_var._live_buffer(ctx)],
                         (math.ceil(C / _device.SMALL_WG), 1))
        enc.submit()
        extra = [(gstat, C * 32)] if update and not device_update else []
        arrays = [y] + ([mean, rstd] if return_stats else [])
        res, raws = collect(ctx, host, arrays, extra)
        if extra:
            cnt, bmean, m2 = gstat_host(raws[0], C)
            if momentum_convention == "torch":
                _host_running_update(running_mean, running_var, mom, bmean, m2 / (cnt - 1))
            else:
                _host_running_update(running_mean, running_var, 1.0 - mom, bmean, m2 / cnt)
        if update and isinstance(num_batches_tracked, np.ndarray):
            num_batches_tracked[...] += 1
        yv = _finish_out(out, res[0], host)
        return (yv, make_stats(res[1], res[2])) if return_stats else yv

    return _run(ctx, body)


def _ns(normalized_shape):
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    try:
        return tuple(int(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(
            f"normalized_shape must be an int or a sequence of ints, got "
            f"{type(normalized_shape).__name__}"
        ) from None


def _rows(x, normalized_shape):
    ns = _ns(normalized_shape)
    if len(ns) == 0 or x.ndim == 0 or len(ns) > x.ndim or tuple(x.shape[-len(ns):]) != ns:
        raise shape_error(
            f"normalized_shape {ns} does not match the trailing dimensions of an input of shape "
            f"{tuple(x.shape)}"
        )
    return ns, _prod(x.shape[: x.ndim - len(ns)]), _prod(ns), tuple(x.shape[: x.ndim - len(ns)])


def _rowwise(x, normalized_shape, weight, bias, eps, out, return_stats, rms: bool):
    host = check_x(x)
    ns, R, F, sshape = _rows(x, normalized_shape)
    check_size(x)
    check_param(weight, ns, "weight")
    check_param(bias, ns, "bias")
    eps = check_eps(eps)
    check_out(out, x, host)
    if x.size == 0:
        return _empty_result(x, host, sshape, return_stats, rstd_only=rms, out=out)
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        enc = _device.Encoder(ctx)
        y = data.like(out)
        mean, rstd = normalize(enc, data, y, red_rows(R, F), map_rows(F), int(rms), eps,
                               param_buffer(ctx, weight), param_buffer(ctx, bias))
        enc.submit()
        arrays = [y] + ([None if rms else mean, rstd] if return_stats else [])
        res, _ = collect(ctx, host, arrays)
        yv = _finish_out(out, res[0], host)
        if not return_stats:
            return yv
        mv = None if rms else res[1].reshape(sshape)
        return yv, make_stats(mv, res[2].reshape(sshape))

    return _run(ctx, body)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               return_stats=False):
    """Layer norm over the trailing ``normalized_shape`` dims; see ``rsnorm.layer_norm``."""
    return _rowwise(x, normalized_shape, weight, bias, eps, out, return_stats, rms=False)


def rms_eps(dtype) -> float:
    return float(np.finfo(np.float32).eps)


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, return_stats=False):
    """RMS norm ``x / sqrt(mean(x^2) + eps) * weight``; ``eps=None`` is float32 machine epsilon.
    ``return_stats`` gives ``Stats(mean=None, rstd)``."""
    if eps is None and isinstance(x, (np.ndarray, GPUArray)):
        eps = rms_eps(x.dtype)
    return _rowwise(x, normalized_shape, weight, None, eps, out, return_stats, rms=True)


def check_not_batch_axis(x, ax: int, op: str):
    """The channel axis may not be the batch axis 0 (the CPU's ChannelView rule and message)."""
    if ax == 0:
        shape = tuple(int(s) for s in x.shape)
        raise value_error(
            f"axis=0 is the batch axis; {op} needs the channel axis to be another one (1 or -1), "
            f"input shape {shape}"
        )


def _grouped_dims(x, ax, op: str = "this op"):
    check_not_batch_axis(x, ax, op)
    N = int(x.shape[0])
    S1 = _prod(x.shape[1:ax])
    C = int(x.shape[ax])
    I = _prod(x.shape[ax + 1 :])
    return N, S1, C, I


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               return_stats=False):
    """Group norm: per (sample, group of C/G channels) over the group's channels and the spatial
    axes, per-channel affine; see ``rsnorm.group_norm``. Stats have shape (N, G)."""
    host = check_x(x)
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
    check_size(x)
    check_param(weight, (C,), "weight")
    check_param(bias, (C,), "bias")
    eps = check_eps(eps)
    check_out(out, x, host)
    if x.size == 0:
        return _empty_result(x, host, (N, G), return_stats, out=out)
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        enc = _device.Encoder(ctx)
        y = data.like(out)
        mean, rstd = normalize(enc, data, y, red_grouped(N, S1, C, I, G),
                               map_grouped(S1, C, I, G), 0, eps, param_buffer(ctx, weight),
                               param_buffer(ctx, bias))
        enc.submit()
        res, _ = collect(ctx, host, [y] + ([mean, rstd] if return_stats else []))
        yv = _finish_out(out, res[0], host)
        if not return_stats:
            return yv
        return yv, make_stats(res[1].reshape(N, G), res[2].reshape(N, G))

    return _run(ctx, body)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  return_stats=False):
    """Instance norm per (sample, channel) over the spatial axes; see ``rsnorm.instance_norm``.

    With running statistics and ``use_input_stats``, they receive the batch average of the
    per-instance means and unbiased variances (as PyTorch); this update runs on the host in
    float64 (device-array running statistics are read back and written again: a small transfer).
    """
    host = check_x(x)
    if x.ndim < 2:
        raise shape_error(
            f"instance_norm expects an input of rank >= 2, got shape {tuple(x.shape)}")
    ax = norm_axis(axis, x.ndim)
    N, S1, C, I = _grouped_dims(x, ax, "instance_norm")
    check_size(x)
    for name, p in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        check_param(p, (C,), name)
    eps = check_eps(eps)
    if (running_mean is None) != (running_var is None):
        raise value_error("running_mean and running_var must be given together")
    has_running = running_mean is not None
    if not use_input_stats and not has_running:
        raise value_error("use_input_stats=False needs running_mean and running_var")
    update = bool(use_input_stats) and has_running
    m = _check_momentum(momentum, allow_none=not update)
    if update:
        _check_running_update(running_mean, running_var)
    spatial = S1 * I
    if use_input_stats and x.size > 0 and spatial <= 1:
        raise value_error(
            "Expected more than 1 spatial element when training, got input size "
            f"{tuple(x.shape)}"
        )
    check_out(out, x, host)
    if x.size == 0:
        if return_stats and host and not use_input_stats:
            return _empty_with_running_stats(x, out, running_mean, running_var, eps, (N, C))
        return _empty_result(x, host, (N, C), return_stats, out=out)
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        enc = _device.Encoder(ctx)
        y = data.like(out)
        wb, bb = param_buffer(ctx, weight), param_buffer(ctx, bias)
        red = red_grouped(N, S1, C, I, C)
        if use_input_stats and not update:
            mean, rstd = normalize(enc, data, y, red, map_grouped(S1, C, I, C), 0, eps, wb, bb)
        else:
            if use_input_stats:
                gstat, mean, rstd, _, _ = stats_pass(enc, data, red, 0, eps)
                gmap = map_grouped(S1, C, I, C)
            else:
                gstat, mean, rstd, _, _ = running_stats_pass(
                    enc, ctx, param_buffer(ctx, running_mean), param_buffer(ctx, running_var),
                    C, eps)
                gmap = map_channels(C, I)
            apply_pass(enc, data, y, gmap, gstat, 0, wb, bb)
        enc.submit()
        extra = [(gstat, N * C * 32)] if update else []
        res, raws = collect(ctx, host, [y] + ([mean, rstd] if return_stats else []), extra)
        if update:
            cnt, imean, m2 = gstat_host(raws[0], N * C)
            bmean = imean.reshape(N, C).mean(axis=0)
            bvar = (m2 / (cnt - 1)).reshape(N, C).mean(axis=0)
            if isinstance(running_mean, GPUArray):
                rm = running_mean.numpy().astype(np.float64)
                rv = running_var.numpy().astype(np.float64)
                rm = ((1.0 - m) * rm + m * bmean).astype(np.float32)
                rv = ((1.0 - m) * rv + m * bvar).astype(np.float32)
                ctx.device.queue.write_buffer(running_mean._live_buffer(ctx), 0, rm.tobytes())
                ctx.device.queue.write_buffer(running_var._live_buffer(ctx), 0, rv.tobytes())
            else:
                _host_running_update(running_mean, running_var, m, bmean, bvar)
        yv = _finish_out(out, res[0], host)
        if not return_stats:
            return yv
        if use_input_stats:
            return yv, make_stats(res[1].reshape(N, C), res[2].reshape(N, C))
        # Running statistics are per channel: broadcast them to the (N, C) shape of the stats.
        mh, rh = (res[1], res[2]) if host else (res[1].numpy(), res[2].numpy())
        means = np.ascontiguousarray(np.broadcast_to(mh, (N, C)))
        rstds = np.ascontiguousarray(np.broadcast_to(rh, (N, C)))
        if not host:
            from ._array import asarray

            means, rstds = asarray(means), asarray(rstds)
        return yv, make_stats(means, rstds)

    return _run(ctx, body)


def filter_response_norm(x, weight=None, bias=None, tau=None, eps=1e-6, *, learned_eps=None,
                         axis=1, out=None, return_stats=False):
    """Filter response norm: ``nu2 = mean(x^2)`` over the spatial axes per (sample, channel),
    ``y = weight * x / sqrt(nu2 + eps + |learned_eps|) + bias``, then ``max(y, tau)`` if ``tau``
    is given; eps must be finite and >= 0, as on the CPU. ``learned_eps`` is a scalar (a size-1
    array or a float) on the GPU path."""
    host = check_x(x)
    if x.ndim < 2:
        raise shape_error(
            f"filter_response_norm expects an input of rank >= 2, got shape {tuple(x.shape)}")
    ax = norm_axis(axis, x.ndim)
    N, S1, C, I = _grouped_dims(x, ax, "filter_response_norm")
    check_size(x)
    for name, p in (("weight", weight), ("bias", bias), ("tau", tau)):
        check_param(p, (C,), name)
    e = check_eps(eps)
    if learned_eps is not None:
        le = np.asarray(learned_eps.numpy() if isinstance(learned_eps, GPUArray) else learned_eps)
        if le.size != 1:
            raise value_error(
                f"learned_eps must be a scalar on the GPU path, got shape {le.shape}")
        e += abs(float(le.reshape(())))
    if not math.isfinite(e):
        raise value_error(f"eps + |learned_eps| must be finite, got {eps} and {learned_eps}")
    check_out(out, x, host)
    if x.size == 0:
        return _empty_result(x, host, (N, C), return_stats, rstd_only=True, out=out)
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        enc = _device.Encoder(ctx)
        y = data.like(out)
        _, rstd = normalize(enc, data, y, red_grouped(N, S1, C, I, C), map_grouped(S1, C, I, C),
                            1, e, param_buffer(ctx, weight), param_buffer(ctx, bias),
                            param_buffer(ctx, tau))
        enc.submit()
        res, _ = collect(ctx, host, [y] + ([rstd] if return_stats else []))
        yv = _finish_out(out, res[0], host)
        if not return_stats:
            return yv
        return yv, make_stats(None, res[1].reshape(N, C))

    return _run(ctx, body)


def tlu(x, tau, *, axis=1, out=None):
    """Thresholded linear unit ``max(x, tau)`` with ``tau`` per channel (NaN stays NaN)."""
    host = check_x(x)
    if x.ndim < 1:
        raise shape_error("tlu expects an input of rank >= 1")
    ax = norm_axis(axis, x.ndim)
    C = int(x.shape[ax])
    I = _prod(x.shape[ax + 1 :])
    check_size(x)
    if tau is None:
        raise value_error("tau must be given")
    check_param(tau, (C,), "tau")
    check_out(out, x, host)
    if x.size == 0:
        return _empty_like(x, host, out)
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        enc = _device.Encoder(ctx)
        y = data.like(out)
        apply_pass(enc, data, y, map_channels(C, I), None, 2, tau=param_buffer(ctx, tau))
        enc.submit()
        res, _ = collect(ctx, host, [y])
        return _finish_out(out, res[0], host)

    return _run(ctx, body)


def moments(x, axis=1):
    """Per-channel ``(count, mean, m2)`` over all other axes, as ``rsnorm.Moments`` (float64
    on the host; computed in float32 on the device, so it carries the GPU tolerance)."""
    host = check_x(x)
    if x.ndim < 1:
        raise shape_error("moments expects an input of rank >= 1")
    ax = norm_axis(axis, x.ndim)
    check_size(x)
    C = int(x.shape[ax])
    O = _prod(x.shape[:ax])
    I = _prod(x.shape[ax + 1 :])
    count = O * I
    if x.size == 0:
        # As the CPU: m2 is the empty sum 0 (also for count == 0, so merging an empty part is
        # exact); the mean of nothing is NaN.
        return _moments(count, np.full(C, np.nan), np.zeros(C))
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        enc = _device.Encoder(ctx)
        gstat, _, _, _, _ = stats_pass(enc, data, red_channels(O, C, I), 0, 0.0)
        enc.submit()
        _, raws = collect(ctx, False, [], [(gstat, C * 32)])
        _, mean, m2 = gstat_host(raws[0], C)
        return _moments(count, mean, m2)

    return _run(ctx, body)


def _moments(count, mean, m2):
    # The CPU package's Moments (with merge) when the native module is there, else a local one.
    try:
        import rsnorm

        cls = getattr(rsnorm, "Moments", Moments)
    except ImportError:  # pragma: no cover
        cls = Moments
    return cls(count, mean, m2)


def _lrn_window(size: int, window: str):
    if window == "torch":
        return size // 2, (size - 1) // 2
    if window == "onnx":
        return (size - 1) // 2, size // 2
    raise value_error(f"window must be 'torch' or 'onnx', got {window!r}")


def _channel_slabs(x, ax):
    C = int(x.shape[ax])
    return _prod(x.shape[:ax]), C, _prod(x.shape[ax + 1 :])


def local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0, *, alpha_over_size=True,
                        window="torch", axis=1, out=None):
    """LRN across channels ``b_c = a_c / (k + alpha' * sum_{j in W(c)} a_j^2)^beta``, zero
    padding; see ``rsnorm.local_response_norm``. ``(k + alpha' s)^-beta`` is
    ``exp2(-beta * log2(.))`` in float32."""
    host = check_x(x)
    if x.ndim < 3:
        raise shape_error(
            f"local_response_norm expects an input of rank >= 3, got shape {tuple(x.shape)}")
    ax = norm_axis(axis, x.ndim)
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if size <= 0:
        raise value_error(f"size must be positive, got {size}")
    lo, hi = _lrn_window(int(size), window)
    for name, v in (("alpha", alpha), ("beta", beta), ("k", k)):
        if not math.isfinite(float(v)):
            raise value_error(f"{name} must be finite, got {v}")
    a = float(alpha) / size if alpha_over_size else float(alpha)
    check_size(x)
    check_out(out, x, host)
    _O, C, I = _channel_slabs(x, ax)
    if x.size == 0:
        return _empty_like(x, host, out)
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        enc = _device.Encoder(ctx)
        y = data.like(out)
        for first, count, ws, off, sz in _device.element_windows(ctx, data.size, data.itemsize,
                                                                 C * I):
            params = _device.pack([(first, "u"), (count, "u"), (ws, "u"), (I, "u"), (C, "u"),
                                   (lo, "u"), (hi, "u"), (0, "u"), (a, "f"), (float(beta), "f"),
                                   (float(k), "f"), (0, "u")])
            nwg = min(math.ceil(count / _device.APPLY_WG), ctx.max_wg)
            enc.dispatch("lrn", data.storage, {"WG": _device.APPLY_WG}, params,
                         [(data.buffer, off, sz), (y._buffer, off, sz)], (nwg, 1))
        enc.submit()
        res, _ = collect(ctx, host, [y])
        return _finish_out(out, res[0], host)

    return _run(ctx, body)


def gdn(x, beta, gamma, *, inverse=False, variant="gdn", axis=1, out=None):
    """Generalized divisive normalization across channels (Ballé 2016):
    ``y_i = x_i / sqrt(beta_i + sum_j gamma[i, j] x_j^2)``; ``inverse=True`` multiplies;
    ``variant="gdn1"`` uses ``beta_i + sum_j gamma[i, j] |x_j|`` without the root. ``beta > 0``
    and ``gamma >= 0`` are checked for NumPy parameters (device parameters are not read back)."""
    host = check_x(x)
    if x.ndim < 2:
        raise shape_error(f"gdn expects an input of rank >= 2, got shape {tuple(x.shape)}")
    ax = norm_axis(axis, x.ndim)
    if variant not in ("gdn", "gdn1"):
        raise value_error(f"variant must be 'gdn' or 'gdn1', got {variant!r}")
    _O, C, I = _channel_slabs(x, ax)
    if beta is None or gamma is None:
        raise value_error("gdn needs beta (C,) and gamma (C, C)")
    check_param(beta, (C,), "beta")
    check_param(gamma, (C, C), "gamma")
    if isinstance(beta, np.ndarray) and not np.all(beta > 0):
        raise value_error("beta must be > 0")
    if isinstance(gamma, np.ndarray) and not np.all(gamma >= 0):
        raise value_error("gamma must be >= 0")
    check_size(x)
    check_out(out, x, host)
    if x.size == 0:
        return _empty_like(x, host, out)
    ctx = _device.context()

    def body():
        data = Data(ctx, x, host)
        enc = _device.Encoder(ctx)
        y = data.like(out)
        bb = param_buffer(ctx, beta)
        gb = param_buffer(ctx, gamma)
        consts = {"WG": _device.APPLY_WG, "VARIANT": int(variant == "gdn1"),
                  "INVERSE": int(bool(inverse))}
        for first, count, ws, off, sz in _device.element_windows(ctx, data.size, data.itemsize,
                                                                 C * I):
            params = _device.pack([(first, "u"), (count, "u"), (ws, "u"), (I, "u"), (C, "u"),
                                   (0, "u"), (0, "u"), (0, "u")])
            nwg = min(math.ceil(count / _device.APPLY_WG), ctx.max_wg)
            enc.dispatch("gdn", data.storage, consts, params,
                         [(data.buffer, off, sz), (y._buffer, off, sz), bb, gb], (nwg, 1))
        enc.submit()
        res, _ = collect(ctx, host, [y])
        return _finish_out(out, res[0], host)

    return _run(ctx, body)
