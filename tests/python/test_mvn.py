"""mean_variance_norm (ONNX MeanVarianceNormalization) forward and backward."""

from __future__ import annotations

import mixing_ref as ref
import numpy as np
import onnx_data
import pytest
import rsnorm as rn

AXES = [(0, 2, 3), (1,), (2, 3), (-1,), (0, 1, 2, 3), (3, 0)]


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("axes", AXES)
def test_reference(rng, dtype, axes):
    x = (rng.standard_normal((3, 4, 5, 2)) * 2 + 1).astype(dtype)
    y = rn.mean_variance_norm(x, axes, eps=1e-6)
    want = ref.mvn(x, axes, eps=1e-6)
    tol = ref.TOL[dtype] * 4
    assert y.dtype == dtype
    np.testing.assert_allclose(y.astype(np.float64), want, rtol=tol, atol=tol)


def test_defaults(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    np.testing.assert_allclose(rn.mean_variance_norm(x), ref.mvn(x), rtol=1e-12)
    np.testing.assert_allclose(rn.mean_variance_norm(x[0], 1), ref.mvn(x[0], (1,)), rtol=1e-12)


def test_onnx_conformance():
    op, attrs, (x,), (want,) = onnx_data.load("test_mvn")
    assert op == "MeanVarianceNormalization"
    axes = tuple(attrs.get("axes", (0, 2, 3)))
    y = rn.mean_variance_norm(x, axes)
    assert y.dtype == want.dtype
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_large_offset_exact(rng):
    # ONNX computes E[x²] − E[x]², which cancels at 1e4 + N(0,1) in float32; two-pass does not.
    x = (1e4 + rng.standard_normal((2, 3, 8, 8))).astype(np.float32)
    y = rn.mean_variance_norm(x)
    np.testing.assert_allclose(y, ref.mvn(x), rtol=4e-6, atol=4e-6)


def test_constant_is_zero():
    x = np.full((2, 3, 2, 2), 3.3e38, np.float32)
    np.testing.assert_array_equal(rn.mean_variance_norm(x), 0)
    g = np.ones_like(x)
    assert np.isfinite(rn.mean_variance_norm_backward(g, x).x).all()


def test_errors(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    with pytest.raises(ValueError, match="axes"):
        rn.mean_variance_norm(x, (0, 4))
    with pytest.raises(ValueError, match="repeat"):
        rn.mean_variance_norm(x, (1, -3))
    with pytest.raises(ValueError, match="axes"):
        rn.mean_variance_norm(x, ())
    with pytest.raises(ValueError, match="eps"):
        rn.mean_variance_norm(x, eps=-1.0)
    with pytest.raises(TypeError):
        rn.mean_variance_norm(x, "0")
    for bad in (x.astype(np.int32), x.astype(np.uint8)):
        with pytest.raises(TypeError):
            rn.mean_variance_norm(bad)
    with pytest.raises(TypeError, match="grad_y"):
        rn.mean_variance_norm_backward(x.astype(np.float32), x)


def test_layouts_bitwise(rng):
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    for axes in [(0, 2, 3), (1,), (3,)]:
        ref.check_layouts(lambda v, a=axes: rn.mean_variance_norm(v, a), x)
        ref.check_layouts(lambda v, a=axes: rn.mean_variance_norm_backward(g, v, a).x, x)
        ref.check_layouts(lambda v, a=axes: rn.mean_variance_norm_backward(v, x, a).x, g)


def test_threads_bitwise(rng):
    x = rng.standard_normal((8, 16, 32, 32)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    ref.check_threads(rn, lambda v: rn.mean_variance_norm(v, (2, 3)), x)
    ref.check_threads(rn, lambda v: rn.mean_variance_norm(v), x)
    ref.check_threads(rn, lambda v: rn.mean_variance_norm_backward(g, v, (2, 3)).x, x)


@pytest.mark.parametrize("shape", [(0, 3, 4, 2), (2, 0, 4, 2), (2, 3, 0, 2)])
def test_zero_size(shape):
    x = np.zeros(shape, np.float32)
    assert rn.mean_variance_norm(x).shape == shape
    assert rn.mean_variance_norm_backward(x, x).x.shape == shape


def test_nan_isolation(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    y0 = rn.mean_variance_norm(x)
    x[1, 2, 0, 3] = np.nan
    y = rn.mean_variance_norm(x)
    want = np.zeros(x.shape, bool)
    want[:, 2] = True  # the group of channel 2 (axes 0, 2, 3)
    np.testing.assert_array_equal(np.isnan(y), want)
    ref.assert_bitwise(y[~want], y0[~want])


@pytest.mark.parametrize("axes", [(0, 2, 3), (1,), (2, 3), (3,)])
@pytest.mark.parametrize("strided", [False, True])
def test_backward_finite_differences(rng, axes, strided):
    x = rng.standard_normal((2, 3, 3, 2))
    g = rng.standard_normal(x.shape)
    xs = np.asfortranarray(x) if strided else x
    got = rn.mean_variance_norm_backward(g, xs, axes, eps=1e-4)
    assert isinstance(got, rn.MeanVarianceNormGrads)
    (num,) = ref.numeric_grad(lambda a: rn.mean_variance_norm(a, axes, 1e-4), [x], g)
    ref.assert_grad(got.x, num)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_backward_dtypes(rng, dtype):
    x = rng.standard_normal((2, 3, 4, 2))
    g = rng.standard_normal(x.shape)
    want = rn.mean_variance_norm_backward(g, x).x
    got = rn.mean_variance_norm_backward(g.astype(dtype), x.astype(dtype)).x
    assert got.dtype == dtype
    tol = 2e-2 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
