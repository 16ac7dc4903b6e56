"""HOSTILE.md item 33: more than 2³¹ elements, with 64-bit index arithmetic everywhere.

A read-only ``np.broadcast_to`` view costs no memory, so the statistics of > 2³¹ elements are
checked in CI through ``moments`` (whose output is O(channels); every other op writes an output
of the input's size, 8 GiB of float32 here). The values repeat with period 1000 along the
reduction, so the exact answer is known. ``huge_bench.py`` beside this file runs the > 2³²
element and single-axis > 2³¹ cases and a real > 2³¹-element float32 array (not run in CI:
tens of seconds and 8-17 GiB). The core also denies clippy's ``cast_possible_truncation``
(src/lib.rs), which catches a silent narrowing of an index at compile time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rsnorm as rn


def test_33_moments_of_more_than_2_pow_31_broadcast_elements():
    a = np.random.default_rng(33).standard_normal((1000, 3)).astype(np.float32)
    k = 2**31 // 3000 + 1
    x = np.broadcast_to(a[None], (k, 1000, 3))
    assert x.size > 2**31 and not x.flags.writeable
    m = rn.moments(x, 2)
    a64 = a.astype(np.float64)
    mean = a64.mean(axis=0)
    m2 = ((a64 - mean) ** 2).sum(axis=0) * k
    assert m.count == k * 1000
    np.testing.assert_allclose(m.mean, mean, rtol=0, atol=1e-11)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-10)


def test_33_core_denies_narrowing_casts():
    lib = (Path(__file__).resolve().parents[3] / "src" / "lib.rs").read_text()
    assert "#![deny(clippy::cast_possible_truncation)]" in lib
