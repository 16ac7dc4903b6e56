"""filter_response_norm (+ fused TLU) and tlu: forward and backward."""

from __future__ import annotations

import itertools

import mixing_ref as ref
import numpy as np
import pytest
import rsnorm as rn


def _params(rng, c, which):
    p = {}
    if "w" in which:
        p["weight"] = rng.standard_normal(c) + 1.0
    if "b" in which:
        p["bias"] = rng.standard_normal(c) * 0.5
    if "t" in which:
        p["tau"] = rng.standard_normal(c) * 0.5
    if "e" in which:
        p["learned_eps"] = rng.standard_normal(c) * 0.1
    return p


def _chlast(x, axis):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if axis == -1 else x


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (3, 4, 7), (2, 3, 2, 2, 2), (3, 4)])
@pytest.mark.parametrize("which", ["", "wb", "wbt", "wbte"])
def test_reference(rng, dtype, axis, shape, which):
    x = _chlast((rng.standard_normal(shape) * 2).astype(dtype), axis)
    p = _params(rng, shape[1], which)
    y = rn.filter_response_norm(x, eps=1e-3, axis=axis, **p)
    ref.assert_close(y, ref.frn(x, eps=1e-3, axis=axis, **p), dtype)


def test_stats(rng):
    x = rng.standard_normal((3, 4, 5, 2))
    _, st = rn.filter_response_norm(x, eps=1e-2, return_stats=True)
    assert isinstance(st, rn.Stats) and st.mean is None and st.rstd.shape == (3, 4)
    np.testing.assert_allclose(st.rstd, 1 / np.sqrt((x * x).mean(axis=(2, 3)) + 1e-2),
                               rtol=1e-14)
    _, s32 = rn.filter_response_norm(x.astype(np.float32), return_stats=True)
    assert s32.rstd.dtype == np.float32


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 1, 1), (2, 3, 1)])
def test_spatial_size_one_is_exact(rng, dtype, shape):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    y = rn.filter_response_norm(x, eps=1e-6)
    x64 = x.astype(np.float64)
    ref.assert_bitwise(y, (x64 / np.sqrt(x64 * x64 + 1e-6)).astype(dtype))


def test_scalar_learned_eps(rng):
    x = rng.standard_normal((2, 3, 4))
    for le in (0.3, np.array(0.3), np.array([0.3])):
        y = rn.filter_response_norm(x, learned_eps=le)
        np.testing.assert_allclose(y, ref.frn(x, learned_eps=0.3), rtol=1e-14)
    y = rn.filter_response_norm(x, learned_eps=-0.3)  # |learned_eps|, as the paper's code
    np.testing.assert_allclose(y, ref.frn(x, learned_eps=0.3), rtol=1e-14)


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_tlu(rng, dtype, axis):
    x = _chlast(rng.standard_normal((2, 5, 3, 4)).astype(dtype), axis)
    tau = rng.standard_normal(5)
    y = rn.tlu(x, tau, axis=axis)
    ref.assert_close(y, ref.tlu(x, tau, axis=axis), dtype)
    # The closed form max(x, τ) holds exactly (in x's dtype for the threshold).
    shape = [1] * 4
    shape[axis] = 5
    ref.assert_bitwise(y, np.maximum(x, tau.astype(dtype).reshape(shape)))


def test_tlu_nan_propagates():
    x = np.array([[np.nan, 1.0, -5.0]]).reshape(1, 1, 3)
    np.testing.assert_array_equal(rn.tlu(x, np.array([0.0])), [[[np.nan, 1.0, 0.0]]])


def test_errors(rng):
    x = rng.standard_normal((2, 3, 4))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        rn.filter_response_norm(x, np.ones(4))
    with pytest.raises(ValueError, match="tau"):
        rn.filter_response_norm(x, tau=np.ones(2))
    with pytest.raises(ValueError, match="learned_eps"):
        rn.filter_response_norm(x, learned_eps=np.ones(2))
    with pytest.raises(ValueError, match="eps"):
        rn.filter_response_norm(x, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        rn.filter_response_norm(x, eps=np.nan)
    with pytest.raises(ValueError, match="2 dimensions"):
        rn.filter_response_norm(x[0, 0])
    with pytest.raises(ValueError, match="tau"):
        rn.tlu(x, np.ones(4))
    for bad in (x.astype(np.int64), x.astype(bool), x.astype(">f4")):
        with pytest.raises(TypeError):
            rn.filter_response_norm(bad)
        with pytest.raises(TypeError):
            rn.tlu(bad, np.ones(3))
    with pytest.raises(TypeError):
        rn.filter_response_norm(x, np.ones(3, dtype=np.int32))
    with pytest.raises(TypeError, match="grad_y"):
        rn.filter_response_norm_backward(x.astype(np.float16), x)
    with pytest.raises(ValueError, match="rstd"):
        rn.filter_response_norm_backward(x, x, stats=rn.Stats(None, np.ones((2, 2))))
    with pytest.raises(ValueError, match=r"rstd must have shape \(2, 3\)"):
        rn.filter_response_norm_backward(x, x, stats=rn.Stats(None, np.ones((3, 2))))


@pytest.mark.parametrize("axis", [1, -1])
def test_layouts_bitwise(rng, axis):
    x = _chlast(rng.standard_normal((3, 4, 5, 6)).astype(np.float32), axis)
    g = rng.standard_normal(x.shape).astype(np.float32)
    p = _params(rng, 4, "wbte")
    ref.check_layouts(lambda v: rn.filter_response_norm(v, axis=axis, **p), x)
    ref.check_layouts(lambda v: tuple(rn.filter_response_norm_backward(g, v, axis=axis, **p)), x)
    ref.check_layouts(lambda v: tuple(rn.filter_response_norm_backward(v, x, axis=axis, **p)), g)
    ref.check_layouts(lambda v: rn.tlu(v, p["tau"], axis=axis), x)
    ref.check_layouts(lambda v: tuple(rn.tlu_backward(g, v, p["tau"], axis=axis)), x)


def test_threads_bitwise(rng):
    x = rng.standard_normal((4, 32, 40, 40)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    p = _params(rng, 32, "wbte")
    ref.check_threads(rn, lambda v: rn.filter_response_norm(v, **p), x)
    ref.check_threads(rn, lambda v: tuple(rn.filter_response_norm_backward(g, v, **p)), x)
    ref.check_threads(rn, lambda v: tuple(rn.tlu_backward(g, v, p["tau"])), x)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    ref.check_threads(rn, lambda v: rn.filter_response_norm(v, axis=-1, **p), xl)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_zero_size(shape):
    x = np.zeros(shape, np.float32)
    c = shape[1]
    y, st = rn.filter_response_norm(x, np.ones(c), return_stats=True)
    assert y.shape == shape and st.rstd.shape == shape[:2]
    gr = rn.filter_response_norm_backward(x, x, np.ones(c), np.ones(c), np.ones(c))
    assert gr.x.shape == shape
    np.testing.assert_array_equal(gr.weight, np.zeros(c))
    assert rn.tlu(x, np.zeros(c)).shape == shape


def test_nan_isolation(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    y0 = rn.filter_response_norm(x)
    x[1, 2, 0, 3] = np.nan
    y = rn.filter_response_norm(x)
    want = np.zeros(x.shape, bool)
    want[1, 2] = True
    np.testing.assert_array_equal(np.isnan(y), want)
    ref.assert_bitwise(y[~want], y0[~want])


PERMS = ["".join(c) for n in range(5) for c in itertools.combinations("wbte", n)]


@pytest.mark.parametrize("which", PERMS)
@pytest.mark.parametrize("axis", [1, -1])
def test_backward_finite_differences(rng, which, axis):
    c = 3
    x = _chlast(rng.standard_normal((2, c, 3, 2)), axis)
    g = rng.standard_normal(x.shape)
    p = _params(rng, c, which)
    names = ["weight", "bias", "tau", "learned_eps"]
    xs = x[::-1].copy()[::-1] if axis == 1 else np.asfortranarray(x)  # strided inputs

    def f(xv, w, b, t, le):
        return rn.filter_response_norm(xv, w, b, t, 1e-3, learned_eps=le, axis=axis)

    args = [x] + [p.get(n) for n in names]
    got = rn.filter_response_norm_backward(g, xs, eps=1e-3, axis=axis, **p)
    assert isinstance(got, rn.FilterResponseNormGrads)
    num = ref.numeric_grad(f, args, g)
    ref.assert_grad(got.x, num[0])
    for n, nv in zip(names, num[1:]):
        if nv is None:
            assert getattr(got, n) is None
        else:
            assert getattr(got, n).dtype == np.float64
            ref.assert_grad(getattr(got, n), nv)


def test_backward_with_stats_and_scalar_learned_eps(rng):
    x = rng.standard_normal((3, 2, 4))
    g = rng.standard_normal(x.shape)
    w = rng.standard_normal(2)
    _, st = rn.filter_response_norm(x, w, eps=1e-3, learned_eps=0.2, return_stats=True)
    a = rn.filter_response_norm_backward(g, x, w, eps=1e-3, learned_eps=0.2)
    b = rn.filter_response_norm_backward(g, x, w, eps=1e-3, learned_eps=0.2, stats=st)
    np.testing.assert_allclose(b.x, a.x, rtol=1e-13)
    np.testing.assert_allclose(b.weight, a.weight, rtol=1e-13)
    assert np.shape(a.learned_eps) == ()
    (num,) = ref.numeric_grad(
        lambda le: rn.filter_response_norm(x, w, eps=1e-3, learned_eps=float(le)),
        [np.array(0.2)], g)
    ref.assert_grad(a.learned_eps, num)
    c = rn.filter_response_norm_backward(g, x, w, eps=1e-3, learned_eps=np.array([0.2]))
    assert c.learned_eps.shape == (1,)


@pytest.mark.parametrize("axis", [1, -1])
def test_tlu_backward_finite_differences(rng, axis):
    x = _chlast(rng.standard_normal((2, 3, 4)), axis)
    g = rng.standard_normal(x.shape)
    tau = rng.standard_normal(3) * 0.3
    got = rn.tlu_backward(g, x, tau, axis=axis)
    assert isinstance(got, rn.TLUGrads)
    num = ref.numeric_grad(lambda a, t: rn.tlu(a, t, axis=axis), [x, tau], g)
    ref.assert_grad(got.x, num[0])
    ref.assert_grad(got.tau, num[1])


def test_tlu_backward_tie_splits_in_halves():
    x = np.array([0.5, 0.0, -1.0]).reshape(1, 1, 3)
    gr = rn.tlu_backward(np.ones_like(x), x, np.array([0.0]))
    np.testing.assert_array_equal(gr.x.ravel(), [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(gr.tau, [1.5])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_backward_dtypes(rng, dtype):
    x = rng.standard_normal((2, 3, 5))
    g = rng.standard_normal(x.shape)
    p = _params(rng, 3, "wbe")
    want = rn.filter_response_norm_backward(g, x, **p)
    got = rn.filter_response_norm_backward(g.astype(dtype), x.astype(dtype), **p)
    tol = 2e-2 if dtype == np.float16 else 1e-5
    for a, b in zip(got, want):
        if b is not None:
            assert a.dtype == dtype
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("axis", [1, -1])
def test_out_any_layout(rng, axis):
    x = _chlast(rng.standard_normal((2, 3, 4, 5)).astype(np.float32), axis)
    p = _params(rng, 3, "wbt")
    want = rn.filter_response_norm(x, axis=axis, **p)
    for out in (np.empty_like(x), np.empty_like(x, order="F"),
                np.empty(x.shape[::-1], np.float32).T):
        r = rn.filter_response_norm(x, axis=axis, out=out, **p)
        assert r is out
        ref.assert_bitwise(out, want)
        r = rn.tlu(x, p["tau"], axis=axis, out=out)
        ref.assert_bitwise(out, rn.tlu(x, p["tau"], axis=axis))
