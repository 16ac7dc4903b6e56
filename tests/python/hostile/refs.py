"""Float64 reference formulas for the ops that tests/python/reference.py does not cover (the
channel-mixing family, iterative normalization, whitening), written plainly from SPEC.md §1."""

from __future__ import annotations

import numpy as np

F64 = np.float64


def f64(a):
    return None if a is None else np.asarray(a, dtype=F64)


def chan(ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return tuple(shape)


def lrn(x, size, alpha=1e-4, beta=0.75, k=1.0, alpha_over_size=True, window="torch", axis=1):
    x = np.moveaxis(f64(x), axis % x.ndim, 1)
    c = x.shape[1]
    a = alpha / size if alpha_over_size else alpha
    if window == "torch":
        lo, hi = size // 2, (size - 1) // 2
    else:
        lo, hi = (size - 1) // 2, -(-(size - 1) // 2)
    sq = x * x
    acc = np.zeros_like(x)
    for ch in range(c):
        j0, j1 = max(0, ch - lo), min(c - 1, ch + hi)
        if j0 <= j1:
            acc[:, ch] = sq[:, j0:j1 + 1].sum(axis=1)
    y = x / (k + a * acc) ** beta
    return np.moveaxis(y, 1, axis % x.ndim)


def frn(x, weight=None, bias=None, tau=None, eps=1e-6, learned_eps=None, axis=1):
    x = f64(x)
    ax = axis % x.ndim
    red = tuple(i for i in range(1, x.ndim) if i != ax)
    nu2 = (x * x).mean(axis=red, keepdims=True) if red else x * x
    le = 0.0 if learned_eps is None else np.abs(f64(learned_eps))
    if np.ndim(le) == 1 and np.size(le) != 1:
        le = le.reshape(chan(x.ndim, ax))
    elif np.ndim(le):
        le = le.reshape(())
    y = x / np.sqrt(nu2 + abs(eps) + le)
    sh = chan(x.ndim, ax)
    if weight is not None:
        y = y * f64(weight).reshape(sh)
    if bias is not None:
        y = y + f64(bias).reshape(sh)
    if tau is not None:
        y = np.maximum(y, f64(tau).reshape(sh))
    return y


def frn_rstd(x, eps=1e-6, learned_eps=None, axis=1):
    x = f64(x)
    ax = axis % x.ndim
    xm = np.moveaxis(x, ax, 1)
    s = int(np.prod(xm.shape[2:]))
    nu2 = (xm * xm).reshape(xm.shape[0], xm.shape[1], s).mean(axis=2)
    le = 0.0 if learned_eps is None else np.abs(f64(learned_eps)).reshape(-1)
    return 1.0 / np.sqrt(nu2 + abs(eps) + le)


def tlu(x, tau, axis=1):
    x = f64(x)
    return np.maximum(x, f64(tau).reshape(chan(x.ndim, axis)))


def gdn(x, beta, gamma, inverse=False, variant="gdn", axis=1):
    x = np.moveaxis(f64(x), axis % x.ndim, -1)
    g = f64(gamma)
    s = np.abs(x) if variant == "gdn1" else x * x
    d = f64(beta) + s @ g.T
    if variant == "gdn1":
        y = x * d if inverse else x / d
    else:
        y = x * np.sqrt(d) if inverse else x / np.sqrt(d)
    return np.moveaxis(y, -1, axis % x.ndim)


def mvn(x, axes=(0, 2, 3), eps=1e-9):
    x = f64(x)
    axes = tuple(a % x.ndim for a in ((axes,) if np.ndim(axes) == 0 else axes))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / (np.sqrt(var) + eps)


def lp_normalize(x, p=2.0, axis=1, eps=1e-12):
    x = f64(x)
    if np.isinf(p):
        norm = np.abs(x).max(axis=axis, keepdims=True, initial=0.0)
        # np.max ignores nothing: a NaN in the slice gives a NaN norm, as it should.
        norm = np.where(np.isnan(x).any(axis=axis, keepdims=True), np.nan, norm)
    else:
        m = np.abs(x).max(axis=axis, keepdims=True, initial=0.0)
        m = np.where(m == 0, 1.0, m)
        norm = m * ((np.abs(x) / m) ** p).sum(axis=axis, keepdims=True) ** (1.0 / p)
    return x / np.maximum(norm, eps)


def iter_norm(x, running_mean=None, running_wm=None, num_groups=1, T=5, eps=1e-5,
              training=True, axis=1):
    """Returns y (float64); Newton–Schulz exactly as the docstring of rsnorm.iter_norm."""
    x = f64(x)
    ax = axis % x.ndim
    xm = np.moveaxis(x, ax, -1)
    c = xm.shape[-1]
    rows = xm.reshape(-1, c)
    g = num_groups
    d = c // g
    y = np.empty_like(rows)
    for k in range(g):
        xs = rows[:, k * d:(k + 1) * d]
        if training:
            mu = xs.mean(axis=0)
            xc = xs - mu
            sigma = xc.T @ xc / xs.shape[0] + eps * np.eye(d)
            tr = np.trace(sigma)
            sn = sigma / tr
            p = np.eye(d)
            for _ in range(T):
                p = 1.5 * p - 0.5 * (p @ p @ p) @ sn
            w = p / np.sqrt(tr)
        else:
            mu = f64(running_mean).reshape(c)[k * d:(k + 1) * d]
            w = f64(running_wm).reshape(g, d, d)[k]
            xc = xs - mu
        y[:, k * d:(k + 1) * d] = xc @ w.T
    return np.moveaxis(y.reshape(xm.shape), -1, ax)


def whitening_gram(X, eps, unbiased):
    """Y·Yᵀ for any whitening W with WᵀW = (Σ + eps·I)⁻¹ (true for ZCA, PCA and Cholesky)."""
    X = f64(X)
    m = X.shape[0]
    xc = X - X.mean(axis=0)
    cov = xc.T @ xc / (m - 1 if unbiased else m)
    lam, u = np.linalg.eigh(cov)
    lam = np.maximum(lam, 0.0)
    inv = (u / (lam + eps)) @ u.T
    cond = float((lam.max(initial=0) + eps) / (lam.min() + eps))
    return xc @ inv @ xc.T, (u / np.sqrt(lam + eps)) @ u.T, xc, cond
