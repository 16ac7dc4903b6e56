"""moments and the exact Moments.merge."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn
from hypothesis import given
from hypothesis import strategies as st
from reference import make_input

DTYPES = [np.float16, np.float32, np.float64]


def _check(m, x, axis):
    count, mean, m2 = ref.moments(x, axis)
    assert isinstance(m.count, int) and m.count == count
    assert m.mean.dtype == np.float64 and m.m2.dtype == np.float64
    assert m.mean.shape == mean.shape and m.m2.shape == m2.shape
    # Float64 accumulation of the exact input values: as good as the float64 reference.
    np.testing.assert_allclose(m.mean, mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((7, 3), 1), ((4, 3, 5), 1), ((2, 3, 4, 5), 1),
                                        ((2, 4, 5, 3), -1), ((2, 4, 5, 3), 3), ((6, 2), 0)])
def test_reference(rng, shape, axis, dtype):
    x = make_input(rng, shape, dtype, loc=5.0)
    m = rn.moments(x, axis=axis)
    assert isinstance(m, rn.Moments)
    _check(m, x, axis)
    np.testing.assert_allclose(m.var(), m.m2 / m.count, rtol=1e-15)
    np.testing.assert_allclose(m.var(ddof=0), m.m2 / m.count, rtol=1e-15)
    np.testing.assert_allclose(m.var(ddof=1), m.m2 / (m.count - 1), rtol=1e-15)


def test_default_axis_is_1(rng):
    x = make_input(rng, (4, 3, 5), np.float64)
    _check(rn.moments(x), x, 1)


def _split(x, sizes):
    parts, start = [], 0
    for s in sizes:
        parts.append(x[start:start + s])
        start += s
    assert start == x.shape[0]
    return parts


@pytest.mark.parametrize("sizes", [(1, 7, 23), (13, 2, 16), (29, 1, 1)])
def test_uneven_three_way_merge_equals_whole(rng, sizes):
    x = make_input(rng, (31, 4, 6), np.float64, loc=100.0, scale=3.0)
    parts = [rn.moments(p) for p in _split(x, sizes)]
    merged = rn.Moments.merge(*parts)
    whole = rn.moments(x)
    assert merged.count == whole.count == 31 * 6
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-12)
    np.testing.assert_allclose(merged.var(), x.var(axis=(0, 2)), rtol=1e-12)


def test_merge_order_is_fixed(rng):
    x = make_input(rng, (30, 3, 5), np.float32, loc=1e3)
    parts = [rn.moments(p) for p in _split(x, (4, 11, 15))]
    a = rn.Moments.merge(*parts)
    b = rn.Moments.merge(*parts)
    ref.assert_bitwise_equal(a.mean, b.mean)
    ref.assert_bitwise_equal(a.m2, b.m2)
    assert a.count == b.count


def test_merge_single_part_is_identity(rng):
    x = make_input(rng, (5, 3), np.float64)
    m = rn.moments(x)
    one = rn.Moments.merge(m)
    assert one.count == m.count
    np.testing.assert_array_equal(one.mean, m.mean)
    np.testing.assert_array_equal(one.m2, m.m2)


def test_merge_with_an_empty_part(rng):
    # SPEC §6: empty ranks are allowed, so an empty part must not poison the merge.
    x = make_input(rng, (9, 3, 2), np.float64)
    parts = [rn.moments(x[:4]), rn.moments(x[4:4]), rn.moments(x[4:])]
    assert parts[1].count == 0
    merged = rn.Moments.merge(*parts)
    assert merged.count == 18
    np.testing.assert_allclose(merged.mean, x.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(merged.m2, ref.moments(x)[2], rtol=1e-12)


def test_channels_last_merge(rng):
    x = make_input(rng, (10, 4, 5, 3), np.float32)
    parts = [rn.moments(p, axis=-1) for p in _split(x, (3, 3, 4))]
    merged = rn.Moments.merge(*parts)
    count, mean, m2 = ref.moments(x, -1)
    assert merged.count == count
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, m2, rtol=1e-12)


def test_more_than_2_pow_24_ones_mean_exactly_one():
    # HOSTILE 25: a float32 accumulator would stall at 2^24.
    x = np.ones((3 * 2**23, 1), np.float32)
    m = rn.moments(x)
    assert m.count == 3 * 2**23
    assert m.mean[0] == 1.0
    assert m.m2[0] == 0.0


@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_splits(sizes, seed):
    rng = np.random.default_rng(seed)
    x = make_input(rng, (sum(sizes), 3, 2), np.float64, loc=10.0)
    merged = rn.Moments.merge(*[rn.moments(p) for p in _split(x, sizes)])
    count, mean, m2 = ref.moments(x)
    assert merged.count == count
    np.testing.assert_allclose(merged.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, m2, rtol=1e-11, atol=1e-12)
