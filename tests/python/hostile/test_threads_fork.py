"""HOSTILE.md items 27-30: thread counts, Python threads, fork children and Ctrl-C, for every
array op of the registry (forward and backward)."""

from __future__ import annotations

import hashlib
import json
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

from .registry import ENTRIES, SIMPLE

F32, F64 = np.float32, np.float64
# Large enough for the parallel paths (the pool is used from 512 KiB of input on).
SHAPE = (4000, 6, 5, 3)
OPS = sorted(n for n, e in ENTRIES.items() if e.call is not None and hasattr(rn, n))


def _flat(res):
    if isinstance(res, tuple):
        return [a for r in res for a in _flat(r)]
    return [] if res is None else [np.asarray(res)]


def _inputs(name, dtype, seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    x = ref.make_input(rng, shape, dtype)
    if name.endswith("_backward"):
        return (rng.standard_normal(shape).astype(dtype), x)
    return (x,)


def _digest(names, dtype):
    h = hashlib.sha256()
    for name in names:
        for a in _flat(ENTRIES[name].call(*_inputs(name, dtype))):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.fixture
def threads():
    before = rn.get_num_threads()
    yield
    rn.set_num_threads(before)


# 27 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64])
def test_27_bitwise_identical_for_1_2_16_threads(dtype, threads):
    digests = {}
    for n in (1, 2, 16, 2):
        rn.set_num_threads(n)
        for name in OPS:
            res = _flat(ENTRIES[name].call(*_inputs(name, dtype)))
            prev = digests.setdefault(name, res)
            for a, b in zip(res, prev):
                ref.assert_bitwise_equal(a, b, f"{name} with {n} threads")


def test_27_rayon_num_threads_env(threads):
    rn.set_num_threads(0)
    here = _digest(OPS, F32)
    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(root)!r}]
        import numpy as np, rsnorm as rn
        from hostile.test_threads_fork import _digest, OPS
        print(rn.get_num_threads(), _digest(OPS, np.float32))
    """)
    for n in ("1", "3"):
        env = dict(os.environ, RAYON_NUM_THREADS=n)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()
        assert out[0] == n
        assert out[1] == here, f"RAYON_NUM_THREADS={n} changed a result"


# 28 ------------------------------------------------------------------------------------------
def test_28_eight_python_threads_on_distinct_arrays(threads):
    rn.set_num_threads(2)
    names = [n for n in OPS if n in SIMPLE] or OPS
    jobs = [(names[i % len(names)], F32 if i % 2 else F64, i) for i in range(8)]
    serial = {j: _flat(ENTRIES[j[0]].call(*_inputs(j[0], j[1], j[2], (800, 6, 5, 3))))
              for j in jobs}
    errors = []
    barrier = threading.Barrier(8)

    def work(job):
        try:
            arrays = _inputs(job[0], job[1], job[2], (800, 6, 5, 3))
            barrier.wait()
            for _ in range(3):
                for a, b in zip(_flat(ENTRIES[job[0]].call(*arrays)), serial[job]):
                    ref.assert_bitwise_equal(a, b, str(job))
        except BaseException as e:  # noqa: BLE001 (reported below, whatever it is)
            errors.append((job, repr(e)))

    ts = [threading.Thread(target=work, args=(j,)) for j in jobs]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    assert not errors, errors


def test_28_two_threads_writing_one_out(threads):
    """A long write into `out` runs in a thread; a second writer of the same `out` meanwhile
    gets ValueError (the array is borrowed), and the first result is whole and correct."""
    rn.set_num_threads(1)
    row = np.linspace(-1, 1, 1024, dtype=F32)
    x = np.broadcast_to(row, (1 << 16, 1024))  # 6.7e7 elements, no input memory
    other = np.broadcast_to(row[::-1].copy(), x.shape)
    want = rn.layer_norm(row[None], 1024)[0]
    for _ in range(5):
        out = np.full(x.shape, np.nan, F32)
        done = threading.Event()
        errors = []

        def first(out=out, done=done, errors=errors):
            try:
                rn.layer_norm(x, 1024, out=out)
            except BaseException as e:  # noqa: BLE001
                errors.append(repr(e))
            done.set()

        t = threading.Thread(target=first)
        t.start()
        collided = False
        while not done.is_set():
            try:
                rn.layer_norm(other, 1024, out=out)
            except ValueError as e:
                collided = True
                assert "out" in str(e) or "borrow" in str(e).lower(), e
                break
            except BaseException as e:
                raise AssertionError(f"second writer: {e!r}") from e
        t.join(timeout=120)
        assert not errors, errors
        if collided:
            assert (out == want).all(), "the first writer's result was corrupted"
            return
    pytest.fail("the second writer never overlapped the first in 5 tries")


# 29 ------------------------------------------------------------------------------------------
def _child(expected, names):
    ok = _digest(names, F32) == expected
    os._exit(0 if ok else 3)


def test_29_fork_child_after_pool_use_finishes(threads):
    rn.set_num_threads(2)
    names = OPS
    expected = _digest(names, F32)  # the pool's threads now exist in the parent
    ctx = multiprocessing.get_context("fork")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        p = ctx.Process(target=_child, args=(expected, names))
        p.start()
    p.join(timeout=120)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail("a call in a fork child hung")
    assert p.exitcode == 0, f"fork child exit code {p.exitcode} (3: a wrong result)"


# 30 ------------------------------------------------------------------------------------------
CTRL_C = textwrap.dedent("""
    import json, os, signal, threading, time
    import numpy as np, rsnorm as rn
    rn.set_num_threads(1)
    n = 1 << 17
    row = np.linspace(-1, 1, 1024, dtype=np.float32)
    x = np.broadcast_to(row, (n, 1024))          # 1.3e8 elements, no input memory
    out = np.empty((n, 1024), np.float32)
    rn.layer_norm(x, 1024, out=out)  # first touch of out's pages
    t0 = time.perf_counter(); rn.layer_norm(x, 1024, out=out); dur = time.perf_counter() - t0
    want = rn.layer_norm(row[None], 1024)[0]
    out[:] = np.nan
    def fire():
        time.sleep(0.2 * dur)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=fire).start()
    t0 = time.perf_counter()
    try:
        rn.layer_norm(x, 1024, out=out)
        for _ in range(10**6):
            pass
        raised = None
    except KeyboardInterrupt:
        raised = time.perf_counter() - t0
    complete = bool((out == want).all())
    print(json.dumps({"dur": dur, "raised": raised, "complete": complete}))
""")


def test_30_ctrl_c_is_raised_when_the_call_returns():
    """Decided by measurement: a kernel does not poll for signals (as NumPy ufuncs do not), so
    SIGINT during a call is raised as KeyboardInterrupt right after the call returns, and the
    call's output is complete and correct."""
    r = subprocess.run([sys.executable, "-c", CTRL_C], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["raised"] is not None, "KeyboardInterrupt was lost"
    assert res["complete"], "the interrupted call left a partial or wrong output"
    # Raised after the call ran to its end, and promptly then.
    assert 0.7 * res["dur"] <= res["raised"] <= 1.5 * res["dur"] + 0.5, res
