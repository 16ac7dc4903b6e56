"""local_response_norm forward and backward against float64 NumPy, ONNX data and FD."""

from __future__ import annotations

import mixing_ref as ref
import numpy as np
import onnx_data
import pytest
import rsnorm as rn

CASES = [
    # (shape, size, window, alpha_over_size)
    ((2, 7, 3, 4), 5, "torch", True),
    ((3, 5, 4), 2, "torch", True),
    ((3, 5, 4), 2, "onnx", True),
    ((2, 6, 3, 2), 4, "torch", False),
    ((2, 6, 3, 2), 4, "onnx", False),
    ((4, 3, 2, 2), 9, "torch", True),  # size > C, N != C
    ((1, 4, 2, 1, 3), 8, "onnx", True),  # 5-D, even size > C
    ((2, 1, 5), 3, "torch", True),  # one channel
]


@pytest.mark.parametrize("dtype", ref.DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("shape,size,window,aos", CASES)
def test_reference(rng, dtype, axis, shape, size, window, aos):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    kw = {"alpha": 0.3, "beta": 0.75, "k": 2.0, "alpha_over_size": aos, "window": window,
          "axis": axis}
    y = rn.local_response_norm(x, size, **kw)
    ref.assert_close(y, ref.lrn(x, size, **kw), dtype)


@pytest.mark.parametrize("beta", [0.5, 1.0, 0.3, 0.75])
def test_beta_paths(rng, beta):
    x = rng.standard_normal((2, 6, 5))
    y = rn.local_response_norm(x, 3, alpha=0.5, beta=beta, k=1.5)
    np.testing.assert_allclose(y, ref.lrn(x, 3, 0.5, beta, 1.5), rtol=1e-13)


def test_windows_differ_only_for_even_sizes(rng):
    x = rng.standard_normal((2, 6, 4))
    for size in (1, 3, 5):
        a = rn.local_response_norm(x, size, alpha=1.0, window="torch")
        b = rn.local_response_norm(x, size, alpha=1.0, window="onnx")
        ref.assert_bitwise(a, b)
    a = rn.local_response_norm(x, 4, alpha=1.0, window="torch")
    b = rn.local_response_norm(x, 4, alpha=1.0, window="onnx")
    assert not np.allclose(a, b)


@pytest.mark.parametrize("size", [2, 3, 4, 5])
def test_matches_torch(rng, size):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 7, 4, 5))
    want = torch.nn.functional.local_response_norm(torch.from_numpy(x), size, 0.2, 0.75, 1.5)
    y = rn.local_response_norm(x, size, 0.2, 0.75, 1.5)
    np.testing.assert_allclose(y, want.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["test_lrn", "test_lrn_default"])
def test_onnx_conformance(name):
    op, attrs, (x,), (want,) = onnx_data.load(name)
    assert op == "LRN"
    known = {"alpha": 1e-4, "beta": 0.75, "bias": 1.0, "size": None}
    assert set(attrs) <= set(known)
    a = {**known, **attrs}
    y = rn.local_response_norm(x, a["size"], a["alpha"], a["beta"], a["bias"], window="onnx")
    assert y.dtype == want.dtype
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [3, 6, 21])
def test_no_drift_after_huge_value(dtype, size):
    c = 64
    x = np.ones((1, c, 2), dtype=dtype)
    x[0, 2, :] = 1e18 if dtype == np.float32 else 1e150
    x[0, 40:, 1] = 0.25
    y = rn.local_response_norm(x, size, alpha=1.0, beta=0.75, k=1.0)
    want = ref.lrn(x, size, alpha=1.0)
    np.testing.assert_allclose(y, want, rtol=ref.TOL[dtype], atol=0)
    # Far from the huge value and the edges the window holds only ones: one value.
    far = y[0, 2 + size: c - size, 0].astype(np.float64)
    np.testing.assert_array_equal(far, far[0])


def test_errors(rng):
    x = rng.standard_normal((2, 3, 4))
    for size in (0, -1):
        with pytest.raises(ValueError, match="size"):
            rn.local_response_norm(x, size)
    with pytest.raises(ValueError, match="3 dimensions"):
        rn.local_response_norm(x[0], 3)
    with pytest.raises(ValueError, match="window"):
        rn.local_response_norm(x, 3, window="caffe")
    with pytest.raises(ValueError, match="axis"):
        rn.local_response_norm(x, 3, axis=3)
    with pytest.raises(ValueError, match="alpha"):
        rn.local_response_norm(x, 3, alpha=np.nan)
    for bad in (x.astype(np.int32), x.astype(np.complex128), x.astype(">f8")):
        with pytest.raises(TypeError):
            rn.local_response_norm(bad, 3)
    with pytest.raises(TypeError, match="grad_y"):
        rn.local_response_norm_backward(x.astype(np.float32), x, 3)
    with pytest.raises(ValueError, match="grad_y"):
        rn.local_response_norm_backward(x[:1], x, 3)
    with pytest.raises(ValueError, match="out"):
        rn.local_response_norm(x, 3, out=x)


def test_out(rng):
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    out = np.empty((3, 5, 2), np.float32).transpose(2, 1, 0)
    r = rn.local_response_norm(x, 3, out=out)
    assert r is out
    ref.assert_bitwise(np.ascontiguousarray(out), rn.local_response_norm(x, 3))


@pytest.mark.parametrize("axis", [1, -1])
def test_layouts_bitwise(rng, axis):
    x = rng.standard_normal((3, 6, 4, 5)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    ref.check_layouts(lambda v: rn.local_response_norm(v, 4, alpha=0.5, axis=axis), x)
    ref.check_layouts(lambda v: rn.local_response_norm_backward(g, v, 4, 0.5, axis=axis).x, x)
    ref.check_layouts(lambda v: rn.local_response_norm_backward(v, x, 4, 0.5, axis=axis).x, g)
    b, bc = ref.broadcast_case((3, 6, 4, 5), np.float32, rng)
    ref.assert_bitwise(rn.local_response_norm(b, 3, axis=axis),
                       rn.local_response_norm(bc, 3, axis=axis))


def test_threads_bitwise(rng):
    x = rng.standard_normal((4, 24, 40, 40)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    ref.check_threads(rn, lambda v: rn.local_response_norm(v, 5, alpha=0.5), x)
    ref.check_threads(rn, lambda v: rn.local_response_norm_backward(g, v, 5, 0.5).x, x)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    ref.check_threads(rn, lambda v: rn.local_response_norm(v, 5, alpha=0.5, axis=-1), xl)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0, 0, 0)])
def test_zero_size(shape):
    x = np.zeros(shape, np.float32)
    assert rn.local_response_norm(x, 3).shape == shape
    assert rn.local_response_norm_backward(x, x, 3).x.shape == shape


def test_nan_isolation(rng):
    x = rng.standard_normal((2, 8, 5))
    y0 = rn.local_response_norm(x, 3, alpha=1.0)
    x[1, 4, 2] = np.nan
    y = rn.local_response_norm(x, 3, alpha=1.0)
    bad = np.isnan(y)
    want = np.zeros_like(bad)
    want[1, 3:6, 2] = True  # the channels whose window holds channel 4, at that position
    np.testing.assert_array_equal(bad, want)
    ref.assert_bitwise(y[~want], y0[~want])


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("size,window", [(3, "torch"), (4, "torch"), (4, "onnx"), (7, "onnx")])
@pytest.mark.parametrize("strided", [False, True])
def test_backward_finite_differences(rng, axis, size, window, strided):
    x = rng.standard_normal((2, 5, 3, 2))
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    g = rng.standard_normal(x.shape)
    kw = {"alpha": 0.8, "beta": 0.75, "k": 1.2, "window": window, "axis": axis}
    xs = np.asfortranarray(x) if strided else x
    got = rn.local_response_norm_backward(g, xs, size, **kw)
    assert isinstance(got, rn.LocalResponseNormGrads)
    (num,) = ref.numeric_grad(lambda a: rn.local_response_norm(a, size, **kw), [x], g)
    ref.assert_grad(got.x, num)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_backward_dtypes(rng, dtype):
    x = rng.standard_normal((2, 5, 6))
    g = rng.standard_normal(x.shape)
    want = rn.local_response_norm_backward(g, x, 3, 0.5).x
    got = rn.local_response_norm_backward(g.astype(dtype), x.astype(dtype), 3, 0.5).x
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=5e-3 if dtype == np.float16 else 1e-5,
                               atol=5e-3 if dtype == np.float16 else 1e-6)


def test_float32_correctly_rounded(rng):
    x = (rng.standard_normal((2, 96, 5, 5)) * 4).astype(np.float32)
    for size in (2, 5, 13):
        y = rn.local_response_norm(x, size, alpha=0.9, beta=0.75, k=1.0)
        assert ref.max_ulp(y, ref.lrn(x, size, alpha=0.9)) <= 0.501
