"""Threads and processes (SPEC §2, HOSTILE 27-29): results bitwise identical for any thread
count (set_num_threads and RAYON_NUM_THREADS), Python threads, fork children.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

# Big enough that every op splits its work into several blocks / rayon tasks.
SHAPE = (32, 48, 24, 24)


def _all_outputs(x):
    """Every op of the family, forward with statistics, on one input (float32 or float64)."""
    c = x.shape[1]
    w = np.linspace(0.5, 1.5, c).astype(x.dtype)
    b = np.linspace(-0.5, 0.5, c).astype(x.dtype)
    rm, rv = np.zeros(c, np.float64), np.ones(c, np.float64)
    outs = []
    y, s = rn.batch_norm(x, rm, rv, w, b, training=True, return_stats=True)
    outs += [y, s.mean, s.rstd, rm, rv]
    y, s = rn.batch_norm(ref.channels_last(x), training=True, axis=-1, return_stats=True)
    outs += [y, s.mean, s.rstd]
    y, s = rn.layer_norm(x, x.shape[1:], return_stats=True)
    outs += [y, s.mean, s.rstd]
    y, s = rn.layer_norm(x, x.shape[-1:], return_stats=True)
    outs += [y, s.mean, s.rstd]
    y, s = rn.rms_norm(x, x.shape[-2:], return_stats=True)
    outs += [y, s.rstd]
    y, s = rn.group_norm(x, 4, w, b, return_stats=True)
    outs += [y, s.mean, s.rstd]
    y, s = rn.instance_norm(x, return_stats=True)
    outs += [y, s.mean, s.rstd]
    m = rn.moments(x)
    outs += [m.mean, m.m2]
    m = rn.moments(x.reshape(-1, c * 24 * 24), axis=0)  # many channels, 32 values each
    outs += [m.mean, m.m2]
    return outs


def _digest(outs):
    h = hashlib.sha256()
    for o in outs:
        h.update(np.ascontiguousarray(o).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    return {
        np.float32: (100 + rng.standard_normal(SHAPE)).astype(np.float32),
        np.float64: (100 + rng.standard_normal(SHAPE)).astype(np.float64),
        np.float16: (100 + rng.standard_normal(SHAPE)).astype(np.float16),
    }


def test_set_get_num_threads(restore_threads):
    rn.set_num_threads(1)
    assert rn.get_num_threads() == 1
    rn.set_num_threads(2)
    assert rn.get_num_threads() == 2


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_bitwise_identical_for_1_2_16_threads(data, dtype, restore_threads):
    x = data[dtype]
    results = {}
    for n in (1, 2, 16, 2, 1):
        rn.set_num_threads(n)
        outs = _all_outputs(x)
        results.setdefault(n, []).append(outs)
    base = results[1][0]
    for n, runs in results.items():
        for outs in runs:
            for k, (a, b) in enumerate(zip(outs, base)):
                ref.assert_bitwise_equal(a, b, f"{n} threads vs 1, output {k}")


def _package_root():
    return str(Path(rn.__file__).resolve().parent.parent)


_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import rsnorm as rn
    import test_threads as t
    rng = np.random.default_rng(1234)
    x = (100 + rng.standard_normal(t.SHAPE)).astype(np.float32)
    print(rn.get_num_threads())
    print(t._digest(t._all_outputs(x)))
    """
)


def _run_with_env(threads, **extra):
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(threads)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([_package_root(), env.get("PYTHONPATH", "")])
    script = _SCRIPT.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    return int(lines[0]), lines[1]


def test_rayon_num_threads_env_is_honoured_and_bitwise(data, restore_threads):
    n1, d1 = _run_with_env(1)
    n2, d2 = _run_with_env(2)
    assert n1 == 1 and n2 == 2, "RAYON_NUM_THREADS not reported by get_num_threads"
    assert d1 == d2, "results differ between RAYON_NUM_THREADS=1 and 2"
    # And the same as this process computes.
    rn.set_num_threads(2)
    assert _digest(_all_outputs(data[np.float32])) == d1


def test_helpers_that_never_spin_give_the_same_bits(data, restore_threads):
    """RSNORM_SPIN_US=0: the helper threads park at once and the caller sleeps on its last
    helper; the mid-size calls of `_all_outputs` (3.5 MB: shared with the caller) still give
    bitwise the results of this process (helpers spinning)."""
    n, d = _run_with_env(2, RSNORM_SPIN_US="0")
    assert n == 2
    rn.set_num_threads(2)
    assert _digest(_all_outputs(data[np.float32])) == d


def _fork_child(expected_digest):
    x = (100 + np.random.default_rng(1234).standard_normal(SHAPE)).astype(np.float32)
    got = _digest(_all_outputs(x))
    if got != expected_digest:
        raise SystemExit(3)


def test_fork_child_after_pool_use_finishes(data, restore_threads):
    rn.set_num_threads(2)
    expected = _digest(_all_outputs(data[np.float32]))  # the pool is now warm in the parent
    ctx = multiprocessing.get_context("fork")
    with warnings.catch_warnings():
        # Python >= 3.12 warns that forking a multi-threaded process may deadlock; that is
        # exactly the situation under test.
        warnings.simplefilter("ignore", DeprecationWarning)
        p = ctx.Process(target=_fork_child, args=(expected,))
        p.start()
    p.join(timeout=60)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail("a call in a fork child hung (rayon pool inherited from the parent)")
    assert p.exitcode == 0, f"fork child exit code {p.exitcode} (3 = wrong result)"
    # The parent still works afterwards.
    assert _digest(_all_outputs(data[np.float32])) == expected


def test_python_threads_on_distinct_arrays(restore_threads):
    rn.set_num_threads(2)
    rng = np.random.default_rng(7)
    xs = [(i + rng.standard_normal((64, 32, 64))).astype(np.float32) for i in range(8)]
    want = [rn.layer_norm(x, (32, 64)) for x in xs]
    want_bn = [rn.batch_norm(x, training=True) for x in xs]
    got = [None] * 8
    got_bn = [None] * 8
    errors = []

    def work(i):
        try:
            for _ in range(3):
                got[i] = rn.layer_norm(xs[i], (32, 64))
                got_bn[i] = rn.batch_norm(xs[i], training=True)
        except BaseException as e:  # noqa: BLE001 - reported below, including panics
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "thread hung"
    assert not errors, errors
    for i in range(8):
        ref.assert_bitwise_equal(got[i], want[i])
        ref.assert_bitwise_equal(got_bn[i], want_bn[i])


def test_two_threads_writing_one_out(restore_threads):
    # Either call may be refused with ValueError while the other holds `out`; whatever
    # happens, no other exception and no corrupted result.
    rn.set_num_threads(2)
    x = (3 + np.random.default_rng(3).standard_normal((256, 1024))).astype(np.float32)
    want = rn.layer_norm(x, (1024,))
    out = np.empty_like(x)
    errors, refused = [], []
    barrier = threading.Barrier(2)

    def work():
        barrier.wait()
        for _ in range(20):
            try:
                rn.layer_norm(x, (1024,), out=out)
            except ValueError:
                refused.append(1)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "thread hung"
    assert not errors, errors
    assert len(refused) < 40, "every call was refused"
    ref.assert_bitwise_equal(out, want)


def test_many_more_threads_than_cores(data, restore_threads):
    # 256 threads on a 2-core machine: still correct and bitwise identical. (Counts like
    # 100_000 are not exercised here: while unbounded they start that many OS threads, a load
    # spike that would disturb everything else running on a shared CI machine.)
    x = data[np.float32]
    rn.set_num_threads(1)
    want = _all_outputs(x)
    rn.set_num_threads(256)
    assert rn.get_num_threads() == 256
    for k, (a, b) in enumerate(zip(_all_outputs(x), want)):
        ref.assert_bitwise_equal(a, b, f"256 threads vs 1, output {k}")


def test_gil_is_released_during_a_long_call(restore_threads):
    # While another thread is inside one long call, this thread keeps running: the longest
    # pause it sees is far shorter than the call. (With the GIL held it would be the whole call.)
    import time

    rn.set_num_threads(1)
    x = np.random.default_rng(5).standard_normal((6144, 8192), dtype=np.float32)
    rn.layer_norm(x[:64], (8192,))
    t0 = time.perf_counter()
    rn.layer_norm(x, (8192,))
    call = time.perf_counter() - t0
    assert call > 0.02, "input too small to measure on this machine"
    for _attempt in range(3):
        done = threading.Event()

        def work(done=done):
            rn.layer_norm(x, (8192,))
            done.set()

        t = threading.Thread(target=work)
        last = time.perf_counter()
        start = last
        t.start()
        worst = 0.0
        while not done.is_set():
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now
        t.join()
        elapsed = time.perf_counter() - start
        if worst < 0.5 * elapsed:
            return
    pytest.fail(f"this thread stalled {worst:.3f} s during a {elapsed:.3f} s call (GIL held?)")
