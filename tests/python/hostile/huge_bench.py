"""Huge-input checks that are too slow or too large for CI (HOSTILE 33). Not collected by
pytest (no ``test_`` prefix). Run by hand:

    python tests/python/hostile/huge_bench.py            # broadcast cases + real 8.6 GB input
    python tests/python/hostile/huge_bench.py --output   # also layer_norm into a second 8.6 GB

Memory: the real float32 array of 2³¹ + 2²⁰ elements is 8.6 GB; ``--output`` needs as much
again (17.2 GB in all), which fits a 24 GB machine only when little else runs.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import rsnorm as rn


def timed(label, fn):
    t = time.perf_counter()
    r = fn()
    print(f"{label}: {time.perf_counter() - t:.2f} s", flush=True)
    return r


def main(argv):
    # 1. > 2³² broadcast elements, periodic values: exact statistics known.
    a = np.random.default_rng(0).standard_normal((1000, 3)).astype(np.float32)
    k = 2**32 // 3000 + 1
    x = np.broadcast_to(a[None], (k, 1000, 3))
    m = timed(f"moments over {x.size:.3e} broadcast elements", lambda: rn.moments(x, 2))
    a64 = a.astype(np.float64)
    mean = a64.mean(axis=0)
    assert m.count == k * 1000
    np.testing.assert_allclose(m.mean, mean, atol=1e-11)
    np.testing.assert_allclose(m.m2, ((a64 - mean) ** 2).sum(axis=0) * k, rtol=1e-10)

    # 2. One axis longer than 2³¹.
    y = np.broadcast_to(np.float32(2.5), (2**31 + 5, 1))
    m = timed("moments over one axis of 2^31 + 5", lambda: rn.moments(y, 1))
    assert m.count == 2**31 + 5 and m.mean[0] == 2.5 and m.m2[0] == 0.0

    # 3. A real float32 array of more than 2³¹ elements.
    n = 2**31 + 2**20
    rows = n // 4096
    big = np.empty((rows, 4096), np.float32)
    big[:] = np.arange(4096, dtype=np.float32) % 7  # each row: the same 4096 values
    row = big[0].astype(np.float64)
    m = timed(f"moments over a real {big.nbytes / 1e9:.1f} GB float32 array",
              lambda: rn.moments(big, 1))
    assert m.count == rows
    np.testing.assert_array_equal(m.mean, row)
    _, st = timed("layer_norm stats, rows of 4096 (output to a fresh array)",
                  lambda: rn.layer_norm(big[:1024], 4096, return_stats=True))
    np.testing.assert_allclose(st.mean, row.mean(), rtol=1e-7)
    if "--output" in argv:
        out = np.empty_like(big)
        timed("layer_norm over the whole array into out=",
              lambda: rn.layer_norm(big, 4096, out=out))
        want = ((row - row.mean()) / np.sqrt(row.var() + 1e-5)).astype(np.float32)
        np.testing.assert_allclose(out[[0, rows // 2, rows - 1]], np.tile(want, (3, 1)),
                                   rtol=1e-6, atol=1e-6)
    print("all huge checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
