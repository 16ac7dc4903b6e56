"""Adversarial numerics (SPEC §3, HOSTILE 20-26): large offsets, constants, huge and tiny values,
float16 range, long reductions, NaN and inf isolation.

The reference is always the float64 formula applied to the very same (float32/float16) values.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

F32 = np.float32

# name -> (call(x, **kw) -> y, reference(x, **kw) -> float64 y, x shape, group of an element).
# The group function maps an index tuple of x to the normalization group it belongs to.


def _bn(x, **kw):
    return rn.batch_norm(x, training=True, **kw)


def _bn_ref(x, **kw):
    return ref.batch_norm(x, training=True, **kw)[0]


OPS = {
    "layer_norm": (lambda x, **kw: rn.layer_norm(x, x.shape[-1:], **kw),
                   lambda x, **kw: ref.layer_norm(x, x.shape[-1:], **kw)[0],
                   (24, 257), lambda idx: idx[0]),
    "rms_norm": (lambda x, **kw: rn.rms_norm(x, x.shape[-1:], **kw),
                 lambda x, **kw: ref.rms_norm(x, x.shape[-1:], **kw)[0],
                 (24, 257), lambda idx: idx[0]),
    "group_norm": (lambda x, **kw: rn.group_norm(x, 3, **kw),
                   lambda x, **kw: ref.group_norm(x, 3, **kw)[0],
                   (4, 6, 41), lambda idx: (idx[0], idx[1] // 2)),
    "instance_norm": (lambda x, **kw: rn.instance_norm(x, **kw),
                      lambda x, **kw: ref.instance_norm(x, **kw)[0],
                      (4, 5, 53), lambda idx: (idx[0], idx[1])),
    "batch_norm": (_bn, _bn_ref, (37, 5, 11), lambda idx: idx[1]),
}
MEAN_SUBTRACTING = ["layer_norm", "group_norm", "instance_norm", "batch_norm"]


def _group_mask(name, shape, idx):
    group = OPS[name][3]
    target = group(idx)
    mask = np.zeros(shape, bool)
    for j in np.ndindex(*shape):
        mask[j] = group(j) == target
    return mask


@pytest.mark.parametrize("offset", [1e4, 1e6, 3e7])
@pytest.mark.parametrize("name", list(OPS))
def test_large_offset_within_2_ulp(rng, name, offset):
    call, reference, shape, _ = OPS[name]
    x = (offset + rng.standard_normal(shape)).astype(F32)
    y = call(x)
    want = reference(x)
    assert y.dtype == F32
    err = ref.ulp_error(y, want)
    assert err.max() <= 2.0, f"{name} at {offset:g}: {err.max():.1f} ulp (worst)"


@pytest.mark.parametrize("offset", [1e4, 1e6, 3e7])
def test_large_offset_stats_are_exact(rng, offset):
    # Never E[x^2] - E[x]^2: the variance (hence rstd) must be right, not just positive.
    x = (offset + rng.standard_normal((16, 513))).astype(F32)
    _, stats = rn.layer_norm(x, (513,), return_stats=True)
    _, mean, rstd = ref.layer_norm(x, (513,))
    assert np.all(np.isfinite(stats.rstd)) and np.all(stats.rstd > 0)
    np.testing.assert_allclose(stats.rstd, rstd, rtol=1e-6)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-7)
    _, stats = rn.batch_norm(x.reshape(16, 1, 513), training=True, return_stats=True)
    _, mean, rstd, _, _ = ref.batch_norm(x.reshape(16, 1, 513), training=True)
    np.testing.assert_allclose(stats.rstd, rstd, rtol=1e-6)


CONSTANTS = [1.0, 0.1, -7.3, 1e-30, 1e-40, 3.3e38, -3.3e38, 65504.0]


@pytest.mark.parametrize("value", CONSTANTS)
@pytest.mark.parametrize("name", MEAN_SUBTRACTING)
def test_constant_groups_give_exactly_zero(name, value):
    call, _, shape, _ = OPS[name]
    x = np.full(shape, value, F32)
    y = call(x)
    assert np.all(y == 0), f"{name} of constant {value:g}: {y[y != 0][:4]}"


@pytest.mark.parametrize("value", CONSTANTS)
@pytest.mark.parametrize("name", ["layer_norm", "group_norm", "instance_norm", "batch_norm"])
def test_constant_groups_give_exactly_bias(rng, name, value):
    x = np.full(OPS[name][2], value, F32)
    if name == "layer_norm":
        n = x.shape[-1]
        w = (1 + rng.random(n)).astype(F32)
        b = (rng.standard_normal(n)).astype(F32)
        y = rn.layer_norm(x, (n,), w, b)
        want = np.broadcast_to(b, x.shape)
    else:
        c = x.shape[1]
        w = (1 + rng.random(c)).astype(F32)
        b = (rng.standard_normal(c)).astype(F32)
        kw = {"weight": w, "bias": b}
        if name == "group_norm":
            y = rn.group_norm(x, 3, **kw)
        elif name == "instance_norm":
            y = rn.instance_norm(x, **kw)
        else:
            y = rn.batch_norm(x, training=True, **kw)
        want = np.broadcast_to(b[None, :, None], x.shape)
    np.testing.assert_array_equal(y, want)


# float16 only: the exactness promise is for data accumulated in a wider type (float64 data summed
# in float64 rounds, e.g. 45 copies of 1e150 do not sum to exactly 45e150).
@pytest.mark.parametrize("dtype,value", [(np.float16, 65504.0), (np.float16, -3.0),
                                         (np.float16, 0.1)])
def test_constant_rows_float16(dtype, value):
    x = np.full((3, 45), value, dtype)
    y = rn.layer_norm(x, (45,))
    assert y.dtype == dtype
    assert np.all(y == 0)
    y = rn.group_norm(x.reshape(3, 5, 9), 5)
    assert np.all(y == 0)


@pytest.mark.parametrize("v", [2e19, 1e20, 1e30, 3e38])
def test_rms_norm_huge_values(v):
    x = np.array([[v, -v, v / 2, 0.0]] * 3, F32)
    y = rn.rms_norm(x, (4,))
    assert y.dtype == F32
    np.testing.assert_allclose(y, np.tile([4 / 3, -4 / 3, 2 / 3, 0], (3, 1)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("v", [2e19, 1e20, 3e38])
def test_mean_subtracting_norms_huge_values(v):
    row = np.array([v, -v, v / 2, 0.0], F32)
    x = np.tile(row, (2, 1))
    want, *_ = ref.layer_norm(x, (4,))
    np.testing.assert_allclose(rn.layer_norm(x, (4,)), want, rtol=1e-6, atol=1e-7)
    want, *_ = ref.group_norm(x, 1)
    np.testing.assert_allclose(rn.group_norm(x, 1), want, rtol=1e-6, atol=1e-7)
    xt = np.ascontiguousarray(x.T)  # (4, 2): 4 values per channel
    want, *_ = ref.batch_norm(xt, training=True)
    np.testing.assert_allclose(rn.batch_norm(xt, training=True), want, rtol=1e-6, atol=1e-7)
    xi = x.reshape(2, 1, 4)
    want, *_ = ref.instance_norm(xi)
    np.testing.assert_allclose(rn.instance_norm(xi), want, rtol=1e-6, atol=1e-7)


def test_float16_rms_of_300_is_one():
    x = np.full((2, 64), 300, np.float16)  # x^2 = 90000 > float16 max 65504
    y = rn.rms_norm(x, (64,))
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, np.ones((2, 64), np.float16))


def test_float16_layer_norm_of_zeros_tiny_eps():
    # eps = 1e-12 is 0 in float16; rstd = 1e6 must not become inf (0 * inf = NaN).
    x = np.zeros((3, 10), np.float16)
    y = rn.layer_norm(x, (10,), eps=1e-12)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, np.zeros((3, 10), np.float16))
    y = rn.group_norm(x.reshape(3, 2, 5), 2, eps=1e-12)
    np.testing.assert_array_equal(y, 0)


def test_float16_large_values_do_not_overflow(rng):
    x = (rng.choice([-1.0, 1.0], (4, 100)) * rng.uniform(3e4, 6e4, (4, 100))).astype(np.float16)
    for y, want in [
        (rn.layer_norm(x, (100,)), ref.layer_norm(x, (100,))[0]),
        (rn.rms_norm(x, (100,)), ref.rms_norm(x, (100,))[0]),
        (rn.batch_norm(x.T.copy(), training=True), ref.batch_norm(x.T, training=True)[0]),
    ]:
        assert np.all(np.isfinite(y))
        ref.assert_output_close(y, want, np.float16)


def test_more_than_2_pow_24_elements_in_one_reduction():
    n = 3 * 2**23
    x = np.ones((1, n), F32)
    y, stats = rn.layer_norm(x, (n,), return_stats=True)
    assert stats.mean[0] == 1.0
    assert not np.any(y)
    del y
    # (3, 1, n/3): one channel, the reduction spans samples and the spatial axis.
    y, stats = rn.batch_norm(x.reshape(3, 1, n // 3), training=True, return_stats=True)
    assert stats.mean[0] == 1.0
    assert not np.any(y)


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_subnormal_inputs(rng, eps):
    x = (1e-40 * (1 + rng.standard_normal((6, 50)))).astype(F32)
    assert np.all(np.abs(x[x != 0]) < np.finfo(F32).tiny)  # really subnormal
    for y, want in [
        (rn.layer_norm(x, (50,), eps=eps), ref.layer_norm(x, (50,), eps=eps)[0]),
        (rn.rms_norm(x, (50,), eps=eps), ref.rms_norm(x, (50,), eps=eps)[0]),
        (rn.batch_norm(x, training=True, eps=eps), ref.batch_norm(x, training=True, eps=eps)[0]),
    ]:
        assert np.all(np.isfinite(y))
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-44)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", list(OPS))
def test_non_finite_poisons_only_its_group(rng, name, bad):
    call, _, shape, _ = OPS[name]
    x = (0.5 + rng.standard_normal(shape)).astype(F32)
    clean = call(x)
    idx = tuple(s // 2 for s in shape)
    x_bad = x.copy()
    x_bad[idx] = bad
    y = call(x_bad)
    mask = _group_mask(name, shape, idx)
    ref.assert_bitwise_equal(y[~mask], clean[~mask], f"{name}: other groups changed")
    if name == "rms_norm" and np.isinf(bad):
        # inf/inf is NaN; the rest of the row is finite/inf = 0 (or NaN): never finite nonzero.
        assert np.isnan(y[idx])
        rest = y[mask]
        assert np.all(np.isnan(rest) | (rest == 0))
    else:
        assert np.all(np.isnan(y[mask])), f"{name}: its group is not all NaN"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_in_batch_norm_training_poisons_only_its_running_stats(rng, bad):
    x = rng.standard_normal((8, 4, 5)).astype(F32)
    x[3, 2, 1] = bad
    rm = np.zeros(4, F32)
    rv = np.ones(4, F32)
    rm_clean, rv_clean = rm.copy(), rv.copy()
    rn.batch_norm(x, rm, rv, training=True)
    x_clean = x.copy()
    x_clean[3, 2, 1] = 0.0
    rn.batch_norm(x_clean, rm_clean, rv_clean, training=True)
    assert np.isnan(rv[2]) and (np.isnan(rm[2]) or np.isinf(rm[2]))
    keep = [0, 1, 3]
    ref.assert_bitwise_equal(rm[keep], rm_clean[keep])
    ref.assert_bitwise_equal(rv[keep], rv_clean[keep])


@pytest.mark.parametrize("name", ["batch_norm", "group_norm", "instance_norm"])
def test_nan_weight_poisons_only_its_channel(rng, name):
    x = rng.standard_normal((4, 6, 9)).astype(F32)
    w = np.linspace(0.5, 1.5, 6).astype(F32)
    w_bad = w.copy()
    w_bad[2] = np.nan
    call = {"batch_norm": lambda w: rn.batch_norm(x, weight=w, training=True),
            "group_norm": lambda w: rn.group_norm(x, 3, w),
            "instance_norm": lambda w: rn.instance_norm(x, weight=w)}[name]
    clean, y = call(w), call(w_bad)
    assert np.all(np.isnan(y[:, 2]))
    keep = [0, 1, 3, 4, 5]
    ref.assert_bitwise_equal(y[:, keep], clean[:, keep])


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_float16_subnormal_inputs(rng, eps):
    x = (6e-6 * (1 + rng.standard_normal((6, 50)))).astype(np.float16)
    assert np.all(np.abs(x[x != 0]) < np.finfo(np.float16).tiny)
    for y, want in [
        (rn.layer_norm(x, (50,), eps=eps), ref.layer_norm(x, (50,), eps=eps)[0]),
        (rn.rms_norm(x, (50,), eps=eps), ref.rms_norm(x, (50,), eps=eps)[0]),
    ]:
        assert np.all(np.isfinite(y))
        ref.assert_output_close(y, want, np.float16)


def test_nan_in_eval_mode_stays_in_its_element(rng):
    # With running statistics every element is normalized on its own: the group is the element.
    x = rng.standard_normal((5, 4, 6)).astype(F32)
    rm = np.array([0.1, -0.2, 0.3, 0.0], F32)
    rv = np.array([1.0, 2.0, 0.5, 1.5], F32)
    clean = rn.batch_norm(x, rm, rv)
    clean_in = rn.instance_norm(x, rm, rv, use_input_stats=False)
    x[2, 1, 3] = np.nan
    y = rn.batch_norm(x, rm, rv)
    y_in = rn.instance_norm(x, rm, rv, use_input_stats=False)
    mask = np.zeros(x.shape, bool)
    mask[2, 1, 3] = True
    for got, want in [(y, clean), (y_in, clean_in)]:
        assert np.isnan(got[2, 1, 3])
        ref.assert_bitwise_equal(got[~mask], want[~mask])
