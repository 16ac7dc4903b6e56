"""rsnorm.distributed: synchronized batch norm.

Two layers of tests. In-process: several "ranks" run as threads that exchange through a small
communicator with mpi4py's ``allgather`` semantics, so the logic (uneven and empty ranks, merge
order, errors on one rank, the layer) is checked without MPI. Under MPI: ``mpiexec -n 2`` and
``-n 3`` (the PyPI ``mpich`` wheel) run ``tests/mpi/check_sync_batch_norm.py`` and the training
example in subprocesses, so MPI is never initialized inside the pytest process. Those skip only
when mpi4py or mpiexec is not installed.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest
import rsnorm as rn
from reference import batch_norm as ref_batch_norm
from rsnorm.distributed import (
    SyncBatchNorm,
    convert_sync_batchnorm,
    sync_batch_norm,
    sync_batch_norm_backward,
)

ROOT = Path(__file__).resolve().parents[2]
F32, F64 = np.float32, np.float64


class _Group:
    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=30)


class ThreadComm:
    """One rank of an in-process group: allgather through shared slots and two barriers."""

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size
        self.calls = 0

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def allgather(self, obj):
        self.calls += 1
        g = self.group
        g.slots[self.rank] = obj
        g.barrier.wait()
        out = list(g.slots)
        g.barrier.wait()
        return out


def run_ranks(size, fn):
    """Runs fn(comm) on `size` threads; returns the results (or raised exceptions) by rank."""
    group = _Group(size)
    results = [None] * size

    def target(r):
        try:
            results[r] = fn(ThreadComm(group, r))
        except BaseException as e:  # noqa: BLE001 - returned to the test for inspection
            results[r] = e

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


def slices(counts):
    edges = np.concatenate([[0], np.cumsum(counts)])
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def ref_backward(dy, x, w, eps, ax):
    x, dy = x.astype(F64), dy.astype(F64)
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = -1
    mean = x.mean(axis=red)
    rstd = 1.0 / np.sqrt(((x - mean.reshape(shape)) ** 2).mean(axis=red) + eps)
    xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
    dx = (w * rstd).reshape(shape) * (
        dy - dy.mean(axis=red, keepdims=True) - xhat * (dy * xhat).mean(axis=red, keepdims=True)
    )
    return dx, (dy * xhat).sum(axis=red), dy.sum(axis=red)


def within_ulp(got, ref, dtype, n=2):
    spacing = np.spacing(np.abs(ref.astype(dtype))).astype(F64)
    return float((np.abs(got.astype(F64) - ref) / spacing).max(initial=0)) <= n


@pytest.mark.parametrize("counts", [[4, 0, 3, 5], [0, 0, 7], [1, 1], [9]])
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("axis", [1, -1])
def test_threads_match_single_process(rng, counts, dtype, axis):
    c = 3
    n = sum(counts)
    shape = (n, c, 5, 2) if axis == 1 else (n, 5, 2, c)
    xg = (2.0 + 1.5 * rng.standard_normal(shape)).astype(dtype)
    dyg = rng.standard_normal(shape).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm0, rv0 = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    sl = slices(counts)

    def rank_fn(comm):
        x = xg[sl[comm.rank]]
        rm, rv = rm0.copy(), rv0.copy()
        y, st = sync_batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, comm=comm, axis=axis,
                                return_stats=True)
        g = sync_batch_norm_backward(dyg[sl[comm.rank]], x, w, b, stats=st, comm=comm, axis=axis)
        return y, st, rm, rv, g

    res = run_ranks(len(counts), rank_fn)
    ax = axis % xg.ndim
    ry, rmean, rrstd, rrm, rrv = ref_batch_norm(xg, rm0, rv0, w, b, True, 0.1, 1e-5, axis=ax)
    rdx, rdw, rdb = ref_backward(dyg, xg, w.astype(F64), 1e-5, ax)
    for r, out in enumerate(res):
        assert not isinstance(out, BaseException), out
        y, st, rm, rv, g = out
        assert y.dtype == dtype and g.x.dtype == dtype and g.weight.dtype == dtype
        if dtype == F64:
            np.testing.assert_allclose(y, ry[sl[r]], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(g.x, rdx[sl[r]], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(g.weight, rdw, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(g.bias, rdb, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(rm, rrm, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(rv, rrv, rtol=1e-12)
        else:
            for got, ref in ((y, ry[sl[r]]), (g.x, rdx[sl[r]]), (g.weight, rdw), (g.bias, rdb),
                             (rm, rrm), (rv, rrv)):
                assert within_ulp(got, ref, dtype)
        np.testing.assert_allclose(st.mean, rmean, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(st.rstd, rrstd, rtol=1e-13)
        # Every rank holds bitwise the same statistics, running statistics and gradients.
        for a, b0 in zip((st.mean, st.rstd, rm, rv, g.weight, g.bias),
                         (res[0][1].mean, res[0][1].rstd, res[0][2], res[0][3], res[0][4].weight,
                          res[0][4].bias)):
            assert a.tobytes() == b0.tobytes()


def test_one_rank_equals_batch_norm(rng):
    x = rng.standard_normal((6, 4, 3))
    rm, rv = np.zeros(4), np.ones(4)
    srm, srv = rm.copy(), rv.copy()
    (y,) = run_ranks(1, lambda comm: sync_batch_norm(x, rm, rv, training=True, comm=comm))
    sy = rn.batch_norm(x, srm, srv, training=True)
    np.testing.assert_allclose(y, sy, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(rm, srm, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(rv, srv, rtol=1e-14)


def test_eval_does_not_communicate(rng):
    x = rng.standard_normal((3, 4, 5)).astype(F32)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    comm = ThreadComm(_Group(2), 0)  # would block forever if used: rank 1 never arrives
    y, st = sync_batch_norm(x, rm, rv, None, None, False, comm=comm, return_stats=True)
    assert comm.calls == 0
    assert np.array_equal(y, rn.batch_norm(x, rm, rv))
    np.testing.assert_array_equal(st.rstd, 1 / np.sqrt(rv + 1e-5))
    g = sync_batch_norm_backward(np.ones_like(x), x, stats=st, comm=comm, training=False)
    assert comm.calls == 0
    np.testing.assert_allclose(g.x, np.broadcast_to((1 / np.sqrt(rv + 1e-5))[:, None], x.shape),
                               rtol=1e-7)


def test_one_value_per_channel_raises_on_every_rank():
    rms = [np.zeros(2) for _ in range(3)]

    def rank_fn(comm):
        x = np.ones((1 if comm.rank == 1 else 0, 2))
        return sync_batch_norm(x, rms[comm.rank], np.ones(2), training=True, comm=comm)

    for out in run_ranks(3, rank_fn):
        assert isinstance(out, ValueError)
        assert "Expected more than 1 value per channel when training" in str(out)
    assert all(not rm.any() for rm in rms)


def test_read_only_running_stats_on_one_rank():
    rms = [np.zeros(2) for _ in range(3)]
    rms[1].flags.writeable = False

    def rank_fn(comm):
        return sync_batch_norm(np.ones((2, 2)) * comm.rank, rms[comm.rank], np.ones(2),
                               training=True, comm=comm)

    res = run_ranks(3, rank_fn)
    assert isinstance(res[1], ValueError) and "running_mean is read-only" in str(res[1])
    assert all(isinstance(r, ValueError) and "rank(s) 1" in str(r) for r in (res[0], res[2]))
    assert not rms[0].any() and not rms[2].any()


def test_empty_batch_on_every_rank(rng):
    state = [(np.zeros(3), np.ones(3), np.array(2, np.int64)) for _ in range(2)]
    dy = np.zeros((0, 3, 4))

    def rank_fn(comm):
        rm, rv, nbt = state[comm.rank]
        x = np.zeros((0, 3, 4))
        y, st = sync_batch_norm(x, rm, rv, np.ones(3), np.zeros(3), True, comm=comm,
                                return_stats=True, num_batches_tracked=nbt)
        g = sync_batch_norm_backward(dy, x, np.ones(3), np.zeros(3), stats=st, comm=comm)
        return y, st, g

    for (y, st, g), (rm, rv, nbt) in zip(run_ranks(2, rank_fn), state):
        assert y.shape == (0, 3, 4) and g.x.shape == (0, 3, 4)
        assert np.isnan(st.mean).all()
        assert np.array_equal(g.weight, np.zeros(3)) and np.array_equal(g.bias, np.zeros(3))
        assert not rm.any() and np.array_equal(rv, np.ones(3)) and int(nbt) == 2


def test_nan_stays_in_its_channel(rng):
    xg = rng.standard_normal((6, 3, 4))
    clean = xg.copy()
    xg[4, 1, 2] = np.nan  # on rank 1
    counts = [3, 3]
    sl = slices(counts)
    state = [(np.zeros(3), np.ones(3)) for _ in counts]

    def run(data):
        def rank_fn(comm):
            rm, rv = state[comm.rank]
            rm[:], rv[:] = 0, 1
            return sync_batch_norm(data[sl[comm.rank]], rm, rv, training=True, comm=comm)
        return run_ranks(2, rank_fn)

    want = np.concatenate(run(clean))
    got = np.concatenate(run(xg))
    assert np.isnan(got[:, 1]).all()
    np.testing.assert_array_equal(got[:, [0, 2]], want[:, [0, 2]])
    for rm, rv in state:
        assert np.isnan(rm[1]) and np.isnan(rv[1])
        assert np.isfinite(rm[[0, 2]]).all() and np.isfinite(rv[[0, 2]]).all()


def test_error_on_one_rank_reaches_all_ranks():
    def rank_fn(comm):
        x = np.ones((3, 2), dtype=np.int64 if comm.rank == 2 else F64)
        return sync_batch_norm(x, training=True, comm=comm)

    res = run_ranks(3, rank_fn)
    assert isinstance(res[2], TypeError) and "int64" in str(res[2])
    for out in res[:2]:
        assert isinstance(out, rn.RsnormError) and "rank(s) 2" in str(out)


def test_bad_parameters():
    (err,) = run_ranks(1, lambda c: sync_batch_norm(np.ones((3, 2)), weight=np.ones(3),
                                                     training=True, comm=c))
    assert isinstance(err, ValueError) and "weight" in str(err) and "(2,)" in str(err)
    with pytest.raises(ValueError, match="together"):
        sync_batch_norm(np.ones((3, 2)), np.zeros(2), None, training=True, comm=object())
    (err,) = run_ranks(1, lambda c: sync_batch_norm(np.ones((3, 2)), np.zeros(2), np.ones(2),
                                                     training=True, momentum=None, comm=c))
    assert isinstance(err, ValueError) and "num_batches_tracked" in str(err)
    for m in (float("nan"), 1.5, -0.1):
        (err,) = run_ranks(1, lambda c, m=m: sync_batch_norm(np.ones((3, 2)), training=True,
                                                             momentum=m, comm=c))
        assert isinstance(err, ValueError) and "momentum must be in [0, 1]" in str(err)
    with pytest.raises(ValueError, match="eps"):
        sync_batch_norm(np.ones((3, 2)), training=True, eps=-1.0, comm=object())
    with pytest.raises(ValueError, match="param_grads"):
        sync_batch_norm_backward(np.ones((3, 2)), np.ones((3, 2)), comm=object(),
                                 param_grads="mean")
    with pytest.raises(ValueError, match="grad_y"):
        sync_batch_norm_backward(np.ones((3, 3)), np.ones((3, 2)), comm=object())


def test_momentum_none_and_onnx_convention(rng):
    xg = rng.standard_normal((7, 3, 4))
    counts = [3, 0, 4]
    sl = slices(counts)
    state = [(np.zeros(3), np.ones(3), np.array(4, np.int64)) for _ in counts]

    def rank_fn(comm):
        rm, rv, nbt = state[comm.rank]
        sync_batch_norm(xg[sl[comm.rank]], rm, rv, training=True, momentum=None, comm=comm,
                        num_batches_tracked=nbt)

    run_ranks(3, rank_fn)
    _, _, _, rrm, rrv = ref_batch_norm(xg, np.zeros(3), np.ones(3), None, None, True, None,
                                       num_batches_tracked=np.array(4))
    for rm, rv, nbt in state:
        assert int(nbt) == 5
        np.testing.assert_allclose(rm, rrm, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(rv, rrv, rtol=1e-12)

    rms = [(np.zeros(3), np.ones(3)) for _ in counts]
    run_ranks(3, lambda comm: sync_batch_norm(
        xg[sl[comm.rank]], *rms[comm.rank], training=True, momentum=0.9, comm=comm,
        momentum_convention="onnx"))
    _, _, _, rrm, rrv = ref_batch_norm(xg, np.zeros(3), np.ones(3), None, None, True, 0.9,
                                       momentum_convention="onnx")
    for rm, rv in rms:
        np.testing.assert_allclose(rm, rrm, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(rv, rrv, rtol=1e-12)


def test_layer_train_eval_state_dict(rng):
    counts = [5, 0, 2]
    sl = slices(counts)
    xg = rng.standard_normal((7, 4, 3)).astype(F32)
    dyg = rng.standard_normal(xg.shape).astype(F32)
    layers = [SyncBatchNorm(4, comm=None) for _ in counts]

    def rank_fn(comm):
        layer = layers[comm.rank]
        layer.comm = comm
        y = layer(xg[sl[comm.rank]])
        dx = layer.backward(dyg[sl[comm.rank]])
        return y, dx

    res = run_ranks(3, rank_fn)
    ry, _, _, rrm, rrv = ref_batch_norm(xg, np.zeros(4), np.ones(4), None, None, True)
    rdx, rdw, rdb = ref_backward(dyg, xg, np.ones(4), 1e-5, 1)
    for r, (y, dx) in enumerate(res):
        assert within_ulp(y, ry[sl[r]], F32) and within_ulp(dx, rdx[sl[r]], F32)
        assert within_ulp(layers[r].weight_grad, rdw, F32)
        assert within_ulp(layers[r].bias_grad, rdb, F32)
        assert within_ulp(layers[r].running_mean, rrm, F32)
        assert within_ulp(layers[r].running_var, rrv, F32)
    sd = layers[0].state_dict()
    assert sorted(sd) == ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    assert int(sd["num_batches_tracked"]) == 1
    for k, v in layers[1].state_dict().items():
        assert v.tobytes() == sd[k].tobytes(), k

    fresh = SyncBatchNorm(4).eval()
    fresh.load_state_dict(sd)
    x = xg[:3]
    y = fresh(x)  # eval: running statistics, no communicator needed
    assert np.array_equal(y, rn.batch_norm(x, sd["running_mean"], sd["running_var"],
                                           sd["weight"], sd["bias"]))
    dx = fresh.backward(np.ones_like(x))
    np.testing.assert_allclose(dx, np.broadcast_to(
        (1 / np.sqrt(sd["running_var"].astype(F64) + 1e-5))[:, None], x.shape), rtol=1e-6)
    with pytest.raises(KeyError, match="unexpected"):
        fresh.load_state_dict({**sd, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict({**sd, "weight": np.ones(5)})
    old = {k: v for k, v in sd.items() if k != "num_batches_tracked"}
    fresh.load_state_dict(old)  # checkpoints from before num_batches_tracked existed


def test_layer_without_running_stats_eval_uses_local_batch(rng):
    layer = SyncBatchNorm(3, track_running_stats=False, comm=object()).eval()
    x = rng.standard_normal((5, 3))
    np.testing.assert_allclose(layer(x), rn.batch_norm(x), rtol=1e-14, atol=1e-14)
    assert layer.state_dict().keys() == {"weight", "bias"}


def test_convert_sync_batchnorm():
    class BatchNorm2d:  # the shape of rsnorm.nn.BatchNorm2d that conversion relies on
        def __init__(self, c):
            self.num_features, self.eps, self.momentum, self.affine = c, 1e-3, 0.2, True
            self.weight, self.bias = np.full(c, 2.0, F32), np.zeros(c, F32)
            self.running_mean, self.running_var = np.zeros(c, F32), np.ones(c, F32)
            self.num_batches_tracked = np.zeros((), np.int64)
            self.training = False

    bn = BatchNorm2d(3)
    comm = object()
    model = [bn, ("relu", [BatchNorm2d(2)])]
    conv = convert_sync_batchnorm(model, comm)
    s = conv[0]
    assert isinstance(s, SyncBatchNorm) and s.comm is comm and not s.training
    assert s.weight is bn.weight and s.running_var is bn.running_var
    assert (s.eps, s.momentum, s.num_features) == (1e-3, 0.2, 3)
    assert isinstance(conv[1][1][0], SyncBatchNorm) and conv[1][0] == "relu"
    assert convert_sync_batchnorm(s) is s  # already synchronized
    assert SyncBatchNorm.convert_sync_batchnorm(bn).weight is bn.weight


# ---------------------------------------------------------------------------------------------
# Real MPI: mpiexec from the mpich wheel, in subprocesses
# ---------------------------------------------------------------------------------------------

def _mpiexec():
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'rsnorm[distributed]': mpi4py mpich)")
    # The mpich wheel installs mpiexec beside the interpreter's scripts, which may not be on PATH.
    exe = shutil.which("mpiexec") or shutil.which("mpiexec", path=sysconfig.get_path("scripts"))
    if exe is None:
        pytest.skip("mpiexec is not installed (pip install mpich provides it)")
    return exe


def _run_mpi(n, *args, timeout=180):
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    cmd = [_mpiexec(), "-n", str(n), sys.executable, *map(str, args)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}"
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_mpiexec_sync_batch_norm(n):
    out = _run_mpi(n, ROOT / "tests" / "mpi" / "check_sync_batch_norm.py")
    assert f"ALL OK on {n} ranks" in out, out


def test_mpiexec_train_step_example():
    out = _run_mpi(2, ROOT / "examples" / "mpi_train_step.py", "--steps", "3", "--check")
    assert "matches a single process on the whole batch" in out, out
    assert "parameters identical on all ranks" in out, out
