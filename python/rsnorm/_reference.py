"""Plain float64 NumPy references for every rsnorm op (SPEC §1).

Shared by ``rsnorm demo``, ``rsnorm check`` and the benchmark's result check. Each function
takes arrays of any float dtype, reads them exactly as float64 and returns float64 results, so
the comparison measures rsnorm's error and not the reference's. The formulas are written the
obvious way on purpose: two-pass statistics in float64, no fusing, no cleverness.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "filter_response_norm",
    "gdn",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "iter_norm",
    "layer_norm",
    "layer_norm_backward",
    "local_response_norm",
    "mean_variance_norm",
    "moments",
    "normalize",
    "rms_norm",
    "rms_norm_backward",
    "tlu",
    "whiten",
]


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector along ``axis`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def _affine(y, weight, bias, ndim, axis):
    cs = _channel_shape(ndim, axis)
    if weight is not None:
        y = y * _f64(weight).reshape(cs)
    if bias is not None:
        y = y + _f64(bias).reshape(cs)
    return y


def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, num_batches_tracked=0,
               momentum_convention="torch"):
    """Returns ``(y, new_running_mean, new_running_var)`` (the stats are None when not given).

    Training normalizes with the biased batch variance; the running variance is updated with
    the unbiased one (PyTorch), or the biased one with ``momentum_convention="onnx"``.
    """
    x = _f64(x)
    axis = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != axis)
    cs = _channel_shape(x.ndim, axis)
    new_rm, new_rv = _f64(running_mean), _f64(running_var)
    if training or running_mean is None:
        mean = x.mean(axis=red)
        var = ((x - mean.reshape(cs)) ** 2).mean(axis=red)
    else:
        mean, var = new_rm, new_rv
    if training and running_mean is not None:
        n = x.size // x.shape[axis]
        if momentum_convention == "onnx":
            new_rm = new_rm * momentum + mean * (1.0 - momentum)
            new_rv = new_rv * momentum + var * (1.0 - momentum)
        else:
            m = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
            new_rm = (1.0 - m) * new_rm + m * mean
            new_rv = (1.0 - m) * new_rv + m * var * n / (n - 1)
    y = (x - mean.reshape(cs)) / np.sqrt(var.reshape(cs) + eps)
    return _affine(y, weight, bias, x.ndim, axis), new_rm, new_rv


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Over the trailing ``normalized_shape`` dims; element-wise affine of that shape."""
    x = _f64(x)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    red = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = x.mean(axis=red, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=red, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    return y


def rms_eps(dtype) -> float:
    """SPEC's ``eps=None`` rule for RMS norm."""
    dtype = np.dtype(dtype)
    return float(np.finfo(np.float64 if dtype == np.float64 else np.float32).eps)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """``x / sqrt(mean(x**2) + eps) * weight`` over the trailing dims."""
    if eps is None:
        eps = rms_eps(np.asarray(x).dtype)
    x = _f64(x)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    red = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    # Scaling by the max keeps x**2 finite for float64 inputs near 1e200; for float32 inputs
    # float64 has room anyway, so this only matters for float64.
    scale = np.max(np.abs(x), axis=red, keepdims=True)
    scale = np.where((scale > 0) & np.isfinite(scale), scale, 1.0)
    xs = x / scale
    ms = (xs**2).mean(axis=red, keepdims=True)
    with np.errstate(over="ignore", divide="ignore"):  # eps/scale**2 -> 0 or inf is right
        y = xs / np.sqrt(ms + eps / scale**2)
    if weight is not None:
        y = y * _f64(weight)
    return y


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1):
    """Channels split into ``num_groups`` groups; statistics per (sample, group)."""
    x = _f64(x)
    axis = axis % x.ndim
    xt = np.moveaxis(x, axis, 1)
    n = xt.shape[0]
    g = xt.reshape(n, num_groups, -1)
    mean = g.mean(axis=2, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=2, keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(xt.shape)
    y = _affine(y, weight, bias, y.ndim, 1)
    return np.moveaxis(y, 1, axis)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1):
    """Per (sample, channel) over the spatial axes. Returns ``(y, new_rm, new_rv)``.

    As in PyTorch, the running stats receive the batch average of the per-instance means and
    of the per-instance unbiased variances.
    """
    x = _f64(x)
    axis = axis % x.ndim
    xt = np.moveaxis(x, axis, 1)
    n, c = xt.shape[:2]
    rows = xt.reshape(n, c, -1)
    new_rm, new_rv = _f64(running_mean), _f64(running_var)
    if use_input_stats:
        mean = rows.mean(axis=2)
        var = ((rows - mean[:, :, None]) ** 2).mean(axis=2)
        if running_mean is not None:
            hw = rows.shape[2]
            new_rm = (1.0 - momentum) * new_rm + momentum * mean.mean(axis=0)
            new_rv = (1.0 - momentum) * new_rv + momentum * (var * hw / (hw - 1)).mean(axis=0)
    else:
        mean = np.broadcast_to(new_rm, (n, c))
        var = np.broadcast_to(new_rv, (n, c))
    y = ((rows - mean[:, :, None]) / np.sqrt(var[:, :, None] + eps)).reshape(xt.shape)
    y = _affine(y, weight, bias, y.ndim, 1)
    return np.moveaxis(y, 1, axis), new_rm, new_rv


def moments(x, axis=1):
    """``(count, mean, m2)`` per channel: the sum of squared deviations, not the variance."""
    x = _f64(x)
    axis = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != axis)
    mean = x.mean(axis=red)
    m2 = ((x - mean.reshape(_channel_shape(x.ndim, axis))) ** 2).sum(axis=red)
    return x.size // max(x.shape[axis], 1), mean, m2


def _window(size: int, window: str) -> tuple[int, int]:
    """How many channels before and after ``c`` the LRN window covers."""
    if window == "torch":
        return size // 2, (size - 1) // 2
    if window == "onnx":
        return (size - 1) // 2, size // 2  # ceil((size-1)/2) == size // 2
    raise ValueError(f"window must be 'torch' or 'onnx', got {window!r}")


def local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0, *, alpha_over_size=True,
                        window="torch", axis=1):
    """``b_c = a_c / (k + alpha' * sum_{j in W(c)} a_j**2) ** beta`` with zero padding."""
    x = _f64(x)
    xt = np.moveaxis(x, axis % x.ndim, 1)
    c = xt.shape[1]
    before, after = _window(size, window)
    sq = xt**2
    s = np.zeros_like(xt)
    for ch in range(c):
        lo, hi = max(ch - before, 0), min(ch + after, c - 1)
        s[:, ch] = sq[:, lo : hi + 1].sum(axis=1)
    a = alpha / size if alpha_over_size else alpha
    y = xt / (k + a * s) ** beta
    return np.moveaxis(y, 1, axis % x.ndim)


def filter_response_norm(x, weight=None, bias=None, tau=None, eps=1e-6, *, learned_eps=None,
                         axis=1):
    """FRN: ``nu2 = mean(x**2)`` over the spatial axes; ``y = w * x / sqrt(nu2 + |eps| +
    |learned_eps|) + b``, then ``max(y, tau)`` when ``tau`` is given."""
    x = _f64(x)
    axis = axis % x.ndim
    spatial = tuple(i for i in range(1, x.ndim) if i != axis)
    nu2 = (x**2).mean(axis=spatial, keepdims=True)
    e = abs(eps) + (0.0 if learned_eps is None else np.abs(_f64(learned_eps)))
    if np.ndim(e) == 1:
        e = e.reshape(_channel_shape(x.ndim, axis))
    y = _affine(x / np.sqrt(nu2 + e), weight, bias, x.ndim, axis)
    if tau is not None:
        y = tlu(y, tau, axis=axis)
    return y


def tlu(x, tau, *, axis=1):
    """``max(x, tau)`` with ``tau`` per channel."""
    x = _f64(x)
    return np.maximum(x, _f64(tau).reshape(_channel_shape(x.ndim, axis % x.ndim)))


def gdn(x, beta, gamma, *, inverse=False, variant="gdn", axis=1):
    """``y_i = x_i / sqrt(beta_i + sum_j gamma[i, j] * x_j**2)`` across channels (Ballé 2016);
    ``inverse`` multiplies instead; ``variant="gdn1"`` uses ``beta_i + sum_j gamma[i, j]*|x_j|``
    without the square root."""
    x = _f64(x)
    xt = np.moveaxis(x, axis % x.ndim, -1)
    g = _f64(gamma)
    if variant == "gdn1":
        d = np.abs(xt) @ g.T + _f64(beta)
    elif variant == "gdn":
        d = np.sqrt(xt**2 @ g.T + _f64(beta))
    else:
        raise ValueError(f"variant must be 'gdn' or 'gdn1', got {variant!r}")
    y = xt * d if inverse else xt / d
    return np.moveaxis(y, -1, axis % x.ndim)


def mean_variance_norm(x, axes: Sequence[int] = (0, 2, 3), eps=1e-9):
    """ONNX MeanVarianceNormalization: ``(x - mean) / sqrt(var + eps)`` over ``axes``."""
    x = _f64(x)
    axes = tuple(a % x.ndim for a in axes)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def normalize(x, p=2.0, axis=1, eps=1e-12):
    """``x / max(||x||_p, eps)`` along ``axis`` (PyTorch ``F.normalize``)."""
    x = _f64(x)
    norm = np.sum(np.abs(x) ** p, axis=axis, keepdims=True) ** (1.0 / p)
    return x / np.maximum(norm, eps)


# ---------------------------------------------------------------------------------------------
# Backward (SPEC §1 "Backward"): gradients of the forwards above, as dicts of float64 arrays
# with the keys of rsnorm's result tuples ("x", "weight", "bias"), present only for the
# parameters that were given.
# ---------------------------------------------------------------------------------------------


def _standardize_backward(g, xhat, rstd, red):
    """dx of ``y = xhat`` with ``xhat = (x - mean) * rstd`` over ``red``, given ``g = dL/dxhat``."""
    return rstd * (g - g.mean(axis=red, keepdims=True)
                   - xhat * (g * xhat).mean(axis=red, keepdims=True))


def _param_grads(out, dy, xhat, weight, bias, red):
    if weight is not None:
        out["weight"] = (dy * xhat).sum(axis=red)
    if bias is not None:
        out["bias"] = dy.sum(axis=red)
    return out


def batch_norm_backward(grad_y, x, running_mean=None, running_var=None, weight=None, bias=None,
                        training=False, eps=1e-5, *, axis=1):
    """Training: through the batch statistics; eval (with running stats): the affine map."""
    x, dy = _f64(x), _f64(grad_y)
    axis = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != axis)
    cs = _channel_shape(x.ndim, axis)
    w = np.ones(x.shape[axis]) if weight is None else _f64(weight)
    g = dy * w.reshape(cs)
    if training or running_mean is None:
        mean = x.mean(axis=red, keepdims=True)
        rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=red, keepdims=True) + eps)
        xhat = (x - mean) * rstd
        dx = _standardize_backward(g, xhat, rstd, red)
    else:
        rstd = 1.0 / np.sqrt(_f64(running_var).reshape(cs) + eps)
        xhat = (x - _f64(running_mean).reshape(cs)) * rstd
        dx = g * rstd
    return _param_grads({"x": dx}, dy, xhat, weight, bias, red)


def layer_norm_backward(grad_y, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    x, dy = _f64(x), _f64(grad_y)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    k = len(normalized_shape)
    red = tuple(range(x.ndim - k, x.ndim))
    mean = x.mean(axis=red, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=red, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    g = dy if weight is None else dy * _f64(weight)
    out = {"x": _standardize_backward(g, xhat, rstd, red)}
    return _param_grads(out, dy, xhat, weight, bias, tuple(range(x.ndim - k)))


def rms_norm_backward(grad_y, x, normalized_shape, weight=None, eps=None):
    if eps is None:
        eps = rms_eps(np.asarray(x).dtype)
    x, dy = _f64(x), _f64(grad_y)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    k = len(normalized_shape)
    red = tuple(range(x.ndim - k, x.ndim))
    rstd = 1.0 / np.sqrt((x**2).mean(axis=red, keepdims=True) + eps)
    xhat = x * rstd
    g = dy if weight is None else dy * _f64(weight)
    out = {"x": rstd * (g - xhat * (g * xhat).mean(axis=red, keepdims=True))}
    return _param_grads(out, dy, xhat, weight, None, tuple(range(x.ndim - k)))


def group_norm_backward(grad_y, x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1):
    x, dy = _f64(x), _f64(grad_y)
    axis = axis % x.ndim
    xt, dyt = np.moveaxis(x, axis, 1), np.moveaxis(dy, axis, 1)
    n = xt.shape[0]
    w = np.ones(xt.shape[1]) if weight is None else _f64(weight)
    g = (dyt * w.reshape(_channel_shape(xt.ndim, 1))).reshape(n, num_groups, -1)
    xs = xt.reshape(n, num_groups, -1)
    mean = xs.mean(axis=2, keepdims=True)
    rstd = 1.0 / np.sqrt(((xs - mean) ** 2).mean(axis=2, keepdims=True) + eps)
    xhat = (xs - mean) * rstd
    dx = _standardize_backward(g, xhat, rstd, (2,)).reshape(xt.shape)
    red = tuple(i for i in range(xt.ndim) if i != 1)
    out = {"x": np.moveaxis(dx, 1, axis)}
    return _param_grads(out, dyt, xhat.reshape(xt.shape), weight, bias, red)


def instance_norm_backward(grad_y, x, weight=None, bias=None, eps=1e-5, *, axis=1):
    """With the instance statistics (``use_input_stats=True``): group norm with G = C."""
    x = np.asarray(x)
    return group_norm_backward(grad_y, x, x.shape[axis % x.ndim], weight, bias, eps, axis=axis)


def whiten(x, method="zca", eps=1e-5, unbiased=False):
    """``(y, mean, eigenvalues)`` of whitening the rows of ``x`` (m samples × d features).

    Covariance divided by m (or m − 1 when ``unbiased``); ZCA ``W = U (Λ+eps)^-½ Uᵀ``, PCA
    ``W = (Λ+eps)^-½ Uᵀ`` (eigenvalues descending; column signs are arbitrary), Cholesky
    ``W = L⁻¹`` with ``L Lᵀ = Σ + eps·I``; ``y = (x − mean) Wᵀ``.
    """
    x = _f64(x)
    m = x.shape[0]
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / (m - 1 if unbiased else m)
    lam, u = np.linalg.eigh(cov)
    lam, u = lam[::-1], u[:, ::-1]
    if method == "zca":
        w = (u / np.sqrt(lam + eps)) @ u.T
    elif method == "pca":
        w = (u / np.sqrt(lam + eps)).T
    elif method == "cholesky":
        low = np.linalg.cholesky(cov + eps * np.eye(cov.shape[0]))
        w = np.linalg.inv(low)
    else:
        raise ValueError(f"method must be 'zca', 'pca' or 'cholesky', got {method!r}")
    return xc @ w.T, mean, lam


def iter_norm(x, running_mean=None, running_wm=None, num_groups=1, T=5, eps=1e-5,
              training=True, momentum=0.1, *, axis=1):
    """IterNorm (Huang et al. 2019), returns ``(y, new_running_mean, new_running_wm)``.

    Per group of d = C/G channels over all m other positions: ``Σ = xc xcᵀ/m + eps·I``,
    ``Σ_N = Σ/tr(Σ)``, ``P₀ = I``, ``P_{k+1} = ½(3P_k − P_k³ Σ_N)``, ``W = P_T/sqrt(tr Σ)``,
    ``y = W xc``. Eval: ``y = running_wm (x − running_mean)``.
    """
    x = _f64(x)
    axis = axis % x.ndim
    xt = np.moveaxis(x, axis, 0)
    c = xt.shape[0]
    d = c // num_groups
    xs = xt.reshape(num_groups, d, -1)
    new_rm, new_wm = _f64(running_mean), _f64(running_wm)
    if training:
        mean = xs.mean(axis=2, keepdims=True)
        xc = xs - mean
        sigma = xc @ np.swapaxes(xc, 1, 2) / xs.shape[2] + eps * np.eye(d)
        tr = np.trace(sigma, axis1=1, axis2=2)[:, None, None]
        sn = sigma / tr
        p = np.broadcast_to(np.eye(d), sigma.shape)
        for _ in range(T):
            p = 1.5 * p - 0.5 * (p @ p @ p @ sn)
        wm = p / np.sqrt(tr)
        if running_mean is not None:
            new_rm = (1 - momentum) * new_rm + momentum * mean.reshape(new_rm.shape)
        if running_wm is not None:
            new_wm = (1 - momentum) * new_wm + momentum * wm.reshape(new_wm.shape)
    else:
        mean = new_rm.reshape(num_groups, d, 1)
        wm = new_wm.reshape(num_groups, d, d)
        xc = xs - mean
    y = (wm @ xc).reshape(xt.shape)
    return np.moveaxis(y, 0, axis), new_rm, new_wm
