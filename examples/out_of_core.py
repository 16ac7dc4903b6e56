"""Standardize an on-disk array larger than the memory given to it, with bounded peak memory.

    python examples/out_of_core.py --size-mb 1024 --budget-mb 64

The example writes a (rows, features) float32 ``.npy`` file of ``--size-mb`` (features with
different means and scales), then z-scores every feature with ``rsnorm.dask.standardize``: one
streaming pass computes the per-feature moments (chunk-wise ``rsnorm.moments`` merged exactly by a
Dask reduction), a second pass normalizes each chunk with the rsnorm kernel and writes it to an
output ``.npy``. Chunks are sized from ``--budget-mb`` and the number of threads, so the peak
resident memory stays near the budget whatever the file size. The file is read and written with
plain file I/O rather than a memory map, because the pages of a mapped file count as resident
memory of the process. The peak resident memory of the normalization (above the baseline before
it started) is measured and printed; ``--verify`` reads the output back and checks that every
feature has mean 0 and variance 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import rsnorm.dask as rd


class NpyFile:
    """A C-ordered ``.npy`` file as a read/write array-like that touches only the rows asked
    for (``dask.array.from_array`` reads through ``__getitem__``, ``dask.array.store`` writes
    through ``__setitem__``)."""

    def __init__(self, path, shape=None, dtype=None):
        self.path = Path(path)
        if shape is not None:  # create: header, then the file extended to its full size
            with open(self.path, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.dtype(dtype).str, "fortran_order": False,
                        "shape": tuple(shape)})
                self.offset = f.tell()
                f.truncate(self.offset + int(np.prod(shape)) * np.dtype(dtype).itemsize)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            assert not fortran, "Fortran-ordered .npy files are not supported here"
            self.offset = f.tell()
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def _rows(self, key):
        key = key if isinstance(key, tuple) else (key,)
        rows = key[0] if key else slice(None)
        start, stop, step = rows.indices(self.shape[0])
        assert step == 1, "row slices only"
        return start, stop, key[1:]

    def __getitem__(self, key):
        start, stop, rest = self._rows(key)
        n = max(stop - start, 0)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            block = np.fromfile(f, self.dtype, n * self.row_bytes // self.dtype.itemsize)
        return block.reshape((n,) + self.shape[1:])[(slice(None),) + rest]

    def __setitem__(self, key, value):
        start, _, rest = self._rows(key)
        assert all(r == slice(None) or r == slice(0, s, None) for r, s in
                   zip(rest, self.shape[1:])), "whole rows only"
        data = np.ascontiguousarray(value, self.dtype)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, memoryview(data).cast("B"), self.offset + start * self.row_bytes)
        finally:
            os.close(fd)


def write_input(path, rows, features, block_rows, seed=0):
    """The input file, written block by block (never whole in memory)."""
    rng = np.random.default_rng(seed)
    loc = rng.uniform(-1e3, 1e3, features)
    scale = rng.uniform(0.1, 10, features)
    out = NpyFile(path, (rows, features), np.float32)
    for start in range(0, rows, block_rows):
        n = min(block_rows, rows - start)
        out[start:start + n] = (loc + scale * rng.standard_normal((n, features))).astype(
            np.float32)
    return out


class PeakRSS:
    """Peak resident memory of this process during a ``with`` block, in bytes above the
    resident memory at its start. Linux: resets the kernel's high-water mark (``VmHWM``) through
    ``/proc/self/clear_refs``; elsewhere, samples every millisecond from a thread."""

    def __enter__(self):
        self.sampled = 0
        self.baseline = self._rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kernel = True
        except OSError:
            self.kernel = False
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.sampled = max(self.sampled, self._rss())
            time.sleep(0.001)

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def _rss(self):
        try:
            return self._status("VmRSS")
        except OSError:
            import psutil

            return psutil.Process().memory_info().rss

    def __exit__(self, *exc):
        if self.kernel:
            self.peak = self._status("VmHWM")
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.sampled, self._rss())
        self.delta = max(self.peak - self.baseline, 0)
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=512, help="size of the input array (MiB)")
    ap.add_argument("--budget-mb", type=float, default=64, help="memory for the chunks (MiB)")
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to write the files (default: a tmp dir)")
    ap.add_argument("--verify", action="store_true", help="check the output's moments")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = ap.parse_args(argv)

    mib = 1 << 20
    features = args.features
    rows = max(int(args.size_mb * mib) // (4 * features), 2)
    # Each thread holds about one input chunk, its float32 output and small temporaries:
    # budget / (4 × threads) per chunk leaves room for Dask's own bookkeeping.
    chunk_rows = max(int(args.budget_mb * mib) // (4 * args.threads * 4 * features), 1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = write_input(Path(tmp) / "x.npy", rows, features, chunk_rows)
        dst = NpyFile(Path(tmp) / "y.npy", src.shape, np.float32)
        x = da.from_array(src, chunks=(chunk_rows, features), asarray=False)

        t0 = time.perf_counter()
        with dask.config.set(scheduler="threads", num_workers=args.threads), PeakRSS() as mem:
            # compute_stats=True: the statistics pass streams over x first; y then reads x
            # again, chunk by chunk, instead of keeping it in memory between the two passes.
            y = rd.standardize(x, axis=-1, compute_stats=True)
            da.store(y, dst, lock=False)
        seconds = time.perf_counter() - t0

        result = {
            "size_mb": rows * features * 4 / mib,
            "budget_mb": args.budget_mb,
            "chunk_mb": chunk_rows * features * 4 / mib,
            "peak_rss_delta_mb": mem.delta / mib,
            "baseline_rss_mb": mem.baseline / mib,
            "seconds": seconds,
            "gb_per_s": 2 * rows * features * 4 / seconds / 1e9,  # read twice
        }
        if args.verify:
            check = da.from_array(dst, chunks=(chunk_rows, features), asarray=False)
            m = rd.moments(check, axis=-1)
            mean, m2 = dask.compute(m.mean, m.m2, scheduler="threads", num_workers=args.threads)
            result["max_abs_mean"] = float(np.abs(mean).max())
            result["max_abs_var_minus_1"] = float(np.abs(m2 / m.count - 1).max())
            result["verified"] = bool(result["max_abs_mean"] < 1e-5
                                      and result["max_abs_var_minus_1"] < 1e-5)

    if args.json:
        print(json.dumps(result))
    else:
        print(f"standardized {result['size_mb']:.0f} MiB ({rows} x {features} float32) in "
              f"{seconds:.2f} s ({result['gb_per_s']:.2f} GB/s read), chunks of "
              f"{result['chunk_mb']:.1f} MiB")
        print(f"peak resident memory: {result['peak_rss_delta_mb']:.1f} MiB above the "
              f"{result['baseline_rss_mb']:.0f} MiB baseline (budget {args.budget_mb:.0f} MiB)")
        if args.verify:
            print(f"output: max |mean| {result['max_abs_mean']:.2e}, max |var - 1| "
                  f"{result['max_abs_var_minus_1']:.2e}")
    return 0 if result.get("verified", True) else 1


if __name__ == "__main__":
    sys.exit(main())
