"""Backward of the GPU batch/layer/RMS/group norm against float64 references.

The references (gpu_reference.py) are themselves checked against central finite differences of
the float64 forward formulas here. Documented GPU tolerance for gradients: rtol=1e-3 and
atol=1e-4 times the largest reference magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest

gpu = pytest.importorskip("rsnorm.gpu", reason="rsnorm.gpu needs wgpu-py")
if not gpu.is_available():
    pytest.skip("no GPU adapter (not even lavapipe)", allow_module_level=True)

import gpu_reference as ref
import rsnorm
from rsnorm.gpu import _device


def gclose(got, want, rtol=1e-3, atol=1e-4):
    want = np.asarray(want, np.float64)
    assert np.shape(got) == want.shape
    scale = max(float(np.abs(want).max()), 1e-30) if want.size else 1.0
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol * scale)


@pytest.fixture
def rng():
    return np.random.default_rng(99)


def randn(rng, *shape, loc=0.0):
    return (loc + rng.standard_normal(shape)).astype(np.float32)


# ----------------------------------------------------------------------------- references vs FD


def _fd_grad(f, arr, dy, h=1e-6):
    """d/d(arr) of sum(dy * f()) by central differences (arr is modified and restored)."""
    g = np.zeros_like(arr)
    it = np.nditer(arr, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = arr[i]
        arr[i] = old + h
        up = (dy * f()).sum()
        arr[i] = old - h
        dn = (dy * f()).sum()
        arr[i] = old
        g[i] = (up - dn) / (2 * h)
    return g


def test_reference_backward_matches_finite_differences():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 3))
    dy = rng.standard_normal(x.shape)
    w = rng.standard_normal(4)
    b = rng.standard_normal(4)
    w3 = rng.standard_normal(3)
    b3 = rng.standard_normal(3)
    rm, rv = rng.standard_normal(4), rng.random(4) + 0.5

    cases = [
        (lambda: ref.layer_norm(x, 1, w3, b3)[0],
         ref.layer_norm_backward(dy, x, 1, w3), [w3, b3]),
        (lambda: ref.rms_norm(x, 1, w3, 1e-3)[0],
         ref.rms_norm_backward(dy, x, 1, w3, 1e-3), [w3]),
        (lambda: ref.group_norm(x, 2, w, b)[0], ref.group_norm_backward(dy, x, 2, w), [w, b]),
        (lambda: ref.batch_norm(x, None, None, w, b, True)[0],
         ref.batch_norm_backward(dy, x, None, None, w, True), [w, b]),
        (lambda: ref.batch_norm(x, rm, rv, w, b, False)[0],
         ref.batch_norm_backward(dy, x, rm, rv, w, False), [w, b]),
    ]
    for f, grads, params in cases:
        np.testing.assert_allclose(grads[0], _fd_grad(f, x, dy), rtol=1e-5, atol=1e-7)
        for g, p in zip(grads[1:], params):
            np.testing.assert_allclose(g, _fd_grad(f, p, dy), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- GPU vs reference


@pytest.mark.parametrize("shape,k", [((3, 7), 1), ((2, 3, 5), 2), ((4, 1), 1), ((5, 1000), 1),
                                     ((3, 5000), 1)])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_backward(rng, shape, k, affine):
    x = randn(rng, *shape, loc=0.5)
    dy = randn(rng, *shape)
    ns = shape[-k:]
    w = rng.standard_normal(ns).astype(np.float32) if affine else None
    b = rng.standard_normal(ns).astype(np.float32) if affine else None
    g = gpu.layer_norm_backward(dy, x, ns, w, b)
    dx, dw, db = ref.layer_norm_backward(dy, x, k, w)
    gclose(g.x, dx)
    assert g.x.dtype == np.float32
    if affine:
        gclose(g.weight, dw)
        gclose(g.bias, db)
    else:
        assert g.weight is None and g.bias is None
    # Passing the forward statistics gives the same gradients.
    _, st = gpu.layer_norm(x, ns, w, b, return_stats=True)
    g2 = gpu.layer_norm_backward(dy, x, ns, w, b, stats=st)
    gclose(g2.x, dx)
    cpu = getattr(rsnorm, "layer_norm_backward", None)
    if cpu is not None:
        c = cpu(dy, x, ns, w, b)
        gclose(g.x, c.x)


def test_layer_norm_backward_one_element_weight_grad_is_zero(rng):
    x = randn(rng, 6, 1)
    g = gpu.layer_norm_backward(randn(rng, 6, 1), x, 1, np.ones(1, np.float32),
                                np.zeros(1, np.float32))
    assert np.array_equal(g.weight, np.zeros(1, np.float32))
    assert np.array_equal(g.x, np.zeros((6, 1), np.float32))


@pytest.mark.parametrize("shape,k", [((3, 7), 1), ((2, 3, 5), 2), ((4, 1000), 1)])
def test_rms_norm_backward(rng, shape, k):
    x = randn(rng, *shape)
    dy = randn(rng, *shape)
    ns = shape[-k:]
    w = rng.standard_normal(ns).astype(np.float32)
    g = gpu.rms_norm_backward(dy, x, ns, w)
    dx, dw = ref.rms_norm_backward(dy, x, k, w)
    gclose(g.x, dx)
    gclose(g.weight, dw)
    assert g.bias is None
    _, st = gpu.rms_norm(x, ns, w, return_stats=True)
    gclose(gpu.rms_norm_backward(dy, x, ns, w, stats=st).x, dx)
    gclose(gpu.rms_norm_backward(dy, x, ns).x, ref.rms_norm_backward(dy, x, k)[0])


@pytest.mark.parametrize("shape,G,axis", [((2, 6, 5, 3), 3, 1), ((2, 5, 3, 6), 2, -1),
                                          ((3, 4, 700), 4, 1), ((2, 4, 1), 4, 1)])
def test_group_norm_backward(rng, shape, G, axis):
    x = randn(rng, *shape, loc=1.0)
    dy = randn(rng, *shape)
    C = shape[axis]
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    g = gpu.group_norm_backward(dy, x, G, w, b, axis=axis)
    dx, dw, db = ref.group_norm_backward(dy, x, G, w, axis=axis)
    gclose(g.x, dx)
    gclose(g.weight, dw)
    gclose(g.bias, db)
    _, st = gpu.group_norm(x, G, w, b, axis=axis, return_stats=True)
    gclose(gpu.group_norm_backward(dy, x, G, w, b, stats=st, axis=axis).x, dx)


@pytest.mark.parametrize("shape,axis", [((4, 3, 5, 7), 1), ((5, 3), 1), ((2, 4, 3, 6), -1),
                                        ((40, 3, 200), 1)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_backward(rng, shape, axis, training):
    x = randn(rng, *shape, loc=-1.0)
    dy = randn(rng, *shape)
    C = shape[axis]
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    rm = rng.standard_normal(C).astype(np.float32)
    rv = (rng.random(C) + 0.5).astype(np.float32)
    g = gpu.batch_norm_backward(dy, x, rm, rv, w, b, training=training, axis=axis)
    dx, dw, db = ref.batch_norm_backward(dy, x, rm, rv, w, training, axis=axis)
    gclose(g.x, dx)
    gclose(g.weight, dw)
    gclose(g.bias, db)
    g0 = gpu.batch_norm_backward(dy, x, axis=axis)  # no running stats: batch statistics
    gclose(g0.x, ref.batch_norm_backward(dy, x, None, None, None, True, axis=axis)[0])
    assert g0.weight is None and g0.bias is None


@pytest.mark.parametrize("loc", [1e4, 1e6])
def test_backward_adversarial_offsets(rng, loc):
    x = randn(rng, 6, 4, 300, loc=loc)
    dy = randn(rng, *x.shape)
    w = np.linspace(0.5, 2, 4).astype(np.float32)
    gclose(gpu.batch_norm_backward(dy, x, weight=w, training=True).x,
           ref.batch_norm_backward(dy, x, None, None, w, True)[0])
    gclose(gpu.layer_norm_backward(dy, x, 300).x, ref.layer_norm_backward(dy, x, 1)[0])
    gclose(gpu.group_norm_backward(dy, x, 2, w).x, ref.group_norm_backward(dy, x, 2, w)[0])


def test_backward_f16(rng):
    x = randn(rng, 3, 6, 11).astype(np.float16)
    dy = randn(rng, 3, 6, 11).astype(np.float16)
    w = np.linspace(0.5, 2, 6).astype(np.float32)
    for on in (True, False):
        with _device._limits(f16=on):
            g = gpu.group_norm_backward(dy, x, 3, w, w)
            assert g.x.dtype == np.float16 and g.weight.dtype == np.float16
            dx, dw, db = ref.group_norm_backward(dy, x, 3, w)
            gclose(g.x, dx, rtol=5e-3, atol=5e-3)
            gclose(g.weight, dw, rtol=5e-3, atol=5e-3)
            gclose(g.bias, db, rtol=5e-3, atol=5e-3)


def test_backward_device_arrays_bitwise_repeat_and_split(rng):
    x = randn(rng, 6, 4, 1700)
    dy = randn(rng, 6, 4, 1700)
    w = np.linspace(0.5, 2, 4).astype(np.float32)
    reads = _device.COUNTERS["reads"]
    xd, dyd, wd = gpu.asarray(x), gpu.asarray(dy), gpu.asarray(w)
    gd = gpu.batch_norm_backward(dyd, xd, weight=wd, bias=wd, training=True)
    gg = gpu.group_norm_backward(dyd, xd, 2, wd, wd)
    gl = gpu.layer_norm_backward(dyd, xd, (4, 1700), None, None)
    assert isinstance(gd.x, gpu.GPUArray) and isinstance(gg.weight, gpu.GPUArray)
    assert _device.COUNTERS["reads"] == reads
    base = [gd.x.numpy(), gd.weight.numpy(), gg.x.numpy(), gg.bias.numpy(), gl.x.numpy()]
    gclose(base[0], ref.batch_norm_backward(dy, x, None, None, w, True)[0])
    gclose(base[2], ref.group_norm_backward(dy, x, 2, w)[0])
    gclose(base[4], ref.layer_norm_backward(dy, x, 2)[0])
    with _device._limits(max_binding=65536, max_workgroups=7):
        sd = gpu.batch_norm_backward(dy, x, weight=w, bias=w, training=True)
        sg = gpu.group_norm_backward(dy, x, 2, w, w)
        sl = gpu.layer_norm_backward(dy, x, (4, 1700))
    again = gpu.batch_norm_backward(dy, x, weight=w, bias=w, training=True)
    for u, v in zip(base, [sd.x, sd.weight, sg.x, sg.bias, sl.x]):
        assert np.array_equal(u, v)
    assert np.array_equal(again.x, base[0]) and np.array_equal(again.weight, base[1])


def test_fused_backward_equals_two_pass_bitwise(rng):
    x = randn(rng, 3, 8, 900, loc=3.0)
    dy = randn(rng, 3, 8, 900)
    w = np.linspace(-1, 1, 8).astype(np.float32)
    w2 = np.linspace(-1, 1, 900).astype(np.float32)

    def run():
        return [gpu.layer_norm_backward(dy, x, 900, w2, w2).x,
                gpu.layer_norm_backward(dy, x, (8, 900)).x,  # two chunks per group
                gpu.rms_norm_backward(dy, x, 900, w2).x,
                gpu.group_norm_backward(dy, x, 4, w, w).x,
                gpu.layer_norm_backward(dy.reshape(-1, 9), x.reshape(-1, 9), 9).x]

    fused = run()
    with _device._limits(fused_chunks=0):
        two = run()
    for u, v in zip(fused, two):
        assert np.array_equal(u, v)
    gclose(fused[3], ref.group_norm_backward(dy, x, 4, w)[0])


def test_backward_errors(rng):
    x = randn(rng, 2, 4, 3)
    with pytest.raises(ValueError):
        gpu.layer_norm_backward(randn(rng, 2, 4), x, 3)
    with pytest.raises(TypeError):
        gpu.layer_norm_backward(x.astype(np.float16), x, 3)
    with pytest.raises(TypeError):
        gpu.layer_norm_backward(gpu.asarray(x), x, 3)
    with pytest.raises(ValueError):
        gpu.group_norm_backward(x, x, 3)
    with pytest.raises(ValueError):
        gpu.layer_norm_backward(x, x, 3, stats=rsnorm.Stats(np.zeros(3), np.ones(3)))
    g = gpu.batch_norm_backward(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32),
                                weight=np.ones(4, np.float32))
    assert g.x.shape == (0, 4) and np.array_equal(g.weight, np.zeros(4, np.float32))
