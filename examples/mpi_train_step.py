"""Data-parallel training steps with synchronized batch norm over MPI.

Run with::

    mpiexec -n 2 python examples/mpi_train_step.py            # add --check to compare with 1 process

A small network ``Linear → SyncBatchNorm → ReLU → Linear`` with a mean-squared-error loss is
trained on a batch split unevenly over the ranks. The batch-norm statistics are those of the whole
batch (``rsnorm.distributed.SyncBatchNorm``); the gradients of the linear layers are summed over
the ranks in rank order (so every rank applies bitwise the same update), and the batch-norm
parameter gradients already are global. With ``--check``, rank 0 also trains the same network on
the concatenated batch in one process and verifies that the parameters agree.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from mpi4py import MPI
from rsnorm.distributed import SyncBatchNorm


class Net:
    def __init__(self, d_in, d_hidden, d_out, comm, seed=0):
        rng = np.random.default_rng(seed)
        self.w1 = rng.standard_normal((d_in, d_hidden)) / np.sqrt(d_in)
        self.b1 = np.zeros(d_hidden)
        self.bn = SyncBatchNorm(d_hidden, comm=comm, dtype=np.float64)
        self.w2 = rng.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)
        self.b2 = np.zeros(d_out)
        self.comm = comm

    def params(self):
        return [self.w1, self.b1, self.w2, self.b2] + self.bn.parameters()

    def step(self, x, target, n_global, lr):
        """Forward, backward and SGD update; returns the global loss."""
        h = x @ self.w1 + self.b1
        z = self.bn(h)
        a = np.maximum(z, 0)
        out = a @ self.w2 + self.b2
        diff = out - target
        # Loss of the whole batch: Σ over all ranks of the local squared errors / (2·N).
        local_loss = 0.5 * float((diff * diff).sum()) / n_global
        dout = diff / n_global
        dw2 = a.T @ dout
        db2 = dout.sum(axis=0)
        dz = (dout @ self.w2.T) * (z > 0)
        self.bn.zero_grad()
        dh = self.bn.backward(dz)
        dw1 = x.T @ dh
        db1 = dh.sum(axis=0)
        # Sum the local gradients of the linear layers in rank order (deterministic everywhere).
        parts = self.comm.allgather((local_loss, dw1, db1, dw2, db2))
        loss = sum(p[0] for p in parts)
        grads = [sum(p[i] for p in parts) for i in range(1, 5)] + self.bn.grads()
        for p, g in zip(self.params(), grads):
            p -= lr * g
        return loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=48, help="global batch size")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--check", action="store_true", help="compare with one process (rank 0)")
    args = ap.parse_args(argv)

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    d_in, d_hidden, d_out = 8, 16, 2
    rng = np.random.default_rng(1234)  # the same data on every rank; each keeps its slice
    xs = [rng.standard_normal((args.batch, d_in)) for _ in range(args.steps)]
    ts = [np.stack([np.sin(x[:, 0] + x[:, 1]), x[:, 2] * x[:, 3]], axis=1) for x in xs]

    # Uneven slices: rank r holds a share proportional to r + 1.
    weights = np.arange(1, size + 1)
    counts = (args.batch * weights // weights.sum()).tolist()
    counts[-1] += args.batch - sum(counts)
    lo = sum(counts[:rank])
    mine = slice(lo, lo + counts[rank])

    net = Net(d_in, d_hidden, d_out, comm)
    for step, (x, t) in enumerate(zip(xs, ts)):
        loss = net.step(x[mine], t[mine], args.batch, args.lr)
        if rank == 0:
            print(f"step {step}: loss {loss:.6f} (batch {counts} over {size} ranks)", flush=True)

    if args.check:
        ok = True
        if rank == 0:
            ref = Net(d_in, d_hidden, d_out, MPI.COMM_SELF)
            for x, t in zip(xs, ts):
                ref.step(x, t, args.batch, args.lr)
            for mine_p, ref_p in zip(net.params() + [net.bn.running_mean, net.bn.running_var],
                                     ref.params() + [ref.bn.running_mean, ref.bn.running_var]):
                ok &= bool(np.allclose(mine_p, ref_p, rtol=1e-12, atol=1e-12))
            print("matches a single process on the whole batch" if ok else "MISMATCH", flush=True)
        # Every rank must hold bitwise the same parameters.
        blobs = comm.allgather(b"".join(p.tobytes() for p in net.params()))
        same = all(b == blobs[0] for b in blobs)
        if rank == 0:
            print("parameters identical on all ranks" if same else "RANKS DIVERGED", flush=True)
        ok = comm.bcast(ok and same, root=0)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
