"""GPU benchmark: ``rsnorm bench --backend gpu [options]`` or ``python benches/gpu_bench.py``.

For each op and size it reports, side by side in one process on one device:

* ``kernel ms``: GPU time of the op's compute passes from timestamp queries (sum of the passes'
  begin/end stamps, median over repeats); ``-`` when the adapter has no ``timestamp-query``;
* ``wall ms``: wall time around the calls with device-resident data plus the wait for the queue
  (``on_submitted_work_done``): it includes Python encoding, so it is an upper bound;
* ``numpy ms``: the NumPy round trip (upload, compute, one readback), reported separately;
* ``GB/s``: minimal bytes (read x (and dy), write y (or dx), parameters) / kernel time (wall
  time when there are no timestamps), and the same as a percentage of a same-run copy kernel
  (``y = x`` through rsnorm's own elementwise pass, timed the same way) and of the card's
  nominal HBM bandwidth. Batch
  norm training really moves 3N (x twice, y once); the minimal figure counts 2N;
* with PyTorch and CUDA: the same op in torch on the same GPU in the same run (CUDA events,
  ``no_grad``, median of the same repeats), its GB/s, and rsnorm's time / torch's time.
  Backward ops are timed alone on both sides: rsnorm gets the forward's ``stats``, torch runs
  ``autograd.grad`` on a kept graph.

Outputs are checked against the float64 references of ``rsnorm._reference`` on a slice before any
timing. Numbers from a CPU adapter (lavapipe) are a smoke test, not performance: the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import numpy as np

NOMINAL_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}

OPS = ["bn", "bn_eval", "ln", "rms", "gn", "in", "frn", "lrn", "gdn",
       "ln_bwd", "rms_bwd", "gn_bwd", "bn_bwd"]
DEFAULT_OPS = ["bn", "ln", "rms", "gn", "ln_bwd", "bn_bwd"]


class Timing:
    """Timestamp query slots handed to each compute pass while active."""

    def __init__(self, ctx, capacity: int = 4096):
        import wgpu

        self.ctx = ctx
        self.capacity = capacity
        self.qs = ctx.device.create_query_set(type=wgpu.QueryType.timestamp, count=capacity)
        self.n = 0

    def next_writes(self):
        if self.n + 2 > self.capacity:
            return None
        i = self.n
        self.n += 2
        return {"query_set": self.qs, "beginning_of_pass_write_index": i,
                "end_of_pass_write_index": i + 1}

    def read_ns(self) -> float:
        """Sum of (end - begin) over the passes recorded since the last read, in ns."""
        import wgpu

        n = self.n
        if n == 0:
            return 0.0
        dev = self.ctx.device
        buf = dev.create_buffer(size=8 * n,
                                usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
        enc = dev.create_command_encoder()
        enc.resolve_query_set(self.qs, 0, n, buf, 0)
        dev.queue.submit([enc.finish()])
        raw = dev.queue.read_buffer(buf)
        buf.destroy()
        t = np.frombuffer(raw, dtype=np.uint64, count=n).astype(np.float64)
        self.n = 0
        return float((t[1::2] - t[0::2]).sum())


_TS_NORMALIZED = [False]


def _enable_timestamp_normalization() -> bool:
    # wgpu-native returns raw ticks unless the instance normalizes them to nanoseconds; this must
    # happen before the instance exists (first adapter request).
    try:
        from wgpu.backends.wgpu_native.extras import set_instance_extras

        set_instance_extras(flags=["AutomaticTimestampNormalization"])
        _TS_NORMALIZED[0] = True
        return True
    except Exception:  # noqa: BLE001 - older wgpu-py or instance already created
        return False


def _shapes(op: str, elems: int, layout: str):
    """(x shape, op kwargs) with about ``elems`` elements."""
    if op in ("ln", "rms", "ln_bwd", "rms_bwd"):
        F = 4096 if elems >= 4096 * 4 else 256
        return (max(elems // F, 1), F), {}
    if op == "gdn":
        C, HW = 64, 1024
    else:
        C, HW = 64, 4096 if elems >= 64 * 4096 * 2 else 64
    N = max(elems // (C * HW), 1)
    side = math.isqrt(HW)
    if layout == "nhwc" and op not in ("lrn", "gdn"):
        return (N, side, side, C), {"axis": -1}
    return (N, C, side, side), {}


def _gpu_call(gpu, op, x, dy, p, kw):
    C = p["C"]
    if op == "bn":
        return gpu.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], training=True, **kw)
    if op == "bn_eval":
        return gpu.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], training=False, **kw)
    if op == "ln":
        return gpu.layer_norm(x, x.shape[-1], p["w"], p["b"])
    if op == "rms":
        return gpu.rms_norm(x, x.shape[-1], p["w"])
    if op == "gn":
        return gpu.group_norm(x, min(32, C), p["w"], p["b"], **kw)
    if op == "in":
        return gpu.instance_norm(x, weight=p["w"], bias=p["b"], **kw)
    if op == "frn":
        return gpu.filter_response_norm(x, p["w"], p["b"], p["tau"], **kw)
    if op == "lrn":
        return gpu.local_response_norm(x, 5, 1e-4, 0.75, 2.0)
    if op == "gdn":
        return gpu.gdn(x, p["beta"], p["gamma"])
    st = p.get("stats")  # the forward's statistics, as a training step would pass them
    if op == "ln_bwd":
        return gpu.layer_norm_backward(dy, x, x.shape[-1], p["w"], p["b"], stats=st)
    if op == "rms_bwd":
        return gpu.rms_norm_backward(dy, x, x.shape[-1], p["w"], stats=st)
    if op == "gn_bwd":
        return gpu.group_norm_backward(dy, x, min(32, C), p["w"], p["b"], stats=st, **kw)
    if op == "bn_bwd":
        return gpu.batch_norm_backward(dy, x, None, None, p["w"], p["b"], training=True,
                                       stats=st, **kw)
    raise ValueError(op)


def _forward_stats(gpu, op, x, p, kw):
    fwd = {"ln_bwd": "ln", "rms_bwd": "rms", "gn_bwd": "gn", "bn_bwd": "bn"}[op]
    q = dict(p, rm=None, rv=None)
    if fwd == "bn":
        return gpu.batch_norm(x, None, None, q["w"], q["b"], training=True, return_stats=True,
                              **kw)[1]
    if fwd == "ln":
        return gpu.layer_norm(x, x.shape[-1], q["w"], q["b"], return_stats=True)[1]
    if fwd == "rms":
        return gpu.rms_norm(x, x.shape[-1], q["w"], return_stats=True)[1]
    return gpu.group_norm(x, min(32, p["C"]), q["w"], q["b"], return_stats=True, **kw)[1]


def _reference(op, x, dy, p, kw):
    """float64 reference for the forward ops (None for backward: covered by the test suite)."""
    from .. import _reference as R

    axis = kw.get("axis", 1)
    C = p["C"]
    if op == "bn":
        return R.batch_norm(x, None, None, p["w"], p["b"], True, axis=axis)[0]
    if op == "bn_eval":
        return R.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], False, axis=axis)[0]
    if op == "ln":
        return R.layer_norm(x, x.shape[-1], p["w"], p["b"])
    if op == "rms":
        return R.rms_norm(x, x.shape[-1], p["w"])
    if op == "gn":
        return R.group_norm(x, min(32, C), p["w"], p["b"], axis=axis)
    if op == "in":
        return R.instance_norm(x, None, None, p["w"], p["b"], axis=axis)[0]
    if op == "frn":
        return R.filter_response_norm(x, p["w"], p["b"], p["tau"], axis=axis)
    if op == "lrn":
        return R.local_response_norm(x, 5, 1e-4, 0.75, 2.0)
    if op == "gdn":
        return R.gdn(x, p["beta"], p["gamma"])
    return None


def _bytes(op, x_nbytes, C):
    params = 4 * C * 4
    if op.endswith("_bwd"):
        return 3 * x_nbytes + params  # read x and dy, write dx
    return 2 * x_nbytes + params


def _params(rng, C):
    return {
        "C": C,
        "w": rng.standard_normal(C).astype(np.float32),
        "b": rng.standard_normal(C).astype(np.float32),
        "tau": np.full(C, -0.5, np.float32),
        "rm": np.zeros(C, np.float32),
        "rv": np.ones(C, np.float32),
        "beta": np.ones(C, np.float32),
        "gamma": np.full((C, C), 0.01, np.float32),
    }


class _Waiter:
    """Waits for the queue to drain: a 4-byte readback completes only after all earlier work
    (``queue.on_submitted_work_done`` is unreliable across wgpu-py versions)."""

    def __init__(self, ctx):
        import wgpu

        self.ctx = ctx
        self.buf = ctx.device.create_buffer(size=4, usage=wgpu.BufferUsage.COPY_SRC)

    def __call__(self):
        self.ctx.device.queue.read_buffer(self.buf)


def _copy_time(ctx, xd, repeats, wait, timing):
    """Median seconds of a compute-shader copy y = x of the same array (the apply kernel in
    identity mode), timed exactly like the ops: the same-run bandwidth reference."""
    from ._engine import Data, apply_pass, map_channels

    data = Data(ctx, xd, False)
    y = data.like()
    times = []
    for _ in range(repeats + 1):
        if timing is not None:
            timing.n = 0
            _device_mod()._timing = timing
        t0 = time.perf_counter()
        enc = _device_mod().Encoder(ctx)
        apply_pass(enc, data, y, map_channels(1, 1), None, 2)
        enc.submit()
        wait()
        t = time.perf_counter() - t0
        _device_mod()._timing = None
        times.append(timing.read_ns() * 1e-9 if timing is not None else t)
    return statistics.median(times[1:])


def _device_mod():
    from . import _device

    return _device


def _torch_bench(op, x, dy, p, kw, repeats, dev="cuda"):
    """(median ms of the same op in torch, median ms of a same-size copy) on CUDA, or None.
    ``dev="cpu"`` exists for the smoke test of this code path on machines without CUDA."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    cuda = dev == "cuda"
    if cuda and not torch.cuda.is_available():
        return None
    if cuda:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    axis = kw.get("axis", 1)
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    if axis == -1:
        # Channels-last: the same memory order as rsnorm's NHWC input.
        xt = xt.permute(0, 3, 1, 2)
    t = {k: torch.from_numpy(v).to(dev) for k, v in p.items() if isinstance(v, np.ndarray)}
    # Affine parameters in x's dtype (torch's layer/group norm want them to match); batch norm
    # keeps float32 parameters and running statistics, as cuDNN takes them for half input.
    if op not in ("bn", "bn_eval", "bn_bwd"):
        t = {k: v.to(xt.dtype) for k, v in t.items()}
    C = p["C"]
    grad = op.endswith("_bwd")
    if grad:
        xt = xt.detach().requires_grad_(True)
        w = t["w"].detach().requires_grad_(True)
        b = t["b"].detach().requires_grad_(True)
        dyt = torch.from_numpy(np.ascontiguousarray(dy)).to(dev)
        if axis == -1:
            dyt = dyt.permute(0, 3, 1, 2)

    def fwd():
        if op in ("bn", "bn_bwd"):
            return F.batch_norm(xt, t["rm"].clone(), t["rv"].clone(), t["w"] if not grad else w,
                                t["b"] if not grad else b, training=True)
        if op == "bn_eval":
            return F.batch_norm(xt, t["rm"], t["rv"], t["w"], t["b"], training=False)
        if op in ("ln", "ln_bwd"):
            return F.layer_norm(xt, (xt.shape[-1],), t["w"] if not grad else w,
                                t["b"] if not grad else b)
        if op in ("rms", "rms_bwd"):
            if not hasattr(F, "rms_norm"):
                return None
            return F.rms_norm(xt, (xt.shape[-1],), t["w"] if not grad else w)
        if op in ("gn", "gn_bwd"):
            return F.group_norm(xt, min(32, C), t["w"] if not grad else w,
                                t["b"] if not grad else b)
        if op == "in":
            return F.instance_norm(xt, weight=t["w"], bias=t["b"])
        if op == "lrn":
            return F.local_response_norm(xt, 5, 1e-4, 0.75, 2.0)
        if op == "gdn":
            s = F.conv2d(xt * xt, t["gamma"].reshape(C, C, 1, 1), t["beta"])
            return xt * torch.rsqrt(s)
        return None

    yg = fwd() if grad else None  # backward is timed alone, from a kept graph

    def call():
        if grad:
            if yg is None:
                return None
            ins = (xt, w, b) if op != "rms_bwd" else (xt, w)
            return torch.autograd.grad(yg, ins, dyt, retain_graph=True)
        with torch.no_grad():
            return fwd()

    if call() is None:
        return None

    def timed(fn):
        out = []
        for _ in range(repeats):
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                out.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(out)

    if cuda:
        torch.cuda.synchronize()
    op_ms = timed(call)
    with torch.no_grad():
        y = torch.empty_like(xt)
        copy_ms = timed(lambda: y.copy_(xt))
    return op_ms, copy_ms


def run(ops, sizes_mib, dtype="float32", layout="nchw", repeats=10, warmup=2, torch=True,
        check=True, out=print, red_wgs=None, variants=None):
    """Benchmark ``ops`` at each size; returns a list of result dicts (also printed).

    ``red_wgs``: also time each op with the reduction workgroup size forced to each of these
    (rows ``op@wg``; PyTorch is timed once per op): a sweep to learn how the statistics
    kernels' speed depends on occupancy and tree depth on a given card. ``variants``: more
    ``(label, overrides)`` pairs timed the same way, e.g. ``("keep_x", {"keep_x": 1})``."""
    from rsnorm import gpu

    from . import _device, asarray, info

    ts_norm = _enable_timestamp_normalization() or _TS_NORMALIZED[0]
    ctx = _device.context()
    wait = _Waiter(ctx)
    inf = info()
    fallback = inf["fallback"]
    nominal = next((v for k, v in NOMINAL_GBPS.items() if k in inf["adapter"]), None)
    timing = Timing(ctx) if ctx.has_timestamp and ts_norm else None
    out(f"device: {inf['adapter']} ({inf['backend']}, {inf['adapter_type']}); "
        f"shader-f16={inf['shader_f16']}; timestamps={'yes' if timing else 'no'}")
    if fallback:
        out("NOTE: a CPU/fallback adapter: these numbers are a smoke test, not GPU performance.")
    rng = np.random.default_rng(0)
    results = []
    for size in sizes_mib:
        isz = np.dtype(dtype).itemsize
        elems = int(size * 2**20 // isz)
        runs = [(None, {}), *((str(w), {"red_wg": w}) for w in red_wgs or []),
                *(variants or [])]
        for op, (label, over) in [(o, v) for o in ops for v in runs]:
            with _device._limits(**over):
                row = _run_one(gpu, asarray, ctx, wait, timing, inf, nominal, fallback, rng,
                               op, elems, dtype, layout, repeats, warmup,
                               torch and label is None, check)
            row["variant"] = label
            row["red_wg"] = over.get("red_wg")
            results.append(row)
    _print_table(results, out)
    return results


def _run_one(gpu, asarray, ctx, wait, timing, inf, nominal, fallback, rng, op, elems, dtype,
             layout, repeats, warmup, torch, check):
    from . import _device

    shape, kw = _shapes(op, elems, layout)
    x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype) if op.endswith(
        "_bwd") else None
    C = shape[-1] if kw.get("axis") == -1 else shape[1]
    if op in ("ln", "rms", "ln_bwd", "rms_bwd"):
        C = shape[-1]
    p = _params(rng, C)
    err = None
    if check:
        xs = x[:2] if x.shape[0] > 2 else x
        want = _reference(op, xs, None, p, kw)
        if want is not None:
            got = _gpu_call(gpu, op, xs, None, p, kw)
            tol = 2e-3 if dtype == "float16" else 1e-4
            err = float(np.max(np.abs(got - want) / (tol + tol * np.abs(want))))
            if not err <= 1.0:
                raise AssertionError(f"{op}: GPU result differs from the reference "
                                     f"({err:.3g} x tolerance)")
    xd = asarray(x)
    dyd = asarray(dy) if dy is not None else None
    pd = {k: (asarray(v) if isinstance(v, np.ndarray) and v.dtype == np.float32 else v)
          for k, v in p.items()}
    if op.endswith("_bwd"):
        pd["stats"] = _forward_stats(gpu, op, xd, pd, kw)
    for _ in range(warmup):
        _gpu_call(gpu, op, xd, dyd, pd, kw)
    wait()
    walls, kernels = [], []
    for _ in range(repeats):
        if timing is not None:
            timing.n = 0
            _device._timing = timing
        t0 = time.perf_counter()
        _gpu_call(gpu, op, xd, dyd, pd, kw)
        wait()
        walls.append(time.perf_counter() - t0)
        _device._timing = None
        if timing is not None:
            kernels.append(timing.read_ns() * 1e-9)
    rt = []
    for _ in range(max(1, min(repeats, 3))):
        t0 = time.perf_counter()
        _gpu_call(gpu, op, x, dy, p, kw)
        rt.append(time.perf_counter() - t0)
    nbytes = x.nbytes
    moved = _bytes(op, nbytes, C)
    wall = statistics.median(walls)
    kern = statistics.median(kernels) if kernels else None
    tbest = kern if kern else wall
    copy = _copy_time(ctx, xd, repeats, wait, timing)
    gbps = moved / tbest / 1e9
    row = {
        "op": op, "shape": list(shape), "dtype": dtype, "layout": layout,
        "kernel_ms": kern * 1e3 if kern else None, "wall_ms": wall * 1e3,
        "wall_spread_ms": (max(walls) - min(walls)) * 1e3,
        "numpy_roundtrip_ms": statistics.median(rt) * 1e3,
        "bytes_min": moved, "gbps": gbps,
        "copy_gbps": 2 * nbytes / copy / 1e9,
        "pct_of_copy": 100.0 * gbps / (2 * nbytes / copy / 1e9),
        "pct_of_nominal": 100.0 * gbps / nominal if nominal else None,
        "max_err_over_tol": err, "device": inf["adapter"], "fallback": fallback,
    }
    if torch and not fallback:
        try:
            tb = _torch_bench(op, x, dy, p, kw, repeats)
        except Exception as exc:  # noqa: BLE001 - a torch limitation must not stop the run
            tb = None
            row["torch_error"] = f"{type(exc).__name__}: {exc}"[:200]
        if tb is not None:
            tms, tcopy = tb
            row["torch_ms"] = tms
            row["torch_gbps"] = moved / (tms * 1e-3) / 1e9
            row["torch_copy_gbps"] = 2 * nbytes / (tcopy * 1e-3) / 1e9
            row["ratio_vs_torch"] = (tbest * 1e3) / tms
    return row


def _fmt(v, f="{:.3f}"):
    return "-" if v is None else f.format(v)


def _print_table(rows, out):
    hdr = (f"{'op':<10} {'shape':<22} {'dtype':<8} {'kernel ms':>10} {'wall ms':>9} "
           f"{'numpy ms':>9} {'GB/s':>8} {'%copy':>6} {'%HBM':>6} {'torch ms':>9} {'x torch':>8}")
    out(hdr)
    for r in rows:
        name = f"{r['op']}@{r['variant']}" if r.get("variant") else r["op"]
        out(f"{name:<10} {'x'.join(map(str, r['shape'])):<22} {r['dtype']:<8} "
            f"{_fmt(r['kernel_ms']):>10} {_fmt(r['wall_ms']):>9} "
            f"{_fmt(r['numpy_roundtrip_ms']):>9} {_fmt(r['gbps'], '{:.1f}'):>8} "
            f"{_fmt(r['pct_of_copy'], '{:.0f}'):>6} {_fmt(r['pct_of_nominal'], '{:.0f}'):>6} "
            f"{_fmt(r.get('torch_ms')):>9} {_fmt(r.get('ratio_vs_torch'), '{:.2f}'):>8}")


def main(argv=None) -> int:
    """Entry point of ``rsnorm bench --backend gpu``; returns the exit status."""
    ap = argparse.ArgumentParser(prog="rsnorm bench --backend gpu",
                                 description="Time rsnorm.gpu kernels (and torch CUDA if present).")
    ap.add_argument("--ops", default=",".join(DEFAULT_OPS),
                    help=f"comma-separated, from {','.join(OPS)} or 'all'")
    ap.add_argument("--size-mib", default="256", help="comma-separated input sizes in MiB")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    ap.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--red-wg", default="",
                    help="comma-separated reduction workgroup sizes (32, 64, 128, 256) to time "
                         "each op with as well (rows op@wg), e.g. 64,128")
    ap.add_argument("--keep-x", action="store_true",
                    help="also time each op with the fused kernel keeping x in registers for "
                         "the apply (rows op@keep_x)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes and 2 repeats (a functional check, e.g. on lavapipe)")
    args = ap.parse_args(argv)
    ops = OPS if args.ops == "all" else [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"unknown ops {bad}; choose from {OPS}")
    sizes = [float(s) for s in args.size_mib.split(",")]
    red_wgs = [int(v) for v in args.red_wg.split(",") if v.strip()]
    if any(v not in (32, 64, 128, 256) for v in red_wgs):
        ap.error(f"--red-wg takes 32, 64, 128 or 256, got {red_wgs}")
    repeats, warmup = args.repeats, args.warmup
    if args.smoke:
        sizes, repeats, warmup = [0.25], 2, 1
    # Before anything creates the wgpu instance.
    _enable_timestamp_normalization()
    try:
        from . import is_available

        if not is_available():
            print("rsnorm bench --backend gpu: no GPU adapter found", file=sys.stderr)
            return 2
        rows = run(ops, sizes, args.dtype, args.layout, repeats, warmup,
                   torch=not args.no_torch, check=not args.no_check, red_wgs=red_wgs,
                   variants=[("keep_x", {"keep_x": 1})] if args.keep_x else None)
    except AssertionError as exc:
        print(f"rsnorm bench --backend gpu: {exc}", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
