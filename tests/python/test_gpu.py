"""rsnorm.gpu forward ops against float64 NumPy references (and the CPU ops where they exist).

Runs on any WebGPU adapter, Mesa's lavapipe in CI; skipped only when there is no adapter at all.
Documented float32 tolerance (rsnorm.gpu docstring): rtol=1e-4, atol=1e-5 on normalized outputs.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

gpu = pytest.importorskip("rsnorm.gpu", reason="rsnorm.gpu needs wgpu-py")
if not gpu.is_available():
    pytest.skip("no GPU adapter (not even lavapipe)", allow_module_level=True)

import gpu_reference as ref
import rsnorm
from rsnorm.gpu import _device

RTOL, ATOL = 1e-4, 1e-5
ErrorClass = getattr(rsnorm, "RsnormError", ValueError)


def close(got, want, rtol=RTOL, atol=ATOL):
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


def cpu_op(name):
    """The CPU op when the installed native module has it (an extra cross-check only)."""
    return getattr(rsnorm, name, None)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randn(rng, *shape, loc=0.0):
    return (loc + rng.standard_normal(shape)).astype(np.float32)


# ----------------------------------------------------------------------------- import, info


def test_import_rsnorm_does_not_import_wgpu():
    import subprocess

    code = "import sys, rsnorm; print('wgpu' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_info_and_adapters():
    info = gpu.info()
    assert info["backend"]
    assert info["max_storage_binding"] >= 2**20
    assert isinstance(info["shader_f16"], bool)
    assert len(gpu.adapters()) >= 1


def test_every_shader_compiles_and_headers_match_layouts():
    import re

    from rsnorm.gpu import shaders

    ctx = _device.context()
    kinds = {"uniform": "u", "storage, read": "r", "storage, read_write": "w"}
    for name, layout in _device.BINDINGS.items():
        text = shaders.load_wgsl(name)
        # Header lines look like "//   3  storage, read_write  y : array<T> ...".
        header = re.findall(r"^//\s+(\d+)\s+(uniform|storage, read_write|storage, read)\s",
                            text, flags=re.MULTILINE)
        assert "".join(kinds[k] for _, k in header) == layout, name
        assert [int(i) for i, _ in header] == list(range(len(layout))), name
        decl = re.findall(r"@binding\((\d+)\) var<(uniform|storage, read_write|storage, read)>",
                          text)
        assert "".join(kinds[k] for _, k in decl) == layout, name
        for storage in ("f32", "f16") if ctx.has_f16 else ("f32",):
            ctx.device.create_shader_module(code=shaders.shader_source(name, storage))
    assert shaders.load_wgsl.cache_info().hits > 0


def test_asarray_roundtrip_and_reshape(rng):
    x = randn(rng, 3, 5, 7)
    d = gpu.asarray(x)
    assert d.shape == (3, 5, 7) and d.dtype == np.float32 and d.size == 105
    assert np.array_equal(d.numpy(), x)
    assert d.reshape(15, 7).numpy().shape == (15, 7)
    h = randn(rng, 3, 5).astype(np.float16)
    assert np.array_equal(gpu.asarray(h).numpy(), h)
    with pytest.raises(TypeError):
        gpu.asarray([1.0, 2.0])


# ----------------------------------------------------------------------------- batch norm


BN_CASES = [
    ((4, 3, 5, 7), 1),
    ((5, 3), 1),
    ((2, 4, 3, 6), -1),  # channels-last (NHWC)
    ((3, 7, 1), 1),
    ((2, 5, 9), 2),
]


@pytest.mark.parametrize("shape,axis", BN_CASES)
@pytest.mark.parametrize("affine", [False, True])
def test_batch_norm_train(rng, shape, axis, affine):
    x = randn(rng, *shape, loc=0.5)
    C = shape[axis]
    w = rng.standard_normal(C).astype(np.float32) if affine else None
    b = rng.standard_normal(C).astype(np.float32) if affine else None
    rm = rng.standard_normal(C)  # float64 running stats, updated in place in float64
    rv = rng.random(C) + 0.5
    rm0, rv0 = rm.copy(), rv.copy()
    y, st = gpu.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2, axis=axis,
                           return_stats=True)
    want, mean, rstd, var = ref.batch_norm(x, None, None, w, b, True, axis=axis)
    close(y, want)
    assert y.dtype == np.float32
    close(st.mean, mean)
    close(st.rstd, rstd)
    n = x.size // C
    np.testing.assert_allclose(rm, 0.8 * rm0 + 0.2 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, 0.8 * rv0 + 0.2 * var * n / (n - 1), rtol=1e-5, atol=1e-6)
    cpu = cpu_op("batch_norm")
    if cpu is not None:
        close(y, cpu(x, None, None, w, b, training=True, axis=axis))


@pytest.mark.parametrize("shape,axis", BN_CASES[:3])
def test_batch_norm_eval_and_no_running(rng, shape, axis):
    x = randn(rng, *shape)
    C = shape[axis]
    rm = rng.standard_normal(C).astype(np.float32)
    rv = (rng.random(C) + 0.5).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    y = gpu.batch_norm(x, rm, rv, w, None, training=False, axis=axis)
    close(y, ref.batch_norm(x, rm, rv, w, None, False, axis=axis)[0])
    # Eval without running stats uses the batch statistics, as PyTorch does.
    y2 = gpu.batch_norm(x, axis=axis)
    close(y2, ref.batch_norm(x, axis=axis)[0])


def test_batch_norm_many_chunks(rng):
    # 40 000 values per channel: 10 reduction chunks, merged by the workgroup-tree finalize.
    x = randn(rng, 40, 3, 1000, loc=5.0)
    y, st = gpu.batch_norm(x, training=True, return_stats=True)
    want, mean, rstd, _ = ref.batch_norm(x, training=True)
    close(y, want)
    close(st.mean, mean)
    close(st.rstd, rstd)
    g = gpu.batch_norm_backward(x, x, training=True)
    assert np.abs(g.x).max() < 1e-3  # dy = x: the gradient through the statistics is ~0


def test_batch_norm_chunks_inside_and_across_runs(rng):
    # H*W = 5000 > 4096: some chunks lie inside one contiguous run (no per-element division),
    # others straddle two runs; both must agree with the reference and split bitwise alike.
    x = randn(rng, 3, 2, 5000, loc=-7.0)
    dy = randn(rng, 3, 2, 5000)
    w = np.array([0.5, 2.0], np.float32)
    y = gpu.batch_norm(x, weight=w, training=True)
    close(y, ref.batch_norm(x, None, None, w, None, True)[0])
    g = gpu.batch_norm_backward(dy, x, weight=w, bias=w, training=True)
    dx, dw, db = ref.batch_norm_backward(dy, x, None, None, w, True)
    np.testing.assert_allclose(g.x, dx, rtol=1e-3, atol=1e-4 * np.abs(dx).max())
    np.testing.assert_allclose(g.weight, dw, rtol=1e-3, atol=1e-4 * np.abs(dw).max())
    np.testing.assert_allclose(g.bias, db, rtol=1e-3, atol=1e-4 * np.abs(db).max())
    with _device._limits(max_binding=40000):
        assert np.array_equal(gpu.batch_norm(x, weight=w, training=True), y)
        assert np.array_equal(gpu.batch_norm_backward(dy, x, weight=w, bias=w,
                                                      training=True).x, g.x)


def test_fused_kernel_equals_two_pass_bitwise(rng):
    x = randn(rng, 3, 8, 900, loc=2.0)
    w = np.linspace(-1, 1, 8).astype(np.float32)
    ops = [
        lambda: gpu.layer_norm(x, 900, return_stats=True),
        lambda: gpu.layer_norm(x, (8, 900)),  # 7200 elements: two chunks in the fused kernel
        lambda: gpu.rms_norm(x, 900, return_stats=True),
        lambda: gpu.group_norm(x, 4, w, w, return_stats=True),
        lambda: gpu.instance_norm(x, weight=w),
        lambda: gpu.filter_response_norm(x, w, w, tau=w),
        lambda: gpu.layer_norm(x.reshape(-1, 12), 12, return_stats=True),  # one per invocation
        lambda: gpu.group_norm(x[:, :, :1], 8, w, w),  # one-element groups
        lambda: gpu.rms_norm(x.reshape(-1, 3), 3),
    ]
    fused = [op() for op in ops]
    n0 = _device.COUNTERS["dispatches"]
    with _device._limits(fused_chunks=0):
        two = [op() for op in ops]
    assert _device.COUNTERS["dispatches"] - n0 == 3 * len(ops)  # stats, finalize, apply
    def flat(r):
        if isinstance(r, tuple):
            return [a for item in r for a in flat(item)]
        return [] if r is None else [r]

    for a, b in zip(fused, two):
        fa, fb = flat(a), flat(b)
        assert len(fa) == len(fb)
        for u, v in zip(fa, fb):
            assert np.array_equal(u, v, equal_nan=True)


def test_batch_norm_momentum_none_and_onnx(rng):
    x = randn(rng, 6, 3, 4)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    nbt = np.array(4, np.int64)
    gpu.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    _, mean, _, var = ref.batch_norm(x, training=True)
    assert int(nbt) == 5
    np.testing.assert_allclose(rm, mean / 5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, 0.8 + var * 24 / 23 / 5, rtol=1e-5, atol=1e-6)
    rm, rv = np.zeros(3), np.ones(3)
    gpu.batch_norm(x, rm, rv, training=True, momentum=0.9, momentum_convention="onnx")
    np.testing.assert_allclose(rm, 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)


def test_batch_norm_device_running_stats(rng):
    x = randn(rng, 8, 4, 5)
    rm_d = gpu.asarray(np.zeros(4, np.float32))
    rv_d = gpu.asarray(np.ones(4, np.float32))
    gpu.batch_norm(gpu.asarray(x), rm_d, rv_d, training=True, momentum=0.1)
    _, mean, _, var = ref.batch_norm(x, training=True)
    close(rm_d.numpy(), 0.1 * mean)
    close(rv_d.numpy(), 0.9 + 0.1 * var * 40 / 39)


# ----------------------------------------------------------------------------- layer / RMS


LN_CASES = [((3, 7), 1), ((2, 3, 5), 2), ((4, 1), 1), ((2, 3, 1000), 1), ((9, 5000), 1),
            ((2, 20000), 1),  # longer than the fused kernel takes: statistics + apply passes
            ((70000, 3), 1),  # short rows: one invocation per row
            ((66000, 17), 1)]  # one workgroup per row: more than 65 535 workgroups, a 2-D grid


@pytest.mark.parametrize("shape,k", LN_CASES)
def test_layer_norm(rng, shape, k):
    x = randn(rng, *shape, loc=1.0)
    ns = shape[-k:]
    w = rng.standard_normal(ns).astype(np.float32)
    b = rng.standard_normal(ns).astype(np.float32)
    for ww, bb in ((None, None), (w, b), (w, None)):
        y, st = gpu.layer_norm(x, ns, ww, bb, return_stats=True)
        want, mean, rstd = ref.layer_norm(x, k, ww, bb)
        close(y, want)
        close(st.mean, mean)
        close(st.rstd, rstd)
    cpu = cpu_op("layer_norm")
    if cpu is not None:
        close(gpu.layer_norm(x, ns, w, b), cpu(x, ns, w, b))


def test_layer_norm_one_element_gives_bias_exactly(rng):
    x = randn(rng, 5, 1)
    b = np.array([0.25], np.float32)
    y = gpu.layer_norm(x, 1, np.array([3.0], np.float32), b)
    assert np.array_equal(y, np.full((5, 1), 0.25, np.float32))


@pytest.mark.parametrize("shape,k", LN_CASES[:5])
def test_rms_norm(rng, shape, k):
    x = randn(rng, *shape)
    ns = shape[-k:]
    w = rng.standard_normal(ns).astype(np.float32)
    y, st = gpu.rms_norm(x, ns, w, return_stats=True)
    want, rstd = ref.rms_norm(x, k, w)
    close(y, want)
    assert st.mean is None
    close(st.rstd, rstd)
    close(gpu.rms_norm(x, ns, eps=1e-3), ref.rms_norm(x, k, None, 1e-3)[0])
    cpu = cpu_op("rms_norm")
    if cpu is not None:
        close(gpu.rms_norm(x, ns, w), cpu(x, ns, w))


# ----------------------------------------------------------------------------- group / instance


GN_CASES = [((2, 6, 5, 3), 3, 1), ((2, 6, 4), 1, 1), ((3, 6, 2, 2), 6, 1), ((2, 5, 3, 6), 2, -1),
            ((2, 4, 1), 4, 1), ((2, 8, 700), 2, 1)]


@pytest.mark.parametrize("shape,G,axis", GN_CASES)
def test_group_norm(rng, shape, G, axis):
    x = randn(rng, *shape, loc=-2.0)
    C = shape[axis]
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    y, st = gpu.group_norm(x, G, w, b, axis=axis, return_stats=True)
    want, mean, rstd = ref.group_norm(x, G, w, b, axis=axis)
    close(y, want)
    close(st.mean, mean)
    close(st.rstd, rstd)
    close(gpu.group_norm(x, G, axis=axis), ref.group_norm(x, G, axis=axis)[0])
    cpu = cpu_op("group_norm")
    if cpu is not None:
        close(y, cpu(x, G, w, b, axis=axis))


def test_group_norm_one_element_groups_give_bias_exactly(rng):
    x = randn(rng, 2, 4, 1)
    b = rng.standard_normal(4).astype(np.float32)
    y = gpu.group_norm(x, 4, np.ones(4, np.float32), b)
    assert np.array_equal(y, np.broadcast_to(b[None, :, None], (2, 4, 1)))


@pytest.mark.parametrize("shape,axis", [((2, 3, 5, 4), 1), ((2, 5, 4, 3), -1), ((3, 2, 9), 1)])
def test_instance_norm(rng, shape, axis):
    x = randn(rng, *shape, loc=3.0)
    C = shape[axis]
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C), np.ones(C)
    y, st = gpu.instance_norm(x, rm, rv, w, b, momentum=0.5, axis=axis, return_stats=True)
    want, mean, rstd = ref.instance_norm(x, w, b, axis=axis)
    close(y, want)
    close(st.mean, mean)
    close(st.rstd, rstd)
    S = x.size // (shape[0] * C)
    var_u = (1 / rstd**2 - 1e-5) * S / (S - 1)
    np.testing.assert_allclose(rm, 0.5 * mean.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, 0.5 + 0.5 * var_u.mean(axis=0), rtol=1e-4, atol=1e-5)
    # use_input_stats=False normalizes with the running statistics.
    y2 = gpu.instance_norm(x, rm, rv, use_input_stats=False, axis=axis)
    close(y2, ref.batch_norm(x, rm, rv, axis=axis)[0])
    cpu = cpu_op("instance_norm")
    if cpu is not None:
        close(gpu.instance_norm(x, axis=axis), cpu(x, axis=axis))


# ----------------------------------------------------------------------------- FRN, TLU


@pytest.mark.parametrize("shape,axis", [((2, 3, 4, 5), 1), ((2, 4, 5, 3), -1), ((3, 4), 1)])
def test_filter_response_norm_and_tlu(rng, shape, axis):
    x = randn(rng, *shape)
    C = shape[axis]
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    tau = rng.standard_normal(C).astype(np.float32)
    close(gpu.filter_response_norm(x, w, b, axis=axis), ref.frn(x, w, b, axis=axis))
    close(gpu.filter_response_norm(x, w, b, tau, eps=1e-3, learned_eps=np.array([-1e-3]),
                                   axis=axis),
          ref.frn(x, w, b, tau, eps=2e-3, axis=axis))
    got = gpu.tlu(x, tau, axis=axis)
    assert np.array_equal(got, np.maximum(x, tau.reshape(ref.chan_shape(x.ndim, axis))))


def test_frn_spatial_size_one(rng):
    x = randn(rng, 3, 4, 1, 1)
    close(gpu.filter_response_norm(x, eps=1e-6), x / np.sqrt(x.astype(np.float64) ** 2 + 1e-6))


# ----------------------------------------------------------------------------- LRN, GDN


@pytest.mark.parametrize("size,window,aos", [(3, "torch", True), (4, "torch", True),
                                             (4, "onnx", True), (5, "torch", False),
                                             (1, "torch", True), (9, "onnx", True)])
def test_local_response_norm(rng, size, window, aos):
    x = randn(rng, 2, 7, 4, 3)
    got = gpu.local_response_norm(x, size, 1e-2, 0.75, 2.0, alpha_over_size=aos, window=window)
    close(got, ref.lrn(x, size, 1e-2, 0.75, 2.0, aos, window))
    close(gpu.local_response_norm(x, 3, 0.5, 0.6, 1.0, axis=-1),
          ref.lrn(x, 3, 0.5, 0.6, 1.0, axis=-1))


@pytest.mark.parametrize("variant,inverse", [("gdn", False), ("gdn", True), ("gdn1", False),
                                             ("gdn1", True)])
@pytest.mark.parametrize("shape,axis", [((2, 5, 3, 4), 1), ((2, 3, 4, 6), -1), ((7, 3), 1)])
def test_gdn(rng, variant, inverse, shape, axis):
    x = randn(rng, *shape)
    C = shape[axis]
    beta = (rng.random(C) + 0.5).astype(np.float32)
    gamma = (0.1 * rng.random((C, C))).astype(np.float32)
    got = gpu.gdn(x, beta, gamma, inverse=inverse, variant=variant, axis=axis)
    close(got, ref.gdn(x, beta, gamma, inverse, variant, axis))


# ----------------------------------------------------------------------------- moments


@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((3, 5, 6), -1), ((5000, 2), 1)])
def test_moments(rng, shape, axis):
    x = randn(rng, *shape, loc=1e4)
    m = gpu.moments(x, axis=axis)
    xd = x.astype(np.float64)
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean = xd.mean(axis=red)
    m2 = ((xd - mean.reshape(ref.chan_shape(x.ndim, axis))) ** 2).sum(axis=red)
    assert m.count == x.size // shape[axis]
    np.testing.assert_allclose(m.mean, mean, rtol=1e-7)
    np.testing.assert_allclose(m.m2, m2, rtol=RTOL)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("loc", [1e4, 1e6, 3e7])
def test_adversarial_offsets(rng, loc):
    x = randn(rng, 4, 6, 300, loc=loc)
    close(gpu.layer_norm(x, 300), ref.layer_norm(x, 1)[0])
    close(gpu.batch_norm(x, training=True), ref.batch_norm(x, training=True)[0])
    close(gpu.group_norm(x, 3), ref.group_norm(x, 3)[0])
    close(gpu.instance_norm(x), ref.instance_norm(x)[0])
    close(gpu.rms_norm(x, 300), ref.rms_norm(x, 1)[0])


def test_constant_rows_give_exact_zero_and_bias(rng):
    for v in (0.0, 1.5, -7e4, 3.3e38):
        x = np.full((3, 5, 4), v, np.float32)
        b = rng.standard_normal(5).astype(np.float32)
        assert np.array_equal(gpu.layer_norm(x, 4), np.zeros_like(x))
        y = gpu.batch_norm(x, bias=b, training=True)
        assert np.array_equal(y, np.broadcast_to(b[None, :, None], x.shape))
        assert np.array_equal(gpu.group_norm(x, 5, bias=b), y)


@pytest.mark.parametrize("v", [2e19, 1e30, 3e38])
def test_huge_values_stay_correct(v):
    x = np.array([[v, -v, v / 2, 0.0]], np.float32)
    close(gpu.rms_norm(x, 4), [[4 / 3, -4 / 3, 2 / 3, 0.0]])
    close(gpu.layer_norm(x, 4), ref.layer_norm(x, 1)[0])
    close(gpu.batch_norm(x.reshape(4, 1), training=True), ref.batch_norm(x.reshape(4, 1),
                                                                          training=True)[0])


def test_nan_and_inf_only_poison_their_group(rng):
    x = randn(rng, 4, 3, 10)
    clean = gpu.group_norm(x, 3)
    x[1, 2, 4] = np.nan
    x[2, 0, 0] = np.inf
    y = gpu.group_norm(x, 3)
    assert np.isnan(y[1, 2]).all() and np.isnan(y[2, 0]).all()
    keep = np.ones((4, 3), bool)
    keep[1, 2] = keep[2, 0] = False
    assert np.array_equal(y[keep], clean[keep])
    z = gpu.batch_norm(x, training=True)
    assert np.isnan(z[:, 0]).all() and np.isnan(z[:, 2]).all() and not np.isnan(z[:, 1]).any()


def test_float16(rng):
    x = randn(rng, 3, 6, 33).astype(np.float16)  # odd sizes: f16 buffers padded to 4 bytes
    w = rng.standard_normal(6).astype(np.float32)
    for on in (True, False):  # shader-f16 storage, then the float32 fallback
        with _device._limits(f16=on):
            y = gpu.group_norm(x, 3, w)
            assert y.dtype == np.float16
            close(y, ref.group_norm(x, 3, w)[0], rtol=2e-3, atol=2e-3)
            r = gpu.rms_norm(np.full((2, 8), 300, np.float16), 8)  # x^2 > 65504
            assert np.array_equal(r, np.ones((2, 8), np.float16))
            d = gpu.asarray(x)
            assert d.dtype == np.float16
            close(gpu.layer_norm(d, 33).numpy(), ref.layer_norm(x, 1)[0], rtol=2e-3, atol=2e-3)
    big = np.full((2, 4), 1.0, np.float16)
    out = gpu.layer_norm(big, 4, bias=np.array([7e4, 0, 0, -7e4], np.float32))
    assert np.isinf(out[:, 0]).all() and np.isinf(out[:, 3]).all()


# ----------------------------------------------------------------------------- determinism, splits


def _all_ops(x):
    C = x.shape[1]
    w = np.linspace(0.5, 1.5, C).astype(np.float32)
    return [
        gpu.batch_norm(x, weight=w, training=True),
        gpu.layer_norm(x, x.shape[1:]),
        gpu.rms_norm(x, x.shape[-1]),
        gpu.group_norm(x, 2, w),
        gpu.instance_norm(x),
        gpu.filter_response_norm(x, w, tau=-w),
        gpu.local_response_norm(x, 3),
        gpu.gdn(x, np.ones(C, np.float32), np.full((C, C), 0.1, np.float32)),
        gpu.tlu(x, -w),
    ]


def test_repeated_runs_are_bitwise_identical(rng):
    x = randn(rng, 6, 4, 900, loc=10.0)
    a = _all_ops(x)
    b = _all_ops(x)
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


def test_split_and_2d_grid_equal_unsplit_bitwise(rng):
    # 64 KiB bindings (the array has 163 KiB) and 7 workgroups per dimension: several binding
    # windows, 2-D grids and multi-chunk reductions (BN groups have 6 * 1700 > 4096 elements).
    x = randn(rng, 6, 4, 1700, loc=-3.0)
    base = _all_ops(x)
    n0 = _device.COUNTERS["dispatches"]
    with _device._limits(max_binding=65536, max_workgroups=7):
        split = _all_ops(x)
    n_split = _device.COUNTERS["dispatches"] - n0
    n1 = _device.COUNTERS["dispatches"]
    _all_ops(x)
    assert n_split > 2 * (_device.COUNTERS["dispatches"] - n1)  # it really was split
    for u, v in zip(base, split):
        assert np.array_equal(u, v)
    w = np.linspace(0.5, 1.5, 4).astype(np.float32)
    close(split[0], ref.batch_norm(x, None, None, w, None, True)[0])


def test_channels_last_column_path(rng):
    # Channels-last batch norm reduces columns of a (rows, C) matrix: the coalesced column
    # kernels, split across bindings (64 KiB windows of a 160 KiB array) bitwise like unsplit.
    x = randn(rng, 6, 1700, 4, loc=1e4)
    w = np.linspace(0.5, 1.5, 4).astype(np.float32)
    y, st = gpu.batch_norm(x, weight=w, training=True, axis=-1, return_stats=True)
    want, mean, rstd, _ = ref.batch_norm(x, None, None, w, None, True, axis=-1)
    close(y, want)
    close(st.rstd, rstd)
    m = gpu.moments(x, axis=-1)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-7)
    dy = randn(rng, *x.shape)
    g = gpu.batch_norm_backward(dy, x, weight=w, bias=w, training=True, axis=-1)
    with _device._limits(max_binding=65536, max_workgroups=7):
        ys = gpu.batch_norm(x, weight=w, training=True, axis=-1)
        gs = gpu.batch_norm_backward(dy, x, weight=w, bias=w, training=True, axis=-1)
    assert np.array_equal(y, ys)
    assert np.array_equal(g.x, gs.x) and np.array_equal(g.weight, gs.weight)
    with _device._limits(columns=False):  # the generic strided reduction agrees
        close(gpu.batch_norm(x, weight=w, training=True, axis=-1), want)
        gg = gpu.batch_norm_backward(dy, x, weight=w, bias=w, training=True, axis=-1)
    np.testing.assert_allclose(gg.weight, g.weight, rtol=1e-4, atol=1e-2)


def test_per_thread_channel_equals_generic_indexing(rng):
    # The apply passes keep one channel per invocation when the grid allows it; the generic
    # per-element indexing must give the same bits.
    for shape, axis in (((5, 3, 7, 9), 1), ((4, 6, 5, 3), -1)):
        x = randn(rng, *shape)
        dy = randn(rng, *shape)
        C = shape[axis]
        w = rng.standard_normal(C).astype(np.float32)
        runs = []
        for fixed in (True, False):
            with _device._limits(fixed_c=fixed):
                runs.append([gpu.batch_norm(x, weight=w, bias=w, training=True, axis=axis),
                             gpu.batch_norm_backward(dy, x, weight=w, training=True, axis=axis).x,
                             gpu.tlu(x, w, axis=axis)])
        for u, v in zip(*runs):
            assert np.array_equal(u, v)


def test_split_windows_with_odd_offsets(rng):
    # float16 data (2-byte elements) and windows that start inside rows.
    x = randn(rng, 9, 3, 1001).astype(np.float16)
    base = [gpu.layer_norm(x, 1001), gpu.group_norm(x, 3), gpu.batch_norm(x, training=True)]
    with _device._limits(max_binding=8192):
        split = [gpu.layer_norm(x, 1001), gpu.group_norm(x, 3)]
    with _device._limits(max_binding=32768):
        split.append(gpu.batch_norm(x, training=True))
    for u, v in zip(base, split):
        assert np.array_equal(u, v)
    close(split[2], ref.batch_norm(x, training=True)[0], rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- device arrays


def test_device_arrays_chain_without_reads(rng):
    x = randn(rng, 4, 6, 5, 5)
    w = rng.standard_normal(6).astype(np.float32)
    w_d = gpu.asarray(w)
    rm_d, rv_d = gpu.asarray(np.zeros(6, np.float32)), gpu.asarray(np.ones(6, np.float32))
    reads = _device.COUNTERS["reads"]
    d = gpu.asarray(x)
    a = gpu.batch_norm(d, rm_d, rv_d, w_d, training=True)
    b = gpu.group_norm(a, 3, w_d)
    c, st = gpu.layer_norm(b, (6, 5, 5), return_stats=True)
    e = gpu.local_response_norm(c, 3)
    f = gpu.filter_response_norm(e, w_d, tau=w_d)
    g = gpu.rms_norm(f, 5)
    assert isinstance(g, gpu.GPUArray) and isinstance(st.mean, gpu.GPUArray)
    assert _device.COUNTERS["reads"] == reads
    got = g.numpy()
    assert _device.COUNTERS["reads"] == reads + 1
    h = ref.batch_norm(x, None, None, w, None, True)[0]
    h = ref.group_norm(h, 3, w)[0]
    h = ref.layer_norm(h, 3)[0]
    h = ref.lrn(h, 3)
    h = ref.frn(h, w, None, w)
    h = ref.rms_norm(h, 1)[0]
    close(got, h, rtol=1e-3, atol=1e-4)


def test_pipelines_cached_and_outputs_recycled(rng):
    ctx = _device.context()
    gpu.layer_norm(randn(rng, 3, 40), 40)
    gpu.layer_norm(randn(rng, 3, 5000), 5000)
    n = len(ctx.pipelines)
    # New shapes compile nothing: shapes, offsets and eps travel in uniforms.
    gpu.layer_norm(randn(rng, 7, 33), 33, eps=1e-3)
    gpu.layer_norm(randn(rng, 2, 6000), 6000)
    assert len(ctx.pipelines) == n
    d = gpu.asarray(randn(rng, 4, 64))
    y = gpu.rms_norm(d, 64)
    buf = y._buffer
    del y
    z = gpu.rms_norm(d, 64)
    assert z._buffer is buf  # the dead output's buffer was reused, not zero-filled again
    v = z.reshape(64, 4)
    del z
    w = gpu.rms_norm(d, 64)
    assert w._buffer is not v._buffer  # a live view keeps its buffer out of the pool
    gpu.empty_cache()


def test_repeated_calls_do_not_grow_memory(rng):
    import resource

    x = randn(rng, 64, 256)
    d = gpu.asarray(x)
    for _ in range(50):
        gpu.layer_norm(x, 256)
        gpu.batch_norm(d, training=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(600):  # a 64 KiB upload and output per host call: 38 MiB if they leaked
        gpu.layer_norm(x, 256)
        gpu.batch_norm(d, training=True)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 12 * 1024
    assert _device._pool_bytes <= 16 * 65536


def test_threads_share_the_device(rng):
    # wgpu-native aborts the process when threads encode at once: ops serialize on a lock.
    import threading

    xs = [randn(rng, 16, 300) for _ in range(6)]
    want = [gpu.layer_norm(x, 300) for x in xs]
    bad = []

    def work(i):
        try:
            for _ in range(15):
                if not np.array_equal(gpu.layer_norm(xs[i], 300), want[i]):
                    bad.append(i)
                gpu.batch_norm(gpu.asarray(xs[i]).reshape(16, 3, 100), training=True).numpy()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            bad.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert bad == []


# Python >= 3.12 warns that fork() in a multi-threaded process (wgpu has threads) may deadlock:
# exactly the situation under test.
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_gets_a_clear_error(rng):
    # wgpu-native does not survive fork(): the child must fail fast instead of hanging.
    import multiprocessing as mp

    x = randn(rng, 4, 10)
    want = gpu.layer_norm(x, 10)
    mpc = mp.get_context("fork")
    q = mpc.Queue()
    p = mpc.Process(target=_fork_child, args=(q, x))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    kind, msg = q.get(timeout=5)
    assert kind == "RuntimeError" and "spawn" in msg
    assert np.array_equal(gpu.layer_norm(x, 10), want)  # the parent is unaffected


def _fork_child(q, x):
    try:
        gpu.layer_norm(x, 10)
        q.put(("ok", ""))
    except Exception as exc:  # noqa: BLE001 - the parent checks the kind
        q.put((type(exc).__name__, str(exc)))


def test_out_argument(rng):
    x = randn(rng, 3, 8)
    out = np.empty_like(x)
    r = gpu.layer_norm(x, 8, out=out)
    assert r is out
    close(out, ref.layer_norm(x, 1)[0])
    d = gpu.asarray(x)
    od = gpu.asarray(np.zeros_like(x))
    assert gpu.layer_norm(d, 8, out=od) is od
    close(od.numpy(), ref.layer_norm(x, 1)[0])
    with pytest.raises(ValueError, match="overlaps"):
        gpu.layer_norm(x, 8, out=x)
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        gpu.layer_norm(x, 8, out=ro)


def test_layouts_equal_contiguous_bitwise(rng):
    base = randn(rng, 6, 8, 10)
    views = [base[:, ::2], base[::-1], np.asfortranarray(base), base.transpose(0, 2, 1),
             np.broadcast_to(base[:1], (6, 8, 10)), base.astype(">f4")]
    for v in views:
        c = np.ascontiguousarray(v, dtype=np.float32)
        assert np.array_equal(gpu.group_norm(v, 2), gpu.group_norm(c, 2))
        assert np.array_equal(gpu.layer_norm(v, v.shape[-1]), gpu.layer_norm(c, c.shape[-1]))
    ro = base.copy()
    ro.flags.writeable = False
    assert np.array_equal(gpu.batch_norm(ro, training=True), gpu.batch_norm(base, training=True))


def test_zero_size_inputs():
    y, st = gpu.batch_norm(np.zeros((0, 3, 4), np.float32), return_stats=True)
    assert y.shape == (0, 3, 4) and np.isnan(st.mean).all()
    rm = np.zeros(3)
    gpu.batch_norm(np.zeros((0, 3), np.float32), rm, np.ones(3), training=True)
    assert np.array_equal(rm, np.zeros(3))
    assert gpu.layer_norm(np.zeros((0, 5), np.float32), 5).shape == (0, 5)
    assert gpu.group_norm(np.zeros((2, 4, 0), np.float32), 2).shape == (2, 4, 0)


# ----------------------------------------------------------------------------- errors


def _raises_like_cpu(exc, name, *args, cpu_too=True, **kw):
    """The GPU op raises ``exc``; the CPU op (when present) raises the same class."""
    n0 = _device.COUNTERS["dispatches"]
    with pytest.raises(exc) as gerr:
        getattr(gpu, name)(*args, **kw)
    assert _device.COUNTERS["dispatches"] == n0  # validated before any GPU work
    cpu = cpu_op(name)
    if cpu is not None and cpu_too:
        with pytest.raises(Exception) as cerr:
            cpu(*args, **kw)
        # The very same class (e.g. rsnorm.ShapeError, not just ValueError).
        assert type(cerr.value) is type(gerr.value), (cerr.value, gerr.value)
    return gerr.value


def test_errors(rng):
    x = randn(rng, 2, 4, 3)
    # float64 is the one deliberate difference: the CPU computes it, WebGPU has no float64.
    e = _raises_like_cpu(TypeError, "layer_norm", x.astype(np.float64), 3, cpu_too=False)
    assert "float64" in str(e)
    e = _raises_like_cpu(TypeError, "layer_norm", x.astype(np.int32), 3)
    assert "int32" in str(e)
    _raises_like_cpu(ValueError, "layer_norm", x, 4)
    _raises_like_cpu(ValueError, "layer_norm", x, (3,), np.ones(4, np.float32))
    _raises_like_cpu(ValueError, "layer_norm", x, 3, None, None, -1.0)
    _raises_like_cpu(ValueError, "group_norm", x, 3)
    _raises_like_cpu(ValueError, "group_norm", x, 0)
    _raises_like_cpu(ValueError, "batch_norm", x, axis=3)
    e = _raises_like_cpu(ValueError, "batch_norm", randn(rng, 1, 4), training=True)
    assert "Expected more than 1 value per channel" in str(e)
    _raises_like_cpu(ValueError, "batch_norm", x, np.zeros(4), np.ones(4), training=True,
                     momentum=float("nan"))
    _raises_like_cpu(ValueError, "instance_norm", randn(rng, 2, 3, 1))
    _raises_like_cpu(ValueError, "local_response_norm", x, 0)
    _raises_like_cpu(ValueError, "local_response_norm", randn(rng, 2, 3), 3)
    _raises_like_cpu(ValueError, "gdn", x, -np.ones(4, np.float32), np.zeros((4, 4)))
    _raises_like_cpu(ValueError, "gdn", x, np.ones(4), -np.ones((4, 4)))
    assert issubclass(type(_raises_like_cpu(ValueError, "group_norm", x, 3)), ErrorClass)
    ro = np.zeros(4)
    ro.flags.writeable = False
    _raises_like_cpu(ValueError, "batch_norm", x, ro, np.ones(4), training=True)
    _raises_like_cpu(ValueError, "batch_norm", randn(rng, 3))  # rank 1
    _raises_like_cpu(ValueError, "group_norm", randn(rng, 3), 1)
    _raises_like_cpu(ValueError, "layer_norm", x, 3, out=np.zeros((2, 4), np.float32))
    _raises_like_cpu(TypeError, "layer_norm", [[1.0, 2.0]], 2)
    _raises_like_cpu(TypeError, "group_norm", x, 2, np.ones(4, np.int32))
    _raises_like_cpu(ValueError, "layer_norm", x, (), cpu_too=True)
    # Masked arrays are refused like on the CPU (data, parameters, out=, asarray).
    mx = np.ma.masked_array(x, mask=np.zeros(x.shape, bool))
    assert "MaskedArray" in str(_raises_like_cpu(TypeError, "layer_norm", mx, 3))
    _raises_like_cpu(TypeError, "group_norm", x, 2, np.ma.masked_array(np.ones(4, np.float32)))
    _raises_like_cpu(TypeError, "layer_norm", x, 3, out=np.ma.masked_array(np.zeros_like(x)))
    with pytest.raises(TypeError, match="MaskedArray"):
        gpu.asarray(mx)


# ----------------------------------------------------------------------------- random layouts


def _random_case(rng):
    ndim = int(rng.integers(2, 5))
    shape = [int(s) for s in rng.integers(1, 7, size=ndim)]
    shape[0] = int(rng.integers(2, 5))
    axis = int(rng.integers(1, ndim))
    if rng.random() < 0.3:
        shape[-1] = int(rng.integers(100, 3000))  # long rows: multi-chunk reductions
    return tuple(shape), axis


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_and_axes(seed):
    # Channel axes in the middle (S1 > 1 and I > 1), odd sizes, long and 1-element groups.
    rng = np.random.default_rng(seed)
    shape, axis = _random_case(rng)
    x = randn(rng, *shape, loc=float(rng.choice([0.0, 50.0])))
    C = shape[axis]
    G = int(rng.choice([g for g in range(1, C + 1) if C % g == 0]))
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    ax = axis - x.ndim if rng.random() < 0.5 else axis  # negative and positive spellings
    close(gpu.batch_norm(x, None, None, w, b, training=True, axis=ax),
          ref.batch_norm(x, None, None, w, b, True, axis=axis)[0])
    close(gpu.group_norm(x, G, w, b, axis=ax), ref.group_norm(x, G, w, b, axis=axis)[0])
    if x.size // (shape[0] * C) > 1:
        close(gpu.instance_norm(x, weight=w, axis=ax), ref.instance_norm(x, w, axis=axis)[0])
    close(gpu.filter_response_norm(x, w, b, tau=b, axis=ax), ref.frn(x, w, b, b, axis=axis))
    k = int(rng.integers(1, x.ndim))
    close(gpu.layer_norm(x, shape[-k:]), ref.layer_norm(x, k)[0])
    close(gpu.rms_norm(x, shape[-k:]), ref.rms_norm(x, k)[0])
    if x.ndim >= 3:
        size = int(rng.integers(1, 6))
        close(gpu.local_response_norm(x, size, 0.1, 0.75, 1.0, axis=ax),
              ref.lrn(x, size, 0.1, 0.75, 1.0, axis=axis))
    gamma = (0.1 * rng.random((C, C))).astype(np.float32)
    close(gpu.gdn(x, np.ones(C, np.float32), gamma, axis=ax),
          ref.gdn(x, np.ones(C, np.float32), gamma, axis=axis))
    dy = randn(rng, *shape)
    gb = gpu.group_norm_backward(dy, x, G, w, b, axis=ax)
    dx, dw, db = ref.group_norm_backward(dy, x, G, w, axis=axis)
    scale = np.abs(dx).max()
    np.testing.assert_allclose(gb.x, dx, rtol=1e-3, atol=1e-4 * scale)
    np.testing.assert_allclose(gb.weight, dw, rtol=1e-3, atol=1e-4 * np.abs(dw).max())
    np.testing.assert_allclose(gb.bias, db, rtol=1e-3, atol=1e-4 * np.abs(db).max())
    gbn = gpu.batch_norm_backward(dy, x, weight=w, training=True, axis=ax)
    dx = ref.batch_norm_backward(dy, x, None, None, w, True, axis=axis)[0]
    np.testing.assert_allclose(gbn.x, dx, rtol=1e-3, atol=1e-4 * np.abs(dx).max())


# ----------------------------------------------------------------------------- device loss (last)


@pytest.mark.parametrize("shape,op", [((64, 4096), "ln"), ((33, 1000), "rms"), ((5, 3000), "ln"),
                                      ((4, 8, 32, 32), "in"), ((4, 8, 16, 16), "gn"),
                                      ((3, 8, 20, 20), "frn")])
def test_fused_kernel_keeping_x_in_registers_gives_the_same_bits(rng, shape, op):
    # The benchmark's keep_x variant (values of one-chunk groups kept for the apply) changes
    # where x is read from, never the arithmetic.
    x = randn(rng, *shape, loc=3.0)
    C = shape[1]
    w = rng.standard_normal(C).astype(np.float32)
    calls = {
        "ln": lambda: gpu.layer_norm(x, shape[-1], np.tile(w[:1], shape[-1]), None),
        "rms": lambda: gpu.rms_norm(x, shape[-1]),
        "in": lambda: gpu.instance_norm(x, weight=w, bias=w),
        "gn": lambda: gpu.group_norm(x, 4, w, w),
        "frn": lambda: gpu.filter_response_norm(x, w, w, w),
    }
    want = calls[op]()
    with _device._limits(keep_x=1):
        got = calls[op]()
    np.testing.assert_array_equal(got, want)


def test_device_arrays_in_reference_cycles_recycle_live_buffers(rng):
    # A device array caught in a reference cycle (e.g. by an exception's traceback) is freed by
    # the cyclic GC together with whatever it references. Its buffer must go back to the pool
    # alive: it once went back released, and the next op of that size bound a NULL buffer
    # (a TypeError, or an abort inside wgpu-native).
    import gc

    x = randn(rng, 64, 48)

    class Holder:
        pass

    for _ in range(3 * _device._POOL_PER_SIZE):
        h = Holder()
        h.a = gpu.asarray(x)
        h.me = h
        del h
    gc.collect()
    for _ in range(2 * _device._POOL_PER_SIZE):
        close(gpu.layer_norm(gpu.asarray(x), 48).numpy(), ref.layer_norm(x, 1)[0])


def test_no_adapter_and_lost_device_recovery(rng, monkeypatch):
    x = randn(rng, 3, 4)
    old = gpu.asarray(x)
    import wgpu

    _device.mark_lost()
    monkeypatch.setattr(wgpu.gpu, "request_adapter_sync", lambda **kw: None)
    # RSNORM_GPU_ADAPTER (set when benchmarking a named card) picks through enumerate instead.
    monkeypatch.setattr(wgpu.gpu, "enumerate_adapters_sync", list)
    assert not gpu.is_available()
    with pytest.raises(RuntimeError, match="no GPU adapter"):
        gpu.layer_norm(x, 4)
    monkeypatch.undo()
    # The next call builds a fresh device; arrays of the lost device say so.
    close(gpu.layer_norm(x, 4), ref.layer_norm(x, 1)[0])
    with pytest.raises(RuntimeError, match="lost"):
        gpu.layer_norm(old, 4)
    close(gpu.layer_norm(gpu.asarray(x), 4).numpy(), ref.layer_norm(x, 1)[0])
