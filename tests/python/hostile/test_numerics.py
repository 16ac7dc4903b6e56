"""HOSTILE.md items 20-25: numerics on float32 data; the reference is the same formula in
float64 on the same values (tests/python/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

F16, F32, F64 = np.float16, np.float32, np.float64

# (op, y and (mean, rstd) from rsnorm, the float64 reference) on an (N, C, L) input.
STAT_OPS = {
    "batch_norm": (lambda x, w, b, e: rn.batch_norm(x, weight=w, bias=b, eps=e, training=True,
                                                    return_stats=True),
                   lambda x, w, b, e: ref.batch_norm(x, weight=w, bias=b, eps=e,
                                                     training=True)[:3]),
    "layer_norm": (lambda x, w, b, e: rn.layer_norm(x, x.shape[-1], w, b, e, return_stats=True),
                   lambda x, w, b, e: ref.layer_norm(x, x.shape[-1:], w, b, e)),
    "group_norm": (lambda x, w, b, e: rn.group_norm(x, 2, w, b, e, return_stats=True),
                   lambda x, w, b, e: ref.group_norm(x, 2, w, b, e)),
    "instance_norm": (lambda x, w, b, e: rn.instance_norm(x, weight=w, bias=b, eps=e,
                                                          return_stats=True),
                      lambda x, w, b, e: ref.instance_norm(x, weight=w, bias=b, eps=e)[:3]),
}
SHAPE = (8, 4, 64)


def _affine(op, x):
    n = x.shape[-1] if op == "layer_norm" else x.shape[1]
    return np.ones(n, F32), np.zeros(n, F32)


# 20 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [1e4, 1e6, 3e7])
@pytest.mark.parametrize("op", sorted(STAT_OPS))
def test_20_large_offset_within_2_ulp(op, offset):
    x = (offset + np.random.default_rng(20).standard_normal(SHAPE)).astype(F32)
    fn, rf = STAT_OPS[op]
    y, st = fn(x, None, None, 1e-5)
    y64, mean, _ = rf(x, None, None, 1e-5)
    assert ref.ulp_error(y, y64).max() <= 2
    assert np.isfinite(st.rstd).all() and (st.rstd <= 1 / np.sqrt(1e-5) * (1 + 1e-6)).all()
    np.testing.assert_allclose(st.mean, mean, rtol=1e-7)


@pytest.mark.parametrize("offset", [1e4, 1e6, 3e7])
def test_20_moments_never_negative_and_exact(offset):
    x = (offset + np.random.default_rng(21).standard_normal(SHAPE)).astype(F32)
    m = rn.moments(x)
    _, mean, m2 = ref.moments(x)
    assert (m.m2 >= 0).all()
    np.testing.assert_allclose(m.mean, mean, rtol=1e-15)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-12)


@pytest.mark.skipif(not hasattr(rn, "mean_variance_norm"), reason="not public yet")
@pytest.mark.parametrize("offset", [1e4, 1e6, 3e7])
def test_20_mean_variance_norm_large_offset(offset):
    x = (offset + np.random.default_rng(22).standard_normal((4, 3, 8, 8))).astype(F32)
    from .refs import mvn

    assert ref.ulp_error(rn.mean_variance_norm(x), mvn(x)).max() <= 2


# 21 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0.0, 1.0, -7.5, 1e30, 3.3e38, -3.3e38])
@pytest.mark.parametrize("op", sorted(STAT_OPS))
def test_21_constant_groups_exactly_bias(op, value):
    x = np.full(SHAPE, value, F32)
    w, _ = _affine(op, x)
    b = np.linspace(-1, 1, w.size).astype(F32)
    y, _ = STAT_OPS[op][0](x, w * 3, b, 1e-5)
    shape = (1, 1, -1) if op == "layer_norm" else (1, -1, 1)
    assert np.array_equal(y, np.broadcast_to(b.reshape(shape), y.shape))


@pytest.mark.parametrize("value", [1.0, 3.3e38])
def test_21_constant_rows_rms_and_frn_finite(value):
    x = np.full(SHAPE, value, F32)
    y = rn.rms_norm(x, SHAPE[-1])
    np.testing.assert_allclose(y, 1.0, rtol=1e-6)


@pytest.mark.parametrize("value", [1.0, 3.3e38])
@pytest.mark.parametrize("op", ["batch_norm", "layer_norm", "group_norm", "instance_norm",
                                "rms_norm"])
def test_21_constant_rows_finite_gradients(op, value):
    name = op + "_backward"
    if not hasattr(rn, name):
        pytest.skip(f"{name} not public yet")
    x = np.full(SHAPE, value, F32)
    gy = np.random.default_rng(0).standard_normal(SHAPE).astype(F32)
    fn = getattr(rn, name)
    if op == "batch_norm":
        g = fn(gy, x, weight=np.ones(4, F32), training=True)
    elif op in ("layer_norm", "rms_norm"):
        g = fn(gy, x, SHAPE[-1], np.ones(SHAPE[-1], F32))
    elif op == "group_norm":
        g = fn(gy, x, 2, np.ones(4, F32))
    else:
        g = fn(gy, x, weight=np.ones(4, F32))
    assert np.isfinite(g.x).all() and np.isfinite(g.weight).all()
    if op != "rms_norm":
        # x̂ = 0 on a constant group: the weight gradient Σ dy·x̂ is exactly 0.
        assert np.array_equal(g.weight, np.zeros_like(g.weight))


# 22 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("v", [2e19, 1e20, 1e30, 1e37, 3e38])
def test_22_rms_norm_huge_values(v):
    x = np.array([[v, -v, v / 2, 0]], F32)
    y = rn.rms_norm(x, 4)
    x64 = x.astype(F64) / v  # scale-free formula; eps is negligible at these magnitudes
    want = x64 / np.sqrt((x64 * x64).mean())
    np.testing.assert_allclose(y[0], [4 / 3, -4 / 3, 2 / 3, 0], rtol=2e-7)
    ref.assert_output_close(y, want, F32)


@pytest.mark.parametrize("v", [2e19, 1e20, 1e30, 1e37, 3e38])
@pytest.mark.parametrize("op", sorted(STAT_OPS))
def test_22_mean_subtracting_norms_huge_values(op, v):
    row = np.array([v, -v, v / 2, 0], F32)
    x = np.tile(row, (2, 4, 1)) if op != "batch_norm" else np.tile(row.reshape(4, 1), (1, 4))
    if op == "batch_norm":
        x = x.reshape(4, 4)  # per channel the batch holds [v, −v, v/2, 0]
    y, _ = STAT_OPS[op][0](x, None, None, 1e-5)
    x64 = x.astype(F64) / v
    want = STAT_OPS[op][1](x64, None, None, 0.0)[0]
    assert np.isfinite(y).all()
    ref.assert_output_close(y, want, F32)


# 23 ------------------------------------------------------------------------------------------
def test_23_float16_rms_of_300_is_one():
    y = rn.rms_norm(np.full((3, 16), 300, F16), 16)
    assert y.dtype == F16 and np.array_equal(y, np.ones((3, 16), F16))


def test_23_float16_layer_norm_of_zeros_tiny_eps():
    y = rn.layer_norm(np.zeros((3, 16), F16), 16, eps=1e-12)
    assert y.dtype == F16 and np.array_equal(y, np.zeros((3, 16), F16))


@pytest.mark.parametrize("op", sorted(STAT_OPS))
def test_23_float16_large_values_do_not_overflow(op):
    x = (60000 * np.random.default_rng(23).uniform(-1, 1, SHAPE)).astype(F16)
    y, _ = STAT_OPS[op][0](x, None, None, 1e-5)
    assert y.dtype == F16 and np.isfinite(y).all()
    ref.assert_output_close(y, STAT_OPS[op][1](x, None, None, 1e-5)[0], F16)


# 24 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("op", sorted(STAT_OPS))
def test_24_subnormal_inputs(op, dtype):
    tiny = np.finfo(dtype).smallest_subnormal
    k = np.random.default_rng(24).integers(-1000, 1000, SHAPE)
    x = (k * tiny).astype(dtype)
    assert (np.abs(x[x != 0]) < np.finfo(dtype).smallest_normal).all()
    # eps = 0 divides by the standard deviation of the subnormals themselves; float32 ones are
    # exact in the float64 accumulators, float64 ones square to 0 in any float64 formula.
    for eps in ((0.0, 1e-5) if dtype == F32 else (1e-5, 1e-300)):
        y, _ = STAT_OPS[op][0](x, None, None, eps)
        want = STAT_OPS[op][1](x, None, None, eps)[0]
        assert np.isfinite(y).all()
        ref.assert_output_close(y, want, dtype)


def test_24_subnormal_rms_norm():
    tiny = np.finfo(F32).smallest_subnormal
    x = (np.arange(1, 65, dtype=F64) * tiny).astype(F32).reshape(2, 32)
    y = rn.rms_norm(x, 32, eps=0.0)
    ref.assert_output_close(y, ref.rms_norm(x, (32,), eps=0.0)[0], F32)


# 25 ------------------------------------------------------------------------------------------
def test_25_more_than_2_pow_24_elements_mean_exactly_one():
    n = 3 * 2**23  # 1.5 · 2²⁴: a float32 running sum would stop at 2²⁴
    x = np.ones((n, 1), F32)
    m = rn.moments(x)
    assert m.count == n and m.mean[0] == 1.0 and m.m2[0] == 0.0
    _, st = rn.layer_norm(x.reshape(1, n), n, return_stats=True)
    assert st.mean[0] == 1.0
    _, st = rn.batch_norm(x, training=True, return_stats=True)
    assert st.mean[0] == 1.0
