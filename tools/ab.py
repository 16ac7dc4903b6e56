"""Compare two builds of the extension in one process, interleaved (A/B timing).

On a shared 2-vCPU VM absolute times move by ±20 % between runs, so comparing two separate
`rsnorm bench` runs hides changes of that size. This loads a saved copy of the old extension
next to the current one and times both on the same arrays, alternating, and prints the median
ratio per workload:

    cp python/rsnorm/_rsnorm.abi3.so /tmp/old.so       # before the change
    bash tools/build_inplace.sh                         # after the change
    python tools/ab.py /tmp/old.so [--threads 2] [--only ln,bn]

Both copies have their own thread pool and output pool; only rsnorm's compiled kernels differ.
Check the harness first: the old build against itself should give ratios within a few %.
The two pools compete for the 2 vCPUs: for small parallel calls (~1 MiB, a few tasks) a
build's result depends on whether the other's workers are still spinning — a chunking change
measured 0.69× here and 1.3–1.9× in separate processes. Compare those with `--threads 1`, or
one build per process.
"""

from __future__ import annotations

import argparse
import functools
import importlib.machinery
import importlib.util
import timeit

import numpy as np
import rsnorm as rn

# name -> (shape, call(module, x, y))
WORKLOADS = {
    "bn (32,64,56,56)": ((32, 64, 56, 56),
                         lambda m, x, y: m.batch_norm(x, None, None, training=True, out=y)),
    "bn nhwc (32,56,56,64)": ((32, 56, 56, 64), lambda m, x, y: m.batch_norm(
        x, None, None, training=True, axis=-1, out=y)),
    "bn (256,1024)": ((256, 1024),
                      lambda m, x, y: m.batch_norm(x, None, None, training=True, out=y)),
    "bn (8,256,14,14)": ((8, 256, 14, 14),
                         lambda m, x, y: m.batch_norm(x, None, None, training=True, out=y)),
    "ln (8192,1024)": ((8192, 1024), lambda m, x, y: m.layer_norm(x, (1024,), out=y)),
    "ln (64,512,768)": ((64, 512, 768), lambda m, x, y: m.layer_norm(x, (768,), out=y)),
    "rms (8192,1024)": ((8192, 1024), lambda m, x, y: m.rms_norm(x, (1024,), out=y)),
    "gn (16,256,32,32)": ((16, 256, 32, 32), lambda m, x, y: m.group_norm(x, 32, out=y)),
    "gn (8,512,64,64)": ((8, 512, 64, 64), lambda m, x, y: m.group_norm(x, 32, out=y)),
    "in (16,64,128,128)": ((16, 64, 128, 128), lambda m, x, y: m.instance_norm(x, out=y)),
    "lrn (32,96,55,55)": ((32, 96, 55, 55),
                          lambda m, x, y: m.local_response_norm(x, 5, out=y)),
    "frn (32,64,56,56)": ((32, 64, 56, 56), lambda m, x, y: m.filter_response_norm(
        x, np.ones(64, np.float32), np.zeros(64, np.float32), np.full(64, -1, np.float32),
        out=y)),
    "mvn (32,64,56,56)": ((32, 64, 56, 56), lambda m, x, y: m.mean_variance_norm(x, out=y)),
    "bn eval (256,1024)": ((256, 1024), lambda m, x, y: m.batch_norm(
        x, _ones(1024, 0.0), _ones(1024), training=False, out=y)),
    "bn eval (8,256,14,14)": ((8, 256, 14, 14), lambda m, x, y: m.batch_norm(
        x, _ones(256, 0.0), _ones(256), training=False, out=y)),
    "bn eval nhwc (32,56,56,64)": ((32, 56, 56, 64), lambda m, x, y: m.batch_norm(
        x, _ones(64, 0.0), _ones(64), training=False, axis=-1, out=y)),
    # Backward: statistics from the forward (as a training step has them); x is reused as dy.
    "bwd bn (32,64,56,56)": ((32, 64, 56, 56), lambda m, x, y: m.batch_norm_backward(
        x, x, None, None, _ones(64), _ones(64), True,
        stats=_stats(m, "bn", x, lambda: m.batch_norm(x, None, None, _ones(64), _ones(64),
                                                      True, return_stats=True)))),
    "bwd ln (8192,1024)": ((8192, 1024), lambda m, x, y: m.layer_norm_backward(
        x, x, (1024,), _ones(1024), _ones(1024), 1e-5,
        _stats(m, "ln", x, lambda: m.layer_norm(x, (1024,), _ones(1024), _ones(1024), 1e-5,
                                                return_stats=True)))),
    "bwd rms (8192,1024)": ((8192, 1024), lambda m, x, y: m.rms_norm_backward(
        x, x, (1024,), _ones(1024), None,
        _stats(m, "rms", x, lambda: m.rms_norm(x, (1024,), _ones(1024), return_stats=True)))),
    # Strided layouts (read in place, bitwise the contiguous result; slower kernels).
    "fortran bn (4096,256)": ((4096, 256), lambda m, x, y: m.batch_norm(
        _fortran(x), None, None, training=True)),
    "fortran ln (4096,256)": ((4096, 256), lambda m, x, y: m.layer_norm(_fortran(x), (256,))),
    "fortran in (8,64,32,32)": ((8, 64, 32, 32), lambda m, x, y: m.instance_norm(_fortran(x))),
    "fortran bwd bn (4096,256)": ((4096, 256), lambda m, x, y: m.batch_norm_backward(
        _fortran(x), _fortran(x), None, None, None, None, True)),
    "fortran bwd ln (4096,256)": ((4096, 256), lambda m, x, y: m.layer_norm_backward(
        _fortran(x), _fortran(x), (256,), np.ones(256), np.zeros(256))),
    "bwd gn (16,256,32,32)": ((16, 256, 32, 32), lambda m, x, y: m.group_norm_backward(
        x, x, 32, _ones(256), _ones(256), 1e-5,
        _stats(m, "gn", x, lambda: m.group_norm(x, 32, _ones(256), _ones(256), 1e-5,
                                                return_stats=True)))),
}


@functools.cache
def _ones(n: int, value: float = 1.0) -> np.ndarray:
    return np.full(n, value, np.float32)


_STATS: dict = {}
_FORTRAN: dict = {}


def _fortran(x: np.ndarray) -> np.ndarray:
    """A Fortran-order copy of x, made once per input (the entry keeps x alive, so its id
    cannot be reused by another array)."""
    hit = _FORTRAN.get(id(x))
    if hit is None or hit[0] is not x:
        hit = _FORTRAN[id(x)] = (x, np.asfortranarray(x))
    return hit[1]


def _stats(m, key: str, x: np.ndarray, forward):
    """The forward's statistics, computed once per build and input."""
    k = (id(m), key, id(x))
    hit = _STATS.get(k)
    if hit is None or hit[0] is not x:  # the entry keeps x alive: its id is not reused
        hit = _STATS[k] = (x, forward()[1])
    return hit[1]


def _first(r) -> np.ndarray:
    """The output array of a call (a backward returns gradients, x's first)."""
    return np.asarray(r.x if hasattr(r, "x") else r[0] if isinstance(r, tuple) else r)


def load_old(path: str):
    # The module's init symbol is PyInit__rsnorm: any package name ending in `._rsnorm` works.
    loader = importlib.machinery.ExtensionFileLoader("rsnorm_ab_old._rsnorm", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="path of the saved old extension (.so)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated substrings of workload names")
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    old, new = load_old(a.old), rn._rsnorm
    for m in (old, new):
        m.set_num_threads(a.threads)
    keys = [s.strip() for s in a.only.split(",") if s.strip()]
    rng = np.random.default_rng(0)
    for name, (shape, call) in WORKLOADS.items():
        if keys and not any(k in name for k in keys):
            continue
        x = rng.standard_normal(shape, dtype=np.float32)
        y = np.empty_like(x)
        fo = functools.partial(call, old, x, y)
        fn = functools.partial(call, new, x, y)
        ro, rn_ = _first(fo()).copy(), _first(fn())
        same = "bitwise" if np.array_equal(ro, rn_, equal_nan=True) else (
            f"DIFFER max {np.nanmax(np.abs(ro.astype(np.float64) - rn_)):.3g}")
        number = max(3, int(0.02 / (timeit.timeit(fo, number=3) / 3)))
        to, tn = [], []
        for i in range(a.rounds):
            # Alternate which build goes first: the second one finds part of x in the L3
            # (measured up to 30 % apparent gain for identical builds without this).
            for f, ts in ((fo, to), (fn, tn)) if i % 2 == 0 else ((fn, tn), (fo, to)):
                ts.append(timeit.timeit(f, number=number) / number)
        mo, mn = float(np.median(to)), float(np.median(tn))
        print(f"{name:24s} old {mo * 1e6:9.1f} us  new {mn * 1e6:9.1f} us  new/old {mn / mo:5.2f}  {same}",
              flush=True)


if __name__ == "__main__":
    main()
