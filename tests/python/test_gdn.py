"""gdn (GDN, IGDN, GDN1) forward and backward, and the CompressAI parameter helpers."""

from __future__ import annotations

import mixing_ref as ref
import numpy as np
import pytest
import rsnorm as rn

VARIANTS = [("gdn", False), ("gdn", True), ("gdn1", False), ("gdn1", True)]


def _params(rng, c):
    beta = rng.uniform(0.5, 1.5, c)
    gamma = rng.uniform(0.0, 0.2, (c, c))
    return beta, gamma


def _chlast(x, axis):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if axis == -1 else x


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("variant,inverse", VARIANTS)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (7, 3), (2, 4, 3), (1, 6, 2, 2, 2)])
def test_reference(rng, dtype, axis, variant, inverse, shape):
    x = _chlast((rng.standard_normal(shape) * 2).astype(dtype), axis)
    beta, gamma = _params(rng, shape[1])
    y = rn.gdn(x, beta, gamma, inverse=inverse, variant=variant, axis=axis)
    want = ref.gdn(x, beta, gamma, inverse, variant, axis)
    tol = ref.TOL[dtype] * 4
    assert y.dtype == dtype
    np.testing.assert_allclose(y.astype(np.float64), want, rtol=tol, atol=tol)


def test_large_channels_reference(rng):
    # Many channels and positions: several tiles, matrixmultiply's full kernels.
    x = rng.standard_normal((3, 70, 9, 11))
    beta, gamma = _params(rng, 70)
    for variant, inverse in VARIANTS:
        y = rn.gdn(x, beta, gamma, inverse=inverse, variant=variant)
        np.testing.assert_allclose(y, ref.gdn(x, beta, gamma, inverse, variant), rtol=1e-12)


@pytest.mark.parametrize("dtype", ref.DTYPES)
def test_closed_forms_at_compressai_init(rng, dtype):
    c = 6
    x = (rng.standard_normal((3, c, 4, 5)) * 4).astype(dtype)
    beta, gamma = rn.gdn_init(c)
    x64 = x.astype(np.float64)
    tol = ref.TOL[dtype]

    def close(got, want):
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol)

    close(rn.gdn(x, beta, gamma), x64 / np.sqrt(1 + 0.1 * x64**2))
    close(rn.gdn(x, beta, gamma, inverse=True), x64 * np.sqrt(1 + 0.1 * x64**2))
    close(rn.gdn(x, beta, gamma, variant="gdn1"), x64 / (1 + 0.1 * np.abs(x64)))
    close(rn.gdn(x, beta, gamma, variant="gdn1", inverse=True), x64 * (1 + 0.1 * np.abs(x64)))


def test_compressai_parametrization():
    c = 4
    beta, gamma = rn.gdn_init(c)
    bp, gp = rn.gdn_params_to_compressai(beta, gamma)
    off = 2.0**-18
    # CompressAI stores sqrt(max(v + offset², offset²)).
    np.testing.assert_array_equal(bp, np.sqrt(1.0 + off**2))
    np.testing.assert_array_equal(gp, np.where(np.eye(c) > 0, np.sqrt(0.1 + off**2), off))
    b2, g2 = rn.gdn_params_from_compressai(bp, gp)
    np.testing.assert_allclose(b2, beta, rtol=1e-15)
    np.testing.assert_allclose(g2, gamma, rtol=1e-15, atol=1e-20)
    # The lower bounds: beta >= beta_min, gamma >= 0 whatever is stored.
    b3, g3 = rn.gdn_params_from_compressai(np.array([-1.0, 0.0]), np.array([[-3.0, 0.0]]))
    np.testing.assert_allclose(b3, [1e-6, 1e-6], rtol=1e-9)
    np.testing.assert_allclose(g3, [[0.0, 0.0]], atol=1e-25)
    assert (g3 >= 0).all()


def test_compressai_parametrization_backward(rng):
    bp = rng.uniform(-0.1, 1.5, 5)
    gp = rng.uniform(-0.1, 0.5, (5, 5))
    gb = rng.standard_normal(5)
    gg = rng.standard_normal((5, 5))
    dbp, dgp = rn.gdn_params_from_compressai_backward(gb, gg, bp, gp)
    bound_b = np.sqrt(1e-6 + 2.0**-36)
    live = bp > bound_b
    h = 1e-7
    num = np.array([((rn.gdn_params_from_compressai(bp + h * e, gp)[0]
                      - rn.gdn_params_from_compressai(bp - h * e, gp)[0]) @ gb) / (2 * h)
                    for e in np.eye(5)])
    np.testing.assert_allclose(dbp[live], num[live], rtol=1e-5)
    # Below the bound, only gradients that push the parameter up pass (CompressAI LowerBound).
    np.testing.assert_array_equal(dbp[~live] != 0, (gb[~live] * 2 * bound_b) < 0)
    assert dgp.shape == (5, 5)


def test_errors(rng):
    x = rng.standard_normal((2, 3, 4))
    beta, gamma = _params(rng, 3)
    for b in (np.array([1.0, 0.0, 1.0]), np.array([1.0, -1.0, 1.0]), np.array([1, np.nan, 1])):
        with pytest.raises(ValueError, match="beta"):
            rn.gdn(x, b, gamma)
    g = gamma.copy()
    g[0, 2] = -1e-9
    with pytest.raises(ValueError, match="gamma"):
        rn.gdn(x, beta, g)
    with pytest.raises(ValueError, match=r"gamma must have shape \(3, 3\)"):
        rn.gdn(x, beta, gamma[:2])
    with pytest.raises(ValueError, match=r"beta must have shape \(3,\)"):
        rn.gdn(x, beta[:2], gamma)
    with pytest.raises(ValueError, match="variant"):
        rn.gdn(x, beta, gamma, variant="gdn2")
    with pytest.raises(ValueError, match="2 dimensions"):
        rn.gdn(x[0, 0], beta, gamma)
    for bad in (x.astype(np.int16), x.astype(np.complex64)):
        with pytest.raises(TypeError):
            rn.gdn(bad, beta, gamma)
    with pytest.raises(TypeError):
        rn.gdn(x, beta.astype(np.int64), gamma)
    with pytest.raises(TypeError, match="grad_y"):
        rn.gdn_backward(x.astype(np.float32), x, beta, gamma)


@pytest.mark.parametrize("axis", [1, -1])
def test_layouts_bitwise(rng, axis):
    x = _chlast(rng.standard_normal((3, 5, 4, 6)).astype(np.float32), axis)
    g = rng.standard_normal(x.shape).astype(np.float32)
    beta, gamma = _params(rng, 5)
    ref.check_layouts(lambda v: rn.gdn(v, beta, gamma, axis=axis), x)
    ref.check_layouts(lambda v: tuple(rn.gdn_backward(g, v, beta, gamma, axis=axis)), x)
    ref.check_layouts(lambda v: tuple(rn.gdn_backward(v, x, beta, gamma, axis=axis)), g)
    ref.check_layouts(lambda v: rn.gdn(v, beta, np.asfortranarray(v[0, :, 0, :5] ** 2)
                                       if axis == 1 else gamma, axis=axis), x)


def test_threads_bitwise(rng):
    x = rng.standard_normal((4, 48, 32, 32)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    beta, gamma = _params(rng, 48)
    ref.check_threads(rn, lambda v: rn.gdn(v, beta, gamma), x)
    ref.check_threads(rn, lambda v: tuple(rn.gdn_backward(g, v, beta, gamma)), x)
    ref.check_threads(rn, lambda v: tuple(rn.gdn_backward(g, v, beta, gamma, variant="gdn1")),
                      x)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 3)])
def test_zero_size(shape):
    x = np.zeros(shape, np.float32)
    c = shape[1]
    assert rn.gdn(x, np.ones(c), np.zeros((c, c))).shape == shape
    gr = rn.gdn_backward(x, x, np.ones(c), np.zeros((c, c)))
    assert gr.x.shape == shape
    np.testing.assert_array_equal(gr.beta, np.zeros(c))
    np.testing.assert_array_equal(gr.gamma, np.zeros((c, c)))


def test_nan_isolation(rng):
    x = rng.standard_normal((2, 4, 3, 3))
    beta, gamma = _params(rng, 4)
    y0 = rn.gdn(x, beta, gamma)
    x[1, 2, 0, 1] = np.nan
    y = rn.gdn(x, beta, gamma)
    want = np.zeros(x.shape, bool)
    want[1, :, 0, 1] = True  # every channel at that position mixes channel 2
    np.testing.assert_array_equal(np.isnan(y), want)
    ref.assert_bitwise(y[~want], y0[~want])


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("variant,inverse", VARIANTS)
@pytest.mark.parametrize("strided", [False, True])
def test_backward_finite_differences(rng, axis, variant, inverse, strided):
    c = 3
    x = _chlast(rng.standard_normal((2, c, 2, 3)), axis)
    g = rng.standard_normal(x.shape)
    beta, gamma = _params(rng, c)
    gamma += 0.05  # away from the γ >= 0 boundary for the differences
    xs = np.asfortranarray(x) if strided else x

    def f(xv, b, gm):
        return rn.gdn(xv, b, gm, inverse=inverse, variant=variant, axis=axis)

    got = rn.gdn_backward(g, xs, beta, gamma, inverse=inverse, variant=variant, axis=axis)
    assert isinstance(got, rn.GDNGrads)
    num = ref.numeric_grad(f, [x, beta, gamma], g)
    for a, n in zip(got, num):
        ref.assert_grad(a, n)


def test_backward_many_tiles(rng):
    # Enough positions for several tiles and tasks: partial ∂γ merged across tasks.
    x = rng.standard_normal((3, 40, 30, 30))
    g = rng.standard_normal(x.shape)
    beta, gamma = _params(rng, 40)
    got = rn.gdn_backward(g, x, beta, gamma)
    xm = np.moveaxis(x, 1, -1).reshape(-1, 40)
    gm = np.moveaxis(g, 1, -1).reshape(-1, 40)
    d = beta + (xm * xm) @ gamma.T
    q = gm * xm * (-0.5) * d**-1.5
    np.testing.assert_allclose(got.beta, q.sum(0), rtol=1e-10)
    np.testing.assert_allclose(got.gamma, q.T @ (xm * xm), rtol=1e-10)
    dx = gm / np.sqrt(d) + 2 * xm * (q @ gamma)
    np.testing.assert_allclose(np.moveaxis(got.x, 1, -1).reshape(-1, 40), dx, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_backward_dtypes(rng, dtype):
    x = rng.standard_normal((2, 3, 5))
    g = rng.standard_normal(x.shape)
    beta, gamma = _params(rng, 3)
    want = rn.gdn_backward(g, x, beta, gamma)
    got = rn.gdn_backward(g.astype(dtype), x.astype(dtype), beta, gamma)
    tol = 2e-2 if dtype == np.float16 else 1e-5
    for a, b in zip(got, want):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_float32_correctly_rounded(rng):
    # f64 GEMM inside: the float32 output is the float64 result rounded once (<= 0.5 ulp + the
    # reference's own rounding), even with 192 channels.
    x = (rng.standard_normal((2, 192, 6, 6)) * 3).astype(np.float32)
    beta, gamma = _params(rng, 192)
    for variant, inverse in VARIANTS:
        y = rn.gdn(x, beta, gamma, inverse=inverse, variant=variant)
        assert ref.max_ulp(y, ref.gdn(x, beta, gamma, inverse, variant)) <= 0.501


def test_float16_igdn_overflows_to_inf_like_a_rounded_reference(rng):
    # Found by the long fuzz run: IGDN of float16 values ~100 exceeds float16's range (65504).
    # The output is the float64 value rounded once to float16: ±inf beyond the range, finite
    # and close elsewhere — never NaN.
    x = (rng.standard_normal((4, 2, 4, 4)) * 200).astype(np.float16)
    beta, gamma = np.ones(2), np.full((2, 2), 1.0)
    y = rn.gdn(x, beta, gamma, inverse=True)
    want = ref.gdn(x.astype(np.float64), beta, gamma, True, "gdn")
    with np.errstate(over="ignore"):
        rounded = want.astype(np.float16)
    assert np.isinf(rounded).any() and not np.isnan(y).any()
    np.testing.assert_array_equal(np.isinf(y), np.isinf(rounded))
    np.testing.assert_array_equal(np.sign(y), np.sign(rounded))
    fin = np.isfinite(rounded)
    np.testing.assert_allclose(y[fin].astype(np.float64), want[fin], rtol=2e-3)
