"""normalize (PyTorch F.normalize: x / max(‖x‖_p, eps)) forward and backward."""

from __future__ import annotations

import mixing_ref as ref
import numpy as np
import onnx_data
import pytest
import rsnorm as rn

PS = [2.0, 1.0, 3.0, 0.5, np.inf]


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("axis", [1, -1, 0])
@pytest.mark.parametrize("shape", [(3, 5, 4), (6, 7), (2, 3, 2, 2)])
def test_reference(rng, dtype, p, axis, shape):
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    y = rn.normalize(x, p, axis)
    want = ref.normalize(x, p, axis)
    tol = ref.TOL[dtype] * 4
    assert y.dtype == dtype
    np.testing.assert_allclose(y.astype(np.float64), want, rtol=tol, atol=tol)


def test_one_dimensional_and_defaults(rng):
    x = rng.standard_normal(7)
    np.testing.assert_allclose(rn.normalize(x, axis=0), x / np.linalg.norm(x), rtol=1e-14)
    x = rng.standard_normal((3, 4))
    np.testing.assert_allclose(rn.normalize(x), ref.normalize(x), rtol=1e-14)


def test_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 5, 4))
    x[1, :, 2] = 0.0
    for p in (1.0, 2.0, 3.0):
        want = torch.nn.functional.normalize(torch.from_numpy(x), p=p, dim=1).numpy()
        np.testing.assert_allclose(rn.normalize(x, p), want, rtol=1e-12, atol=1e-15)


def test_onnx_conformance():
    op, attrs, (x,), (want,) = onnx_data.load("test_lpnormalization_default")
    assert op == "LpNormalization"
    y = rn.normalize(x, float(attrs.get("p", 2)), attrs.get("axis", -1))
    assert y.dtype == want.dtype
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_eps_clamp_and_zero_rows():
    x = np.array([[0.0, 0.0], [1e-14, 0.0], [3.0, 4.0]])
    y = rn.normalize(x, axis=1)
    np.testing.assert_array_equal(y[0], 0.0)
    np.testing.assert_allclose(y[1], [1e-14 / 1e-12, 0.0], rtol=1e-15)
    np.testing.assert_allclose(y[2], [0.6, 0.8], rtol=1e-15)


def test_no_overflow_or_underflow():
    big = np.array([[1e200, 1e200]])
    np.testing.assert_allclose(rn.normalize(big), [[2**-0.5, 2**-0.5]], rtol=1e-15)
    tiny = np.array([[3e-310, 4e-310]])
    np.testing.assert_allclose(rn.normalize(tiny, eps=0.0), [[0.6, 0.8]], rtol=1e-9)
    f32 = np.array([[3e38, 3e38]], np.float32)
    np.testing.assert_allclose(rn.normalize(f32), [[2**-0.5, 2**-0.5]], rtol=1e-7)


def test_errors(rng):
    x = rng.standard_normal((2, 3))
    for p in (0.0, -1.0, np.nan):
        with pytest.raises(ValueError, match="p must"):
            rn.normalize(x, p)
    with pytest.raises(ValueError, match="axis"):
        rn.normalize(x, axis=2)
    with pytest.raises(ValueError, match="eps"):
        rn.normalize(x, eps=-1.0)
    with pytest.raises(ValueError, match="0-d"):
        rn.normalize(np.array(1.0), axis=0)
    for bad in (x.astype(np.int32), x.astype(object)):
        with pytest.raises(TypeError):
            rn.normalize(bad)
    with pytest.raises(TypeError, match="grad_y"):
        rn.normalize_backward(x.astype(np.float32), x)


@pytest.mark.parametrize("axis", [1, -1])
def test_layouts_bitwise(rng, axis):
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    ref.check_layouts(lambda v: rn.normalize(v, 2.0, axis), x)
    ref.check_layouts(lambda v: rn.normalize(v, 3.0, axis), x)
    ref.check_layouts(lambda v: rn.normalize_backward(g, v, 2.0, axis).x, x)
    ref.check_layouts(lambda v: rn.normalize_backward(v, x, 2.0, axis).x, g)


def test_threads_bitwise(rng):
    x = rng.standard_normal((8, 32, 32, 32)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    ref.check_threads(rn, lambda v: rn.normalize(v), x)
    ref.check_threads(rn, lambda v: rn.normalize(v, axis=-1), x)
    ref.check_threads(rn, lambda v: rn.normalize_backward(g, v).x, x)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0), (2, 0, 4), (0,)])
def test_zero_size(shape):
    x = np.zeros(shape, np.float32)
    ax = 1 if len(shape) > 1 else 0
    assert rn.normalize(x, axis=ax).shape == shape
    assert rn.normalize_backward(x, x, axis=ax).x.shape == shape


def test_nan_isolation(rng):
    x = rng.standard_normal((3, 4, 5))
    y0 = rn.normalize(x)
    x[1, 2, 3] = np.nan
    y = rn.normalize(x)
    want = np.zeros(x.shape, bool)
    want[1, :, 3] = True
    np.testing.assert_array_equal(np.isnan(y), want)
    ref.assert_bitwise(y[~want], y0[~want])


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("strided", [False, True])
def test_backward_finite_differences(rng, p, axis, strided):
    x = rng.standard_normal((2, 4, 3))
    g = rng.standard_normal(x.shape)
    xs = x[:, ::-1][:, ::-1] if not strided else np.asfortranarray(x)
    got = rn.normalize_backward(g, xs, p, axis)
    assert isinstance(got, rn.NormalizeGrads)
    (num,) = ref.numeric_grad(lambda a: rn.normalize(a, p, axis), [x], g)
    ref.assert_grad(got.x, num)


def test_backward_below_eps_passes_through():
    x = np.array([[1e-3, -2e-3]])
    g = np.array([[0.5, 2.0]])
    np.testing.assert_allclose(rn.normalize_backward(g, x, eps=0.1).x, g / 0.1, rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_backward_dtypes(rng, dtype):
    x = rng.standard_normal((3, 4, 5))
    g = rng.standard_normal(x.shape)
    want = rn.normalize_backward(g, x).x
    got = rn.normalize_backward(g.astype(dtype), x.astype(dtype)).x
    assert got.dtype == dtype
    tol = 2e-2 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
