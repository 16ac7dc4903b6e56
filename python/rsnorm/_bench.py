"""The benchmark engine behind ``rsnorm bench`` (and ``benches/bench_ops.py``).

Every workload of the fixed table (issue "CPU performance", SPEC §8) is timed in this one process
for rsnorm (fresh output and ``out=``), naive NumPy (the plain formulas), PyTorch CPU
(``torch.nn.functional`` under ``inference_mode``) and onnxruntime (a one-node ONNX model), the
latter two only when importable. Before timing, each implementation's output is compared with
rsnorm's, so a peer computing something else shows up as a large difference, not as a speed-up.

The memory-bound ceiling is a copy of the same bytes into a preallocated array, measured in the
same run: ``np.copyto`` on one thread and split over ``--threads`` threads (NumPy releases the
GIL for the copy), whichever is faster. GB/s counts the input read once plus the output written
once (a backward also reads dy). A ratio is ``peer time / rsnorm time`` (medians): above 1 means
rsnorm is faster. Minor page faults per call show what fresh outputs cost; the share of the CPUs
used by other processes during the run is reported, since it makes thread-pool peers erratic.

Workloads whose rsnorm function does not exist yet are listed as skipped, so the table grows
with the library. Hidden knobs for tests: ``--min-time``, ``--min-samples``, ``--max-elements``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["WORKLOADS", "Workload", "main", "run"]

PEERS = ("numpy", "torch", "onnxruntime")
# torch before onnxruntime: each peer's idle threads spin for a while after a call (libgomp,
# onnxruntime's pool), and a spinning thread on one of two vCPUs stalls the next peer's workers.
# So torch is followed by a pause, and each onnxruntime session is destroyed after its timing.
IMPL_ORDER = ("rsnorm", "rsnorm_out", "numpy", "torch", "onnxruntime")
EPS = 1e-5
RMS_EPS = 1e-6
MOMENTUM = 0.1


@dataclass(frozen=True)
class Workload:
    op: str  # rsnorm function name (also what --ops selects)
    shape: tuple[int, ...]
    dtype: str = "float32"
    variant: str = ""  # "train"/"eval" for batch norm, "+tlu" for FRN, ...
    layout: str = ""  # "NCHW", "NHWC" (channel axis -1), or "" for row-wise ops
    quick: bool = False  # part of --quick
    params: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def axis(self) -> int:
        return -1 if self.layout == "NHWC" else 1

    @property
    def backward(self) -> bool:
        return "backward" in self.variant

    @property
    def function(self) -> str:
        """The rsnorm function this workload times."""
        return f"{self.op}_backward" if self.backward else self.op

    @property
    def traffic_arrays(self) -> int:
        """Arrays of x's size moved per call: forward reads x, writes y; backward also reads dy."""
        return 3 if self.backward else 2

    def name(self, shape: tuple[int, ...] | None = None) -> str:
        shape = self.shape if shape is None else shape
        parts = [self.op]
        if self.variant:
            parts.append(self.variant)
        if self.layout:
            parts.append(self.layout)
        dt = {"float32": "f32", "float64": "f64", "float16": "f16"}[self.dtype]
        return f"{' '.join(parts)} ({','.join(map(str, shape))}) {dt}"


def _wl(op, shape, dtype="float32", variant="", layout="", quick=False, **params):
    return Workload(op, tuple(shape), dtype, variant, layout, quick, params)


# The table of issue 8. Shapes are logical (N, C, ...) for NCHW and (N, ..., C) for NHWC.
WORKLOADS: list[Workload] = [
    _wl("batch_norm", (32, 64, 56, 56), variant="train", layout="NCHW", quick=True),
    _wl("batch_norm", (32, 56, 56, 64), variant="train", layout="NHWC", quick=True),
    _wl("batch_norm", (32, 64, 56, 56), variant="eval", layout="NCHW"),
    _wl("batch_norm", (32, 56, 56, 64), variant="eval", layout="NHWC", quick=True),
    _wl("batch_norm", (256, 1024), variant="train", quick=True),
    _wl("batch_norm", (256, 1024), variant="eval"),
    _wl("batch_norm", (8, 256, 14, 14), variant="train", layout="NCHW"),
    _wl("batch_norm", (8, 256, 14, 14), variant="eval", layout="NCHW"),
    _wl("batch_norm", (32, 64, 56, 56), "float64", variant="train", layout="NCHW"),
    _wl("layer_norm", (8192, 1024), quick=True),
    _wl("layer_norm", (64, 512, 768)),
    _wl("layer_norm", (4096, 4096)),
    _wl("layer_norm", (8192, 1024), "float64", quick=True),
    _wl("rms_norm", (8192, 1024), quick=True),
    _wl("rms_norm", (64, 512, 768)),
    _wl("rms_norm", (4096, 4096)),
    _wl("group_norm", (16, 256, 32, 32), layout="NCHW", quick=True, groups=32),
    _wl("group_norm", (8, 512, 64, 64), layout="NCHW", groups=32),
    _wl("instance_norm", (16, 64, 128, 128), layout="NCHW"),
    _wl("instance_norm", (32, 64, 56, 56), layout="NCHW", quick=True),
    _wl("local_response_norm", (32, 96, 55, 55), layout="NCHW", quick=True, size=5),
    _wl("local_response_norm", (128, 96, 55, 55), layout="NCHW", size=5),
    _wl("filter_response_norm", (32, 64, 56, 56), variant="+tlu", layout="NCHW", quick=True),
    _wl("gdn", (8, 192, 64, 64), layout="NCHW", quick=True),
    _wl("mean_variance_norm", (32, 64, 56, 56), layout="NCHW"),
    _wl("normalize", (32, 64, 56, 56), layout="NCHW"),
    # Backward (issue "Backward"): dx (+ parameter gradients) from dy, x and the saved stats.
    _wl("batch_norm", (32, 64, 56, 56), variant="train backward", layout="NCHW", quick=True),
    _wl("layer_norm", (8192, 1024), variant="backward", quick=True),
    _wl("group_norm", (16, 256, 32, 32), variant="backward", layout="NCHW", groups=32),
    _wl("rms_norm", (8192, 1024), variant="backward"),
    # Per-call overhead (SPEC §8: <= 2 us).
    _wl("layer_norm", (4, 16), variant="tiny", quick=True),
    _wl("batch_norm", (2, 4, 3, 3), variant="tiny train", layout="NCHW", quick=True),
]


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """``fn()`` is timed; ``to_numpy(fn())`` gives the output in x's layout for the check;
    ``context()`` wraps the whole timing loop (torch's inference mode)."""

    fn: Callable[[], Any]
    to_numpy: Callable[[Any], np.ndarray] = np.asarray
    context: Callable[[], Any] = contextlib.nullcontext
    note: str = ""


class Env:
    """What is importable, imported once, with the thread count applied."""

    def __init__(self, threads: int | None, peers: Sequence[str]):
        import rsnorm

        self.rn = rsnorm
        self.skipped_peers: dict[str, str] = {}
        if threads is not None and hasattr(rsnorm, "set_num_threads"):
            rsnorm.set_num_threads(threads)
        if hasattr(rsnorm, "get_num_threads"):
            self.threads = int(rsnorm.get_num_threads())
        else:
            self.threads = threads or os.cpu_count() or 1
        self.torch = None
        if "torch" in peers:
            try:
                import torch

                torch.set_num_threads(self.threads)
                self.torch = torch
            except Exception as exc:  # noqa: BLE001 - ImportError, or a broken wheel
                self.skipped_peers["torch"] = f"not importable ({type(exc).__name__})"
        else:
            self.skipped_peers["torch"] = "not selected"
        self.ort = self.onnx = None
        if "onnxruntime" in peers:
            try:
                import onnx
                import onnxruntime

                self.ort, self.onnx = onnxruntime, onnx
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                self.skipped_peers["onnxruntime"] = (
                    f"onnx + onnxruntime not importable ({type(exc).__name__})")
        else:
            self.skipped_peers["onnxruntime"] = "not selected"
        self.use_numpy = "numpy" in peers

    def versions(self) -> dict[str, str | None]:
        return {
            "rsnorm": getattr(self.rn, "__version__", None),
            "numpy": np.__version__,
            "torch": None if self.torch is None else self.torch.__version__,
            "onnxruntime": None if self.ort is None else self.ort.__version__,
            "python": platform.python_version(),
        }

    # -- onnxruntime ------------------------------------------------------------------------

    def ort_session(self, op_type: str, x: np.ndarray, consts: dict[str, np.ndarray],
                    opset: int, outputs: int = 1, domain: str = "", **attrs):
        """A session for one node ``op_type(X, *consts)``; the constants are initializers."""
        from onnx import TensorProto, helper, numpy_helper

        elem = {np.dtype(np.float32): TensorProto.FLOAT,
                np.dtype(np.float64): TensorProto.DOUBLE,
                np.dtype(np.float16): TensorProto.FLOAT16}[x.dtype]
        out_names = ["Y"] + [f"Y{i}" for i in range(1, outputs)]
        node = helper.make_node(op_type, ["X", *consts], out_names, domain=domain, **attrs)
        graph = helper.make_graph(
            [node], "bench", [helper.make_tensor_value_info("X", elem, list(x.shape))],
            [helper.make_tensor_value_info(n, elem, None) for n in out_names],
            initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()])
        imports = [helper.make_opsetid("", opset)]
        if domain:
            imports.append(helper.make_opsetid(domain, 1))
        model = helper.make_model(graph, opset_imports=imports)
        model.ir_version = min(model.ir_version, 10)
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = self.ort.InferenceSession(model.SerializeToString(), so,
                                         providers=["CPUExecutionProvider"])
        return sess


def _vec(ndim: int, axis: int) -> tuple[int, ...]:
    s = [1] * ndim
    s[axis] = -1
    return tuple(s)


def _torch_layout(env: Env, wl: Workload, x: np.ndarray):
    """x as a torch tensor in NCHW logical order (channels_last memory for NHWC), and back."""
    t = env.torch.from_numpy(x)
    if wl.layout == "NHWC" and x.ndim > 2:
        perm = (0, x.ndim - 1, *range(1, x.ndim - 1))
        back = (0, *range(2, x.ndim), 1)
        return t.permute(*perm), lambda y: y.permute(*back).numpy()
    return t, lambda y: y.numpy()


def _inference(env: Env):
    return env.torch.inference_mode


def _params(rng, c, dtype):
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    return w, b


def build_batch_norm(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
    rn, axis = env.rn, wl.axis
    c = x.shape[axis]
    training = "train" in wl.variant
    w, b = _params(rng, c, x.dtype)
    rm0 = rng.standard_normal(c).astype(x.dtype)
    rv0 = rng.uniform(0.5, 1.5, c).astype(x.dtype)
    impls: dict[str, Impl] = {}
    rm, rv = rm0.copy(), rv0.copy()
    impls["rsnorm"] = Impl(lambda: rn.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS,
                                                 axis=axis))
    rm2, rv2, out = rm0.copy(), rv0.copy(), np.empty_like(x)
    impls["rsnorm_out"] = Impl(lambda: rn.batch_norm(x, rm2, rv2, w, b, training, MOMENTUM, EPS,
                                                     axis=axis, out=out))
    if env.use_numpy:
        red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
        vs = _vec(x.ndim, axis % x.ndim)
        rm3, rv3 = rm0.copy(), rv0.copy()
        n = x.size // c

        def np_bn():
            if training:
                m = x.mean(axis=red, keepdims=True)
                v = x.var(axis=red, keepdims=True)
                rm3[:] = (1 - MOMENTUM) * rm3 + MOMENTUM * m.reshape(-1)
                rv3[:] = (1 - MOMENTUM) * rv3 + MOMENTUM * v.reshape(-1) * (n / (n - 1))
            else:
                m, v = rm3.reshape(vs), rv3.reshape(vs)
            return (x - m) / np.sqrt(v + EPS) * w.reshape(vs) + b.reshape(vs)

        impls["numpy"] = Impl(np_bn)
    if env.torch is not None:
        tch = env.torch
        xt, back = _torch_layout(env, wl, x)
        trm, trv = tch.from_numpy(rm0.copy()), tch.from_numpy(rv0.copy())
        tw, tb = tch.from_numpy(w), tch.from_numpy(b)
        fbn = tch.nn.functional.batch_norm
        impls["torch"] = Impl(lambda: fbn(xt, trm, trv, tw, tb, training, MOMENTUM, EPS), back,
                              _inference(env))
    if env.ort is not None and wl.layout != "NHWC":
        consts = {"scale": w, "B": b, "mean": rm0.copy(), "var": rv0.copy()}
        attrs = {"epsilon": EPS, "momentum": 1 - MOMENTUM}
        if training:
            attrs["training_mode"] = 1
        sess = env.ort_session("BatchNormalization", x, consts, 15,
                               outputs=3 if training else 1, **attrs)
        impls["onnxruntime"] = Impl(lambda: sess.run(["Y"], {"X": x})[0])
    return impls


def _rowwise(op):
    def build(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
        rn = env.rn
        ns = x.shape[-1:]
        w, b = _params(rng, ns, x.dtype)
        out = np.empty_like(x)
        impls: dict[str, Impl] = {}
        if op == "layer_norm":
            impls["rsnorm"] = Impl(lambda: rn.layer_norm(x, ns, w, b, EPS))
            impls["rsnorm_out"] = Impl(lambda: rn.layer_norm(x, ns, w, b, EPS, out=out))
        else:
            impls["rsnorm"] = Impl(lambda: rn.rms_norm(x, ns, w, RMS_EPS))
            impls["rsnorm_out"] = Impl(lambda: rn.rms_norm(x, ns, w, RMS_EPS, out=out))
        if env.use_numpy:
            if op == "layer_norm":
                def np_op():
                    m = x.mean(axis=-1, keepdims=True)
                    v = x.var(axis=-1, keepdims=True)
                    return (x - m) / np.sqrt(v + EPS) * w + b
            else:
                def np_op():
                    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * w
            impls["numpy"] = Impl(np_op)
        if env.torch is not None:
            tch = env.torch
            xt, tw, tb = tch.from_numpy(x), tch.from_numpy(w), tch.from_numpy(b)
            F = tch.nn.functional
            if op == "layer_norm":
                impls["torch"] = Impl(lambda: F.layer_norm(xt, ns, tw, tb, EPS),
                                      lambda y: y.numpy(), _inference(env))
            elif hasattr(F, "rms_norm"):
                impls["torch"] = Impl(lambda: F.rms_norm(xt, ns, tw, RMS_EPS),
                                      lambda y: y.numpy(), _inference(env))
        if env.ort is not None:
            if op == "layer_norm":
                sess = env.ort_session("LayerNormalization", x, {"W": w, "B": b}, 17,
                                       axis=-1, epsilon=EPS)
            else:
                try:
                    sess = env.ort_session("RMSNormalization", x, {"W": w}, 23, axis=-1,
                                           epsilon=RMS_EPS)
                except Exception:  # noqa: BLE001 - any failure: try the fallback
                    # Older onnxruntime: its contrib kernel is the same computation.
                    sess = env.ort_session("SimplifiedLayerNormalization", x, {"W": w}, 17,
                                           axis=-1, epsilon=RMS_EPS)
            impls["onnxruntime"] = Impl(lambda: sess.run(["Y"], {"X": x})[0])
        return impls

    return build


def build_group_norm(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
    rn, g = env.rn, wl.params.get("groups", 32)
    c = x.shape[1]
    w, b = _params(rng, c, x.dtype)
    out = np.empty_like(x)
    impls = {"rsnorm": Impl(lambda: rn.group_norm(x, g, w, b, EPS)),
             "rsnorm_out": Impl(lambda: rn.group_norm(x, g, w, b, EPS, out=out))}
    vs = _vec(x.ndim, 1)
    if env.use_numpy:
        def np_gn():
            r = x.reshape(x.shape[0], g, -1)
            m = r.mean(axis=-1, keepdims=True)
            v = r.var(axis=-1, keepdims=True)
            return ((r - m) / np.sqrt(v + EPS)).reshape(x.shape) * w.reshape(vs) + b.reshape(vs)
        impls["numpy"] = Impl(np_gn)
    if env.torch is not None:
        tch = env.torch
        xt, tw, tb = tch.from_numpy(x), tch.from_numpy(w), tch.from_numpy(b)
        impls["torch"] = Impl(lambda: tch.nn.functional.group_norm(xt, g, tw, tb, EPS),
                              lambda y: y.numpy(), _inference(env))
    if env.ort is not None:
        sess = env.ort_session("GroupNormalization", x, {"scale": w, "bias": b}, 21,
                               num_groups=g, epsilon=EPS)
        impls["onnxruntime"] = Impl(lambda: sess.run(["Y"], {"X": x})[0])
    return impls


def build_instance_norm(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
    rn = env.rn
    c = x.shape[1]
    w, b = _params(rng, c, x.dtype)
    out = np.empty_like(x)
    impls = {"rsnorm": Impl(lambda: rn.instance_norm(x, None, None, w, b, eps=EPS)),
             "rsnorm_out": Impl(lambda: rn.instance_norm(x, None, None, w, b, eps=EPS,
                                                         out=out))}
    vs = _vec(x.ndim, 1)
    if env.use_numpy:
        red = tuple(range(2, x.ndim))

        def np_in():
            m = x.mean(axis=red, keepdims=True)
            v = x.var(axis=red, keepdims=True)
            return (x - m) / np.sqrt(v + EPS) * w.reshape(vs) + b.reshape(vs)
        impls["numpy"] = Impl(np_in)
    if env.torch is not None:
        tch = env.torch
        xt, tw, tb = tch.from_numpy(x), tch.from_numpy(w), tch.from_numpy(b)
        impls["torch"] = Impl(lambda: tch.nn.functional.instance_norm(xt, weight=tw, bias=tb,
                                                                      eps=EPS),
                              lambda y: y.numpy(), _inference(env))
    if env.ort is not None:
        sess = env.ort_session("InstanceNormalization", x, {"scale": w, "B": b}, 6,
                               epsilon=EPS)
        impls["onnxruntime"] = Impl(lambda: sess.run(["Y"], {"X": x})[0])
    return impls


def build_lrn(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
    rn, size = env.rn, wl.params.get("size", 5)
    alpha, beta, k = 1e-4, 0.75, 1.0
    out = np.empty_like(x)
    impls = {"rsnorm": Impl(lambda: rn.local_response_norm(x, size, alpha, beta, k)),
             "rsnorm_out": Impl(lambda: rn.local_response_norm(x, size, alpha, beta, k,
                                                               out=out))}
    if env.use_numpy:
        c = x.shape[1]
        pad = [(0, 0)] * x.ndim
        pad[1] = (size // 2, (size - 1) // 2)

        def np_lrn():
            sq = np.pad(x * x, pad)
            s = sq[:, 0:c].copy()
            for i in range(1, size):
                s += sq[:, i:i + c]
            return x / (k + (alpha / size) * s) ** beta
        impls["numpy"] = Impl(np_lrn)
    if env.torch is not None:
        tch = env.torch
        xt = tch.from_numpy(x)
        impls["torch"] = Impl(
            lambda: tch.nn.functional.local_response_norm(xt, size, alpha, beta, k),
            lambda y: y.numpy(), _inference(env))
    if env.ort is not None and size % 2 == 1:  # ONNX centres even windows differently
        sess = env.ort_session("LRN", x, {}, 13, size=size, alpha=alpha, beta=beta, bias=k)
        impls["onnxruntime"] = Impl(lambda: sess.run(["Y"], {"X": x})[0])
    return impls


def build_frn(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
    rn = env.rn
    c = x.shape[1]
    w, b = _params(rng, c, x.dtype)
    tau = (0.3 * rng.standard_normal(c)).astype(x.dtype)
    eps = 1e-6
    out = np.empty_like(x)
    impls = {"rsnorm": Impl(lambda: rn.filter_response_norm(x, w, b, tau, eps)),
             "rsnorm_out": Impl(lambda: rn.filter_response_norm(x, w, b, tau, eps, out=out))}
    vs = _vec(x.ndim, 1)
    red = tuple(range(2, x.ndim))
    if env.use_numpy:
        def np_frn():
            nu2 = np.mean(x * x, axis=red, keepdims=True)
            y = x / np.sqrt(nu2 + eps) * w.reshape(vs) + b.reshape(vs)
            return np.maximum(y, tau.reshape(vs))
        impls["numpy"] = Impl(np_frn)
    if env.torch is not None:
        # PyTorch has no FRN: this is the usual composed module body.
        tch = env.torch
        xt = tch.from_numpy(x)
        tw, tb, tt = (tch.from_numpy(a.reshape(vs)) for a in (w, b, tau))

        def t_frn():
            nu2 = xt.square().mean(dim=red, keepdim=True)
            return tch.maximum(xt * tch.rsqrt(nu2 + eps) * tw + tb, tt)
        impls["torch"] = Impl(t_frn, lambda y: y.numpy(), _inference(env),
                              note="composed")
    return impls


def build_gdn(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
    rn = env.rn
    c = x.shape[1]
    beta = rng.uniform(0.5, 1.5, c).astype(x.dtype)
    gamma = (0.1 * np.eye(c) + rng.uniform(0, 0.01, (c, c))).astype(x.dtype)
    out = np.empty_like(x)
    impls = {"rsnorm": Impl(lambda: rn.gdn(x, beta, gamma)),
             "rsnorm_out": Impl(lambda: rn.gdn(x, beta, gamma, out=out))}
    if env.use_numpy:
        def np_gdn():
            x2 = (x * x).reshape(x.shape[0], c, -1)
            d = np.matmul(gamma, x2) + beta[:, None]
            return x / np.sqrt(d).reshape(x.shape)
        impls["numpy"] = Impl(np_gdn)
    if env.torch is not None and x.ndim == 4:
        # CompressAI's GDN.forward: a 1x1 convolution of x**2 with gamma.
        tch = env.torch
        xt = tch.from_numpy(x)
        tg = tch.from_numpy(gamma).reshape(c, c, 1, 1)
        tbeta = tch.from_numpy(beta)

        def t_gdn():
            return xt * tch.rsqrt(tch.nn.functional.conv2d(xt * xt, tg, tbeta))
        impls["torch"] = Impl(t_gdn, lambda y: y.numpy(), _inference(env), note="conv2d")
    return impls


def build_mvn(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
    rn = env.rn
    axes = (0, 2, 3)
    eps = 1e-9
    out = np.empty_like(x)
    impls = {"rsnorm": Impl(lambda: rn.mean_variance_norm(x, axes=axes, eps=eps)),
             "rsnorm_out": Impl(lambda: rn.mean_variance_norm(x, axes=axes, eps=eps, out=out))}
    if env.use_numpy:
        def np_mvn():
            m = x.mean(axis=axes, keepdims=True)
            return (x - m) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
        impls["numpy"] = Impl(np_mvn)
    if env.ort is not None:
        sess = env.ort_session("MeanVarianceNormalization", x, {}, 13, axes=list(axes))
        impls["onnxruntime"] = Impl(lambda: sess.run(["Y"], {"X": x})[0])
    return impls


def build_normalize(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
    rn = env.rn
    out = np.empty_like(x)
    impls = {"rsnorm": Impl(lambda: rn.normalize(x, 2.0, 1, 1e-12)),
             "rsnorm_out": Impl(lambda: rn.normalize(x, 2.0, 1, 1e-12, out=out))}
    if env.use_numpy:
        def np_norm():
            return x / np.maximum(np.sqrt(np.sum(x * x, axis=1, keepdims=True)), 1e-12)
        impls["numpy"] = Impl(np_norm)
    if env.torch is not None:
        tch = env.torch
        xt = tch.from_numpy(x)
        impls["torch"] = Impl(lambda: tch.nn.functional.normalize(xt, 2.0, 1, 1e-12),
                              lambda y: y.numpy(), _inference(env))
    if env.ort is not None:
        # ONNX LpNormalization has no eps: the same values for data without zero vectors.
        sess = env.ort_session("LpNormalization", x, {}, 1, axis=1, p=2)
        impls["onnxruntime"] = Impl(lambda: sess.run(["Y"], {"X": x})[0])
    return impls


def _grad_x(g):
    """The input gradient of a backward result (a named tuple with field ``x``)."""
    return np.asarray(g.x if hasattr(g, "x") else g[0])


def build_backward(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
    """Backward of BN (training), LN, GN and RMS norm: rsnorm gets the statistics saved by its
    forward (``return_stats=True``), as a training step would; PyTorch runs autograd on a graph
    built once (``retain_graph``); NumPy uses the textbook formulas."""
    rn, op = env.rn, wl.op
    fn = getattr(rn, wl.function)
    gy = _make_x(rng, x.shape, x.dtype)
    groups = wl.params.get("groups", 32)
    if op in ("layer_norm", "rms_norm"):
        ns = x.shape[-1:]
        c = ns
        red_stats = (x.ndim - 1,)  # statistics over the last axis
        red_param = tuple(range(x.ndim - 1))
        vs = ns
    else:
        c = x.shape[1]
        vs = _vec(x.ndim, 1)
        red_param = tuple(i for i in range(x.ndim) if i != 1)
        red_stats = red_param if op == "batch_norm" else tuple(range(2, x.ndim))
    w, b = _params(rng, c, x.dtype)
    impls: dict[str, Impl] = {}
    if op == "batch_norm":
        _, st = rn.batch_norm(x, None, None, w, b, True, MOMENTUM, EPS, return_stats=True)
        impls["rsnorm"] = Impl(lambda: fn(gy, x, weight=w, bias=b, training=True, eps=EPS,
                                          stats=st), _grad_x)
    elif op == "layer_norm":
        _, st = rn.layer_norm(x, ns, w, b, EPS, return_stats=True)
        impls["rsnorm"] = Impl(lambda: fn(gy, x, ns, weight=w, bias=b, eps=EPS, stats=st),
                               _grad_x)
    elif op == "rms_norm":
        _, st = rn.rms_norm(x, ns, w, RMS_EPS, return_stats=True)
        impls["rsnorm"] = Impl(lambda: fn(gy, x, ns, weight=w, eps=RMS_EPS, stats=st), _grad_x)
    else:
        _, st = rn.group_norm(x, groups, w, b, EPS, return_stats=True)
        impls["rsnorm"] = Impl(lambda: fn(gy, x, groups, weight=w, bias=b, eps=EPS, stats=st),
                               _grad_x)
    if env.use_numpy:
        def np_bwd():
            if op == "group_norm":
                xs = x.reshape(x.shape[0], groups, -1)
                gs = (gy * w.reshape(vs)).reshape(xs.shape)
                red = (2,)
            else:
                xs, gs, red = x, gy * w.reshape(vs), red_stats
            if op == "rms_norm":
                r = 1.0 / np.sqrt(np.mean(xs * xs, axis=red, keepdims=True) + RMS_EPS)
                xhat = xs * r
                dx = r * (gs - xhat * np.mean(gs * xhat, axis=red, keepdims=True))
            else:
                m = xs.mean(axis=red, keepdims=True)
                r = 1.0 / np.sqrt(xs.var(axis=red, keepdims=True) + EPS)
                xhat = (xs - m) * r
                dx = r * (gs - gs.mean(axis=red, keepdims=True)
                          - xhat * np.mean(gs * xhat, axis=red, keepdims=True))
            xhat = xhat.reshape(x.shape)
            dw = (gy * xhat).sum(axis=red_param)
            db = gy.sum(axis=red_param)
            return dx.reshape(x.shape), dw, db
        impls["numpy"] = Impl(np_bwd, lambda g: g[0])
    if env.torch is not None:
        tch = env.torch
        F = tch.nn.functional
        xt = tch.from_numpy(x.copy()).requires_grad_()
        tw = tch.from_numpy(w.copy()).requires_grad_()
        tb = tch.from_numpy(b.copy()).requires_grad_()
        tgy = tch.from_numpy(gy)
        if op == "batch_norm":
            yt = F.batch_norm(xt, None, None, tw, tb, True, MOMENTUM, EPS)
        elif op == "layer_norm":
            yt = F.layer_norm(xt, ns, tw, tb, EPS)
        elif op == "rms_norm":
            yt = F.rms_norm(xt, ns, tw, RMS_EPS) if hasattr(F, "rms_norm") else None
        else:
            yt = F.group_norm(xt, groups, tw, tb, EPS)
        if yt is not None:
            inputs = (xt, tw) if op == "rms_norm" else (xt, tw, tb)
            impls["torch"] = Impl(
                lambda: tch.autograd.grad(yt, inputs, tgy, retain_graph=True),
                lambda g: g[0].numpy(), note="autograd")
    return impls


def build_workload(env: Env, wl: Workload, x: np.ndarray, rng) -> dict[str, Impl]:
    if wl.backward:
        return build_backward(env, wl, x, rng)
    return BUILDERS[wl.op](env, wl, x, rng)


BUILDERS: dict[str, Callable[..., dict[str, Impl]]] = {
    "batch_norm": build_batch_norm,
    "layer_norm": _rowwise("layer_norm"),
    "rms_norm": _rowwise("rms_norm"),
    "group_norm": build_group_norm,
    "instance_norm": build_instance_norm,
    "local_response_norm": build_lrn,
    "filter_response_norm": build_frn,
    "gdn": build_gdn,
    "mean_variance_norm": build_mvn,
    "normalize": build_normalize,
}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_s: float
    min_s: float
    calls: int
    faults_per_call: float | None = None  # minor page faults (fresh output memory), all threads
    samples: tuple[float, ...] = ()  # seconds per call of each sample

    @staticmethod
    def merge(parts: Sequence[Timing]) -> Timing:
        """One timing from the samples of several rounds (median over all of them)."""
        samples = tuple(v for t in parts for v in t.samples)
        calls = sum(t.calls for t in parts)
        faults = [t.faults_per_call * t.calls for t in parts if t.faults_per_call is not None]
        return Timing(float(np.median(samples)), float(np.min(samples)), calls,
                      sum(faults) / calls if len(faults) == len(parts) and calls else None,
                      samples)


def _minflt() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn: Callable[[], Any], context=contextlib.nullcontext, *, min_time=0.2,
            min_samples=5, max_samples=1000) -> Timing:
    """Median and min seconds per call. Calls are grouped so one sample lasts >= 200 us
    (timer noise stays below 1 % even for a 1 us call); samples are taken until ``min_time``
    has passed and at least ``min_samples`` were taken."""
    with context():
        fn()  # warm-up: first-touch of caches, lazy initialisation
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
        number = max(1, min(10_000, int(2e-4 / max(one, 1e-9))))
        samples: list[float] = []
        flt0 = _minflt()
        start = time.perf_counter()
        while len(samples) < min_samples or (time.perf_counter() - start < min_time
                                             and len(samples) < max_samples):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - t0) / number)
        flt1 = _minflt()
    calls = number * len(samples)
    faults = None if flt0 is None or flt1 is None else (flt1 - flt0) / calls
    return Timing(float(np.median(samples)), float(np.min(samples)), calls, faults,
                  tuple(samples))


class CopyRef:
    """Same-size copy into a preallocated array: one thread and ``threads`` threads."""

    def __init__(self, threads: int):
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def measure(self, x: np.ndarray, **kw) -> dict[str, Any]:
        src = np.ascontiguousarray(x).reshape(-1)
        dst = np.empty_like(src)
        res = {"single": measure(lambda: np.copyto(dst, src), **kw)}
        if self.pool is not None and src.size >= 4096:
            bounds = np.linspace(0, src.size, self.threads + 1).astype(int)
            # Split on cache-line boundaries so threads never share a line.
            bounds = [int(b) // 16 * 16 for b in bounds[:-1]] + [src.size]
            chunks = [(dst[a:z], src[a:z]) for a, z in itertools.pairwise(bounds)]

            def par():
                list(self.pool.map(lambda c: np.copyto(*c), chunks))
            res["threaded"] = measure(par, **kw)
        best = min(res, key=lambda k: res[k].median_s)
        return {"best": best, **res}

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def shrink(shape: tuple[int, ...], max_elements: int, keep: Sequence[int] = ()) -> tuple:
    """Halve the largest free dimension until the array has at most ``max_elements`` elements."""
    s = list(shape)
    keep = {k % len(s) for k in keep}
    while math.prod(s) > max_elements:
        free = [i for i in range(len(s)) if i not in keep and s[i] > 1]
        if not free:
            break
        i = max(free, key=lambda j: s[j])
        s[i] = (s[i] + 1) // 2
    return tuple(s)


def _make_x(rng, shape, dtype):
    x = rng.standard_normal(shape, dtype=np.float32 if dtype == "float16" else dtype)
    # Offset and scale so that a kernel that does not centre shows a large difference.
    x *= 2.0
    x += 0.5
    return x.astype(dtype, copy=False)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a)
    if a.shape != b.shape:
        return float("inf")
    with np.errstate(invalid="ignore"):
        return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


#: Each implementation is timed in this many rounds, interleaved with the others (the order
#: rotates every round), and its samples are pooled. Timed one after the other, a phase of
#: the machine (another tenant's memory traffic, a frequency change) fell on one of them
#: only: on the 2-vCPU machine the same binary's time moved by 10-30 % between windows.
ROUNDS = 3


def _timed_rounds(live: Sequence[tuple[str, Impl, float]], env: Env, kw: dict[str, Any],
                  scaling: bool) -> dict[str, Any]:
    """Times every live implementation in ``ROUNDS`` interleaved rounds; with ``scaling``,
    rsnorm on one thread joins the rounds as ``"rsnorm@1"``. Failures go to ``"errors"``."""
    jobs: list[tuple[str, Impl]] = [(name, impl) for name, impl, _ in live]
    if scaling and env.threads > 1 and any(name == "rsnorm" for name, _ in jobs):
        impl = next(impl for name, impl in jobs if name == "rsnorm")

        @contextlib.contextmanager
        def one_thread(ctx=impl.context):
            env.rn.set_num_threads(1)
            try:
                with ctx():
                    yield
            finally:
                env.rn.set_num_threads(env.threads)
        jobs.append(("rsnorm@1", Impl(impl.fn, impl.to_numpy, one_thread)))
    parts: dict[str, list[Timing]] = {name: [] for name, _ in jobs}
    errors: dict[str, str] = {}
    per_round = {"min_time": kw["min_time"] / ROUNDS,
                 "min_samples": max(1, -(-kw["min_samples"] // ROUNDS))}
    for r in range(ROUNDS):
        k = r % len(jobs) if jobs else 0
        for name, impl in jobs[k:] + jobs[:k]:
            if name in errors:
                continue
            try:
                parts[name].append(measure(impl.fn, impl.context, **per_round))
            except Exception as exc:  # noqa: BLE001 - reported, not hidden
                errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            finally:
                if name in ("torch", "onnxruntime"):
                    # libgomp's and onnxruntime's workers spin after a parallel region; let
                    # them go idle so they do not steal a vCPU from the next measurement.
                    time.sleep(0.02)
    out: dict[str, Any] = {name: Timing.merge(ts) for name, ts in parts.items()
                           if ts and name not in errors}
    out["errors"] = errors
    return out


def run(workloads: Sequence[Workload], env: Env, *, min_time: float, min_samples: int,
        max_elements: int | None = None, progress=None, seed: int = 0,
        scaling: bool = False) -> list[dict]:
    """Runs each workload, returns one result dict per workload (the JSON ``results``).
    With ``scaling``, rsnorm is timed again on one thread (``thread_scaling`` = t1 / tN)."""
    copier = CopyRef(env.threads)
    results = []
    kw = {"min_time": min_time, "min_samples": min_samples}
    try:
        for wl in workloads:
            rng = np.random.default_rng(seed)
            shape = wl.shape
            if max_elements:
                keep = [wl.axis] if wl.op in ("group_norm", "gdn", "local_response_norm") else []
                shape = shrink(shape, max_elements, keep)
            res: dict[str, Any] = {"workload": wl.name(shape), "op": wl.op,
                                   "function": wl.function, "variant": wl.variant,
                                   "layout": wl.layout or None, "shape": list(shape),
                                   "dtype": wl.dtype, "impls": {}, "skipped": {},
                                   "ratios": {}, "ratios_out": {}}
            results.append(res)
            if not hasattr(env.rn, wl.function):
                res["skipped"]["rsnorm"] = f"rsnorm.{wl.function} not implemented yet"
                if progress:
                    progress(wl, "skipped", len(IMPL_ORDER) + 1)
                continue
            x = _make_x(rng, shape, wl.dtype)
            res["bytes"] = wl.traffic_arrays * x.nbytes
            copy_bytes = 2 * x.nbytes
            if progress:
                progress(wl, "copy", 0)
            cp = copier.measure(x, **kw)
            best = cp[cp["best"]]
            res["copy"] = {"method": cp["best"], "median_s": best.median_s,
                           "min_s": best.min_s, "gbps": copy_bytes / best.median_s / 1e9,
                           **{f"{k}_median_s": v.median_s for k, v in cp.items()
                              if isinstance(v, Timing)}}
            if progress:
                progress(wl, "copy", 1)
            impls: dict[str, Impl] = {}
            try:
                impls = build_workload(env, wl, x, rng)
            except Exception as exc:  # noqa: BLE001 - a peer cannot build: note, go on
                res["skipped"]["setup"] = f"{type(exc).__name__}: {exc}"
            for peer, why in env.skipped_peers.items():
                res["skipped"].setdefault(peer, why)
            reference = None
            live: list[tuple[str, Impl, float]] = []
            for name in IMPL_ORDER:
                if name not in impls:
                    if progress:
                        progress(wl, name, 1)
                    continue
                impl = impls.pop(name)
                if progress:
                    progress(wl, name, 0)
                try:
                    with impl.context():
                        y = impl.to_numpy(impl.fn())
                    diff = 0.0 if reference is None else _diff(y, reference)
                    if name == "rsnorm":
                        reference = np.array(y, copy=True)
                except Exception as exc:  # noqa: BLE001 - reported, not hidden
                    res["skipped"][name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    if progress:
                        progress(wl, name, 1)
                    continue
                live.append((name, impl, diff))
            timings = _timed_rounds(live, env, kw, scaling)
            for name, impl, diff in live:
                t = timings.get(name)
                if t is None:
                    continue
                gbps = res["bytes"] / t.median_s / 1e9
                res["impls"][name] = {
                    "median_s": t.median_s, "min_s": t.min_s, "calls": t.calls, "gbps": gbps,
                    "faults_per_call": t.faults_per_call,
                    # As bandwidth: a backward moves 3 arrays where the copy moves 2.
                    "pct_copy": 100.0 * gbps / res["copy"]["gbps"],
                    "max_abs_diff_vs_rsnorm": diff, "note": impl.note or None}
                if progress:
                    progress(wl, name, 1)
            for name, why in timings.get("errors", {}).items():
                res["skipped"][name] = why
            if "rsnorm@1" in timings and "rsnorm" in timings:
                t1 = timings["rsnorm@1"]
                res["rsnorm_1thread_median_s"] = t1.median_s
                res["thread_scaling"] = t1.median_s / timings["rsnorm"].median_s
            # Dropping the last reference closes an onnxruntime session and its threads.
            del live
            _ratios(res)
    finally:
        copier.close()
    return results


def _ratios(res: dict) -> None:
    impls = res["impls"]
    for base, key in (("rsnorm", "ratios"), ("rsnorm_out", "ratios_out")):
        if base not in impls:
            continue
        t0 = impls[base]["median_s"]
        for peer in PEERS:
            if peer in impls:
                res[key][peer] = impls[peer]["median_s"] / t0
        fast = [res[key][p] for p in ("torch", "onnxruntime") if p in res[key]]
        if fast:
            res[key]["peer"] = min(fast)  # vs the faster of PyTorch and onnxruntime


def _copy_scaling(r: dict) -> float | None:
    """How much faster the copy of this workload's input ran on N threads than on one: the
    memory system's own scaling, the ceiling of a memory-bound op's."""
    c = r.get("copy", {})
    one, many = c.get("single_median_s"), c.get("threaded_median_s")
    # Where one thread copied faster (small inputs: the Python thread pool costs more than the
    # copy), the copy's scaling says nothing about the memory system.
    return one / many if one and many and c.get("method") == "threaded" else None


def summarize(results: Sequence[dict]) -> dict[str, Any]:
    def med(values):
        v = [x for x in values if x is not None]
        return float(np.median(v)) if v else None

    summ: dict[str, Any] = {}
    for key in ("ratios", "ratios_out"):
        for peer in (*PEERS, "peer"):
            vals = [r[key].get(peer) for r in results if r[key].get(peer) is not None]
            if vals:
                summ[f"{key}.{peer}.median"] = med(vals)
                summ[f"{key}.{peer}.min"] = float(min(vals))
                summ[f"{key}.{peer}.count"] = len(vals)
    scal = [r["thread_scaling"] for r in results if "thread_scaling" in r]
    if scal:
        summ["thread_scaling.median"] = med(scal)
        summ["thread_scaling.min"] = float(min(scal))
        copy = [_copy_scaling(r) for r in results if "thread_scaling" in r]
        if any(v is not None for v in copy):
            summ["copy_scaling.median"] = med(copy)
    pct = [r["impls"]["rsnorm"]["pct_copy"] for r in results if "rsnorm" in r["impls"]]
    if pct:
        summ["rsnorm.pct_copy.median"] = med(pct)
    return summ


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _t(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _x_ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_results(results: Sequence[dict], summary: dict, header: str, verbose: bool) -> None:
    from .cli import print_table

    cols = ["workload", "impl", "median", "min", "GB/s", "% copy", "faults/call",
            "rsnorm speed-up", "max|diff|"]
    rows = []
    for r in results:
        if "rsnorm" in r["skipped"] and not r["impls"]:
            rows.append([r["workload"], "rsnorm", "-", "-", "-", "-", "-", "-",
                         r["skipped"]["rsnorm"]])
            continue
        if "copy" in r:
            c = r["copy"]
            rows.append([r["workload"], f"copy ({c['method']})", _t(c["median_s"]),
                         _t(c["min_s"]), f"{c['gbps']:.1f}", "100", "", "", ""])
        for name in IMPL_ORDER:
            if name in r["impls"]:
                i = r["impls"][name]
                ratio = r["ratios"].get(name) if name in PEERS else None
                label = name + (f" ({i['note']})" if i.get("note") else "")
                flt = i.get("faults_per_call")
                rows.append(["", label, _t(i["median_s"]), _t(i["min_s"]),
                             f"{i['gbps']:.1f}", f"{i['pct_copy']:.0f}",
                             "-" if flt is None else f"{flt:.0f}", _x_ratio(ratio),
                             "" if name == "rsnorm" else f"{i['max_abs_diff_vs_rsnorm']:.1e}"])
            elif verbose and name in r["skipped"]:
                rows.append(["", name, "-", "-", "-", "-", "-", "-", r["skipped"][name][:60]])
    print_table(header, cols, rows)
    # The compact view: one line per workload, ratio = peer time / rsnorm time.
    cols2 = ["workload", "rsnorm", "% copy", "out= % copy", "vs numpy", "vs torch",
             "vs onnxruntime", "vs peer", "vs peer (out=)"]
    with_scaling = any("thread_scaling" in r for r in results)
    if with_scaling:
        cols2 += ["N threads vs 1", "copy: N vs 1"]
    rows2 = []
    for r in results:
        if "rsnorm" not in r["impls"]:
            continue
        i = r["impls"]["rsnorm"]
        o = r["impls"].get("rsnorm_out")
        rows2.append([r["workload"], _t(i["median_s"]), f"{i['pct_copy']:.0f}",
                      "-" if o is None else f"{o['pct_copy']:.0f}",
                      *(_x_ratio(r["ratios"].get(p)) for p in (*PEERS, "peer")),
                      _x_ratio(r["ratios_out"].get("peer")),
                      *([_x_ratio(r.get("thread_scaling")), _x_ratio(_copy_scaling(r))]
                        if with_scaling else [])])
    print_table("ratios (peer time / rsnorm time; > 1 means rsnorm is faster; peer = the faster "
                "of torch and onnxruntime)", cols2, rows2)
    parts = []
    for key, label in (("ratios.peer.median", "median vs peer"),
                       ("ratios.peer.min", "worst vs peer"),
                       ("ratios_out.peer.median", "median vs peer (out=)"),
                       ("ratios.numpy.median", "median vs numpy"),
                       ("thread_scaling.median", "median thread scaling"),
                       ("copy_scaling.median", "a copy's"),
                       ("rsnorm.pct_copy.median", "median % of copy")):
        if key in summary:
            v = summary[key]
            parts.append(f"{label}: {v:.0f}" if "pct" in key else f"{label}: {v:.2f}x")
    if parts:
        print("; ".join(parts))


def plot(results: Sequence[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Tiny workloads measure per-call overhead; as GB/s they would be invisible bars.
    rows = [r for r in results if r["impls"] and "tiny" not in r["variant"]]
    names = ["copy", *IMPL_ORDER]
    colors = {"copy": "#bbbbbb", "rsnorm": "#d1495b", "rsnorm_out": "#edae49",
              "numpy": "#66a182", "onnxruntime": "#00798c", "torch": "#30638e"}
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) * 1.2 + 1.5))
    height = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = []
        for r in rows:
            if name == "copy":
                vals.append(r.get("copy", {}).get("gbps", 0.0))
            else:
                vals.append(r["impls"].get(name, {}).get("gbps", 0.0))
        pos = np.arange(len(rows)) + (j - len(names) / 2 + 0.5) * height
        ax.barh(pos, vals, height=height, label=name, color=colors.get(name))
    ax.set_yticks(np.arange(len(rows)))
    ax.set_yticklabels([r["workload"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("effective GB/s (input read once + output written once)")
    ax.set_title(title.replace(" · ", "\n", 1), fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser(prog: str = "rsnorm bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Time rsnorm against naive NumPy, "
                                "PyTorch and onnxruntime on a fixed workload table.")
    p.add_argument("--quick", action="store_true", help="a subset with short timings (< 1 min)")
    p.add_argument("--threads", type=int, help="threads for rsnorm, torch and onnxruntime")
    p.add_argument("--ops", help="comma-separated op names, e.g. layer_norm,batch_norm")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated peers to run (default: numpy,torch,onnxruntime)")
    p.add_argument("--json", metavar="FILE", help="write all results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of GB/s (needs matplotlib)")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("--scaling", action="store_true",
                   help="also time rsnorm on one thread (thread scaling column)")
    p.add_argument("-v", "--verbose", action="store_true", help="also show skipped peers")
    p.add_argument("--backend", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: run rsnorm.gpu's benchmark instead (needs wgpu); other options "
                   "are passed to it")
    # Knobs for tests and exploration, not part of the documented interface.
    p.add_argument("--min-time", type=float, help=argparse.SUPPRESS)
    p.add_argument("--min-samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-elements", type=int, help=argparse.SUPPRESS)
    return p


def _progress_factory(workloads: Sequence[Workload]):
    """A callback ``(workload, impl, done)`` and a context manager that draws the bar."""
    total = len(workloads) * (len(IMPL_ORDER) + 1)
    if importlib.util.find_spec("rich") is not None and sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        prog = Progress(TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), transient=True)
        task = prog.add_task("bench", total=total)

        def cb(wl, impl, done):
            prog.update(task, advance=done, description=f"{wl.name()} · {impl}")
        return cb, prog

    def plain(wl, impl, done):
        if not done:
            print(f"  {wl.name()}: {impl} ...", file=sys.stderr, flush=True)
    return plain, contextlib.nullcontext()


def select(ops: str | None, quick: bool) -> list[Workload]:
    wls = [w for w in WORKLOADS if w.quick or not quick]
    if ops:
        wanted = {o.strip() for o in ops.split(",") if o.strip()}
        known = {w.op for w in WORKLOADS} | {w.function for w in WORKLOADS}
        if wanted - known:
            raise SystemExit(f"rsnorm bench: unknown op(s) {sorted(wanted - known)}; "
                             f"known: {sorted(known)}")
        wls = [w for w in wls if w.op in wanted or w.function in wanted]
    return wls


def machine_info(env: Env) -> dict[str, Any]:
    rn = env.rn
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "processor": _cpu_model(), "cpus": os.cpu_count(),
                            "threads": env.threads}
    if hasattr(rn, "build_info"):
        try:
            info["build_info"] = {k: (v if isinstance(v, (int, float, str, bool, type(None)))
                                      else str(v)) for k, v in dict(rn.build_info()).items()}
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            info["build_info"] = f"unavailable: {exc}"
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    info["env"] = {k: os.environ[k] for k in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS",
                                              "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                              "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
                   if k in os.environ}
    return info


class CpuProbe:
    """Share of the machine's CPU time used by other processes since construction: the
    machine-wide busy time from /proc/stat minus this process's own CPU time."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            import resource

            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            hz = os.sysconf("SC_CLK_TCK")
            # user nice system idle iowait irq softirq steal: all but idle/iowait are busy,
            # steal included (a hypervisor taking the vCPU is contention too).
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz
            ru = resource.getrusage(resource.RUSAGE_SELF)
            return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime
        except (OSError, ValueError, IndexError, ImportError):
            return None

    def other_fraction(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        if wall <= 0:
            return None
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, other / (wall * (os.cpu_count() or 1)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_main(argv: list[str]) -> int:
    rest = [a for i, a in enumerate(argv) if not (a == "--backend" or a.startswith("--backend=")
                                                  or (i > 0 and argv[i - 1] == "--backend"))]
    try:
        from rsnorm.gpu import bench as gpu_bench
    except (ImportError, RuntimeError) as exc:
        print(f"rsnorm bench: the GPU benchmark is not available ({exc}); it needs "
              "rsnorm.gpu.bench and wgpu (pip install 'rsnorm[gpu]')", file=sys.stderr)
        return 2
    if not hasattr(gpu_bench, "main"):
        print("rsnorm bench: rsnorm.gpu.bench has no main()", file=sys.stderr)
        return 2
    return int(gpu_bench.main(rest) or 0)


def main(argv: Sequence[str] | None = None, prog: str = "rsnorm bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = build_parser(prog).parse_known_args(argv)
    if known.backend == "gpu":
        return _gpu_main(argv)
    args = build_parser(prog).parse_args(argv)
    workloads = select(args.ops, args.quick)
    if args.list:
        for w in workloads:
            print(w.name() + ("  [quick]" if w.quick else ""))
        return 0
    if args.threads is not None and args.threads < 1:
        print("rsnorm bench: --threads must be >= 1", file=sys.stderr)
        return 2
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = set(peers) - set(PEERS)
    if bad:
        print(f"rsnorm bench: unknown peer(s) {sorted(bad)}; known: {list(PEERS)}",
              file=sys.stderr)
        return 2
    env = Env(args.threads, peers)
    info = machine_info(env)  # before the run: the load average then tells of other work
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.2)
    min_samples = args.min_samples or (3 if args.quick else 5)
    cb, bar = _progress_factory(workloads)
    t0 = time.perf_counter()
    cpu_probe = CpuProbe()
    with bar:
        results = run(workloads, env, min_time=min_time, min_samples=min_samples,
                      max_elements=args.max_elements, progress=cb, scaling=args.scaling)
    elapsed = time.perf_counter() - t0
    summary = summarize(results)
    other = cpu_probe.other_fraction()
    info["other_processes_cpu_fraction"] = other
    if other is not None and other > 0.1:
        print(f"warning: other processes used {100 * other:.0f}% of the CPUs during the run; "
              "timings (torch's and onnxruntime's thread pools most) are unreliable",
              file=sys.stderr)
    header = (f"rsnorm bench · {info['processor']} · {env.threads} thread(s) · "
              + ", ".join(f"{k} {v}" for k, v in env.versions().items() if v)
              + (" · quick" if args.quick else ""))
    print_results(results, summary, header, args.verbose)
    print(f"total {elapsed:.1f} s")
    if args.json:
        doc = {"schema": 1, "rsnorm_version": env.versions()["rsnorm"], "versions": env.versions(),
               "machine": info, "threads": env.threads, "quick": args.quick,
               "settings": {"min_time_s": min_time, "min_samples": min_samples,
                            "scaling": args.scaling,
                            "max_elements": args.max_elements},
               "skipped_peers": env.skipped_peers, "elapsed_s": elapsed,
               "results": results, "summary": summary}
        with open(args.json, "w") as f:
            json.dump(_finite(doc), f, indent=1, allow_nan=False, default=_json_default)
    if args.plot:
        try:
            plot(results, args.plot, header)
        except ImportError:
            print("rsnorm bench: --plot needs matplotlib (pip install 'rsnorm[bench]')",
                  file=sys.stderr)
            return 2
    return 0


def _finite(o):
    """NaN/inf (e.g. a peer whose output has the wrong shape) become null: strict JSON."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (float, np.floating)) and not math.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
