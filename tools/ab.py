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
    "in (16,64,128,128)": ((16, 64, 128, 128), lambda m, x, y: m.instance_norm(x, out=y)),
    "lrn (32,96,55,55)": ((32, 96, 55, 55),
                          lambda m, x, y: m.local_response_norm(x, 5, out=y)),
    "frn (32,64,56,56)": ((32, 64, 56, 56), lambda m, x, y: m.filter_response_norm(
        x, np.ones(64, np.float32), np.zeros(64, np.float32), np.full(64, -1, np.float32),
        out=y)),
    "mvn (32,64,56,56)": ((32, 64, 56, 56), lambda m, x, y: m.mean_variance_norm(x, out=y)),
}


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
        fo(), fn()
        number = max(3, int(0.02 / (timeit.timeit(fo, number=3) / 3)))
        to, tn = [], []
        for i in range(a.rounds):
            # Alternate which build goes first: the second one finds part of x in the L3
            # (measured up to 30 % apparent gain for identical builds without this).
            for f, ts in ((fo, to), (fn, tn)) if i % 2 == 0 else ((fn, tn), (fo, to)):
                ts.append(timeit.timeit(f, number=number) / number)
        mo, mn = float(np.median(to)), float(np.median(tn))
        print(f"{name:24s} old {mo * 1e6:9.1f} us  new {mn * 1e6:9.1f} us  new/old {mn / mo:5.2f}",
              flush=True)


if __name__ == "__main__":
    main()
