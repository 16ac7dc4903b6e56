"""iter_norm (Huang et al. 2019) against a plain float64 NumPy version of the same algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import rsnorm as rn


def ref_iter_norm(x, G, T, eps, axis=1):
    """Returns y (float64), per-group mean (G, d), Σ + eps·I and W, one group at a time."""
    x = np.asarray(x, dtype=np.float64)
    xm = np.moveaxis(x, axis, 1)
    n, c = xm.shape[:2]
    d = c // G
    y = np.empty_like(xm)
    means, sigmas, wms = [], [], []
    for g in range(G):
        blk = xm[:, g * d:(g + 1) * d]
        cols = np.moveaxis(blk, 1, 0).reshape(d, -1)  # d × m
        m = cols.shape[1]
        mu = cols.mean(axis=1)
        xc = cols - mu[:, None]
        sigma = xc @ xc.T / m + eps * np.eye(d)
        tr = np.trace(sigma)
        sn = sigma / tr
        p = np.eye(d)
        for _ in range(T):
            p = 0.5 * (3 * p - np.linalg.matrix_power(p, 3) @ sn)
        wm = p / np.sqrt(tr)
        out = wm @ xc
        y[:, g * d:(g + 1) * d] = np.moveaxis(out.reshape((d, n) + blk.shape[2:]), 0, 1)
        means.append(mu)
        sigmas.append(sigma)
        wms.append(wm)
    return np.moveaxis(y, 1, axis), np.array(means), np.array(sigmas), np.array(wms)


def _x(rng, shape=(6, 8, 5, 4), corr=True):
    # Correlated, yet well conditioned (κ(Σ) < 9): the plain Newton–Schulz iteration amplifies
    # rounding errors for ill-conditioned Σ (Higham 1986), in the reference implementation too.
    x = rng.standard_normal(shape)
    if corr:
        x[:, 1] += 0.5 * x[:, 0]
    if corr and shape[1] > 5:
        x[:, 5] = 0.8 * x[:, 5] - 0.5 * x[:, 4] + 2.0
    return x


@pytest.mark.parametrize("G,T", [(1, 5), (2, 3), (4, 0), (8, 5), (2, 12)])
def test_matches_reference(rng, G, T):
    x = _x(rng)
    y, st = rn.iter_norm(x, num_groups=G, T=T, eps=1e-5, return_stats=True)
    ry, rmu, rsig, rwm = ref_iter_norm(x, G, T, 1e-5)
    np.testing.assert_allclose(y, ry, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(st.mean, rmu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(st.sigma, rsig, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(st.wm, rwm, rtol=1e-10, atol=1e-12)
    assert st.mean.dtype == st.wm.dtype == np.float64


@pytest.mark.parametrize("shape", [(7, 6), (4, 6, 9), (3, 6, 2, 3, 2)])
def test_ranks_and_channels_last(rng, shape):
    x = rng.standard_normal(shape)
    ry = ref_iter_norm(x, 3, 4, 1e-3)[0]
    np.testing.assert_allclose(rn.iter_norm(x, num_groups=3, T=4, eps=1e-3), ry, rtol=1e-10,
                               atol=1e-12)
    xl = np.moveaxis(x, 1, -1)
    yl = rn.iter_norm(xl, num_groups=3, T=4, eps=1e-3, axis=-1)
    np.testing.assert_allclose(yl, np.moveaxis(ry, 1, -1), rtol=1e-10, atol=1e-12)


def test_whitens_with_many_iterations(rng):
    x = _x(rng, (16, 8, 6, 6))
    y = rn.iter_norm(x, num_groups=2, T=40, eps=1e-9)
    for g in range(2):
        cols = np.moveaxis(y[:, 4 * g:4 * g + 4], 1, 0).reshape(4, -1)
        np.testing.assert_allclose(cols @ cols.T / cols.shape[1], np.eye(4), atol=1e-6)
        np.testing.assert_allclose(cols.mean(axis=1), 0, atol=1e-12)
    # A few iterations only approximate Σ^-½ (IterNorm's point: a partial whitening).
    y5 = rn.iter_norm(x, num_groups=2, T=1, eps=1e-9)
    cols = np.moveaxis(y5[:, :4], 1, 0).reshape(4, -1)
    assert np.abs(cols @ cols.T / cols.shape[1] - np.eye(4)).max() > 1e-3


def test_running_stats_update_and_eval(rng):
    G, d, mom = 2, 4, 0.25
    rm = np.zeros((G, d, 1))
    rw = np.broadcast_to(np.eye(d), (G, d, d)).copy()
    x1, x2 = _x(rng), _x(rng) * 2 + 1
    exp_m, exp_w = rm.copy(), rw.copy()
    for x in (x1, x2):
        rn.iter_norm(x, rm, rw, num_groups=G, T=5, momentum=mom)
        _, mu, _, wm = ref_iter_norm(x, G, 5, 1e-5)
        exp_m = (1 - mom) * exp_m + mom * mu[..., None]
        exp_w = (1 - mom) * exp_w + mom * wm
    np.testing.assert_allclose(rm, exp_m, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rw, exp_w, rtol=1e-10, atol=1e-13)
    # Eval uses the running statistics: y = W_g (x − μ_g) per group.
    x3 = _x(rng)
    before = (rm.copy(), rw.copy())
    y = rn.iter_norm(x3, rm, rw, num_groups=G, training=False)
    assert np.array_equal(rm, before[0]) and np.array_equal(rw, before[1])
    xm = np.moveaxis(x3, 1, 0).reshape(G, d, -1)
    ref = (rw @ (xm - rm)).reshape((G * d,) + (x3.shape[0],) + x3.shape[2:])
    np.testing.assert_allclose(y, np.moveaxis(ref, 0, 1), rtol=1e-12, atol=1e-13)


def test_running_stats_float32_and_flat_mean(rng):
    rm = np.zeros(8, dtype=np.float32)
    rw = np.broadcast_to(np.eye(8, dtype=np.float32), (1, 8, 8)).copy()
    x = _x(rng)
    rn.iter_norm(x, rm, rw, momentum=1.0)
    _, mu, _, wm = ref_iter_norm(x, 1, 5, 1e-5)
    np.testing.assert_array_equal(rm, mu[0].astype(np.float32))
    np.testing.assert_allclose(rw, wm.astype(np.float32), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision(rng, dtype):
    x = _x(rng).astype(dtype)
    y, st = rn.iter_norm(x, num_groups=2, return_stats=True)
    assert y.dtype == dtype and st.wm.dtype == np.float32
    ry = ref_iter_norm(x.astype(np.float64), 2, 5, 1e-5)[0]
    np.testing.assert_array_equal(y, ry.astype(dtype)) if dtype == np.float16 else (
        np.testing.assert_allclose(y, ry, rtol=1e-6, atol=1e-6))


def test_errors(rng):
    x = _x(rng)
    with pytest.raises(ValueError, match="num_groups"):
        rn.iter_norm(x, num_groups=3)
    with pytest.raises(ValueError, match="T"):
        rn.iter_norm(x, T=-1)
    with pytest.raises(ValueError, match="eval"):
        rn.iter_norm(x, training=False)
    with pytest.raises(rn.ShapeError, match="running_wm"):
        rn.iter_norm(x, np.zeros(8), np.zeros((1, 8, 7)))
    with pytest.raises(ValueError, match="together"):
        rn.iter_norm(x, np.zeros(8))
    with pytest.raises(TypeError, match="dtype"):
        rn.iter_norm(x.astype(np.int64))
    with pytest.raises(ValueError, match="at least one value"):
        rn.iter_norm(np.zeros((0, 8)))
    ro = np.zeros(8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        rn.iter_norm(x, ro, np.zeros((1, 8, 8)))


def test_threads_bitwise(rng, restore_threads):
    x = rng.standard_normal((32, 16, 16, 16))  # 1 MiB: above the parallel threshold
    res = []
    for t in (1, 2):
        rn.set_num_threads(t)
        rm, rw = np.zeros(16), np.zeros((4, 4, 4))
        y, st = rn.iter_norm(x, rm, rw, num_groups=4, return_stats=True)
        g = rn.iter_norm_backward(np.cos(x), x, num_groups=4, stats=st).x
        res.append((y, st.mean, st.sigma, st.wm, rm, rw, g))
    for a, b in zip(*res):
        assert np.array_equal(a, b)


def test_layouts_bitwise(rng):
    x = _x(rng, (4, 8, 6, 5))
    ref = rn.iter_norm(x, num_groups=2)
    for v in (np.asfortranarray(x), x[:, :, ::-1][:, :, ::-1],
              np.ascontiguousarray(x[:, ::-1])[:, ::-1]):
        assert np.array_equal(rn.iter_norm(v, num_groups=2), ref)
    big = np.zeros((4, 8, 12, 5))
    big[:, :, ::2] = x
    assert np.array_equal(rn.iter_norm(big[:, :, ::2], num_groups=2), ref)


# ---- backward -------------------------------------------------------------------------------

def _fd_grad(f, x, h=1e-6):
    g = np.empty_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f(x)
        flat[i] = old - h
        fm = f(x)
        flat[i] = old
        gf[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("G,T,axis", [(1, 3, 1), (2, 5, 1), (2, 4, -1), (4, 0, 1)])
def test_backward_finite_differences(rng, G, T, axis):
    x = _x(rng, (3, 4, 2, 3)) if axis == 1 else np.moveaxis(_x(rng, (3, 4, 2, 3)), 1, -1)
    x = np.ascontiguousarray(x)
    gy = rng.standard_normal(x.shape)

    def loss(v):
        return float(np.sum(rn.iter_norm(v, num_groups=G, T=T, eps=1e-3, axis=axis) * gy))

    fd = _fd_grad(loss, x.copy())
    got = rn.iter_norm_backward(gy, x, num_groups=G, T=T, eps=1e-3, axis=axis).x
    np.testing.assert_allclose(got, fd, rtol=1e-3, atol=1e-5)
    # With stats from the forward: the same gradient.
    _, st = rn.iter_norm(x, num_groups=G, T=T, eps=1e-3, axis=axis, return_stats=True)
    got2 = rn.iter_norm_backward(gy, x, num_groups=G, T=T, eps=1e-3, axis=axis, stats=st).x
    np.testing.assert_allclose(got2, got, rtol=1e-10, atol=1e-12)
    # x − μ makes the gradient sum to zero over the positions of each channel.
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    np.testing.assert_allclose(got.sum(axis=red), 0, atol=1e-10)


def test_backward_eval_mode(rng):
    x = _x(rng, (3, 4, 2, 2))
    rm, rw = rng.standard_normal(4), rng.standard_normal((2, 2, 2))
    gy = rng.standard_normal(x.shape)

    def loss(v):
        return float(np.sum(rn.iter_norm(v, rm, rw, num_groups=2, training=False) * gy))

    got = rn.iter_norm_backward(gy, x, rm, rw, num_groups=2, training=False).x
    np.testing.assert_allclose(got, _fd_grad(loss, x.copy()), rtol=1e-3, atol=1e-5)


def test_backward_float32_dtype(rng):
    x = _x(rng).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    g32 = rn.iter_norm_backward(gy, x, num_groups=2)
    assert g32.x.dtype == np.float32
    g64 = rn.iter_norm_backward(gy.astype(np.float64), x.astype(np.float64), num_groups=2)
    np.testing.assert_allclose(g32.x, g64.x, rtol=1e-5, atol=1e-6)


def test_zero_size_and_nan_isolation(rng):
    assert rn.iter_norm(np.zeros((2, 0, 3))).shape == (2, 0, 3)
    rm, rw = np.zeros(4), np.broadcast_to(np.eye(2), (2, 2, 2)).copy()
    assert rn.iter_norm(np.zeros((0, 4, 3)), rm, rw, num_groups=2, training=False).shape == (
        0, 4, 3)
    # Eval: a NaN spreads only over its own position's group (the mixing), nowhere else.
    x = rng.standard_normal((3, 4, 5))
    x[1, 2, 3] = np.nan
    y = rn.iter_norm(x, rm, rw, num_groups=2, training=False)
    bad = np.zeros(x.shape, bool)
    bad[1, 2:4, 3] = True
    assert np.all(np.isnan(y[bad])) and np.all(np.isfinite(y[~bad]))
    # Constant input: Σ = eps·I, y = 0 and a finite gradient.
    c = np.full((4, 4, 3), 2.5)
    assert np.array_equal(rn.iter_norm(c), np.zeros_like(c))
    assert np.all(np.isfinite(rn.iter_norm_backward(np.ones_like(c), c).x))


def test_backward_layouts_bitwise_and_dtype_errors(rng):
    x = _x(rng, (4, 8, 6, 5))
    gy = rng.standard_normal(x.shape)
    ref = rn.iter_norm_backward(gy, x, num_groups=2).x
    for f in (np.asfortranarray, lambda a: a[:, :, ::-1].copy()[:, :, ::-1]):
        assert np.array_equal(rn.iter_norm_backward(f(gy), f(x), num_groups=2).x, ref)
    # channels-last input: the same numbers, moved.
    got = rn.iter_norm_backward(np.moveaxis(gy, 1, -1), np.moveaxis(x, 1, -1), num_groups=2,
                                axis=-1).x
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="dtype"):
        rn.iter_norm_backward(gy.astype(np.float32), x)
    with pytest.raises(rn.ShapeError):
        rn.iter_norm_backward(gy[:2], x)


def test_cross_moments_kernel(rng):
    from rsnorm import _rsnorm

    a, b = rng.standard_normal((5, 6, 7)), rng.standard_normal((5, 6, 7))
    mu = rng.standard_normal(6)
    s, cross = _rsnorm.group_cross_moments(a, b, mu, 3, axis=1)
    af = np.moveaxis(a, 1, 0).reshape(6, -1)
    bf = np.moveaxis(b, 1, 0).reshape(6, -1) - mu[:, None]
    np.testing.assert_allclose(s, af.sum(axis=1), rtol=1e-12)
    for g in range(3):
        sl = slice(2 * g, 2 * g + 2)
        np.testing.assert_allclose(cross[g], af[sl] @ bf[sl].T, rtol=1e-12)
    ma, mb = rng.standard_normal((3, 2, 2)), rng.standard_normal((3, 2, 2))
    off = rng.standard_normal(6)
    y = _rsnorm.group_whiten_apply2(a, b, ma, mb, off, axis=1)
    bf0 = np.moveaxis(b, 1, 0).reshape(6, -1)
    for g in range(3):
        sl = slice(2 * g, 2 * g + 2)
        want = ma[g] @ af[sl] + mb[g] @ bf0[sl] + off[sl, None]
        np.testing.assert_allclose(np.moveaxis(y, 1, 0).reshape(6, -1)[sl], want, rtol=1e-12,
                                   atol=1e-13)


def test_out_argument(rng):
    x = _x(rng).astype(np.float32)
    out = np.empty_like(x)
    r = rn.iter_norm(x, num_groups=2, out=out)
    assert r is out
    assert np.array_equal(out, rn.iter_norm(x, num_groups=2))
    with pytest.raises(TypeError):
        rn.iter_norm(x, out=np.empty(x.shape, np.float64))


@pytest.mark.parametrize("T", [-1, 1001, 2**40])
def test_absurd_iteration_counts_are_refused_not_run(T):
    # 2**40 Newton steps would hang the call: forward and backward refuse T outside [0, 1000].
    x = np.random.default_rng(0).standard_normal((8, 4))
    with pytest.raises(rn.RsnormError, match=r"T \(the number of Newton iterations\)"):
        rn.iter_norm(x, T=T)
    with pytest.raises(rn.RsnormError, match=r"T \(the number of Newton iterations\)"):
        rn.iter_norm_backward(x, x, T=T)
