"""Backward of the statistics family (issue 4): batch, layer, RMS, group and instance norm.

* every gradient against central finite differences of the forward in float64 (step 1e-6,
  ``|analytic − numeric| ≤ 1e-5 + 1e-3·|numeric|``, as torch.autograd.gradcheck), for every
  weight/bias permutation, both channel axes and strided inputs;
* Σ dx over the normalized axes = 0 without affine; the affine-free identities;
* bitwise identical for 1 and 2 threads and for strided vs contiguous inputs;
* the exact edge cases (one element per group, constant input, channels-last GN);
* the error contract.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import rsnorm as rn

STEP, ATOL, RTOL = 1e-6, 1e-5, 1e-3
AFFINE = list(itertools.product([False, True], [False, True]))  # (weight given, bias given)


def numeric_grads(f, arrays, gy):
    """Central differences of L = Σ gy·f() with respect to each array (perturbed in place)."""
    out = []
    for a in arrays:
        g = np.zeros_like(a)
        flat, gflat = a.reshape(-1), g.reshape(-1)
        assert np.shares_memory(flat, a)
        for i in range(flat.size):
            v = flat[i]
            flat[i] = v + STEP
            p = np.sum(f() * gy)
            flat[i] = v - STEP
            m = np.sum(f() * gy)
            flat[i] = v
            gflat[i] = (p - m) / (2 * STEP)
        out.append(g)
    return out


def assert_gradcheck(analytic, numeric, name):
    assert analytic.shape == numeric.shape, name
    err = np.abs(analytic - numeric)
    bound = ATOL + RTOL * np.abs(numeric)
    bad = err > bound
    assert not bad.any(), (
        f"{name}: {bad.sum()} of {bad.size} entries off; worst |diff| {err.max():.3g}")


def layout(x, kind):
    """The same values as x (float64, logical shape kept) in another memory layout."""
    if kind == "contiguous":
        return np.ascontiguousarray(x)
    if kind == "fortran":
        return np.asfortranarray(x)
    if kind == "sliced":
        base = np.zeros((x.shape[0],) + tuple(2 * d for d in x.shape[1:]), dtype=x.dtype)
        view = base[(slice(None),) + tuple(slice(None, None, 2) for _ in x.shape[1:])]
        view[...] = x
        return view
    if kind == "reversed":
        return np.ascontiguousarray(x[::-1])[::-1]
    raise ValueError(kind)


def params(rng, c, w, b):
    weight = rng.uniform(0.5, 1.5, c) if w else None
    bias = rng.standard_normal(c) if b else None
    return weight, bias


def check_all(analytic, f, x, weight, bias, gy, name):
    """Compares Grads fields with finite differences over x, weight, bias (contiguous copies)."""
    x = np.ascontiguousarray(x, dtype=np.float64).copy()
    arrays = [x] + [a for a in (weight, bias) if a is not None]
    numeric = numeric_grads(lambda: f(x, weight, bias), arrays, gy)
    assert_gradcheck(analytic.x, numeric[0], name + " dx")
    k = 1
    for field, p in (("weight", weight), ("bias", bias)):
        got = getattr(analytic, field)
        if p is None:
            assert got is None, f"{name}: {field} gradient returned for a parameter not given"
        else:
            assert got is not None and got.dtype == np.float64
            assert_gradcheck(got, numeric[k], f"{name} d{field}")
            k += 1


# ---------------------------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w,b", AFFINE)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_running"])
@pytest.mark.parametrize("kind", ["contiguous", "sliced", "fortran"])
def test_batch_norm_gradcheck(rng, w, b, axis, mode, kind):
    shape = (3, 4, 5) if axis == 1 else (3, 5, 4)
    c = 4
    x = rng.standard_normal(shape) * 2 + 0.5
    gy = rng.standard_normal(shape)
    weight, bias = params(rng, c, w, b)
    rm = rng.standard_normal(c) if mode == "eval" else None
    rv = rng.uniform(0.5, 2, c) if mode == "eval" else None
    training = mode == "train"

    def f(xx, ww, bb):
        # Copies: training would update the running statistics in place.
        return rn.batch_norm(xx, None if rm is None else rm.copy(),
                             None if rv is None else rv.copy(), ww, bb, training, 0.1, 1e-5,
                             axis=axis)

    g = rn.batch_norm_backward(layout(gy, kind), layout(x, kind), rm, rv, weight, bias,
                               training, 0.1, 1e-5, axis=axis)
    check_all(g, f, x, weight, bias, gy, f"bn {mode} axis={axis} {kind}")


@pytest.mark.parametrize("w,b", AFFINE)
@pytest.mark.parametrize("ns", [(6,), (4, 6)])
@pytest.mark.parametrize("kind", ["contiguous", "sliced", "reversed"])
def test_layer_norm_gradcheck(rng, w, b, ns, kind):
    shape = (3, 4, 6)
    x = rng.standard_normal(shape) * 3 - 1
    gy = rng.standard_normal(shape)
    weight = rng.uniform(0.5, 1.5, ns) if w else None
    bias = rng.standard_normal(ns) if b else None
    g = rn.layer_norm_backward(layout(gy, kind), layout(x, kind), ns, weight, bias, 1e-5)
    check_all(g, lambda xx, ww, bb: rn.layer_norm(xx, ns, ww, bb, 1e-5), x, weight, bias, gy,
              f"ln {ns} {kind}")


@pytest.mark.parametrize("w", [False, True])
@pytest.mark.parametrize("ns", [(6,), (4, 6)])
@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("kind", ["contiguous", "fortran"])
def test_rms_norm_gradcheck(rng, w, ns, eps, kind):
    shape = (3, 4, 6)
    x = rng.standard_normal(shape) + 0.3
    gy = rng.standard_normal(shape)
    weight = rng.uniform(0.5, 1.5, ns) if w else None
    g = rn.rms_norm_backward(layout(gy, kind), layout(x, kind), ns, weight, eps)
    check_all(g, lambda xx, ww, bb: rn.rms_norm(xx, ns, ww, eps), x, weight, None, gy,
              f"rms {ns} {kind}")


@pytest.mark.parametrize("w,b", AFFINE)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("kind", ["contiguous", "sliced"])
def test_group_norm_gradcheck(rng, w, b, axis, groups, kind):
    shape = (2, 6, 3, 2) if axis == 1 else (2, 3, 2, 6)
    x = rng.standard_normal(shape) * 1.5
    gy = rng.standard_normal(shape)
    weight, bias = params(rng, 6, w, b)
    g = rn.group_norm_backward(layout(gy, kind), layout(x, kind), groups, weight, bias, 1e-5,
                               axis=axis)
    check_all(g, lambda xx, ww, bb: rn.group_norm(xx, groups, ww, bb, 1e-5, axis=axis), x,
              weight, bias, gy, f"gn G={groups} axis={axis} {kind}")


@pytest.mark.parametrize("w,b", AFFINE)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize("kind", ["contiguous", "fortran"])
def test_instance_norm_gradcheck(rng, w, b, axis, use_input_stats, kind):
    shape = (2, 3, 5) if axis == 1 else (2, 5, 3)
    x = rng.standard_normal(shape) * 2
    gy = rng.standard_normal(shape)
    weight, bias = params(rng, 3, w, b)
    rm = None if use_input_stats else rng.standard_normal(3)
    rv = None if use_input_stats else rng.uniform(0.5, 2, 3)
    g = rn.instance_norm_backward(layout(gy, kind), layout(x, kind), rm, rv, weight, bias,
                                  use_input_stats, 0.1, 1e-5, axis=axis)
    check_all(g, lambda xx, ww, bb: rn.instance_norm(xx, rm, rv, ww, bb, use_input_stats, 0.1,
                                                     1e-5, axis=axis),
              x, weight, bias, gy, f"in use_input_stats={use_input_stats} axis={axis} {kind}")


# ---------------------------------------------------------------------------------------------
# An independent float64 formula (not finite differences) for float16/32 inputs
# ---------------------------------------------------------------------------------------------


def ref_backward(x, gy, axes, w_shape_axes, weight=None, mean=None, var=None, eps=1e-5):
    """dx, dweight, dbias of y = (x − mean)·rstd·w + b, stats over ``axes`` (or fixed)."""
    x, gy = x.astype(np.float64), gy.astype(np.float64)
    fixed = mean is not None
    if not fixed:
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    g = gy if weight is None else gy * weight
    if fixed:
        dx = g * rstd
    else:
        dx = rstd * (g - g.mean(axis=axes, keepdims=True)
                     - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    red = tuple(i for i in range(x.ndim) if i not in w_shape_axes)
    return dx, (gy * xhat).sum(axis=red), gy.sum(axis=red)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_against_float64_formula(rng, dtype):
    x = (rng.standard_normal((8, 6, 5, 4)) * 3 + 100).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, 6)
    wc = w.reshape(1, 6, 1, 1)
    tol = {"rtol": 2e-3, "atol": 2e-3} if dtype == np.float16 else {"rtol": 1e-5, "atol": 1e-5}
    cases = [
        (rn.batch_norm_backward(gy, x, None, None, w, w, True), (0, 2, 3), (1,)),
        (rn.group_norm_backward(gy, x, 3, w, w), None, (1,)),
        (rn.instance_norm_backward(gy, x, None, None, w, w), (2, 3), (1,)),
    ]
    for g, axes, waxes in cases:
        assert g.x.dtype == dtype and g.weight.dtype == dtype and g.bias.dtype == dtype
        if axes is None:  # group norm: view as (N, G, C/G·H·W)
            xr = x.reshape(8, 3, -1)
            gr = (gy.astype(np.float64) * wc).reshape(8, 3, -1)
            dx, _, _ = ref_backward(xr, gr, (2,), ())
            dx = dx.reshape(x.shape)
            mean = x.astype(np.float64).reshape(8, 3, -1).mean(axis=2)
            var = x.astype(np.float64).reshape(8, 3, -1).var(axis=2)
            xhat = ((x.astype(np.float64).reshape(8, 3, -1) - mean[..., None])
                    / np.sqrt(var[..., None] + 1e-5)).reshape(x.shape)
            dw = (gy.astype(np.float64) * xhat).sum(axis=(0, 2, 3))
            db = gy.astype(np.float64).sum(axis=(0, 2, 3))
        else:
            dx, dw, db = ref_backward(x, gy, axes, waxes, weight=wc)
        scale = np.abs(dx).max()
        np.testing.assert_allclose(g.x.astype(np.float64) / scale, dx / scale, **tol)
        np.testing.assert_allclose(g.weight, dw, rtol=tol["rtol"], atol=tol["atol"] * len(x))
        np.testing.assert_allclose(g.bias, db, rtol=tol["rtol"], atol=tol["atol"] * len(x))
    # Row ops.
    xl = (rng.standard_normal((16, 32)) * 2 + 50).astype(dtype)
    gl = rng.standard_normal(xl.shape).astype(dtype)
    wl = rng.uniform(0.5, 1.5, 32)
    g = rn.layer_norm_backward(gl, xl, 32, wl, wl)
    dx, dw, db = ref_backward(xl, gl, (1,), (1,), weight=wl)
    assert g.x.dtype == dtype
    np.testing.assert_allclose(g.x.astype(np.float64), dx, rtol=tol["rtol"],
                               atol=tol["atol"] * np.abs(dx).max())
    np.testing.assert_allclose(g.weight, dw, rtol=tol["rtol"], atol=tol["atol"] * 16)
    np.testing.assert_allclose(g.bias, db, rtol=tol["rtol"], atol=tol["atol"] * 16)


def test_batch_norm_eval_is_the_affine_map(rng):
    x = rng.standard_normal((5, 3, 4))
    gy = rng.standard_normal(x.shape)
    rm, rv, w, b = rng.standard_normal(3), rng.uniform(0.5, 2, 3), rng.standard_normal(3), None
    g = rn.batch_norm_backward(gy, x, rm, rv, w, b, False)
    dx, dw, _ = ref_backward(x, gy, (0, 2), (1,), weight=w.reshape(1, 3, 1),
                             mean=rm.reshape(1, 3, 1), var=rv.reshape(1, 3, 1))
    np.testing.assert_allclose(g.x, dx, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(g.weight, dw, rtol=1e-13, atol=1e-13)
    assert g.bias is None


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["bn", "ln", "gn", "in"])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_dx_sums_to_zero_without_affine(rng, op, eps):
    x = rng.standard_normal((4, 6, 5, 3)) * 10 + 3
    gy = rng.standard_normal(x.shape) + 1.0
    if op == "bn":
        dx, axes = rn.batch_norm_backward(gy, x, training=True, eps=eps).x, (0, 2, 3)
    elif op == "ln":
        dx, axes = rn.layer_norm_backward(gy, x, (5, 3), eps=eps).x, (2, 3)
    elif op == "gn":
        dx = rn.group_norm_backward(gy, x, 2, eps=eps).x.reshape(4, 2, -1)
        axes = (2,)
    else:
        dx, axes = rn.instance_norm_backward(gy, x, eps=eps).x, (2, 3)
    scale = np.abs(dx).sum(axis=axes)
    assert np.all(np.abs(dx.sum(axis=axes)) <= 1e-12 * scale + 1e-14)
    if eps == 0.0:
        # With eps = 0, dx is also orthogonal to x − mean (the output's scale is invariant).
        xr = x.reshape(4, 2, -1) if op == "gn" else x
        d = xr - xr.mean(axis=axes, keepdims=True)
        assert np.all(np.abs((dx * d).sum(axis=axes)) <= 1e-12 * np.abs(dx * d).sum(axis=axes))


def _all_ops(x, gy, axis):
    c = x.shape[axis]
    w = np.linspace(0.5, 1.5, c).astype(x.dtype)
    b = np.linspace(-1, 1, c).astype(x.dtype)
    rm, rv = np.linspace(-0.5, 0.5, c), np.linspace(0.5, 2, c)
    wl = np.linspace(0.5, 1.5, x.shape[-1]).astype(x.dtype)
    return {
        "bn_train": rn.batch_norm_backward(gy, x, None, None, w, b, True, axis=axis),
        "bn_eval": rn.batch_norm_backward(gy, x, rm, rv, w, b, False, axis=axis),
        "gn": rn.group_norm_backward(gy, x, 4, w, b, axis=axis),
        "in": rn.instance_norm_backward(gy, x, None, None, w, b, axis=axis),
        "in_eval": rn.instance_norm_backward(gy, x, rm, rv, w, b, False, axis=axis),
        "ln": rn.layer_norm_backward(gy, x, x.shape[-1:], wl, wl),
        "ln2": rn.layer_norm_backward(gy, x, x.shape[-2:]),
        "rms": rn.rms_norm_backward(gy, x, x.shape[-1:], wl),
    }


def _assert_same(a, b, msg):
    for name in a:
        for field in ("x", "weight", "bias"):
            u, v = getattr(a[name], field), getattr(b[name], field)
            if u is None:
                assert v is None
                continue
            assert u.dtype == v.dtype and u.shape == v.shape
            assert u.tobytes() == v.tobytes(), f"{msg}: {name}.{field} differs"


# Large enough for the thread pool (the parallel threshold is on x + grad_y bytes).
BIG = (16, 12, 24, 20)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_bitwise_threads(rng, restore_threads, dtype, axis):
    shape = BIG if axis == 1 else (16, 24, 20, 12)
    x = (rng.standard_normal(shape) * 3 + 7).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    rn.set_num_threads(1)
    one = _all_ops(x, gy, axis)
    rn.set_num_threads(2)
    two = _all_ops(x, gy, axis)
    _assert_same(one, two, f"1 vs 2 threads {np.dtype(dtype).name} axis={axis}")
    rn.set_num_threads(3)
    _assert_same(one, _all_ops(x, gy, axis), "1 vs 3 threads")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["sliced", "fortran", "reversed", "channels_last_view",
                                  "broadcast_grad"])
def test_bitwise_strided_vs_contiguous(rng, dtype, kind):
    x = (rng.standard_normal(BIG) * 3 + 7).astype(dtype)
    gy = rng.standard_normal(BIG).astype(dtype)
    if kind == "channels_last_view":
        # NCHW logical shape whose memory is NHWC (torch's channels_last).
        xs = np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, 3, 1, 2)
        gs = np.ascontiguousarray(np.moveaxis(gy, 1, -1)).transpose(0, 3, 1, 2)
    elif kind == "broadcast_grad":
        # A zero-stride grad_y, as the gradient of a sum: read in place.
        gy = np.broadcast_to(gy[:1], BIG)
        xs, gs = x, gy
    else:
        xs, gs = layout(x, kind), layout(gy, kind)
    assert xs.shape == x.shape
    ref_ = _all_ops(np.ascontiguousarray(x), np.ascontiguousarray(gy), 1)
    got = _all_ops(xs, gs, 1)
    _assert_same(ref_, got, f"{kind} vs contiguous")


def test_channels_last_group_norm_weight_grad_is_exact(rng):
    # pytorch#140913: PyTorch's channels-last group norm returns a wrong weight gradient.
    x = rng.standard_normal((4, 8, 6, 5)) * 2 + 1
    gy = rng.standard_normal(x.shape)
    w, b = rng.uniform(0.5, 1.5, 8), rng.standard_normal(8)
    nchw = rn.group_norm_backward(gy, x, 2, w, b)
    xl, gl = np.ascontiguousarray(np.moveaxis(x, 1, -1)), np.ascontiguousarray(np.moveaxis(gy, 1, -1))
    nhwc = rn.group_norm_backward(gl, xl, 2, w, b, axis=-1)
    assert nhwc.weight.tobytes() == nchw.weight.tobytes()
    assert nhwc.bias.tobytes() == nchw.bias.tobytes()
    assert np.moveaxis(nhwc.x, -1, 1).tobytes() == np.ascontiguousarray(nchw.x).tobytes()
    xr = x.reshape(4, 2, -1)
    xhat = ((xr - xr.mean(axis=2, keepdims=True))
            / np.sqrt(xr.var(axis=2, keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(nhwc.weight, (gy * xhat).sum(axis=(0, 2, 3)), rtol=1e-12)


def test_stats_argument_skips_recomputation_with_same_result(rng):
    x = rng.standard_normal((6, 4, 5)) + 2
    gy = rng.standard_normal(x.shape)
    w = rng.uniform(0.5, 1.5, 4)
    _, s = rn.batch_norm(x, None, None, w, w, True, return_stats=True)
    a = rn.batch_norm_backward(gy, x, None, None, w, w, True, stats=s)
    b = rn.batch_norm_backward(gy, x, None, None, w, w, True)
    assert a.x.tobytes() == b.x.tobytes() and a.weight.tobytes() == b.weight.tobytes()
    _, s = rn.group_norm(x, 2, w, w, return_stats=True)
    a, b = rn.group_norm_backward(gy, x, 2, w, w, stats=s), rn.group_norm_backward(gy, x, 2, w, w)
    assert a.x.tobytes() == b.x.tobytes() and a.weight.tobytes() == b.weight.tobytes()
    _, s = rn.instance_norm(x, return_stats=True)
    a, b = rn.instance_norm_backward(gy, x, stats=s), rn.instance_norm_backward(gy, x)
    assert a.x.tobytes() == b.x.tobytes()
    _, s = rn.layer_norm(x, 5, return_stats=True)
    a, b = rn.layer_norm_backward(gy, x, 5, stats=s), rn.layer_norm_backward(gy, x, 5)
    assert a.x.tobytes() == b.x.tobytes()
    _, s = rn.rms_norm(x, 5, return_stats=True)
    assert s.mean is None
    a, b = rn.rms_norm_backward(gy, x, 5, stats=s), rn.rms_norm_backward(gy, x, 5)
    assert a.x.tobytes() == b.x.tobytes()
    # The stats really are used: wrong ones give a different result.
    bad = rn.Stats(s.mean, s.rstd * 2)
    assert not np.allclose(rn.rms_norm_backward(gy, x, 5, stats=bad).x, b.x)


def test_grads_namedtuple():
    x = np.arange(12.0).reshape(3, 4)
    g = rn.layer_norm_backward(np.ones_like(x), x, 4, np.ones(4))
    assert isinstance(g, rn.Grads) and g._fields == ("x", "weight", "bias")
    assert g.bias is None and g.weight.shape == (4,)
    dx, dw, db = g
    assert dx is g.x and dw is g.weight and db is None


# ---------------------------------------------------------------------------------------------
# Exact edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_layer_norm_over_one_element(rng, dtype):
    # PyTorch returns a non-zero weight gradient here (pytorch/pytorch#188375).
    x = (rng.standard_normal((7, 3, 1)) * 5).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    w, b = np.full(1, 1.7, dtype), np.full(1, 0.3, dtype)
    g = rn.layer_norm_backward(gy, x, 1, w, b)
    assert g.x.dtype == dtype and np.all(g.x == 0)
    assert np.all(g.weight == 0)
    np.testing.assert_allclose(g.bias, gy.astype(np.float64).sum(), rtol=1e-3)


@pytest.mark.parametrize("shape", [(5, 6), (5, 6, 1, 1)])
def test_group_norm_one_value_per_group(rng, shape):
    x = rng.standard_normal(shape) * 4
    gy = rng.standard_normal(shape)
    w, b = rng.uniform(0.5, 2, 6), rng.standard_normal(6)
    g = rn.group_norm_backward(gy, x, 6, w, b)
    assert np.all(g.x == 0) and np.all(g.weight == 0)
    np.testing.assert_allclose(g.bias, gy.reshape(5, 6).sum(axis=0), rtol=1e-14)


@pytest.mark.parametrize("value", [0.0, 3.0, -1e4, 3.3e38])
def test_constant_input_gives_finite_gradients(rng, value):
    x = np.full((4, 3, 5), value, np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    w = np.float32([0.5, 1.0, 2.0])
    grads = [
        rn.batch_norm_backward(gy, x, None, None, w, w, True),
        rn.group_norm_backward(gy, x, 3, w, w),
        rn.instance_norm_backward(gy, x, None, None, w, w),
        rn.layer_norm_backward(gy, x, 5, np.ones(5, np.float32), np.ones(5, np.float32)),
    ]
    for g in grads:
        for a in g:
            assert np.all(np.isfinite(a))
        assert np.all(g.weight == 0)
    # Constant channels: x − mean = 0 exactly, so dx = w·rstd·(dy − mean(dy)), rstd = 1/√eps.
    dy = gy.astype(np.float64)
    expect = (w.reshape(1, 3, 1) / np.sqrt(1e-5)) * (dy - dy.mean(axis=(0, 2), keepdims=True))
    np.testing.assert_allclose(grads[0].x, expect, rtol=1e-5, atol=1e-3)


def test_rms_norm_huge_values():
    x = np.float32([[2e19, -2e19, 1e19, 0.0], [3e38, -3e38, 1.5e38, 0.0]])
    gy = np.float32([[1, 2, 3, 4], [1, 2, 3, 4]])
    g = rn.rms_norm_backward(gy, x, 4)
    assert np.all(np.isfinite(g.x))
    # Scale-invariant: dx(c·x) = dx(x)/c.
    g1 = rn.rms_norm_backward(gy.astype(np.float64), np.float64([[2, -2, 1, 0]] * 2), 4, eps=0.0)
    np.testing.assert_allclose(g.x[0].astype(np.float64) * 1e19, g1.x[0], rtol=1e-5)
    np.testing.assert_allclose(g.x[1].astype(np.float64) * 1.5e38, g1.x[1], rtol=1e-5)


def test_empty_batch_gives_zero_parameter_gradients():
    x = np.zeros((0, 3, 4), np.float32)
    g = rn.batch_norm_backward(x, x, None, None, np.ones(3, np.float32),
                               np.ones(3, np.float32), True)
    assert g.x.shape == x.shape
    assert np.all(g.weight == 0) and np.all(g.bias == 0)
    g = rn.layer_norm_backward(np.zeros((0, 4)), np.zeros((0, 4)), 4, np.ones(4), np.ones(4))
    assert g.x.shape == (0, 4) and np.all(g.weight == 0) and np.all(g.bias == 0)


def test_nan_stays_in_its_group(rng):
    x = rng.standard_normal((4, 6, 5))
    gy = rng.standard_normal(x.shape)
    clean = rn.group_norm_backward(gy, x, 3)
    x[1, 2, 3] = np.nan
    dirty = rn.group_norm_backward(gy, x, 3)
    assert np.all(np.isnan(dirty.x[1, 2:4]))
    mask = np.ones(x.shape, bool)
    mask[1, 2:4] = False
    assert dirty.x[mask].tobytes() == clean.x[mask].tobytes()


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors():
    x = np.zeros((4, 3, 5), np.float32)
    with pytest.raises(rn.ShapeError, match=r"grad_y must have the shape of x \(4, 3, 5\)"):
        rn.batch_norm_backward(np.zeros((4, 3, 4), np.float32), x, training=True)
    with pytest.raises(TypeError, match="grad_y has dtype float64 but x has dtype float32"):
        rn.layer_norm_backward(x.astype(np.float64), x, 5)
    with pytest.raises(TypeError, match="int64"):
        rn.layer_norm_backward(x.astype(np.int64), x.astype(np.int64), 5)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        rn.batch_norm_backward(np.zeros((1, 3)), np.zeros((1, 3)), training=True)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        rn.instance_norm_backward(np.zeros((2, 3, 1)), np.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match="eps"):
        rn.group_norm_backward(x, x, 3, eps=-1.0)
    with pytest.raises(ValueError, match="divisible"):
        rn.group_norm_backward(x, x, 2)
    with pytest.raises(rn.ShapeError, match=r"weight must have shape \(3,\)"):
        rn.batch_norm_backward(x, x, weight=np.ones(4))
    with pytest.raises(rn.ShapeError, match=r"normalized_shape"):
        rn.layer_norm_backward(x, x, (3,))
    with pytest.raises(rn.ShapeError, match=r"stats.rstd must have shape \(3,\)"):
        rn.batch_norm_backward(x, x, training=True,
                               stats=rn.Stats(np.zeros(3, np.float32), np.ones(4, np.float32)))
    with pytest.raises(ValueError, match="stats.mean is None"):
        rn.layer_norm_backward(x, x, 5, stats=rn.Stats(None, np.ones((4, 3))))
    with pytest.raises(ValueError, match="axis"):
        rn.group_norm_backward(x, x, 3, axis=3)
    with pytest.raises(ValueError, match="use_input_stats=False needs running_mean"):
        rn.instance_norm_backward(x, x, use_input_stats=False)
    with pytest.raises(ValueError, match="momentum"):
        rn.batch_norm_backward(x, x, momentum=2.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(40, 12), (300, 37), (3000, 700)])
def test_bitwise_two_dimensional_inputs(rng, dtype, shape):
    # (N, C): one value per plane, read as rows of C; compared with the channel-group paths of
    # Fortran-order and sliced copies (groups of 16 channels with a tail). Negative zeros in
    # grad_y must not leak a sign.
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    gy[::3, ::2] = -0.0
    c = shape[1]
    w = np.linspace(0.5, 1.5, c)
    outs = []
    for kind in ("contiguous", "fortran", "sliced"):
        xs, gs = layout(x, kind), layout(gy, kind)
        outs.append([
            rn.batch_norm_backward(gs, xs, None, None, w, w, True),
            rn.batch_norm_backward(gs, xs, w, w + 1, w, w, False),
            rn.group_norm_backward(gs, xs, 3 if c % 3 == 0 else 1, w, w),
            rn.group_norm_backward(gs, xs, c, w, w),
        ])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            for u, v in zip(a, b):
                assert u.tobytes() == v.tobytes()
    # (3000, 700): the contiguous path's per-thread channel chunks (700 is no multiple of 16)
    # and row-block dx tasks, and a forward output of 8 MiB in float32 (streaming stores).
    for threads in (1, 3):
        rn.set_num_threads(threads)
        try:
            again = rn.batch_norm_backward(gy, x, None, None, w, w, True)
            fwd = rn.batch_norm(x, None, None, w, w, training=True)
            fwd_f = rn.batch_norm(layout(x, "fortran"), None, None, w, w, training=True)
        finally:
            rn.set_num_threads(0)
        for u, v in zip(again, outs[0][0]):
            assert u.tobytes() == v.tobytes()
        assert fwd.tobytes() == np.ascontiguousarray(fwd_f).tobytes()
    # And the training dx against the float64 formula.
    x64, g64 = x.astype(np.float64), gy.astype(np.float64)
    d = x64 - x64.mean(axis=0)
    r = 1 / np.sqrt((d * d).mean(axis=0) + 1e-5)
    dx = w * r * (g64 - g64.mean(axis=0) - d * r * r * (g64 * d).mean(axis=0))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(outs[1][0].x, dx, rtol=tol, atol=tol * np.abs(dx).max())


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("features", [1, 31, 100, 257])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_row_backward_paths_are_bitwise_equal(rng, restore_threads, dtype, features, op):
    # C-contiguous inputs take the grouped row path (rows in groups, dweight/dbias accumulated
    # column chunk by column chunk); rows that are contiguous in a wider array take the per-row
    # path; strided rows the general element path. All three must agree bit for bit, with and
    # without the forward's statistics, for every affine combination, across row groups (up to
    # 16 rows) and column chunks (32 values) with tails, with −0.0 in grad_y, for 1 and 2
    # threads.
    rows = 150
    x = (rng.standard_normal((rows, features)) * 2 + 5).astype(dtype)
    gy = rng.standard_normal((rows, features)).astype(dtype)
    gy[::7, ::3] = -0.0
    w = np.linspace(0.5, 1.5, features).astype(dtype)
    wide = np.zeros((rows, features + 3), dtype)  # rows contiguous, the array is not
    wide_g = np.zeros_like(wide)
    wide[:, 1:features + 1], wide_g[:, 1:features + 1] = x, gy
    step = np.zeros((rows, 2 * features), dtype)  # strided rows
    step_g = np.zeros_like(step)
    step[:, ::2], step_g[:, ::2] = x, gy
    layouts = [(x, gy), (wide[:, 1:features + 1], wide_g[:, 1:features + 1]),
               (step[:, ::2], step_g[:, ::2])]

    def run(xs, gs, wb, stats):
        if op == "layer_norm":
            return rn.layer_norm_backward(gs, xs, features, *wb, stats=stats)
        return rn.rms_norm_backward(gs, xs, features, wb[0], 1e-5, stats=stats)

    for wb in [(None, None), (w, None), (None, w), (w, w)]:
        if op == "rms_norm" and wb[1] is not None:
            continue
        if op == "layer_norm":
            stats = rn.layer_norm(x, features, *wb, return_stats=True)[1]
        else:
            stats = rn.rms_norm(x, features, wb[0], return_stats=True)[1]
        # (Statistics returned in float32/float16 are rounded, so "given" and "recomputed"
        # are compared separately.)
        for threads, st in itertools.product((1, 2), (None, stats)):
            rn.set_num_threads(threads)
            got = [run(xs, gs, wb, st) for xs, gs in layouts]
            for g in got[1:]:
                for u, v in zip(got[0], g):
                    assert (u is None) == (v is None)
                    if u is not None:
                        assert u.tobytes() == v.tobytes(), (op, wb[0] is not None, threads)
    # And the values: dx against the float64 formula.
    x64, g64, w64 = (a.astype(np.float64) for a in (x, gy, w))
    g = rn.layer_norm_backward(gy, x, features, w, w) if op == "layer_norm" else (
        rn.rms_norm_backward(gy, x, features, w, 1e-5))
    gw = g64 * w64
    if op == "layer_norm":
        d = x64 - x64.mean(axis=1, keepdims=True)
        r = 1 / np.sqrt((d * d).mean(axis=1, keepdims=True) + 1e-5)
        xh = d * r
        dx = r * (gw - gw.mean(axis=1, keepdims=True) - xh * (gw * xh).mean(axis=1, keepdims=True))
    else:
        r = 1 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-5)
        xh = x64 * r
        dx = r * (gw - xh * (gw * xh).mean(axis=1, keepdims=True))
    tol = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-12}[dtype]
    np.testing.assert_allclose(g.x, dx, rtol=tol, atol=tol * np.abs(dx).max())
    np.testing.assert_allclose(g.weight, (g64 * xh).sum(axis=0), rtol=tol * 10,
                               atol=tol * 10 * np.abs(g64 * xh).sum(axis=0).max())


@pytest.mark.parametrize("dtype,shape", [(np.float32, (5, 70000)), (np.float64, (3, 40000)),
                                         (np.float16, (2, 140000))])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_row_backward_wide_rows(rng, dtype, shape, op):
    # Rows of >= 256 KiB: one row per parameter-gradient block, summed by columns over the rows
    # (no per-block partials). Bitwise the strided path (which keeps the partials) and close
    # to the float64 formula.
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    f = shape[1]
    w = np.linspace(0.5, 1.5, f).astype(dtype)
    step = np.zeros((shape[0], 2 * f), dtype)
    step_g = np.zeros_like(step)
    step[:, ::2], step_g[:, ::2] = x, gy

    def run(xs, gs):
        if op == "layer_norm":
            return rn.layer_norm_backward(gs, xs, f, w, w)
        return rn.rms_norm_backward(gs, xs, f, w, 1e-5)

    a, b = run(x, gy), run(step[:, ::2], step_g[:, ::2])
    for u, v in zip(a, b):
        if u is not None:
            assert u.tobytes() == v.tobytes()
    x64, g64 = x.astype(np.float64), gy.astype(np.float64)
    if op == "layer_norm":
        d = x64 - x64.mean(axis=1, keepdims=True)
        xh = d / np.sqrt((d * d).mean(axis=1, keepdims=True) + 1e-5)
    else:
        xh = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-5)
    tol = {np.float16: 1e-2, np.float32: 1e-5, np.float64: 1e-10}[dtype]
    dw = (g64 * xh).sum(axis=0)
    np.testing.assert_allclose(a.weight, dw, rtol=tol, atol=tol * np.abs(dw).max())
    if op == "layer_norm":
        db = g64.sum(axis=0)
        np.testing.assert_allclose(a.bias, db, rtol=tol, atol=tol * np.abs(db).max())
