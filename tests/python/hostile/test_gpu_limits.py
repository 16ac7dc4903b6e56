"""HOSTILE.md items 34-35 on any WebGPU adapter (Mesa's lavapipe in CI): splitting above the
binding and dispatch limits (reached with the small limits that ``rsnorm.gpu._device._limits``
injects), validation before any wgpu call, no adapter, f16 without ``shader-f16``, device loss,
and accuracy/determinism on the adversarial float32 sets."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gpu = pytest.importorskip("rsnorm.gpu", reason="rsnorm.gpu needs wgpu-py")
if not gpu.is_available():
    pytest.skip("no GPU adapter (not even lavapipe)", allow_module_level=True)

import reference as ref
import rsnorm as rn
from rsnorm.gpu import _device

from . import refs, registry
from .test_fuzz import run_case

F16, F32 = np.float16, np.float32
RTOL, ATOL = 1e-4, 1e-5  # the documented GPU tolerance (rsnorm.gpu docs)


def _x(shape, loc=0.3, seed=0):
    return ref.make_input(np.random.default_rng(seed), shape, F32) + F32(loc - 0.3)


def _w(c):
    return np.linspace(0.5, 1.5, c).astype(F32)


# Each: (name, call on an (N, C, H, W) float32 array with C = 8, float64 reference of y).
OPS = {
    "batch_norm": (lambda x: gpu.batch_norm(x, weight=_w(8), bias=_w(8), training=True),
                   lambda x: ref.batch_norm(x, weight=_w(8), bias=_w(8), training=True)[0]),
    "batch_norm_nhwc": (lambda x: gpu.batch_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)),
                                                 training=True, axis=-1),
                        lambda x: np.moveaxis(ref.batch_norm(x, training=True)[0], 1, -1)),
    "layer_norm": (lambda x: gpu.layer_norm(x, x.shape[2:]),
                   lambda x: ref.layer_norm(x, x.shape[2:])[0]),
    "rms_norm": (lambda x: gpu.rms_norm(x, x.shape[-1:]),
                 lambda x: ref.rms_norm(x, x.shape[-1:])[0]),
    "group_norm": (lambda x: gpu.group_norm(x, 4, _w(8), _w(8)),
                   lambda x: ref.group_norm(x, 4, _w(8), _w(8))[0]),
    "instance_norm": (lambda x: gpu.instance_norm(x), lambda x: ref.instance_norm(x)[0]),
    "filter_response_norm": (lambda x: gpu.filter_response_norm(x, _w(8), _w(8), -_w(8)),
                             lambda x: refs.frn(x, _w(8), _w(8), -_w(8))),
    "tlu": (lambda x: gpu.tlu(x, np.linspace(-1, 1, 8)),
            lambda x: refs.tlu(x, np.linspace(-1, 1, 8))),
    "local_response_norm": (lambda x: gpu.local_response_norm(x, 3, alpha=0.5),
                            lambda x: refs.lrn(x, 3, alpha=0.5)),
    "gdn": (lambda x: gpu.gdn(x, np.ones(8), 0.1 * np.ones((8, 8))),
            lambda x: refs.gdn(x, np.ones(8), 0.1 * np.ones((8, 8)))),
}
BWD = {
    "batch_norm_backward": lambda gy, x: gpu.batch_norm_backward(gy, x, weight=_w(8),
                                                                 training=True),
    "layer_norm_backward": lambda gy, x: gpu.layer_norm_backward(gy, x, x.shape[2:]),
    "rms_norm_backward": lambda gy, x: gpu.rms_norm_backward(gy, x, x.shape[-1:]),
    "group_norm_backward": lambda gy, x: gpu.group_norm_backward(gy, x, 4, _w(8)),
}


def _flat(res):
    if isinstance(res, tuple):
        return [a for r in res for a in _flat(r)]
    return [] if res is None else [np.asarray(res)]


# 34 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("limits", [{"max_binding": 160000}, {"max_workgroups": 7},
                                    {"max_binding": 131072, "max_workgroups": 7}])
@pytest.mark.parametrize("name", sorted(OPS) + sorted(BWD) + ["moments"])
def test_34_split_above_the_limits_is_bitwise_equal(name, limits):
    x = _x((6, 8, 40, 30))
    gy = _x((6, 8, 40, 30), seed=1)
    if name in OPS:
        fn = OPS[name][0]
        args = (x,)
    elif name in BWD:
        fn = BWD[name]
        args = (gy, x)
    else:
        fn = lambda a: tuple(gpu.moments(a)[1:])
        args = (x,)
    whole = _flat(fn(*args))
    with _device._limits(**limits):
        split = _flat(fn(*args))
    for a, b in zip(split, whole):
        ref.assert_bitwise_equal(a, b, f"{name} under {limits}")


def test_34_too_many_elements_refused_before_any_wgpu_call():
    x = np.broadcast_to(np.float32(1), (2**16, 2**16))  # 2³² elements, no memory
    before = dict(_device.COUNTERS)
    for fn in (lambda: gpu.layer_norm(x, 2**16), lambda: gpu.moments(x),
               lambda: gpu.batch_norm(x, training=True)):
        with pytest.raises(rn.RsnormError, match=r"4294967296 elements; the GPU path indexes "
                                                 r"with 32 bits"):
            fn()
    assert _device.COUNTERS == before, "work reached wgpu before the size check"


def test_34_f16_without_shader_f16_falls_back():
    x = _x((4, 8, 6, 5)).astype(F16)
    with _device._limits(f16=False):
        y = gpu.layer_norm(x, (6, 5))
        g = gpu.group_norm(x, 4)
    assert y.dtype == F16 and g.dtype == F16
    want = ref.layer_norm(x, (6, 5))[0]
    np.testing.assert_allclose(y.astype(np.float64), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(g.astype(np.float64), ref.group_norm(x, 4)[0], rtol=2e-3,
                               atol=2e-3)


def test_34_lost_device_is_recreated_and_no_adapter_is_a_clear_error(monkeypatch):
    x = _x((3, 8, 4, 4))
    want = gpu.layer_norm(x, (4, 4))
    _device.mark_lost()
    ref.assert_bitwise_equal(gpu.layer_norm(x, (4, 4)), want, "after a device loss")

    import wgpu

    _device.mark_lost()
    monkeypatch.setattr(wgpu.gpu, "request_adapter_sync", lambda **kw: None)
    with pytest.raises(RuntimeError, match=r"no GPU adapter"):
        gpu.layer_norm(x, (4, 4))
    monkeypatch.undo()
    ref.assert_bitwise_equal(gpu.layer_norm(x, (4, 4)), want, "on the recreated device")


# 35 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loc", [0.0, 1e4, 1e6, 3e7])
@pytest.mark.parametrize("name", sorted(OPS))
def test_35_adversarial_sets_within_tolerance_and_repeatable(name, loc):
    x = _x((4, 8, 12, 10), loc=loc, seed=35)
    fn, want_fn = OPS[name]
    y = np.asarray(fn(x))
    want = want_fn(x)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=ATOL * max(1.0, np.abs(want).max()))
    for _ in range(2):
        ref.assert_bitwise_equal(np.asarray(fn(x)), y, f"{name}: repeated run")


@pytest.mark.parametrize("v", [1.0, 2e19, 3.3e38])
@pytest.mark.parametrize("name", ["batch_norm", "layer_norm", "group_norm", "instance_norm"])
def test_35_constant_groups_exactly_bias_on_gpu(name, v):
    x = np.full((4, 8, 6, 5), v, F32)
    b = np.linspace(-1, 1, 8).astype(F32)
    if name == "layer_norm":
        y = gpu.layer_norm(x, (8, 6, 5), None, np.broadcast_to(b[:, None, None], (8, 6, 5)))
    else:
        y = getattr(gpu, name)(x, **({"training": True} if name == "batch_norm" else {}),
                               bias=b) if name != "group_norm" else gpu.group_norm(x, 4, None, b)
    assert np.array_equal(y, np.broadcast_to(b.reshape(1, 8, 1, 1), x.shape))


@pytest.mark.parametrize("v", [2e19, 1e30, 3e38])
def test_35_huge_values_rms_norm_on_gpu(v):
    x = np.tile(np.array([v, -v, v / 2, 0], F32), (3, 1))
    np.testing.assert_allclose(gpu.rms_norm(x, 4), np.tile([4 / 3, -4 / 3, 2 / 3, 0], (3, 1)),
                               rtol=RTOL, atol=ATOL)


# Fuzzing the GPU ops -------------------------------------------------------------------------
GPU_NAMES = sorted(n for n in gpu.__all__ if n in registry.ENTRIES and callable(getattr(gpu, n))
                   and hasattr(rn, n))


@pytest.fixture
def gpu_tolerances(monkeypatch):
    # The documented float32 GPU tolerance (rtol 1e-4, atol 1e-5 relative to the output scale);
    # float16: the float32 result rounded (2e-3).
    # float64 running statistics are updated from float32 GPU statistics: float32 accuracy.
    monkeypatch.setattr(registry, "TOL", {np.float64: 1e-4, F32: 1e-4, F16: 4e-3})
    monkeypatch.setattr(registry, "GPU_FD_ATOL", 1e-4)


@pytest.mark.parametrize("name", GPU_NAMES)
@settings(max_examples=int(os.environ.get("RSNORM_FUZZ_EXAMPLES", "300"))
          if os.environ.get("RSNORM_FUZZ") == "long" else 12,
          deadline=None, derandomize=os.environ.get("RSNORM_FUZZ") != "long", database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_gpu(name, data, gpu_tolerances):
    """The CPU fuzzer's cases through rsnorm.gpu: same result within the GPU tolerance, or the
    same documented error; float64 input is a TypeError (WebGPU has no float64)."""
    case = registry.ENTRIES[name].build(registry.Draw(data.draw))
    case.fn = getattr(gpu, name)
    args = case.args
    x = args[1] if name.endswith("_backward") else args[0]
    if isinstance(x, np.ndarray) and x.dtype == np.float64:
        with pytest.raises((TypeError, ValueError)):
            case.fn(*args, **case.kwargs)
        return
    kw = case.kwargs
    le = kw.get("learned_eps")
    if isinstance(le, np.ndarray) and le.size != 1 and case.expect is None:
        # Documented GPU limitation: a scalar learned_eps only.
        with pytest.raises(rn.RsnormError, match=r"learned_eps must be a scalar on the GPU"):
            case.fn(*args, **kw)
        return
    run_case(case)


def test_gpu_batch_norm_axis_0_is_value_error_as_on_cpu():
    # This and the next three: GPU/CPU divergences the fuzzer found (fixed).
    x = _x((4, 3, 5))
    with pytest.raises(rn.RsnormError, match=r"axis=0 is the batch axis"):
        rn.batch_norm(x, training=True, axis=0)
    with pytest.raises(rn.RsnormError, match=r"axis=0 is the batch axis"):
        gpu.batch_norm(x, training=True, axis=0)


def test_gpu_batch_norm_backward_validates_momentum_as_on_cpu():
    x = _x((4, 3, 5))
    with pytest.raises(rn.RsnormError, match=r"momentum must be in \[0, 1\]"):
        gpu.batch_norm_backward(x, x, training=True, momentum=float("nan"))


def test_gpu_moments_of_empty_batch_match_cpu():
    x = np.zeros((0, 3, 4), F32)
    ref.assert_bitwise_equal(gpu.moments(x).m2, rn.moments(x).m2)


def test_gpu_frn_negative_eps_is_value_error_as_on_cpu():
    with pytest.raises(rn.RsnormError, match=r"eps"):
        gpu.filter_response_norm(_x((2, 8, 4)), eps=-1e-5)


def test_gpu_instance_norm_running_stats_of_empty_input_match_cpu():
    # Long GPU fuzz run, session 5: with use_input_stats=False an empty input still reports the
    # running statistics (broadcast to (N, C)) on the CPU; the GPU returned NaN.
    x = np.zeros((2, 2, 0), F16)
    kw = {"use_input_stats": False, "running_mean": np.array([-0.4, -1.5], F32),
          "running_var": np.array([1.5, 0.8]), "return_stats": True}
    want = rn.instance_norm(x, **kw)[1]
    got = gpu.instance_norm(x, **kw)[1]
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-7)
    np.testing.assert_allclose(got.rstd, want.rstd, rtol=1e-6)


@pytest.mark.parametrize("x0,eps", [(-0.15707089, 1e-5), (1.0, 1e-7), (3e3, 1e-2)])
def test_gpu_rms_norm_backward_of_one_value(x0, eps):
    # Long GPU fuzz run, session 5: over one value dx = dy * eps * rstd^3, which the general
    # formula forms as rstd * dy * (1 - xhat^2), xhat^2 within a few ulp of 1 (1.7 % off).
    # Both dx kernels (fused, sums + apply).
    x = np.array([[x0], [-x0 / 3]], F32)
    dy = np.array([[2.999], [-0.5]], F32)
    want = rn.rms_norm_backward(dy, x, (1,), eps=eps).x
    fused = gpu.rms_norm_backward(dy, x, (1,), eps=eps).x
    with _device._limits(fused_chunks=0):
        two_pass = gpu.rms_norm_backward(dy, x, (1,), eps=eps).x
    np.testing.assert_array_equal(fused, two_pass)
    np.testing.assert_allclose(fused, want, rtol=1e-4)


# Found by the long GPU fuzz run (RSNORM_FUZZ=long), still open ------------------------------
def test_gpu_eval_stats_of_empty_batch_match_cpu():
    x = np.zeros((0, 2, 1), F32)
    rm, rv = np.array([0.5, 1.0]), np.array([2.0, 3.0])
    want = rn.batch_norm(x, rm, rv, return_stats=True)[1]
    got = gpu.batch_norm(x, rm, rv, return_stats=True)[1]
    np.testing.assert_array_equal(got.mean, want.mean)
    np.testing.assert_allclose(got.rstd, want.rstd, rtol=1e-6)


def test_gpu_batch_norm_backward_one_value_per_channel():
    x = _x((1, 4))
    with pytest.raises(rn.RsnormError, match=r"Expected more than 1 value per channel"):
        gpu.batch_norm_backward(x, x, np.zeros(4), np.ones(4), training=True, axis=-1)


def test_gpu_lrn_nan_poisons_its_window_as_on_cpu():
    x = _x((1, 5, 3))
    x[0, 2, 1] = np.nan
    want = np.isnan(rn.local_response_norm(x, 3, alpha=2.0, beta=1.0))
    got = np.isnan(gpu.local_response_norm(x, 3, alpha=2.0, beta=1.0))
    np.testing.assert_array_equal(got, want)


def test_gpu_group_norm_backward_tiny_variance_within_documented_tolerance():
    # Groups of two tiny values (x ~ 1e-3, eps 1e-12): the general formula's terms cancel to
    # eps / var of their size, which float32 lost (20 % of max|dx|, found by the long GPU fuzz
    # run); the shaders use the closed form of two-value groups.
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = (0.001 * rng.standard_normal((3, 1, 2))).astype(F32)
        gy = rng.standard_normal((3, 1, 2)).astype(F32)
        want = rn.group_norm_backward(gy, x, 1, eps=1e-12).x
        got = gpu.group_norm_backward(gy, x, 1, eps=1e-12).x
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_gpu_two_value_groups_backward_tiny_variance_all_families():
    # The same closed form in both dx kernels (fused, and sums + apply) and every centred
    # family: layer norm over 2 features (with weight), batch norm with 2 values per channel
    # (weight on the sums), group norm; the two paths agree bitwise.
    rng = np.random.default_rng(2)
    x = (1e-3 * rng.standard_normal((6, 2))).astype(F32)
    gy = rng.standard_normal((6, 2)).astype(F32)
    w = rng.uniform(0.5, 2.0, 2).astype(F32)
    w6 = rng.uniform(0.5, 2.0, 6).astype(F32)
    xb, gb = x.T.copy(), gy.T.copy()  # (2, 6): 2 values per channel
    xg, gg = x.reshape(6, 2, 1), gy.reshape(6, 2, 1)

    def run():
        return [gpu.layer_norm_backward(gy, x, (2,), w, None, eps=1e-12).x,
                gpu.batch_norm_backward(gb, xb, weight=w6, training=True, eps=1e-12).x,
                gpu.group_norm_backward(gg, xg, 1, eps=1e-12).x]

    fused = run()
    with _device._limits(fused_chunks=0):
        two_pass = run()
    want = [rn.layer_norm_backward(gy, x, (2,), w, None, eps=1e-12).x,
            rn.batch_norm_backward(gb, xb, weight=w6, training=True, eps=1e-12).x,
            rn.group_norm_backward(gg, xg, 1, eps=1e-12).x]
    for f, t, v in zip(fused, two_pass, want):
        np.testing.assert_array_equal(f, t)
        np.testing.assert_allclose(f, v, rtol=1e-3, atol=1e-4 * np.abs(v).max())
