"""Plain float64 NumPy references for the GPU tests (forward and backward).

Everything is computed in float64 from the float32/float16 values the GPU sees, with two-pass
statistics and no cleverness, so a comparison measures the GPU's error. The backward formulas are
checked against central finite differences of the forward references in test_gpu_backward.py.
"""

from __future__ import annotations

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def chan_shape(ndim, axis):
    s = [1] * ndim
    s[axis % ndim] = -1
    return tuple(s)


def affine(y, w, b, axis):
    cs = chan_shape(y.ndim, axis)
    if w is not None:
        y = y * f64(w).reshape(cs)
    if b is not None:
        y = y + f64(b).reshape(cs)
    return y


def batch_norm(x, rm=None, rv=None, w=None, b=None, training=False, eps=1e-5, axis=1):
    x = f64(x)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    cs = chan_shape(x.ndim, axis)
    if training or rm is None:
        mean = x.mean(axis=red)
        var = ((x - mean.reshape(cs)) ** 2).mean(axis=red)
    else:
        mean, var = f64(rm), f64(rv)
    rstd = 1.0 / np.sqrt(var + eps)
    return affine((x - mean.reshape(cs)) * rstd.reshape(cs), w, b, axis), mean, rstd, var


def layer_norm(x, k, w=None, b=None, eps=1e-5):
    """Over the trailing ``k`` dims."""
    x = f64(x)
    red = tuple(range(x.ndim - k, x.ndim))
    mean = x.mean(axis=red, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=red, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if w is not None:
        y = y * f64(w)
    if b is not None:
        y = y + f64(b)
    return y, mean.reshape(x.shape[: x.ndim - k]), (1 / np.sqrt(var + eps)).reshape(
        x.shape[: x.ndim - k])


def rms_norm(x, k, w=None, eps=F32_EPS):
    x = f64(x)
    red = tuple(range(x.ndim - k, x.ndim))
    ms = (x**2).mean(axis=red, keepdims=True)
    y = x / np.sqrt(ms + eps)
    if w is not None:
        y = y * f64(w)
    return y, (1 / np.sqrt(ms + eps)).reshape(x.shape[: x.ndim - k])


def _to_ncs(x, axis):
    """(N, C, S) view of x with the channel axis moved to 1."""
    xt = np.moveaxis(x, axis % x.ndim, 1)
    return xt, xt.reshape(xt.shape[0], xt.shape[1], -1)


def group_norm(x, G, w=None, b=None, eps=1e-5, axis=1):
    x = f64(x)
    xt, r = _to_ncs(x, axis)
    N, C, S = r.shape
    g = r.reshape(N, G, (C // G) * S)
    mean = g.mean(axis=2, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=2, keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(xt.shape)
    y = np.moveaxis(affine(y, w, b, 1), 1, axis % x.ndim)
    return y, mean[:, :, 0], 1 / np.sqrt(var[:, :, 0] + eps)


def instance_norm(x, w=None, b=None, eps=1e-5, axis=1):
    x = f64(x)
    return group_norm(x, x.shape[axis % x.ndim], w, b, eps, axis)


def frn(x, w=None, b=None, tau=None, eps=1e-6, axis=1):
    x = f64(x)
    xt, r = _to_ncs(x, axis)
    nu2 = (r**2).mean(axis=2, keepdims=True)
    y = (r / np.sqrt(nu2 + abs(eps))).reshape(xt.shape)
    y = affine(y, w, b, 1)
    if tau is not None:
        y = np.maximum(y, f64(tau).reshape(chan_shape(y.ndim, 1)))
    return np.moveaxis(y, 1, axis % x.ndim)


def lrn(x, size, alpha=1e-4, beta=0.75, k=1.0, alpha_over_size=True, window="torch", axis=1):
    x = f64(x)
    xt = np.moveaxis(x, axis % x.ndim, 1)
    C = xt.shape[1]
    before, after = (size // 2, (size - 1) // 2) if window == "torch" else ((size - 1) // 2,
                                                                           size // 2)
    s = np.zeros_like(xt)
    for c in range(C):
        lo, hi = max(c - before, 0), min(c + after, C - 1)
        s[:, c] = (xt[:, lo : hi + 1] ** 2).sum(axis=1)
    a = alpha / size if alpha_over_size else alpha
    return np.moveaxis(xt / (k + a * s) ** beta, 1, axis % x.ndim)


def gdn(x, beta, gamma, inverse=False, variant="gdn", axis=1):
    x = f64(x)
    xt = np.moveaxis(x, axis % x.ndim, -1)
    f = np.abs(xt) if variant == "gdn1" else xt**2
    s = f @ f64(gamma).T + f64(beta)
    d = s if variant == "gdn1" else np.sqrt(s)
    return np.moveaxis(xt * d if inverse else xt / d, -1, axis % x.ndim)


# ----------------------------------------------------------------------------- backward


def _norm_backward(dy, x, red, w_b, center=True, eps=1e-5, ms_eps=None):
    """dx of y = xhat (* w) for groups reduced over ``red`` (keepdims broadcasting);
    ``w_b`` is w broadcast to x's shape (or None)."""
    x = f64(x)
    dy = f64(dy)
    if center:
        mean = x.mean(axis=red, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=red, keepdims=True)
        rstd = 1 / np.sqrt(var + eps)
        xhat = (x - mean) * rstd
    else:
        rstd = 1 / np.sqrt((x**2).mean(axis=red, keepdims=True) + ms_eps)
        xhat = x * rstd
    g = dy * (w_b if w_b is not None else 1.0)
    dx = g - (xhat * g).mean(axis=red, keepdims=True) * xhat
    if center:
        dx = dx - g.mean(axis=red, keepdims=True)
    return dx * rstd, xhat


def layer_norm_backward(dy, x, k, w=None, eps=1e-5):
    red = tuple(range(x.ndim - k, x.ndim))
    dx, xhat = _norm_backward(dy, x, red, None if w is None else f64(w), True, eps)
    rows = tuple(range(x.ndim - k))
    return dx, (f64(dy) * xhat).sum(axis=rows), f64(dy).sum(axis=rows)


def rms_norm_backward(dy, x, k, w=None, eps=F32_EPS):
    red = tuple(range(x.ndim - k, x.ndim))
    dx, xhat = _norm_backward(dy, x, red, None if w is None else f64(w), False, ms_eps=eps)
    rows = tuple(range(x.ndim - k))
    return dx, (f64(dy) * xhat).sum(axis=rows)


def group_norm_backward(dy, x, G, w=None, eps=1e-5, axis=1):
    xt, r = _to_ncs(f64(x), axis)
    _, dr = _to_ncs(f64(dy), axis)
    N, C, S = r.shape
    wb = None if w is None else np.broadcast_to(f64(w)[None, :, None], r.shape)
    wg = None if wb is None else wb.reshape(N, G, -1)
    dx, xhat = _norm_backward(dr.reshape(N, G, -1), r.reshape(N, G, -1), (2,), wg, True, eps)
    dx = np.moveaxis(dx.reshape(xt.shape), 1, axis % x.ndim)
    xh = xhat.reshape(N, C, S)
    return dx, (dr * xh).sum(axis=(0, 2)), dr.sum(axis=(0, 2))


def batch_norm_backward(dy, x, rm=None, rv=None, w=None, training=True, eps=1e-5, axis=1):
    x = f64(x)
    dy = f64(dy)
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    cs = chan_shape(x.ndim, ax)
    wb = None if w is None else np.broadcast_to(f64(w).reshape(cs), x.shape)
    if training or rm is None:
        dx, xhat = _norm_backward(dy, x, red, wb, True, eps)
    else:
        rstd = (1 / np.sqrt(f64(rv) + eps)).reshape(cs)
        xhat = (x - f64(rm).reshape(cs)) * rstd
        dx = dy * (wb if wb is not None else 1.0) * rstd
    return dx, (dy * xhat).sum(axis=red), dy.sum(axis=red)
