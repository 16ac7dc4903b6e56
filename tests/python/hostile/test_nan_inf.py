"""HOSTILE.md item 26: a NaN (or ±inf) in one element poisons only its own normalization group;
every other element is bitwise equal to the clean run. Checked for every forward op of the
registry, with the group of each op written out below for an (N, C, H, W) = (4, 6, 5, 3) input
as called in registry.SIMPLE."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

from .registry import SIMPLE

F32, F64 = np.float32, np.float64
SHAPE = (4, 6, 5, 3)
POS = (2, 3, 1, 2)  # the poisoned element (n, c, h, w)


def _mask(op):
    """Elements allowed to change when x[POS] is NaN."""
    n, c, h, w = POS
    m = np.zeros(SHAPE, bool)
    if op in ("batch_norm", "mean_variance_norm"):
        m[:, c] = True
    elif op == "layer_norm":  # normalized_shape (5, 3)
        m[n, c] = True
    elif op == "rms_norm":  # normalized_shape (3,)
        m[n, c, h] = True
    elif op == "group_norm":  # 3 groups of 2 channels
        m[n, (c // 2) * 2:(c // 2) * 2 + 2] = True
    elif op in ("instance_norm", "filter_response_norm"):
        m[n, c] = True
    elif op == "iter_norm":  # 2 groups of 3 channels whitened over all positions
        m[:, (c // 3) * 3:(c // 3) * 3 + 3] = True
    elif op == "local_response_norm":  # size 3: the channels whose window holds c
        m[n, c - 1:c + 2, h, w] = True
    elif op in ("gdn", "normalize"):  # every channel at that position
        m[n, :, h, w] = True
    elif op == "tlu":
        m[POS] = True
    else:
        raise AssertionError(f"no group defined for {op}")
    return m


def _y(res):
    return res[0] if isinstance(res, tuple) else res


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("op", sorted(set(SIMPLE) - {"moments"}))
def test_26_non_finite_poisons_only_its_group(op, dtype, bad):
    if not hasattr(rn, op):
        pytest.skip(f"{op} not public yet")
    x = ref.make_input(np.random.default_rng(26), SHAPE, dtype)
    clean = _y(SIMPLE[op](x))
    xb = x.copy()
    xb[POS] = bad
    y = _y(SIMPLE[op](xb))
    m = _mask(op)
    ref.assert_bitwise_equal(y[~m], clean[~m], f"{op}: outside the poisoned group")
    if op == "tlu":
        tau = np.linspace(-1, 1, 6)[POS[1]]  # as in registry.SIMPLE
        assert np.isnan(y[POS]) if np.isnan(bad) else y[POS] == dtype(max(bad, tau))
    elif np.isnan(bad):
        assert np.isnan(y[m]).all(), f"{op}: the group of a NaN must be NaN"
    elif op in ("batch_norm", "layer_norm", "group_norm", "instance_norm", "iter_norm",
                "mean_variance_norm"):
        # ±inf makes the group's mean or variance non-finite: the whole group is NaN.
        assert np.isnan(y[m]).all(), f"{op}: the group of an inf must be NaN"
    else:
        # Scale-only norms (x/‖x‖): inf/inf is NaN at the element; the rest of its group is
        # divided by inf, i.e. what the op gives for x = 0 there (0, or FRN's max(β, τ)).
        assert np.isnan(y[POS]), op
        xz = x.copy()
        xz[m] = 0
        zero = _y(SIMPLE[op](xz))
        rest = m.copy()
        rest[POS] = False
        ref.assert_bitwise_equal(np.abs(y[rest]), np.abs(zero[rest]), op)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_26_bn_training_poisons_only_that_channels_running_stats(bad):
    x = ref.make_input(np.random.default_rng(27), SHAPE, F32)
    rm, rv = np.zeros(6), np.ones(6)
    rn.batch_norm(x, rm, rv, training=True)
    xb = x.copy()
    xb[POS] = bad
    rm2, rv2 = np.zeros(6), np.ones(6)
    rn.batch_norm(xb, rm2, rv2, training=True)
    c = POS[1]
    keep = np.arange(6) != c
    ref.assert_bitwise_equal(rm2[keep], rm[keep])
    ref.assert_bitwise_equal(rv2[keep], rv[keep])
    assert np.isnan(rv2[c]) and (np.isnan(rm2[c]) or np.isinf(rm2[c]))


def test_26_moments_nan_only_in_its_channel():
    x = ref.make_input(np.random.default_rng(28), SHAPE, F64)
    m = rn.moments(x)
    xb = x.copy()
    xb[POS] = np.nan
    mb = rn.moments(xb)
    keep = np.arange(6) != POS[1]
    ref.assert_bitwise_equal(mb.mean[keep], m.mean[keep])
    ref.assert_bitwise_equal(mb.m2[keep], m.m2[keep])
    assert np.isnan(mb.mean[POS[1]]) and np.isnan(mb.m2[POS[1]])


@pytest.mark.parametrize("op", ["batch_norm", "layer_norm", "group_norm", "instance_norm",
                                "rms_norm"])
def test_26_backward_nan_stays_in_its_group(op):
    name = op + "_backward"
    if not hasattr(rn, name):
        pytest.skip(f"{name} not public yet")
    from .registry import ENTRIES

    rng = np.random.default_rng(29)
    x = ref.make_input(rng, SHAPE, F64)
    gy = rng.standard_normal(SHAPE)
    clean = ENTRIES[name].call(gy, x).x
    xb = x.copy()
    xb[POS] = np.nan
    g = ENTRIES[name].call(gy, xb).x
    m = _mask(op)
    ref.assert_bitwise_equal(g[~m], clean[~m], name)
    assert np.isnan(g[m]).all()
