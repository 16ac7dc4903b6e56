"""Benchmark (not a test): overhead of sync_batch_norm over local batch_norm.

    RAYON_NUM_THREADS=1 mpiexec -n 2 python tests/mpi/bench_sync_batch_norm.py [--shape 32 64 56 56]

``--shape`` is the global batch, split evenly over the ranks. Every rank times, on its own slice,
local ``rsnorm.batch_norm(training=True)`` and ``sync_batch_norm`` (training, global statistics),
forward and forward+backward, interleaved, and rank 0 prints the medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import rsnorm as rn
from mpi4py import MPI
from rsnorm.distributed import sync_batch_norm, sync_batch_norm_backward


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs="+", default=[32, 64, 56, 56])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    shape = list(args.shape)
    n = shape[0] // size + (rank < shape[0] % size)
    rng = np.random.default_rng(rank)
    x = rng.standard_normal([n] + shape[1:]).astype(args.dtype)
    dy = rng.standard_normal(x.shape).astype(args.dtype)
    c = shape[1]
    w, b = np.ones(c, args.dtype), np.zeros(c, args.dtype)

    def local_fwd():
        return rn.batch_norm(x, np.zeros(c), np.ones(c), w, b, True, return_stats=True)

    def sync_fwd():
        return sync_batch_norm(x, np.zeros(c), np.ones(c), w, b, True, comm=comm,
                               return_stats=True)

    def local_fwd_bwd():
        # Local backward written the same way as the synchronized one, without the exchange.
        _y, st = local_fwd()
        return sync_batch_norm_backward(dy, x, w, b, stats=(st.mean.astype(np.float64),
                                                           st.rstd.astype(np.float64)),
                                        comm=_Self())

    def sync_fwd_bwd():
        _y, st = sync_fwd()
        return sync_batch_norm_backward(dy, x, w, b, stats=st, comm=comm)

    cases = {"local fwd": local_fwd, "sync fwd": sync_fwd, "local fwd+bwd": local_fwd_bwd,
             "sync fwd+bwd": sync_fwd_bwd}
    times = {k: [] for k in cases}
    for _ in range(args.repeat):
        for k, f in cases.items():
            comm.Barrier()
            t = time.perf_counter()
            f()
            dt = time.perf_counter() - t
            times[k].append(max(comm.allgather(dt)))  # the slowest rank sets the pace
    if rank == 0:
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"global batch {tuple(shape)} {args.dtype} over {size} ranks, per-rank slice "
              f"{x.shape}, RAYON threads {rn.get_num_threads()}")
        for k, v in med.items():
            print(f"  {k:14s} {v:8.2f} ms")
        print(f"  sync overhead: forward {med['sync fwd'] / med['local fwd'] - 1:+.1%}, "
              f"forward+backward {med['sync fwd+bwd'] / med['local fwd+bwd'] - 1:+.1%}")


class _Self:
    def Get_rank(self):
        return 0

    def allgather(self, obj):
        return [obj]


if __name__ == "__main__":
    main()
