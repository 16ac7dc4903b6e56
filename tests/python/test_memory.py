"""Memory (SPEC §2, HOSTILE 31): for a contiguous input the only allocation is the output plus
O(channels) statistics.

tracemalloc sees NumPy's allocations (NumPy reports them to it), so a hidden NumPy-side copy of
the input shows up in the traced peak. Allocations made by Rust's allocator are invisible to it,
so a second test measures the process's peak RSS in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rsnorm as rn

SHAPE = (32, 64, 16, 16)  # 2 MiB of float32, 64 channels
SLACK = 64 * 1024  # O(channels) statistics and small Python objects

OPS = {
    "batch_norm_train": lambda x, **kw: rn.batch_norm(x, training=True, **kw),
    "batch_norm_train_running": lambda x, **kw: rn.batch_norm(
        x, np.zeros(64, np.float32), np.ones(64, np.float32), np.ones(64, np.float32),
        np.zeros(64, np.float32), training=True, **kw),
    "batch_norm_eval": lambda x, **kw: rn.batch_norm(
        x, np.zeros(64, np.float32), np.ones(64, np.float32), **kw),
    "batch_norm_channels_last": lambda x, **kw: rn.batch_norm(
        x.reshape(32, 16, 16, 64), training=True, axis=-1, **kw),
    "layer_norm": lambda x, **kw: rn.layer_norm(x, (16, 16), **kw),
    "rms_norm": lambda x, **kw: rn.rms_norm(x, (16,), **kw),
    "group_norm": lambda x, **kw: rn.group_norm(x, 8, **kw),
    "instance_norm": lambda x, **kw: rn.instance_norm(x, **kw),
}


def _traced_peak(fn):
    fn()  # warm up: lazy initialisation (thread pool, caches) is not per call
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        res = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return res, peak - base


def test_tracemalloc_sees_numpy_allocations():
    # Guards the tests below against passing vacuously.
    x = np.ones(SHAPE, np.float32)
    _, peak = _traced_peak(lambda: x.copy())
    assert peak >= x.nbytes


@pytest.mark.parametrize("return_stats", [False, True])
@pytest.mark.parametrize("op", list(OPS))
def test_traced_peak_is_output_plus_stats(op, return_stats):
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    res, peak = _traced_peak(lambda: OPS[op](x, return_stats=return_stats))
    y = res[0] if return_stats else res
    assert peak <= y.nbytes + SLACK, f"{op}: traced peak {peak} B for a {y.nbytes} B output"


@pytest.mark.parametrize("op", list(OPS))
def test_traced_peak_with_out_is_small(op):
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    out = np.empty_like(x)
    if op == "batch_norm_channels_last":
        out = out.reshape(32, 16, 16, 64)
    _, peak = _traced_peak(lambda: OPS[op](x, out=out))
    assert peak <= SLACK, f"{op} with out=: traced peak {peak} B"


def test_moments_traced_peak_is_small():
    x = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    _, peak = _traced_peak(lambda: rn.moments(x))
    assert peak <= SLACK


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    import rsnorm as rn

    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    shape = (16, 64, 128, 128)  # 64 MiB of float32
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    calls = {
        "batch_norm": lambda: rn.batch_norm(x, training=True),
        "layer_norm": lambda: rn.layer_norm(x, (128, 128)),
        "rms_norm": lambda: rn.rms_norm(x, (128,)),
        "group_norm": lambda: rn.group_norm(x, 8),
        "instance_norm": lambda: rn.instance_norm(x),
        "moments": lambda: rn.moments(x),
    }
    small = np.ascontiguousarray(x[:2])
    for name in calls:  # warm up every code path on a small input (thread pool, caches)
        {"batch_norm": lambda: rn.batch_norm(small, training=True),
         "layer_norm": lambda: rn.layer_norm(small, (128, 128)),
         "rms_norm": lambda: rn.rms_norm(small, (128,)),
         "group_norm": lambda: rn.group_norm(small, 8),
         "instance_norm": lambda: rn.instance_norm(small),
         "moments": lambda: rn.moments(small)}[name]()
    base = maxrss()
    for name, call in calls.items():
        y = call()
        print(name, maxrss() - base, x.nbytes)
        del y
    """
)


def test_peak_rss_is_input_plus_one_output():
    env = dict(os.environ)
    root = str(Path(rn.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], check=False, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # maxrss is a high-water mark: after the first op it stays at base + one output, and any op
    # that copies its input (or allocates a float64 temporary) pushes it further.
    for line in proc.stdout.strip().splitlines():
        name, grow, nbytes = line.split()
        grow, nbytes = int(grow), int(nbytes)
        assert grow <= nbytes * 1.15 + 16 * 2**20, (
            f"{name}: peak RSS grew by {grow / 2**20:.0f} MiB for a {nbytes / 2**20:.0f} MiB "
            "output (an extra copy?)")


# --- the pool of reused output buffers (src/python/outbuf.rs) ---------------------------------

_POOL_SCRIPT = textwrap.dedent("""
    import json, numpy as np, rsnorm as rn
    def ptr(a):
        return a.__array_interface__["data"][0]
    mib = 1 << 20
    xs = {k: np.ones(k * mib // 4, np.float32).reshape(-1, 256) for k in (2, 3, 4)}
    seen = {}
    # Each size in turn, one output alive at a time: the limit (8 MiB) cannot hold all three.
    for k in (2, 3, 4, 2, 3, 4):
        y = rn.layer_norm(xs[k], (256,))
        seen.setdefault(k, []).append(ptr(y))
        base = type(y.base).__name__
        del y
    idle_after = rn.build_info()["output_pool_idle_bytes"]
    # The size in use right now is reused call after call.
    ys = []
    for _ in range(3):
        y = rn.layer_norm(xs[4], (256,))
        ys.append(ptr(y))
        del y
    print(json.dumps({"base": base, "seen": seen, "idle_after": idle_after, "again": ys,
                      "idle_end": rn.build_info()["output_pool_idle_bytes"]}))
""")


def _pool_run(limit_mb: int) -> dict:
    import json

    env = dict(os.environ, RSNORM_POOL_MB=str(limit_mb))
    out = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_pool_reuses_the_size_in_use_and_respects_its_limit():
    r = _pool_run(8)
    assert r["base"] == "PooledBuffer"
    # Least recently returned blocks are evicted first: after 2, 3, 4, 2, 3, 4 MiB the idle
    # blocks are the last two sizes (3 + 4 MiB). Dropping the returning block instead would
    # leave the stale 2 + 3 MiB.
    assert r["idle_after"] == 7 << 20
    # The most recent size keeps coming back from the pool: the same buffer every call.
    assert len(set(r["again"])) == 1
    assert r["again"][0] == r["seen"]["4"][1]
    assert r["idle_end"] <= 8 << 20


def test_pool_off():
    r = _pool_run(0)
    assert r["base"] != "PooledBuffer"
    assert r["idle_after"] == 0 and r["idle_end"] == 0


_WIDE_BWD_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np, rsnorm as rn
    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    x = np.random.default_rng(0).standard_normal((16, 1 << 20), dtype=np.float32)  # 64 MiB
    w = np.ones(1 << 20, np.float32)
    rn.layer_norm_backward(x[:2], x[:2], 1 << 20, w, w)  # warm up
    base = maxrss()
    g = rn.layer_norm_backward(x, x, 1 << 20, w, w)
    print(maxrss() - base, x.nbytes)
    """
)


def test_wide_row_backward_keeps_no_per_row_partials():
    # Rows of 4 MiB: one row per parameter-gradient block. Per-block partials would add
    # 2 x 16 rows x 8 MiB = 256 MiB; summed by columns they add nothing beyond dx and the
    # (C,) gradients.
    env = dict(os.environ)
    root = str(Path(rn.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _WIDE_BWD_SCRIPT], check=False, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    grow, nbytes = map(int, proc.stdout.split())
    assert grow <= nbytes * 1.15 + 64 * 2**20, f"peak RSS grew by {grow / 2**20:.0f} MiB"
