"""Plain float64 NumPy references for the channel-mixing ops, and the shared test helpers
(finite differences, layout variants). Written the obvious way, sharing no code with rsnorm."""

from __future__ import annotations

import numpy as np

DTYPES = (np.float16, np.float32, np.float64)
# Output tolerance per dtype against the float64 reference (one rounding of the output, plus
# the reference's own rounding for float64).
TOL = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-12}


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def lrn(x, size, alpha=1e-4, beta=0.75, k=1.0, alpha_over_size=True, window="torch", axis=1):
    x = np.moveaxis(f64(x), axis, 1)
    c = x.shape[1]
    if window == "torch":
        lo, hi = size // 2, (size - 1) // 2
    else:
        lo, hi = (size - 1) // 2, size // 2
    a = alpha / size if alpha_over_size else alpha
    sq = x * x
    s = np.zeros_like(x)
    for ch in range(c):
        s[:, ch] = sq[:, max(0, ch - lo): min(c - 1, ch + hi) + 1].sum(axis=1)
    y = x / (k + a * s) ** beta
    return np.moveaxis(y, 1, axis)


def frn(x, weight=None, bias=None, tau=None, eps=1e-6, learned_eps=None, axis=1):
    x = np.moveaxis(f64(x), axis, 1)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    sp = tuple(range(2, x.ndim))
    nu2 = (x * x).mean(axis=sp, keepdims=True) if sp else x * x
    e = eps
    if learned_eps is not None:
        le = np.abs(f64(learned_eps))
        e = e + (le.reshape(shape) if le.size > 1 else le.reshape(()))
    y = x / np.sqrt(nu2 + e)
    if weight is not None:
        y = y * f64(weight).reshape(shape)
    if bias is not None:
        y = y + f64(bias).reshape(shape)
    if tau is not None:
        y = np.maximum(y, f64(tau).reshape(shape))
    return np.moveaxis(y, 1, axis)


def tlu(x, tau, axis=1):
    x = np.moveaxis(f64(x), axis, 1)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return np.moveaxis(np.maximum(x, f64(tau).reshape(shape)), 1, axis)


def gdn(x, beta, gamma, inverse=False, variant="gdn", axis=1):
    x = np.moveaxis(f64(x), axis, -1)
    u = x * x if variant == "gdn" else np.abs(x)
    d = f64(beta) + u @ f64(gamma).T
    if variant == "gdn":
        y = x * np.sqrt(d) if inverse else x / np.sqrt(d)
    else:
        y = x * d if inverse else x / d
    return np.moveaxis(y, -1, axis)


def mvn(x, axes=(0, 2, 3), eps=1e-9):
    x = f64(x)
    axes = tuple(axes)
    m = x.mean(axis=axes, keepdims=True)
    var = ((x - m) ** 2).mean(axis=axes, keepdims=True)
    return (x - m) / (np.sqrt(var) + eps)


def normalize(x, p=2.0, axis=1, eps=1e-12):
    x = f64(x)
    if p == np.inf:
        n = np.abs(x).max(axis=axis, keepdims=True)
    else:
        n = (np.abs(x) ** p).sum(axis=axis, keepdims=True) ** (1.0 / p)
    return x / np.maximum(n, eps)


def assert_close(got, want, dtype):
    assert got.dtype == dtype
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=TOL[dtype], atol=TOL[dtype])


def numeric_grad(f, arrays, g, step=1e-6):
    """Central differences of L = Σ f(*arrays)·g with respect to each array (float64)."""
    out = []
    for i, a in enumerate(arrays):
        if a is None:
            out.append(None)
            continue
        a = np.array(a, dtype=np.float64, copy=True)
        grad = np.zeros_like(a)
        flat = a.reshape(-1)
        for j in range(flat.size):
            old = flat[j]
            args = list(arrays)
            flat[j] = old + step
            args[i] = a.copy()
            lp = float((f(*args) * g).sum())
            flat[j] = old - step
            args[i] = a.copy()
            lm = float((f(*args) * g).sum())
            flat[j] = old
            grad.reshape(-1)[j] = (lp - lm) / (2 * step)
        out.append(grad)
    return out


def assert_grad(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, atol=1e-5, rtol=1e-3)


def layouts(x, axis=1):
    """Non-contiguous views with the same logical values as x (each a fresh case)."""
    yield "fortran", np.asfortranarray(x)
    big = np.repeat(x, 2, axis=-1)
    yield "sliced", big[..., ::2]
    rev = np.ascontiguousarray(np.flip(x, 0))
    yield "negative", np.flip(rev, 0)
    perm = tuple(range(x.ndim))[::-1]
    yield "transposed", np.ascontiguousarray(x.transpose(perm)).transpose(perm)
    if x.ndim >= 3:
        yield "channels_last", np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        yield "channels_first", np.moveaxis(np.ascontiguousarray(np.moveaxis(x, -1, 1)), 1, -1)
    ro = x.copy()
    ro.flags.writeable = False
    yield "readonly", ro


def broadcast_case(shape, dtype, rng):
    """A broadcast (zero-stride) input and its contiguous copy."""
    base = rng.standard_normal(shape[:-1] + (1,)).astype(dtype)
    b = np.broadcast_to(base, shape)
    return b, np.ascontiguousarray(b)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(-1)


def assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(bits(a), bits(b))


def check_layouts(fn, x):
    """fn(view) is bitwise fn(contiguous copy) for every layout of x."""
    want = fn(np.ascontiguousarray(x))
    for name, v in layouts(x):
        got = fn(v)
        assert np.array_equal(np.asarray(v), x), name  # input untouched
        if isinstance(want, tuple):
            for a, b in zip(got, want):
                if b is not None:
                    assert_bitwise(a, b)
        else:
            assert_bitwise(got, want)


def check_threads(rn, fn, x):
    """1 and 2 threads (and a repeat) give bitwise identical results."""
    before = rn.get_num_threads()
    try:
        rn.set_num_threads(1)
        a = fn(x)
        rn.set_num_threads(2)
        b = fn(x)
        c = fn(x)
    finally:
        rn.set_num_threads(before)
    seq = a if isinstance(a, tuple) else (a,)
    for u, v, w in zip(seq, b if isinstance(b, tuple) else (b,), c if isinstance(c, tuple) else (c,)):
        if u is not None:
            assert_bitwise(u, v)
            assert_bitwise(u, w)


def max_ulp(got, want):
    """Largest error of float32 `got` against the float64 `want`, in float32 ulps."""
    want32 = np.abs(want).astype(np.float32)
    return float((np.abs(got.astype(np.float64) - want) / np.spacing(want32)).max())
