"""Checks of rsnorm.distributed under ``mpiexec -n K`` (K = 2, 3, ...), run by test_distributed.py.

Every rank builds the same global batch from a fixed seed, keeps its slice (uneven slices, some
empty), and compares the synchronized forward/backward with plain float64 NumPy formulas on the
whole batch, and with single-process ``rsnorm.batch_norm``. Any failure aborts the whole job
(``Abort``) so that no rank is left waiting in a collective; rank 0 prints ``ALL OK`` at the end.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
import rsnorm as rn
from mpi4py import MPI
from rsnorm.distributed import (
    SyncBatchNorm,
    convert_sync_batchnorm,
    sync_batch_norm,
    sync_batch_norm_backward,
)

WORLD = MPI.COMM_WORLD
F32, F64 = np.float32, np.float64


# ---------------------------------------------------------------------------------------------
# float64 references on the whole batch, written the plain way
# ---------------------------------------------------------------------------------------------

def ref_forward(x, rm, rv, w, b, momentum, eps, ax):
    x = x.astype(F64)
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = -1
    n = x.size // x.shape[ax]
    mean = x.mean(axis=red)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=red)
    rstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean.reshape(shape)) * rstd.reshape(shape) * w.reshape(shape) + b.reshape(shape)
    new_rm = (1 - momentum) * rm.astype(F64) + momentum * mean
    new_rv = (1 - momentum) * rv.astype(F64) + momentum * var * n / (n - 1)
    return y, mean, rstd, new_rm, new_rv


def ref_backward(dy, x, w, eps, ax):
    x = x.astype(F64)
    dy = dy.astype(F64)
    red = tuple(i for i in range(x.ndim) if i != ax)
    shape = [1] * x.ndim
    shape[ax] = -1
    mean = x.mean(axis=red)
    var = ((x - mean.reshape(shape)) ** 2).mean(axis=red)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * rstd.reshape(shape)
    dx = (w * rstd).reshape(shape) * (
        dy - dy.mean(axis=red, keepdims=True) - xhat * (dy * xhat).mean(axis=red, keepdims=True)
    )
    return dx, (dy * xhat).sum(axis=red), dy.sum(axis=red)


# ---------------------------------------------------------------------------------------------
# comparison helpers
# ---------------------------------------------------------------------------------------------

def close(got, ref, dtype, what):
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), (what, got.dtype, dtype)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    if np.dtype(dtype) == F64:
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12, err_msg=what)
    else:
        # Within 2 ulp (of the float32 rounding of the reference) of the float64 reference.
        spacing = np.spacing(np.abs(ref.astype(dtype))).astype(F64)
        err = np.abs(got.astype(F64) - ref) / spacing
        assert err.max(initial=0) <= 2, f"{what}: {err.max()} ulp"


def same_on_all_ranks(comm, a, what):
    a = np.ascontiguousarray(a)
    blobs = comm.allgather((a.dtype.str, a.shape, a.tobytes()))
    assert all(b == blobs[0] for b in blobs), f"{what} differs between ranks"


def my_slice(comm, counts):
    r = comm.Get_rank()
    start = sum(counts[:r])
    return slice(start, start + counts[r])


class NoComm:
    """A communicator that must not be used (eval mode needs no exchange)."""

    def allgather(self, obj):
        raise AssertionError("eval mode communicated")


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------

def check_forward_backward(comm, counts, dtype, ax, seed, inner=(4, 3)):
    """Training forward + backward on a batch split as ``counts`` over the ranks of ``comm``."""
    c = 5
    rng = np.random.default_rng(seed)
    n = sum(counts)
    gshape = (n, c) + inner if ax == 1 else (n,) + inner + (c,)
    # Data with an offset so that a naive E[x²]−E[x]² variance would visibly lose digits.
    xg = (3.0 + 2.0 * rng.standard_normal(gshape)).astype(dtype)
    dyg = rng.standard_normal(gshape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    rm0 = rng.standard_normal(c).astype(dtype)
    rv0 = rng.uniform(0.5, 2.0, c).astype(dtype)
    eps, momentum = 1e-5, 0.1
    sl = my_slice(comm, counts)
    x = np.ascontiguousarray(xg[sl])
    dy = np.ascontiguousarray(dyg[sl])
    axis = 1 if ax == 1 else -1
    tag = f"{np.dtype(dtype).name} counts={counts} axis={axis}"

    rm, rv = rm0.copy(), rv0.copy()
    nbt = np.zeros((), np.int64)
    y, st = sync_batch_norm(x, rm, rv, w, b, True, momentum, eps, comm=comm, axis=axis,
                            return_stats=True, num_batches_tracked=nbt)
    ax_n = ax % xg.ndim
    ry, rmean, rrstd, rrm, rrv = ref_forward(xg, rm0, rv0, w, b, momentum, eps, ax_n)
    close(y, ry[sl], dtype, f"y {tag}")
    np.testing.assert_allclose(st.mean, rmean, rtol=1e-13, atol=1e-13, err_msg=f"mean {tag}")
    np.testing.assert_allclose(st.rstd, rrstd, rtol=1e-13, err_msg=f"rstd {tag}")
    close(rm, rrm, dtype, f"running_mean {tag}")
    close(rv, rrv, dtype, f"running_var {tag}")
    assert int(nbt) == 1, nbt
    for a, what in ((st.mean, "mean"), (st.rstd, "rstd"), (rm, "running_mean"),
                    (rv, "running_var")):
        same_on_all_ranks(comm, a, f"{what} {tag}")

    # The same as single-process rsnorm on the concatenated batch.
    srm, srv = rm0.copy(), rv0.copy()
    sy = rn.batch_norm(xg, srm, srv, w, b, True, momentum, eps, axis=axis)
    if dtype == F64:
        np.testing.assert_allclose(y, sy[sl], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rm, srm, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(rv, srv, rtol=1e-12)
    else:
        np.testing.assert_allclose(y, sy[sl], rtol=3e-7, atol=3e-7)
        np.testing.assert_allclose(rm, srm, rtol=2.5e-7, atol=1e-7)
        np.testing.assert_allclose(rv, srv, rtol=2.5e-7)

    g = sync_batch_norm_backward(dy, x, w, b, stats=st, comm=comm, axis=axis)
    rdx, rdw, rdb = ref_backward(dyg, xg, w.astype(F64), eps, ax_n)
    close(g.x, rdx[sl], dtype, f"dx {tag}")
    close(g.weight, rdw, dtype, f"dweight {tag}")
    close(g.bias, rdb, dtype, f"dbias {tag}")
    same_on_all_ranks(comm, g.weight, f"dweight {tag}")
    same_on_all_ranks(comm, g.bias, f"dbias {tag}")

    # Without stats=, the statistics are recomputed (one more exchange) to the same result.
    g2 = sync_batch_norm_backward(dy, x, w, b, comm=comm, axis=axis, eps=eps)
    assert np.array_equal(g2.x, g.x) and np.array_equal(g2.weight, g.weight)

    # param_grads="local": this rank's share; the shares sum to the global gradient.
    gl = sync_batch_norm_backward(dy, x, w, b, stats=st, comm=comm, axis=axis,
                                  param_grads="local")
    assert np.array_equal(gl.x, g.x)
    parts = comm.allgather(gl.weight.astype(F64))
    np.testing.assert_allclose(sum(parts), rdw, rtol=1e-5 if dtype == F32 else 1e-12,
                               atol=1e-5 if dtype == F32 else 1e-12)


def check_cumulative_momentum(comm, counts):
    c = 3
    rng = np.random.default_rng(7)
    rm, rv = np.zeros(c), np.ones(c)
    nbt = np.array(2, dtype=np.int64)
    ref_rm, ref_rv = rm.copy(), rv.copy()
    for step in range(2):
        xg = rng.standard_normal((sum(counts), c, 3))
        sync_batch_norm(xg[my_slice(comm, counts)], rm, rv, training=True, momentum=None,
                        comm=comm, num_batches_tracked=nbt)
        n = xg.shape[0] * 3
        mean = xg.mean(axis=(0, 2))
        var = xg.var(axis=(0, 2)) * n / (n - 1)
        f = 1.0 / (2 + step + 1)
        ref_rm = (1 - f) * ref_rm + f * mean
        ref_rv = (1 - f) * ref_rv + f * var
    assert int(nbt) == 4, nbt
    np.testing.assert_allclose(rm, ref_rm, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rv, ref_rv, rtol=1e-12)
    same_on_all_ranks(comm, rm, "cumulative running_mean")


def check_eval_no_comm(comm):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 5)).astype(F32)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    w, b = rng.standard_normal(4), rng.standard_normal(4)
    y = sync_batch_norm(x, rm, rv, w, b, False, comm=NoComm())
    assert np.array_equal(y, rn.batch_norm(x, rm, rv, w, b, False))


def check_errors(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    # One value per channel over all ranks: the ValueError of batch_norm, on every rank.
    rm, rv = np.zeros(2), np.ones(2)
    x = np.ones((1 if rank == size - 1 else 0, 2))
    try:
        sync_batch_norm(x, rm, rv, training=True, comm=comm)
    except ValueError as e:
        assert "Expected more than 1 value per channel when training" in str(e), e
    else:
        raise AssertionError("one value per channel did not raise")
    assert np.array_equal(rm, np.zeros(2)) and np.array_equal(rv, np.ones(2)), "stats touched"

    # A wrong dtype on one rank only: that rank's TypeError, an error naming it everywhere else,
    # and nobody hangs.
    x = np.ones((3, 2), dtype=np.int32 if rank == 1 else F64)
    try:
        sync_batch_norm(x, training=True, comm=comm)
    except TypeError as e:
        assert rank == 1, e
    except ValueError as e:
        assert rank != 1 and "rank(s) 1" in str(e), e
    else:
        raise AssertionError("a wrong dtype on rank 1 did not raise everywhere")

    # A weight of the wrong shape on the last rank only.
    w = np.ones(3 if rank == size - 1 else 2)
    try:
        sync_batch_norm(np.ones((3, 2)), weight=w, training=True, comm=comm)
    except ValueError as e:
        assert ("weight" in str(e)) if rank == size - 1 else (f"rank(s) {size - 1}" in str(e)), e
    else:
        raise AssertionError("a wrong weight shape did not raise everywhere")
    comm.Barrier()  # still in step


def check_sub_communicator(world):
    rank = world.Get_rank()
    sub = world.Split(color=rank % 2, key=rank)
    try:
        k = sub.Get_size()
        # Each group has its own batch (seeded by its color); group 0 has an empty last rank.
        counts = [3 + i for i in range(k)]
        if k > 1 and rank % 2 == 0:
            counts[-1] = 0
        check_forward_backward(sub, counts, F64, 1, seed=100 + rank % 2)
    finally:
        sub.Free()


def check_layer(comm, counts):
    c = 4
    rng = np.random.default_rng(5)
    xg = rng.standard_normal((sum(counts), c, 3, 2)).astype(F32)
    dyg = rng.standard_normal(xg.shape).astype(F32)
    sl = my_slice(comm, counts)
    layer = SyncBatchNorm(c, comm=comm)
    layer.weight[:] = rng.uniform(0.5, 1.5, c)
    layer.bias[:] = rng.standard_normal(c)
    w, b = layer.weight.copy(), layer.bias.copy()
    y = layer(xg[sl])
    ry, _, _, rrm, rrv = ref_forward(xg, np.zeros(c), np.ones(c), w, b, 0.1, 1e-5, 1)
    close(y, ry[sl], F32, "layer y")
    close(layer.running_mean, rrm, F32, "layer running_mean")
    close(layer.running_var, rrv, F32, "layer running_var")
    dx = layer.backward(dyg[sl])
    rdx, rdw, rdb = ref_backward(dyg, xg, w.astype(F64), 1e-5, 1)
    close(dx, rdx[sl], F32, "layer dx")
    close(layer.grads()[0], rdw, F32, "layer dweight")
    close(layer.grads()[1], rdb, F32, "layer dbias")
    # Gradients accumulate until zero_grad(), as in PyTorch.
    layer(xg[sl])
    layer.backward(dyg[sl])
    np.testing.assert_allclose(layer.weight_grad, 2 * rdw, rtol=1e-6, atol=1e-6)
    layer.zero_grad()
    assert not layer.weight_grad.any()
    # Eval: running statistics, no exchange.
    layer.eval()
    layer.comm = NoComm()
    ye = layer(xg[sl])
    assert np.array_equal(ye, rn.batch_norm(xg[sl], layer.running_mean, layer.running_var,
                                            layer.weight, layer.bias, False))
    sd = layer.state_dict()
    assert sorted(sd) == ["bias", "num_batches_tracked", "running_mean", "running_var",
                          "weight"], sorted(sd)
    assert int(sd["num_batches_tracked"]) == 2
    for k in ("running_mean", "running_var", "weight", "bias"):
        same_on_all_ranks(comm, sd[k], f"layer {k}")

    # convert_sync_batchnorm on a layer that looks like rsnorm.nn.BatchNorm2d.
    class BatchNorm2d:
        def __init__(self, c):
            self.num_features, self.eps, self.momentum, self.affine = c, 1e-5, 0.1, True
            self.weight, self.bias = np.ones(c, F32), np.zeros(c, F32)
            self.running_mean, self.running_var = np.zeros(c, F32), np.ones(c, F32)
            self.num_batches_tracked = np.zeros((), np.int64)
            self.training = True

    model = [BatchNorm2d(c), "relu"]
    conv = convert_sync_batchnorm(model, comm)
    assert isinstance(conv[0], SyncBatchNorm) and conv[1] == "relu"
    assert conv[0].weight is model[0].weight and conv[0].running_mean is model[0].running_mean
    conv[0](xg[sl])
    close(model[0].running_mean, rrm, F32, "converted running_mean")


def main():
    rank, size = WORLD.Get_rank(), WORLD.Get_size()
    # Uneven splits, each with an empty rank, for the world size this job runs with.
    splits = {
        1: [[6]],
        2: [[5, 3], [0, 6], [7, 0]],
        3: [[2, 0, 5], [3, 3, 1], [0, 4, 0]],
    }.get(size, [[(i % 3) for i in range(size)]])
    for i, counts in enumerate(splits):
        for dtype in (F64, F32):
            check_forward_backward(WORLD, counts, dtype, 1, seed=10 * i + (dtype == F32))
        check_forward_backward(WORLD, counts, F64, -1, seed=50 + i)
    check_cumulative_momentum(WORLD, splits[-1])
    check_eval_no_comm(WORLD)
    if size > 1:
        check_errors(WORLD)
    check_sub_communicator(WORLD)
    check_layer(WORLD, splits[0])
    WORLD.Barrier()
    if rank == 0:
        print(f"ALL OK on {size} ranks", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BaseException:  # noqa: BLE001 - any failure must abort every rank
        sys.stderr.write(f"rank {WORLD.Get_rank()} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        WORLD.Abort(1)
