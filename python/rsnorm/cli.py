"""The ``rsnorm`` command line (SPEC §7): ``info``, ``demo``, ``check`` and ``bench``.

``demo`` and ``check`` run a registry of cases (:data:`DEMO_CASES`): each builds seeded data,
calls one rsnorm op and compares every output with the float64 references of
:mod:`rsnorm._reference`. A case whose op is not (yet) in :mod:`rsnorm` is skipped, so later ops
light up as they are implemented; a case whose op exists but errs or misses its tolerance fails
the command. Add an op by appending :class:`DemoCase` entries (see :func:`register`).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _reference as ref

__all__ = ["DEMO_CASES", "DemoCase", "Prepared", "main", "register", "run_cases"]

# ---------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------

# (rtol, atol) for "got" arrays of each dtype, compared with |got - ref| <= atol + rtol*|ref|.
# Statistics are float64 (SPEC §3), so an output rounded once is within 0.5 ulp; these leave
# room for kernels that round a few times more, yet catch any formula or convention mistake
# (those are >= 1e-3).
TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (2e-3, 2e-3),
    "float32": (1e-5, 1e-5),
    "float64": (1e-12, 1e-12),
}

# ULPs are counted at max(|ref|, ULP_FLOOR): a normalized output that crosses zero would
# otherwise count millions of denormal ulps for an absolute error of 1e-8.
ULP_FLOOR = 2.0**-6


@dataclass
class Prepared:
    """One built case: ``run()`` makes the checked call, ``compare(result)`` lists
    ``(what, got, expected)`` pairs, ``timed()`` is called repeatedly for the time column
    (defaults to ``run``; give it when ``run`` mutates state such as running statistics)."""

    run: Callable[[], Any]
    compare: Callable[[Any], list[tuple[str, Any, Any]]]
    timed: Callable[[], Any] | None = None


@dataclass(frozen=True)
class DemoCase:
    """A registry entry: ``build(rn, rng, dtype, shape) -> Prepared``."""

    label: str
    op: str
    dtype: str
    shape: tuple[int, ...]
    build: Callable[[Any, np.random.Generator, np.dtype, tuple[int, ...]], Prepared]
    requires: tuple[str, ...] = ()
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class CaseResult:
    case: DemoCase
    status: str  # "ok", "FAIL", "ERROR", "skipped"
    max_abs: float = float("nan")
    max_ulp: float = float("nan")
    time_s: float = float("nan")
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "ERROR")


DEMO_CASES: list[DemoCase] = []


def register(*cases: DemoCase) -> None:
    """Append cases to the demo/check registry (later ops add theirs here)."""
    DEMO_CASES.extend(cases)


def _ulp_error(got: np.ndarray, expected: np.ndarray) -> float:
    if got.dtype not in (np.float16, np.float32) or got.size == 0:
        return float("nan")
    floor = np.maximum(np.abs(expected), ULP_FLOOR).astype(got.dtype)
    ulp = np.spacing(floor).astype(np.float64)
    both_nan = np.isnan(got) & np.isnan(expected)
    with np.errstate(invalid="ignore"):
        ratio = np.abs(got.astype(np.float64) - expected) / ulp
    ratio = np.where(both_nan, 0.0, np.where(np.isnan(ratio), np.inf, ratio))
    return float(np.max(ratio))


def compare_arrays(got, expected, overrides=None) -> tuple[bool, float, float, str]:
    """(passed, max_abs, max_ulp, why) for one output against its float64 reference."""
    got_arr = np.asarray(got)
    exp = np.asarray(expected, dtype=np.float64)
    if got_arr.shape != exp.shape:
        return False, float("nan"), float("nan"), f"shape {got_arr.shape} != {exp.shape}"
    if got_arr.dtype.kind in "iub":
        ok = bool(np.array_equal(got_arr, exp))
        return ok, 0.0 if ok else float("inf"), float("nan"), "" if ok else "integers differ"
    if got_arr.size == 0:
        return True, 0.0, 0.0, ""
    g = got_arr.astype(np.float64)
    rtol, atol = (overrides or {}).get(got_arr.dtype.name) or TOLERANCES.get(
        got_arr.dtype.name, TOLERANCES["float64"])
    both_nan = np.isnan(exp) & np.isnan(g)
    with np.errstate(invalid="ignore"):
        err = np.where(both_nan, 0.0, np.abs(g - exp))
        ok = both_nan | (err <= atol + rtol * np.abs(exp))
    max_abs = float(np.max(err)) if err.size else 0.0
    why = ""
    if not ok.all():
        bad = np.argwhere(~ok)[0]
        why = (f"{int((~ok).sum())} of {ok.size} outside rtol={rtol:g} atol={atol:g}, "
               f"first at {tuple(int(i) for i in bad)}: got {float(g[tuple(bad)])!r}, "
               f"expected {float(exp[tuple(bad)])!r}")
    return bool(ok.all()), max_abs, _ulp_error(got_arr, exp), why


def _time_call(fn: Callable[[], Any], budget: float = 0.02, max_calls: int = 2000) -> float:
    """Median seconds per call over about ``budget`` seconds (at least 5 calls)."""
    fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < budget and len(samples) < max_calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def run_case(rn, case: DemoCase, seed: int = 0, timing: bool = True) -> CaseResult:
    missing = [name for name in (case.op, *case.requires) if not hasattr(rn, name)]
    if missing:
        return CaseResult(case, "skipped", detail=f"not in rsnorm yet: {', '.join(missing)}")
    rng = np.random.default_rng(seed)
    try:
        prep = case.build(rn, rng, np.dtype(case.dtype), case.shape)
        result = prep.run()
        pairs = prep.compare(result)
    except Exception as exc:  # noqa: BLE001 - any crash is a failed check, shown
        return CaseResult(case, "ERROR", detail=f"{type(exc).__name__}: {exc}")
    ok, max_abs, max_ulp, whys = True, 0.0, float("nan"), []
    for what, got, expected in pairs:
        p, a, u, why = compare_arrays(got, expected, case.tolerances)
        ok &= p
        max_abs = max(max_abs, a) if not np.isnan(a) else max_abs
        if not np.isnan(u):
            max_ulp = u if np.isnan(max_ulp) else max(max_ulp, u)
        if not p:
            whys.append(f"{what}: {why}")
    t = float("nan")
    if timing:
        try:
            t = _time_call(prep.timed or prep.run)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            return CaseResult(case, "ERROR", max_abs, max_ulp,
                              detail=f"timing: {type(exc).__name__}: {exc}")
    return CaseResult(case, "ok" if ok else "FAIL", max_abs, max_ulp, t, "; ".join(whys))


def run_cases(rn, cases: Sequence[DemoCase], *, timing=True, progress=None) -> list[CaseResult]:
    results = []
    for i, case in enumerate(cases):
        results.append(run_case(rn, case, seed=i, timing=timing))
        if progress is not None:
            progress(results[-1])
    return results


# ---------------------------------------------------------------------------------------------
# Demo data and the case registry
# ---------------------------------------------------------------------------------------------


def _x(rng, shape, dtype, loc=0.5, scale=2.0):
    """Offset, scaled normal data, so a kernel that forgets to centre is visible."""
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def _pos(rng, n, dtype, lo=0.5, hi=1.5):
    return rng.uniform(lo, hi, n).astype(dtype)


def _chan(shape, axis):
    return shape[axis % len(shape)]


def _bn_case(training, axis=1, running=True, affine=True, momentum=0.1, convention="torch",
             cumulative=False):
    def build(rn, rng, dtype, shape):
        c = _chan(shape, axis)
        x = _x(rng, shape, dtype)
        w = _pos(rng, c, dtype) if affine else None
        b = rng.standard_normal(c).astype(dtype) if affine else None
        rm0 = rng.standard_normal(c).astype(dtype) if running else None
        rv0 = _pos(rng, c, dtype) if running else None
        nbt0 = 3
        mom = None if cumulative else momentum
        state = {}

        def call(rm, rv, nbt):
            kw = {"axis": axis}
            if convention != "torch":
                kw["momentum_convention"] = convention
            if nbt is not None:
                kw["num_batches_tracked"] = nbt
            return rn.batch_norm(x, rm, rv, w, b, training, mom, 1e-5, **kw)

        def run():
            state["rm"] = None if rm0 is None else rm0.copy()
            state["rv"] = None if rv0 is None else rv0.copy()
            state["nbt"] = np.array(nbt0, dtype=np.int64) if cumulative else None
            return call(state["rm"], state["rv"], state["nbt"])

        def compare(y):
            ey, erm, erv = ref.batch_norm(x, rm0, rv0, w, b, training, mom, 1e-5, axis=axis,
                                          num_batches_tracked=nbt0,
                                          momentum_convention=convention)
            pairs = [("y", y, ey)]
            if training and running:
                pairs += [("running_mean", state["rm"], erm), ("running_var", state["rv"], erv)]
            if cumulative:
                pairs.append(("num_batches_tracked", state["nbt"], np.array(nbt0 + 1)))
            return pairs

        def timed():
            rm = None if rm0 is None else rm0.copy()
            rv = None if rv0 is None else rv0.copy()
            nbt = np.array(nbt0, dtype=np.int64) if cumulative else None
            return call(rm, rv, nbt)

        # Copying the tiny running stats in timed() is noise next to the op itself.
        return Prepared(run, compare, timed if (training and running) else run)

    return build


def _ln_case(ndims=1, affine=True, stats=False):
    def build(rn, rng, dtype, shape):
        ns = tuple(shape[-ndims:])
        x = _x(rng, shape, dtype)
        w = _pos(rng, ns, dtype) if affine else None
        b = rng.standard_normal(ns).astype(dtype) if affine else None

        def run():
            return rn.layer_norm(x, ns, w, b, 1e-5, return_stats=stats)

        def compare(res):
            ey = ref.layer_norm(x, ns, w, b, 1e-5)
            if not stats:
                return [("y", res, ey)]
            y, st = res
            red = tuple(range(x.ndim - ndims, x.ndim))
            x64 = x.astype(np.float64)
            mean = x64.mean(axis=red)
            var = x64.var(axis=red)
            return [("y", y, ey), ("stats.mean", st.mean, mean),
                    ("stats.rstd", st.rstd, 1.0 / np.sqrt(var + 1e-5))]

        return Prepared(run, compare)

    return build


def _rms_case(ndims=1, affine=True, eps=None):
    def build(rn, rng, dtype, shape):
        ns = tuple(shape[-ndims:])
        x = _x(rng, shape, dtype)
        w = _pos(rng, ns, dtype) if affine else None

        def run():
            return rn.rms_norm(x, ns, w, eps)

        return Prepared(run, lambda y: [("y", y, ref.rms_norm(x, ns, w, eps))])

    return build


def _gn_case(groups, axis=1, affine=True):
    def build(rn, rng, dtype, shape):
        c = _chan(shape, axis)
        x = _x(rng, shape, dtype)
        w = _pos(rng, c, dtype) if affine else None
        b = rng.standard_normal(c).astype(dtype) if affine else None

        def run():
            return rn.group_norm(x, groups, w, b, 1e-5, axis=axis)

        return Prepared(run, lambda y: [("y", y, ref.group_norm(x, groups, w, b, 1e-5,
                                                                axis=axis))])

    return build


def _in_case(axis=1, running=False, affine=True):
    def build(rn, rng, dtype, shape):
        c = _chan(shape, axis)
        x = _x(rng, shape, dtype)
        w = _pos(rng, c, dtype) if affine else None
        b = rng.standard_normal(c).astype(dtype) if affine else None
        rm0 = rng.standard_normal(c).astype(dtype) if running else None
        rv0 = _pos(rng, c, dtype) if running else None
        state = {}

        def run():
            state["rm"] = None if rm0 is None else rm0.copy()
            state["rv"] = None if rv0 is None else rv0.copy()
            return rn.instance_norm(x, state["rm"], state["rv"], w, b, True, 0.1, 1e-5,
                                    axis=axis)

        def compare(y):
            ey, erm, erv = ref.instance_norm(x, rm0, rv0, w, b, True, 0.1, 1e-5, axis=axis)
            pairs = [("y", y, ey)]
            if running:
                pairs += [("running_mean", state["rm"], erm), ("running_var", state["rv"], erv)]
            return pairs

        return Prepared(run, compare)

    return build


def _moments_case(axis=1, split=(1, 3, 4)):
    def build(rn, rng, dtype, shape):
        x = _x(rng, shape, dtype, loc=1e3)
        bounds = np.cumsum((0,) + split)
        assert bounds[-1] == shape[0], "split must cover the batch axis"

        def run():
            whole = rn.moments(x, axis=axis)
            parts = [rn.moments(x[a:z], axis=axis) for a, z in itertools.pairwise(bounds)]
            return whole, type(whole).merge(*parts)

        def compare(res):
            whole, merged = res
            count, mean, m2 = ref.moments(x, axis)
            pairs = []
            for name, m in (("whole", whole), ("merged", merged)):
                pairs += [(f"{name}.count", np.array(m.count), np.array(count)),
                          (f"{name}.mean", m.mean, mean), (f"{name}.m2", m.m2, m2),
                          (f"{name}.var()", m.var(), m2 / count)]
            return pairs

        return Prepared(run, compare, lambda: rn.moments(x, axis=axis))

    return build


def _lrn_case(size, alpha=1e-4, beta=0.75, k=1.0, **kw):
    def build(rn, rng, dtype, shape):
        # Larger values than the default data, so the window sum really matters.
        x = _x(rng, shape, dtype, loc=0.0, scale=20.0)
        return Prepared(lambda: rn.local_response_norm(x, size, alpha, beta, k, **kw),
                        lambda y: [("y", y, ref.local_response_norm(x, size, alpha, beta, k,
                                                                    **kw))])

    return build


def _frn_case(with_tau=True, axis=1):
    def build(rn, rng, dtype, shape):
        c = _chan(shape, axis)
        x = _x(rng, shape, dtype)
        w = _pos(rng, c, dtype)
        b = rng.standard_normal(c).astype(dtype)
        tau = (0.3 * rng.standard_normal(c)).astype(dtype) if with_tau else None
        kw = {} if axis == 1 else {"axis": axis}
        return Prepared(
            lambda: rn.filter_response_norm(x, w, b, tau, 1e-6, **kw),
            lambda y: [("y", y, ref.filter_response_norm(x, w, b, tau, 1e-6, axis=axis))])

    return build


def _tlu_case():
    def build(rn, rng, dtype, shape):
        x = _x(rng, shape, dtype)
        tau = rng.standard_normal(shape[1]).astype(dtype)
        return Prepared(lambda: rn.tlu(x, tau), lambda y: [("y", y, ref.tlu(x, tau))])

    return build


def _gdn_case(inverse=False, variant="gdn"):
    def build(rn, rng, dtype, shape):
        c = shape[1]
        x = _x(rng, shape, dtype, loc=0.0, scale=1.0)
        beta = _pos(rng, c, dtype, 0.5, 1.5)
        # CompressAI initialises gamma to 0.1*I; off-diagonal mass makes the mixing matter.
        gamma = (0.1 * np.eye(c) + rng.uniform(0.0, 0.02, (c, c))).astype(dtype)
        kw = {}
        if inverse:
            kw["inverse"] = True
        if variant != "gdn":
            kw["variant"] = variant
        return Prepared(lambda: rn.gdn(x, beta, gamma, **kw),
                        lambda y: [("y", y, ref.gdn(x, beta, gamma, inverse=inverse,
                                                   variant=variant))])

    return build


def _mvn_case(axes=(0, 2, 3)):
    def build(rn, rng, dtype, shape):
        # std 3: eps=1e-9 is invisible whether it is added to the variance or the std.
        x = _x(rng, shape, dtype, scale=3.0)
        return Prepared(lambda: rn.mean_variance_norm(x, axes=axes, eps=1e-9),
                        lambda y: [("y", y, ref.mean_variance_norm(x, axes, 1e-9))])

    return build


def _normalize_case(p=2.0, axis=1):
    def build(rn, rng, dtype, shape):
        x = _x(rng, shape, dtype)
        return Prepared(lambda: rn.normalize(x, p=p, axis=axis),
                        lambda y: [("y", y, ref.normalize(x, p, axis))])

    return build


def _bwd_case(op, *, axis=1, affine=True, training=True, ndims=1, groups=3, use_stats=False):
    """``<op>_backward(grad_y, x, <forward params by name>, stats=...)`` against the analytic
    float64 gradients of :mod:`rsnorm._reference`."""

    def build(rn, rng, dtype, shape):
        x = _x(rng, shape, dtype)
        gy = rng.standard_normal(shape).astype(dtype)
        fn = getattr(rn, f"{op}_backward")
        fwd = getattr(rn, op)
        if op in ("layer_norm", "rms_norm"):
            pshape = tuple(shape[-ndims:])
            lead = (pshape,)
        else:
            pshape = _chan(shape, axis)
            lead = (groups,) if op == "group_norm" else ()
        w = _pos(rng, pshape, dtype) if affine else None
        b = rng.standard_normal(pshape).astype(dtype) if affine and op != "rms_norm" else None
        kw: dict[str, Any] = {"weight": w}
        if op != "rms_norm":
            kw["bias"] = b
        kw["eps"] = 1e-6 if op == "rms_norm" else 1e-5
        if op in ("batch_norm", "group_norm", "instance_norm") and axis != 1:
            kw["axis"] = axis
        rm = rv = None
        if op == "batch_norm":
            if not training:
                rm = rng.standard_normal(pshape).astype(dtype)
                rv = _pos(rng, pshape, dtype)
            kw.update(running_mean=rm, running_var=rv, training=training)
        stats_kw = {}
        if use_stats:
            fkw = dict(kw)
            if op == "batch_norm":
                # The forward would update the running stats in place: give it copies.
                fkw["running_mean"] = None if rm is None else rm.copy()
                fkw["running_var"] = None if rv is None else rv.copy()
            _, stats_kw["stats"] = fwd(x, *lead, **fkw, return_stats=True)

        def run():
            return fn(gy, x, *lead, **kw, **stats_kw)

        def compare(res):
            a = {"axis": axis} if op in ("batch_norm", "group_norm", "instance_norm") else {}
            if op == "batch_norm":
                exp = ref.batch_norm_backward(gy, x, rm, rv, w, b, training, 1e-5, **a)
            elif op == "layer_norm":
                exp = ref.layer_norm_backward(gy, x, pshape, w, b, 1e-5)
            elif op == "rms_norm":
                exp = ref.rms_norm_backward(gy, x, pshape, w, 1e-6)
            elif op == "group_norm":
                exp = ref.group_norm_backward(gy, x, groups, w, b, 1e-5, **a)
            else:
                exp = ref.instance_norm_backward(gy, x, w, b, 1e-5, **a)
            return [(f"grad {k}", getattr(res, k), v) for k, v in exp.items()]

        return Prepared(run, compare)

    return build


def _whitening_case(method, unbiased=False):
    def build(rn, rng, dtype, shape):
        m, d = shape
        # Correlated features with an offset; well conditioned so eps conventions do not matter.
        mix = rng.standard_normal((d, d)) + 2 * np.eye(d)
        x = (3.0 + rng.standard_normal((m, d)) @ mix).astype(dtype)
        eps = 1e-12

        def run():
            wh = rn.Whitening(method=method, eps=eps, unbiased=unbiased).fit(x)
            y = wh.transform(x)
            return wh, y, wh.inverse_transform(y)

        def compare(res):
            wh, y, back = res
            ey, mean, lam = ref.whiten(x, method, eps, unbiased)
            y = np.asarray(y)
            if method == "pca":
                # Eigenvectors are unique only up to sign: align each column with the reference.
                y = y * np.where(np.sum(y * ey, axis=0) < 0, -1, 1).astype(y.dtype)
            return [("transform", y, ey), ("mean_", np.asarray(wh.mean_), mean),
                    ("eigenvalues_", np.asarray(wh.eigenvalues_), lam),
                    ("inverse_transform", back, x)]

        return Prepared(run, compare)

    return build


def _iter_norm_case(groups, training=True, axis=1):
    def build(rn, rng, dtype, shape):
        c = _chan(shape, axis)
        d = c // groups
        x = _x(rng, shape, dtype)
        rm0 = rng.standard_normal(c).astype(dtype)
        # A well-conditioned symmetric matrix per group stands in for a trained running one.
        a = rng.standard_normal((groups, d, d)) * 0.1
        rwm0 = (np.eye(d) + a + np.swapaxes(a, 1, 2)).astype(dtype)
        kw = {"axis": axis} if axis != 1 else {}
        state = {}

        def run():
            state["rm"], state["rwm"] = rm0.copy(), rwm0.copy()
            return rn.iter_norm(x, state["rm"], state["rwm"], groups, 5, 1e-5, training, 0.1,
                                **kw)

        def compare(y):
            ey, erm, ewm = ref.iter_norm(x, rm0, rwm0, groups, 5, 1e-5, training, 0.1,
                                         axis=axis)
            return [("y", y, ey), ("running_mean", state["rm"], erm),
                    ("running_wm", state["rwm"], ewm)]

        return Prepared(run, compare)

    return build


_F4, _F8, _F2 = "float32", "float64", "float16"
# Gradients round a few more times than forwards (dx = rstd*(g - mean g - xhat*mean(g*xhat))).
_BWD_TOL = {"float32": (3e-5, 3e-5)}

register(
    DemoCase("batch_norm train NCHW", "batch_norm", _F4, (8, 16, 12, 12), _bn_case(True)),
    DemoCase("batch_norm train NHWC (axis=-1)", "batch_norm", _F4, (8, 12, 12, 16),
             _bn_case(True, axis=-1)),
    DemoCase("batch_norm train, no running stats", "batch_norm", _F4, (16, 8, 20),
             _bn_case(True, running=False)),
    DemoCase("batch_norm train momentum=None", "batch_norm", _F8, (64, 32),
             _bn_case(True, cumulative=True)),
    DemoCase("batch_norm train onnx momentum", "batch_norm", _F4, (4, 8, 10),
             _bn_case(True, momentum=0.9, convention="onnx")),
    DemoCase("batch_norm eval NCHW", "batch_norm", _F4, (8, 16, 12, 12), _bn_case(False)),
    DemoCase("batch_norm eval NHWC (axis=-1)", "batch_norm", _F8, (4, 6, 6, 24),
             _bn_case(False, axis=-1)),
    DemoCase("layer_norm", "layer_norm", _F4, (32, 256), _ln_case()),
    DemoCase("layer_norm over (10, 24)", "layer_norm", _F8, (4, 10, 24), _ln_case(ndims=2)),
    DemoCase("layer_norm float16", "layer_norm", _F2, (64, 128), _ln_case()),
    DemoCase("layer_norm return_stats", "layer_norm", _F4, (6, 5, 48), _ln_case(stats=True)),
    DemoCase("rms_norm", "rms_norm", _F4, (32, 256), _rms_case()),
    DemoCase("rms_norm over (6, 40), eps=1e-6", "rms_norm", _F8, (8, 6, 40),
             _rms_case(ndims=2, eps=1e-6)),
    DemoCase("rms_norm float16, no weight", "rms_norm", _F2, (16, 96), _rms_case(affine=False)),
    DemoCase("group_norm G=8", "group_norm", _F4, (4, 32, 8, 8), _gn_case(8)),
    DemoCase("group_norm G=4 NHWC (axis=-1)", "group_norm", _F4, (4, 8, 8, 32),
             _gn_case(4, axis=-1)),
    DemoCase("group_norm G=3 1-D", "group_norm", _F8, (3, 12, 30), _gn_case(3, affine=False)),
    DemoCase("instance_norm", "instance_norm", _F4, (4, 16, 10, 10), _in_case()),
    DemoCase("instance_norm running stats", "instance_norm", _F4, (4, 16, 10, 10),
             _in_case(running=True)),
    DemoCase("instance_norm NHWC (axis=-1)", "instance_norm", _F8, (3, 7, 7, 12),
             _in_case(axis=-1)),
    DemoCase("moments + merge (1|3|4 split)", "moments", _F4, (8, 16, 6, 6), _moments_case(),
             requires=("Moments",)),
    DemoCase("moments + merge NHWC (axis=-1)", "moments", _F8, (5, 4, 4, 12),
             _moments_case(axis=-1, split=(2, 0, 3))),
    DemoCase("batch_norm_backward train", "batch_norm_backward", _F4, (8, 6, 5, 5),
             _bwd_case("batch_norm"), tolerances=_BWD_TOL),
    DemoCase("batch_norm_backward train NHWC, stats", "batch_norm_backward", _F8, (6, 4, 4, 5),
             _bwd_case("batch_norm", axis=-1, use_stats=True)),
    DemoCase("batch_norm_backward eval", "batch_norm_backward", _F4, (8, 6, 5, 5),
             _bwd_case("batch_norm", training=False), tolerances=_BWD_TOL),
    DemoCase("layer_norm_backward", "layer_norm_backward", _F4, (16, 64),
             _bwd_case("layer_norm"), tolerances=_BWD_TOL),
    DemoCase("layer_norm_backward over (4, 6), stats", "layer_norm_backward", _F8, (5, 4, 6),
             _bwd_case("layer_norm", ndims=2, affine=False, use_stats=True)),
    DemoCase("rms_norm_backward", "rms_norm_backward", _F4, (16, 64), _bwd_case("rms_norm"),
             tolerances=_BWD_TOL),
    DemoCase("rms_norm_backward, stats", "rms_norm_backward", _F8, (6, 40),
             _bwd_case("rms_norm", use_stats=True)),
    DemoCase("group_norm_backward G=3", "group_norm_backward", _F4, (4, 12, 5, 5),
             _bwd_case("group_norm"), tolerances=_BWD_TOL),
    DemoCase("group_norm_backward NHWC, stats", "group_norm_backward", _F8, (3, 4, 4, 12),
             _bwd_case("group_norm", axis=-1, groups=4, use_stats=True)),
    DemoCase("instance_norm_backward", "instance_norm_backward", _F4, (4, 6, 7, 7),
             _bwd_case("instance_norm"), tolerances=_BWD_TOL),
    DemoCase("local_response_norm size=5", "local_response_norm", _F4, (4, 16, 7, 7),
             _lrn_case(5)),
    DemoCase("local_response_norm size=4 onnx window", "local_response_norm", _F4,
             (2, 12, 5, 5), _lrn_case(4, 2e-4, 0.5, 2.0, window="onnx")),
    DemoCase("local_response_norm alpha_over_size=False", "local_response_norm", _F8,
             (2, 10, 6), _lrn_case(3, 1e-4, 0.75, 2.0, alpha_over_size=False)),
    DemoCase("filter_response_norm + TLU", "filter_response_norm", _F4, (4, 16, 9, 9),
             _frn_case()),
    DemoCase("filter_response_norm NHWC (axis=-1)", "filter_response_norm", _F8, (2, 5, 5, 8),
             _frn_case(with_tau=False, axis=-1)),
    DemoCase("tlu", "tlu", _F4, (4, 16, 9, 9), _tlu_case()),
    DemoCase("gdn", "gdn", _F4, (2, 16, 8, 8), _gdn_case()),
    DemoCase("gdn inverse (IGDN)", "gdn", _F4, (2, 16, 8, 8), _gdn_case(inverse=True)),
    DemoCase("gdn variant=gdn1", "gdn", _F8, (2, 8, 5, 5), _gdn_case(variant="gdn1")),
    DemoCase("Whitening zca", "Whitening", _F8, (200, 6), _whitening_case("zca"),
             tolerances={_F8: (1e-9, 1e-9)}),
    DemoCase("Whitening pca, unbiased", "Whitening", _F8, (200, 6),
             _whitening_case("pca", unbiased=True), tolerances={_F8: (1e-9, 1e-9)}),
    DemoCase("Whitening cholesky", "Whitening", _F8, (200, 6), _whitening_case("cholesky"),
             tolerances={_F8: (1e-9, 1e-9)}),
    DemoCase("iter_norm G=2 train", "iter_norm", _F4, (8, 6, 4, 4), _iter_norm_case(2)),
    DemoCase("iter_norm G=1 train NHWC (axis=-1)", "iter_norm", _F8, (5, 3, 3, 4),
             _iter_norm_case(1, axis=-1)),
    DemoCase("iter_norm G=2 eval", "iter_norm", _F8, (4, 6, 5), _iter_norm_case(2, False)),
    DemoCase("mean_variance_norm", "mean_variance_norm", _F4, (4, 8, 6, 6), _mvn_case()),
    DemoCase("normalize p=2", "normalize", _F4, (16, 32), _normalize_case()),
    DemoCase("normalize p=1 axis=-1", "normalize", _F8, (4, 5, 6), _normalize_case(1.0, -1)),
)


# ---------------------------------------------------------------------------------------------
# Output helpers (rich when installed, plain text otherwise)
# ---------------------------------------------------------------------------------------------


def _have_rich() -> bool:
    return importlib.util.find_spec("rich") is not None


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]],
                file=None, left: int = 1) -> None:
    """A table with rich if installed, else aligned plain text (same content either way)."""
    file = file or sys.stdout
    if _have_rich():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i < left else "right", overflow="fold")
        for row in rows:
            table.add_row(*row)
        width = None if file.isatty() else 200
        Console(file=file, width=width, highlight=False).print(table)
        return
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) if rows else len(c)
              for i, c in enumerate(columns)]
    print(title, file=file)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)), file=file)


def _fmt_time(t: float) -> str:
    if np.isnan(t):
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def _fmt_num(v: float, spec: str) -> str:
    return "-" if v is None or np.isnan(v) else format(v, spec)


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------


def _import_rsnorm():
    import rsnorm

    return rsnorm


def cmd_info(args) -> int:
    rn = _import_rsnorm()
    rows = [("rsnorm", getattr(rn, "__version__", "?")),
            ("python", f"{platform.python_implementation()} {platform.python_version()}"),
            ("numpy", np.__version__),
            ("platform", f"{platform.system()} {platform.machine()}"),
            ("cpus", str(os.cpu_count()))]
    info = {}
    if hasattr(rn, "build_info"):
        try:
            info = dict(rn.build_info())
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            rows.append(("build_info", f"unavailable ({type(exc).__name__}: {exc})"))
    first = ("version", "profile", "simd", "num_threads", "features")
    for key in [k for k in first if k in info] + [k for k in info if k not in first]:
        val = info[key]
        if isinstance(val, (list, tuple, set)):
            val = ", ".join(map(str, val)) or "-"
        rows.append((f"build.{key}", str(val)))
    if hasattr(rn, "get_num_threads"):
        rows.append(("threads", str(rn.get_num_threads())))
    if os.environ.get("RAYON_NUM_THREADS"):
        rows.append(("RAYON_NUM_THREADS", os.environ["RAYON_NUM_THREADS"]))
    rows.extend(_gpu_rows())
    for name, val in rows:
        print(f"{name + ':':<22}{val}")
    return 0


def _gpu_rows() -> list[tuple[str, str]]:
    # wgpu is optional and heavy: never import it (nor rsnorm.gpu, which does) unless present.
    if importlib.util.find_spec("wgpu") is None:
        return [("gpu", "wgpu not installed (pip install 'rsnorm[gpu]')")]
    try:
        from rsnorm import gpu

        # Every adapter wgpu can see (the one in use first would need a device: info()).
        info = getattr(gpu, "adapters", lambda: None)() or gpu.info()
    except (ImportError, RuntimeError, AttributeError) as exc:
        return [("gpu", f"no GPU adapter ({type(exc).__name__}: {exc})")]
    if not info:
        return [("gpu", "no GPU adapter")]
    items = info if isinstance(info, (list, tuple)) else [info]
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            text = ", ".join(f"{k}={v}" for k, v in item.items())
        else:
            text = str(item)
        rows.append((f"gpu[{i}]" if len(items) > 1 else "gpu", text))
    return rows


def _select(cases: Sequence[DemoCase], ops: str | None) -> list[DemoCase]:
    if not ops:
        return list(cases)
    wanted = {o.strip() for o in ops.split(",") if o.strip()}
    unknown = wanted - {c.op for c in cases}
    if unknown:
        raise SystemExit(f"rsnorm: unknown op(s) {sorted(unknown)}; known: "
                         f"{sorted({c.op for c in cases})}")
    return [c for c in cases if c.op in wanted]


def _result_rows(results: Sequence[CaseResult], verbose: bool) -> list[list[str]]:
    rows = []
    for r in results:
        c = r.case
        status = r.status
        if r.status == "skipped" and verbose:
            status = f"skipped ({r.detail})"
        rows.append([c.label, c.op, c.dtype, "x".join(map(str, c.shape)),
                     _fmt_num(r.max_abs, ".2e"), _fmt_num(r.max_ulp, ".2f"),
                     _fmt_time(r.time_s), status])
    return rows


def _report_failures(results: Sequence[CaseResult]) -> None:
    for r in results:
        if r.failed:
            print(f"{r.status}: {r.case.label} [{r.case.dtype} {r.case.shape}]: {r.detail}",
                  file=sys.stderr)


def cmd_demo(args) -> int:
    rn = _import_rsnorm()
    cases = _select(DEMO_CASES, args.ops)
    results = run_cases(rn, cases, timing=not args.no_timing)
    shown = [r for r in results if r.status != "skipped" or args.verbose]
    print_table(f"rsnorm {getattr(rn, '__version__', '?')} demo: each op against a float64 "
                "NumPy reference (ulp for float16/32 outputs)",
                ["case", "op", "dtype", "shape", "max abs err", "max ulp", "time/call",
                 "status"], _result_rows(shown, args.verbose), left=4)
    skipped = sorted({r.case.op for r in results if r.status == "skipped"})
    if skipped and not args.verbose:
        print(f"not implemented yet (skipped): {', '.join(skipped)}")
    extra_failed = [hook.__name__ for hook in DEMO_EXTRAS if hook(rn, args) is False]
    _report_failures(results)
    failed = [r for r in results if r.failed]
    ran = [r for r in results if r.status != "skipped"]
    print(f"{len(ran) - len(failed)} of {len(ran)} checks passed"
          + (f", {len(failed)} FAILED" if failed else "")
          + (f"; failed demo sections: {', '.join(extra_failed)}" if extra_failed else ""))
    return 1 if failed or extra_failed else 0


# Extra demo sections (e.g. a small training loop) as callables ``hook(rn, args) -> bool``,
# run after the table; False fails the command. Later issues append here.
DEMO_EXTRAS: list[Callable[[Any, argparse.Namespace], bool]] = []


def _train_demo(rn, args: argparse.Namespace) -> bool:
    """The training section: a small NumPy network with and without batch norm (and with
    layer/group norm) on built-in data; passes when batch norm ends with the lower loss."""
    if getattr(args, "no_train", False) or getattr(args, "ops", None):
        return True
    from . import demo_train

    return demo_train.cli_hook(rn, args)


DEMO_EXTRAS.append(_train_demo)


# ---------------------------------------------------------------------------------------------
# ONNX conformance (used by `check` when the onnx package with its node test data is present)
# ---------------------------------------------------------------------------------------------

# ONNX's own backend tests compare with rtol=1e-3, atol=1e-7; its expected outputs are computed
# in float32, so ours (float64 statistics) differ from them by float32 rounding.
ONNX_RTOL, ONNX_ATOL = 1e-3, 1e-6


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)


def _onnx_run(rn, node, opset: int, ins: list) -> list:
    """Evaluate one ONNX node with rsnorm; returns its outputs in ONNX order."""
    a = _attrs(node)
    op = node.op_type
    x = ins[0]
    if op == "BatchNormalization":
        eps = a.get("epsilon", 1e-5)
        mom = a.get("momentum", 0.9)
        scale, bias, mean, var = ins[1:5]
        if a.get("training_mode", 0):
            rm, rv = mean.copy(), var.copy()
            y = rn.batch_norm(x, rm, rv, scale, bias, True, mom, eps,
                              momentum_convention="onnx")
            return [y, rm, rv]
        return [rn.batch_norm(x, mean, var, scale, bias, False, mom, eps)]
    if op == "InstanceNormalization":
        return [rn.instance_norm(x, None, None, ins[1], ins[2], eps=a.get("epsilon", 1e-5))]
    if op == "LayerNormalization":
        axis = a.get("axis", -1) % x.ndim
        ns = x.shape[axis:]
        bias = ins[2] if len(ins) > 2 else None
        y, st = rn.layer_norm(x, ns, ins[1], bias, a.get("epsilon", 1e-5), return_stats=True)
        keep = x.shape[:axis] + (1,) * (x.ndim - axis)
        return [y, np.reshape(st.mean, keep), np.reshape(st.rstd, keep)]
    if op == "RMSNormalization":
        axis = a.get("axis", -1) % x.ndim
        ns = x.shape[axis:]
        w = np.broadcast_to(ins[1], ns)
        return [rn.rms_norm(x, ns, w, a.get("epsilon", 1e-5))]
    if op == "GroupNormalization":
        if opset < 21:
            raise NotImplementedError("opset-18 per-group scale")
        return [rn.group_norm(x, a["num_groups"], ins[1], ins[2], a.get("epsilon", 1e-5))]
    if op == "LRN":
        return [rn.local_response_norm(x, a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75),
                                       a.get("bias", 1.0), window="onnx")]
    if op == "MeanVarianceNormalization":
        return [rn.mean_variance_norm(x, axes=tuple(a.get("axes", (0, 2, 3))))]
    if op == "LpNormalization":
        # F.normalize's default eps turns a zero vector into zeros, which ONNX expects too.
        return [rn.normalize(x, p=float(a.get("p", 2)), axis=a.get("axis", -1))]
    raise NotImplementedError(op)


ONNX_OPS = {"BatchNormalization": "batch_norm", "InstanceNormalization": "instance_norm",
            "LayerNormalization": "layer_norm", "RMSNormalization": "rms_norm",
            "GroupNormalization": "group_norm", "LRN": "local_response_norm",
            "MeanVarianceNormalization": "mean_variance_norm", "LpNormalization": "normalize"}


def onnx_conformance(rn, verbose=False) -> tuple[int, int, int, list[str]]:
    """(passed, failed, skipped, messages) over the single-node ONNX tests of our ops."""
    import onnx
    from onnx import numpy_helper

    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    dirs = sorted((root / "node").glob("test_*"))
    dirs += sorted((root / "pytorch-converted").glob("test_BatchNorm*_eval"))
    passed = failed = skipped = 0
    msgs: list[str] = []
    for d in dirs:
        if "_expanded" in d.name or not (d / "model.onnx").exists():
            continue
        model = onnx.load(str(d / "model.onnx"))
        if len(model.graph.node) != 1 or model.graph.node[0].op_type not in ONNX_OPS:
            continue
        node = model.graph.node[0]
        if not hasattr(rn, ONNX_OPS[node.op_type]):
            skipped += 1
            continue
        consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        data_dir = d / "test_data_set_0"
        feeds = [numpy_helper.to_array(onnx.load_tensor(str(p)))
                 for p in sorted(data_dir.glob("input_*.pb"))]
        expected = [numpy_helper.to_array(onnx.load_tensor(str(p)))
                    for p in sorted(data_dir.glob("output_*.pb"))]
        graph_inputs = [i.name for i in model.graph.input if i.name not in consts]
        values = dict(zip(graph_inputs, feeds))
        values.update(consts)
        ins = [values[n] if n else None for n in node.input]
        try:
            outs = _onnx_run(rn, node, _opset(model), ins)
        except NotImplementedError as exc:
            skipped += 1
            if verbose:
                msgs.append(f"skip {d.name}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            failed += 1
            msgs.append(f"FAIL {d.name}: {type(exc).__name__}: {exc}")
            continue
        bad = []
        for i, (got, exp) in enumerate(zip(outs, expected)):
            ok, _, _, why = compare_arrays(
                got, exp, {np.asarray(got).dtype.name: (ONNX_RTOL, ONNX_ATOL)})
            if not ok:
                bad.append(f"output {i}: {why}")
        if bad:
            failed += 1
            msgs.append(f"FAIL {d.name}: " + "; ".join(bad))
        else:
            passed += 1
            if verbose:
                msgs.append(f"ok   {d.name}")
    return passed, failed, skipped, msgs


def cmd_check(args) -> int:
    rn = _import_rsnorm()
    results = run_cases(rn, DEMO_CASES, timing=False)
    ran = [r for r in results if r.status != "skipped"]
    failed = [r for r in results if r.failed]
    print(f"reference checks: {len(ran) - len(failed)} passed, {len(failed)} failed, "
          f"{len(results) - len(ran)} skipped (op not implemented yet)")
    if args.verbose:
        print_table("reference checks", ["case", "op", "dtype", "shape", "max abs err",
                                          "max ulp", "time/call", "status"],
                    _result_rows(results, True), left=4)
    _report_failures(results)
    bad = len(failed)
    if args.no_onnx:
        print("onnx conformance: not run (--no-onnx)")
    elif importlib.util.find_spec("onnx") is None:
        print("onnx conformance: not run (pip install onnx==1.22.0 for the node test data)")
    else:
        p, f, s, msgs = onnx_conformance(rn, verbose=args.verbose)
        print(f"onnx conformance: {p} passed, {f} failed, {s} skipped")
        for m in msgs:
            print("  " + m, file=sys.stderr if m.startswith("FAIL") else sys.stdout)
        if p + f == 0 and s == 0:
            print("  (no node test data found in this onnx wheel: onnx==1.22.0 ships it)")
        bad += f
    print("check: " + ("FAILED" if bad else "passed"))
    return 1 if bad else 0


def cmd_bench(argv: list[str]) -> int:
    from . import _bench

    return _bench.main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rsnorm", description="rsnorm: normalization layers for "
                                "NumPy with a Rust core.")
    sub = p.add_subparsers(dest="command", metavar="{info,demo,check,bench}")
    sub.add_parser("info", help="version, build, SIMD level, threads, GPU adapters")
    d = sub.add_parser("demo", help="run every op on built-in data against float64 references")
    d.add_argument("--ops", help="comma-separated op names (default: all)")
    d.add_argument("--no-timing", action="store_true", help="skip the time column")
    d.add_argument("-v", "--verbose", action="store_true", help="also list skipped cases")
    d.add_argument("--no-train", action="store_true", help="skip the training demo")
    d.add_argument("--train-steps", type=int, default=300, help="SGD steps per variant")
    d.add_argument("--train-plot", metavar="FILE.png",
                   help="save the loss curves (needs matplotlib)")
    c = sub.add_parser("check", help="conformance self-test (references + ONNX test data)")
    c.add_argument("--no-onnx", action="store_true", help="skip the ONNX conformance data")
    c.add_argument("-v", "--verbose", action="store_true")
    # The bench engine owns its options (rsnorm bench --help); listed here for the overview.
    sub.add_parser("bench", help="time rsnorm against NumPy, PyTorch and onnxruntime",
                   add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return {"info": cmd_info, "demo": cmd_demo, "check": cmd_check}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
