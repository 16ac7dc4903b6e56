"""Every public name of ``rsnorm`` → how to fuzz it.

``ENTRIES[name]`` is an ``Entry`` whose ``build(d)`` draws one call (a ``Case``: function,
arguments, the expected outcome and a checker against a float64 reference). ``d`` is a ``Draw``:
either hypothesis' ``data.draw`` (fuzzing) or a seeded NumPy generator (plain tests), so the same
builders serve both. Backward ops are derived from their forward's builder and checked by a
central finite difference of the float64 forward reference.

A name in ``rsnorm.__all__`` that has no entry fails ``test_every_public_name_is_registered``
(tests/python/hostile/test_fuzz.py): new public functions cannot escape fuzzing. Only result
types (NamedTuples) and exception classes are exempt, by what they are, not by name.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import reference as ref
import rsnorm as rn
from hypothesis import strategies as st

from . import refs

F16, F32, F64 = np.float16, np.float32, np.float64
DTYPES = (F16, F32, F64)
LAYOUTS = ("c", "f", "slice", "neg", "transpose", "broadcast", "readonly")


# ------------------------------------------------------------------------------- drawing


class Draw:
    """The few kinds of choice the builders make, from hypothesis or from a seed."""

    def __init__(self, draw=None, seed=None):
        self._draw = draw
        if draw is not None:
            seed = draw(st.integers(0, 2**32 - 1), label="seed")
        self.rng = np.random.default_rng(seed)

    def choice(self, seq):
        seq = list(seq)
        if self._draw is not None:
            return self._draw(st.sampled_from(seq))
        return seq[int(self.rng.integers(len(seq)))]

    def int(self, lo, hi):
        if self._draw is not None:
            return self._draw(st.integers(lo, hi))
        return int(self.rng.integers(lo, hi + 1))

    def bool(self, p=0.5):
        if self._draw is not None:
            return self._draw(st.booleans())
        return bool(self.rng.random() < p)

    def rare(self):
        """True about one time in eight: a hostile variation of an otherwise valid call."""
        return self.int(0, 7) == 0


def values(d: Draw, shape, dtype):
    loc = d.choice([0.0, 0.0, 3.0, -50.0, 1e4])
    scale = d.choice([1.0, 1.0, 1e-3, 100.0])
    if dtype == F16 and abs(loc) > 100:
        loc = 100.0
    v = (loc + scale * d.rng.standard_normal(shape)).astype(dtype)
    if v.size and d.rare():
        v.flat[d.int(0, v.size - 1)] = np.nan
    return v


def layout(d: Draw, v: np.ndarray, kind=None):
    """A view with v's values (except 'broadcast', which repeats one slice) and other strides."""
    kind = kind or d.choice(LAYOUTS)
    if v.ndim == 0:
        return v.copy()
    ax = d.int(0, v.ndim - 1)
    if kind == "f":
        return np.asfortranarray(v)
    if kind == "slice":
        big = np.zeros(v.shape[:ax] + (2 * v.shape[ax] + 1,) + v.shape[ax + 1:], v.dtype)
        sl = [slice(None)] * v.ndim
        sl[ax] = slice(1, None, 2)
        big[tuple(sl)] = v
        return big[tuple(sl)]
    if kind == "neg":
        sl = [slice(None)] * v.ndim
        sl[ax] = slice(None, None, -1)
        return np.ascontiguousarray(v[tuple(sl)])[tuple(sl)]
    if kind == "transpose":
        perm = list(d.rng.permutation(v.ndim))
        inv = list(np.argsort(perm))
        return np.ascontiguousarray(v.transpose(perm)).transpose(inv)
    if kind == "broadcast":
        sl = [slice(None)] * v.ndim
        sl[ax] = slice(0, 1)
        return np.broadcast_to(v[tuple(sl)], v.shape)
    if kind == "readonly":
        r = v.copy()
        r.flags.writeable = False
        return r
    return v.copy()


def shape_of(d: Draw, rank, lo=0, hi=5):
    return tuple(d.int(lo, hi) for _ in range(rank))


def param(d: Draw, n, positive=False, shape=None):
    dt = d.choice(DTYPES)
    shape = (n,) if shape is None else shape
    v = d.rng.uniform(0.5, 1.5, shape) if positive else d.rng.standard_normal(shape)
    return layout(d, v.astype(dt), d.choice(["c", "c", "slice", "neg", "readonly"]))


def eps_value(d: Draw, default):
    """(eps, valid); eps=0 is left to the targeted tests (constant rows give 0·inf there)."""
    if d.rare():
        return d.choice([-1e-5, -1.0, math.nan, math.inf, -math.inf]), False
    return d.choice([default, 1e-12, 1e-5, 0.1, 2.0]), True


# ------------------------------------------------------------------------------- checking


# float64: data like 1e4 + 1e-3·N(0,1) loses log10(1e4/1e-3) digits in any float64 two-pass
# mean, the reference's included; the strict ulp bounds live in test_numerics.py. The GPU fuzzer
# (test_gpu_limits.py) swaps in the documented GPU tolerances.
TOL = {F64: 1e-8, F32: 2e-5, F16: 4e-3}
# Set by the GPU fuzzer: the documented GPU backward tolerance is relative to the largest
# gradient (atol 1e-4 · max|g|), looser than float32 rounding for small components.
GPU_FD_ATOL = 0.0


def tol(dtype):
    return TOL[np.dtype(dtype).type]


def assert_close(got, want, dtype, name="y", scale=None, tol_as=None):
    got = np.asarray(got)
    want = np.asarray(want, dtype=F64)
    assert got.dtype == np.dtype(dtype), (name, got.dtype, dtype)
    dtype = tol_as or dtype
    assert got.shape == want.shape, (name, got.shape, want.shape)
    g = got.astype(F64)
    nan_w = np.isnan(want)
    assert np.array_equal(np.isnan(g), nan_w), f"{name}: NaN pattern differs"
    fin = ~nan_w
    if not fin.any():
        return
    inf_w = np.isinf(want) & fin
    assert np.array_equal(g[inf_w], want[inf_w]), f"{name}: infinities differ"
    fin &= ~inf_w
    # Values beyond the output dtype's range round to ±inf (IEEE overflow): e.g. IGDN of
    # float16 x ~ 100 gives 1e5 > 65504. Expect ±inf there (or the largest finite value, for a
    # reference within the tolerance of the boundary).
    with np.errstate(over="ignore"):
        over = fin & np.isinf(want.astype(got.dtype))
    if over.any():
        big = np.finfo(got.dtype).max * (1 - tol(dtype))
        ok = (np.sign(g[over]) == np.sign(want[over])) & (np.abs(g[over]) >= big)
        assert ok.all(), f"{name}: overflow to ±inf expected, got {g[over][~ok][:4]}"
        fin &= ~over
    if scale is None:
        scale = max(1.0, float(np.abs(want[fin]).max(initial=0.0)))
    t = tol(dtype)
    err = np.abs(g[fin] - want[fin])
    bound = t * (np.abs(want[fin]) + scale)
    bad = err > bound
    assert not bad.any(), (
        f"{name}: {int(bad.sum())}/{bad.size} off (tol {t}); got {g[fin][bad][:4]}, "
        f"want {want[fin][bad][:4]}"
    )


def stats_dtype(xd):
    return ref.stats_dtype(xd)


# ------------------------------------------------------------------------------- cases


@dataclass
class Case:
    fn: Callable
    args: tuple
    kwargs: dict
    # None: must succeed and pass `check`; ValueError / TypeError: must raise it;
    # "either": a documented ValueError or a correct result (edge cases the spec leaves open).
    expect: Any = None
    check: Callable | None = None
    # Arrays that must not be modified by the call.
    frozen: list = field(default_factory=list)
    # Float64 forward reference as a function of the differentiable inputs (for backward).
    ref_fn: Callable | None = None
    diff: dict = field(default_factory=dict)


@dataclass
class Entry:
    build: Callable[[Draw], Case] | None = None
    # Deterministic call for layout / thread / memory tests: inputs(rng, dtype) -> tuple of
    # arrays, call(*arrays) -> result. None for entries that are not array ops.
    inputs: Callable | None = None
    call: Callable | None = None
    rowwise: bool = False  # rows along axis 0 are independent (HOSTILE 15)
    has_out: bool = False
    note: str = ""


def _first(r):
    return r[0] if isinstance(r, tuple) else r


def _out_kw(d: Draw, x, kw):
    """Maybe add out= (fresh, strided or Fortran); returns the out array or None."""
    if not d.bool() or x.size == 0 and d.bool():
        return None
    kind = d.choice(["c", "f", "slice", "neg"])
    out = layout(d, np.full(x.shape, np.nan, x.dtype), kind)
    kw["out"] = out
    return out


def _check_out(out, res):
    if out is not None:
        assert _first(res) is out, "out= must be returned as is"


# -- the statistics family ---------------------------------------------------------------


def build_batch_norm(d: Draw) -> Case:
    rank = d.int(2, 5)
    shp = shape_of(d, rank, 0, 4)
    dt = d.choice(DTYPES)
    x = layout(d, values(d, shp, dt))
    axis = d.choice([1, 1, -1, rank - 2, 0])
    ax = axis % rank
    c = shp[ax]
    n = math.prod(s for i, s in enumerate(shp) if i != ax)
    training = d.bool()
    kw: dict = {"training": training, "axis": axis}
    expect = None
    w = b = rm = rv = nbt = None
    if d.bool():
        w = kw["weight"] = param(d, c)
    if d.bool():
        b = kw["bias"] = param(d, c)
    if d.bool():
        rm = param(d, c).copy()
        rv = np.abs(param(d, c).copy()) + 0.5
        rm.flags.writeable = rv.flags.writeable = True
        kw["running_mean"], kw["running_var"] = rm, rv
    soft = False  # an error only the forward must raise (the running-stat update rules)
    momentum = d.choice([0.1, 0.0, 1.0, 0.5, None])
    conv = d.choice(["torch", "torch", "onnx"])
    kw["momentum_convention"] = conv
    kw["momentum"] = momentum
    if momentum is None:
        if conv == "onnx":
            expect = ValueError if training and rm is not None else "either"
            soft = True
        elif rm is not None and training:
            if d.bool():
                nbt = kw["num_batches_tracked"] = np.array(d.int(0, 5), np.int64)
            else:
                expect, soft = ValueError, True
    elif d.rare():
        kw["momentum"] = d.choice([-0.1, 1.5, math.nan])
        expect = ValueError
    kw["eps"], ok = eps_value(d, 1e-5)
    if not ok:
        expect = ValueError
    if training and n == 1:
        expect = expect or ValueError
    if ax == 0:  # the batch axis cannot be the channel axis
        expect = ValueError
    kw["return_stats"] = d.bool()
    out = _out_kw(d, x, kw)
    if d.rare():
        kw["axis"] = d.choice([rank, -rank - 1, 7])
        expect = ValueError
    rm0 = None if rm is None else rm.copy()
    rv0 = None if rv is None else rv.copy()
    nbt0 = None if nbt is None else int(nbt)

    def check(res):
        _check_out(out, res)
        y64, mean, rstd, nrm, nrv = ref.batch_norm(
            np.array(x), rm0, rv0, w, b, training=training, momentum=momentum, eps=kw["eps"],
            axis=axis, num_batches_tracked=nbt0, momentum_convention=conv)
        y = _first(res)
        assert_close(y, y64, dt)
        if kw["return_stats"]:
            assert_close(res[1].mean, mean, stats_dtype(dt), "mean")
            assert_close(res[1].rstd, rstd, stats_dtype(dt), "rstd")
        if rm is not None:
            if training and n > 0:
                assert_close(rm, nrm, rm.dtype, "running_mean")
                assert_close(rv, nrv, rv.dtype, "running_var")
            else:
                assert ref.assert_bitwise_equal(rm, rm0) is None
                assert ref.assert_bitwise_equal(rv, rv0) is None
        if nbt is not None:
            # Counting an empty training batch is not specified; eval never counts.
            counted = training and n > 0 and c > 0
            allowed = {nbt0 + 1} if counted else {nbt0, nbt0 + int(training)}
            assert int(nbt) in allowed, (int(nbt), nbt0)

    def ref_fn(v):
        # y does not depend on the running-statistics update rule.
        return ref.batch_norm(v["x"], rm0, rv0, v.get("weight"), v.get("bias"), training,
                              0.1, kw["eps"], axis=axis)[0]

    case = Case(rn.batch_norm, (x,), kw, expect, check, [x, w, b], ref_fn,
                {"x": x, "weight": w, "bias": b})
    case.soft = soft and kw["eps"] == kw["eps"] and ok and not (training and n == 1)
    return case


def build_layer_norm(d: Draw, rms=False) -> Case:
    rank = d.int(1, 4)
    shp = shape_of(d, rank, 0, 5)
    dt = d.choice(DTYPES)
    x = layout(d, values(d, shp, dt))
    k = d.int(1, rank)
    ns = shp[rank - k:]
    expect = None
    if d.rare():
        ns = d.choice([(), tuple(s + 1 for s in ns), (3,) * (rank + 1)])
        expect = ValueError
    ns_arg = ns[0] if len(ns) == 1 and d.bool() else ns
    kw: dict = {}
    w = b = None
    if d.bool():
        w = kw["weight"] = param(d, 0, shape=shp[rank - k:])
    if not rms and d.bool():
        b = kw["bias"] = param(d, 0, shape=shp[rank - k:])
    if rms:
        eps, ok = eps_value(d, None)
    else:
        eps, ok = eps_value(d, 1e-5)
    kw["eps"] = eps
    expect = expect or (None if ok else ValueError)
    kw["return_stats"] = d.bool()
    out = _out_kw(d, x, kw)
    fn = rn.rms_norm if rms else rn.layer_norm

    def check(res):
        _check_out(out, res)
        if rms:
            y64, rstd = ref.rms_norm(np.array(x), ns, w, eps)
        else:
            y64, mean, rstd = ref.layer_norm(np.array(x), ns, w, b, eps)
        assert_close(_first(res), y64, dt)
        if kw["return_stats"]:
            st_ = res[1]
            assert_close(st_.rstd, rstd, stats_dtype(dt), "rstd")
            if rms:
                assert st_.mean is None
            else:
                assert_close(st_.mean, mean, stats_dtype(dt), "mean")

    def ref_fn(v):
        if rms:
            return ref.rms_norm(v["x"], ns, v.get("weight"), eps if eps is not None else
                                ref.rms_eps_default(dt))[0]
        return ref.layer_norm(v["x"], ns, v.get("weight"), v.get("bias"), eps)[0]

    return Case(fn, (x, ns_arg), kw, expect, check, [x, w, b], ref_fn,
                {"x": x, "weight": w, "bias": b})


def build_rms_norm(d):
    return build_layer_norm(d, rms=True)


def build_group_norm(d: Draw) -> Case:
    rank = d.int(2, 5)
    g = d.int(1, 3)
    cpg = d.int(0, 3)
    shp = list(shape_of(d, rank, 0, 3))
    axis = d.choice([1, 1, -1])
    ax = axis % rank
    shp[ax] = g * cpg
    if ax == 0:
        axis, ax = 1, 1
        shp[1] = g * cpg
    shp = tuple(shp)
    dt = d.choice(DTYPES)
    x = layout(d, values(d, shp, dt))
    c = shp[ax]
    kw: dict = {"axis": axis}
    expect = None
    groups = g
    if d.rare():
        groups = d.choice([0, -1, c + 1 if c else 0])
        expect = ValueError
    w = b = None
    if d.bool():
        w = kw["weight"] = param(d, c)
    if d.bool():
        b = kw["bias"] = param(d, c)
    kw["eps"], ok = eps_value(d, 1e-5)
    expect = expect or (None if ok else ValueError)
    kw["return_stats"] = d.bool()
    out = _out_kw(d, x, kw)
    if c == 0 and groups > 0:
        # C = 0 channels in G groups: an empty output or a clear error are both reasonable.
        expect = expect or "either"

    def check(res):
        _check_out(out, res)
        xm = np.moveaxis(np.array(x, F64), ax, 1)
        if x.size == 0:
            assert _first(res).shape == shp and _first(res).dtype == dt
            return
        y64, mean, rstd = ref.group_norm(xm, groups, w, b, kw["eps"], axis=1)
        assert_close(_first(res), np.moveaxis(y64, 1, ax), dt)
        if kw["return_stats"]:
            assert_close(res[1].mean, mean, stats_dtype(dt), "mean")
            assert_close(res[1].rstd, rstd, stats_dtype(dt), "rstd")

    def ref_fn(v):
        return ref.group_norm(v["x"], groups, v.get("weight"), v.get("bias"), kw["eps"],
                              axis=axis)[0]

    return Case(rn.group_norm, (x, groups), kw, expect, check, [x, w, b], ref_fn,
                {"x": x, "weight": w, "bias": b})


def build_instance_norm(d: Draw) -> Case:
    rank = d.int(2, 5)
    shp = shape_of(d, rank, 0, 4)
    dt = d.choice(DTYPES)
    x = layout(d, values(d, shp, dt))
    axis = d.choice([1, 1, -1])
    ax = axis % rank
    if ax == 0:
        axis, ax = 1, 1
    c = shp[ax]
    s = math.prod(v for i, v in enumerate(shp) if i not in (0, ax))
    use = d.bool() or d.bool()
    kw: dict = {"axis": axis, "use_input_stats": use}
    w = b = rm = rv = None
    if d.bool():
        w = kw["weight"] = param(d, c)
    if d.bool():
        b = kw["bias"] = param(d, c)
    if d.bool() or not use:
        rm = param(d, c).copy()
        rv = np.abs(param(d, c).copy()) + 0.5
        kw["running_mean"], kw["running_var"] = rm, rv
    kw["momentum"] = d.choice([0.1, 0.0, 1.0])
    expect = None
    if d.rare():
        kw["momentum"] = d.choice([-1.0, 2.0, math.nan])
        expect = ValueError
    kw["eps"], ok = eps_value(d, 1e-5)
    expect = expect or (None if ok else ValueError)
    if use and s == 1:
        # An empty batch is also a zero-size input (HOSTILE 19): an empty result is fine there.
        expect = expect or (ValueError if shp[0] else "either")
    kw["return_stats"] = d.bool()
    out = _out_kw(d, x, kw)
    rm0 = None if rm is None else rm.copy()
    rv0 = None if rv is None else rv.copy()
    if use and s == 0 and rm is not None and shp[0] * c > 0:
        expect = expect or "either"
    if x.size == 0 and expect is ValueError and ok and kw["momentum"] == kw["momentum"]:
        expect = "either"

    def check(res):
        _check_out(out, res)
        y64, mean, rstd, nrm, nrv = ref.instance_norm(
            np.array(x), rm0, rv0, w, b, use, kw["momentum"], kw["eps"], axis=axis)
        assert_close(_first(res), y64, dt)
        if kw["return_stats"]:
            assert_close(res[1].mean, mean, stats_dtype(dt), "mean")
            assert_close(res[1].rstd, rstd, stats_dtype(dt), "rstd")
        if rm is not None and use and shp[0] * s > 0:
            assert_close(rm, nrm, rm.dtype, "running_mean")
            assert_close(rv, nrv, rv.dtype, "running_var")

    def ref_fn(v):
        return ref.instance_norm(v["x"], rm0, rv0, v.get("weight"), v.get("bias"), use,
                                 kw["momentum"], kw["eps"], axis=axis)[0]

    return Case(rn.instance_norm, (x,), kw, expect, check, [x, w, b], ref_fn,
                {"x": x, "weight": w, "bias": b})


def build_moments(d: Draw) -> Case:
    rank = d.int(1, 4)
    shp = shape_of(d, rank, 0, 5)
    dt = d.choice(DTYPES)
    x = layout(d, values(d, shp, dt))
    axis = d.int(-rank, rank - 1)
    expect = None
    if d.rare():
        axis = d.choice([rank, -rank - 1])
        expect = ValueError

    def check(res):
        count, mean, m2 = ref.moments(np.array(x), axis)
        assert res.count == count
        assert res.mean.dtype == F64 and res.m2.dtype == F64
        t = F64 if dt == F64 else F32
        assert_close(res.mean, mean, F64, "mean", tol_as=t)
        assert_close(res.m2, m2, F64, "m2", tol_as=t, scale=max(1.0, float(np.nanmax(
            np.abs(m2), initial=0))))
        if count == 0:
            assert np.isnan(res.mean).all()

    return Case(rn.moments, (x,), {"axis": axis}, expect, check, [x])


# -- whitening --------------------------------------------------------------------------


def build_iter_norm(d: Draw) -> Case:
    rank = d.int(2, 4)
    g = d.int(1, 2)
    dd = d.int(1, 3)
    shp = list(shape_of(d, rank, 1, 4))
    axis = d.choice([1, -1])
    ax = axis % rank
    shp[ax] = g * dd
    shp = tuple(shp)
    dt = d.choice(DTYPES)
    x = layout(d, values(d, shp, dt))
    c = shp[ax]
    training = d.bool()
    T = d.int(0, 6)
    kw: dict = {"num_groups": g, "T": T, "training": training, "axis": axis}
    rm = rwm = None
    if not training or d.bool():
        rm = d.rng.standard_normal(c)
        a = d.rng.standard_normal((g, dd, dd)) * 0.3
        rwm = np.eye(dd) + a @ a.transpose(0, 2, 1)
        kw["running_mean"], kw["running_wm"] = rm, rwm
    kw["eps"], ok = eps_value(d, 1e-5)
    expect = None if ok else ValueError
    out = _out_kw(d, x, kw)
    rm0 = None if rm is None else rm.copy()
    rwm0 = None if rwm is None else rwm.copy()

    def ref_fn(v):
        return refs.iter_norm(v["x"], rm0, rwm0, g, T, kw["eps"], training, axis)

    def check(res):
        _check_out(out, res)
        y64 = ref_fn({"x": np.array(x)})
        assert_close(_first(res), y64, dt, scale=max(1.0, float(np.nanmax(np.abs(y64)))))

    return Case(rn.iter_norm, (x,), kw, expect, check, [x], ref_fn, {"x": x})


def build_whitening(d: Draw) -> Case:
    n = d.int(0, 12)
    f = d.int(1, 4)
    dt = d.choice([F32, F64])
    v = values(d, (n, f), dt)
    if d.bool() and f > 1:
        v[:, -1] = v[:, 0]  # rank-deficient covariance: finite output (HOSTILE 11)
    X = layout(d, v, d.choice(["c", "f", "neg", "transpose", "readonly"]))
    method = d.choice(["zca", "pca", "cholesky"])
    eps = d.choice([1e-5, 1e-3, 0.5])
    unbiased = d.bool()
    expect = ValueError if n <= 1 else None
    if np.isnan(v).any() and n > 1:
        expect = "either"

    def run():
        w = rn.Whitening(method, eps, unbiased).fit(X)
        return w, w.transform(X)

    def check(res):
        w, Y = res
        assert Y.dtype == dt and Y.shape == X.shape
        if np.isnan(v).any():
            return
        gram, wz, xc, cond = refs.whitening_gram(np.array(X), eps, unbiased)
        Y64 = Y.astype(F64)
        scale = max(1.0, float(np.abs(gram).max()))
        # (Σ + eps·I)⁻¹ amplifies rounding by its condition number.
        t = max(1e-8, 1e-14 * cond) if dt == F64 else max(2e-3, 1e-7 * cond)
        np.testing.assert_allclose(Y64 @ Y64.T, gram, rtol=t, atol=t * scale)
        if method == "zca":
            assert_close(Y, xc @ wz.T, dt, scale=max(1.0, float(np.abs(xc @ wz.T).max())))
        back = w.inverse_transform(Y)
        assert np.isfinite(back).all()

    return Case(lambda: run(), (), {}, expect, check, [X])


# -- the channel-mixing family ------------------------------------------------------------


def _mix_x(d: Draw, min_rank=2, max_rank=4, lo=0, hi=4):
    rank = d.int(min_rank, max_rank)
    shp = shape_of(d, rank, lo, hi)
    dt = d.choice(DTYPES)
    x = layout(d, values(d, shp, dt))
    axis = d.choice([1, 1, -1])
    if axis % rank == 0:
        axis = 1
    return x, dt, axis, shp[axis % rank]


def build_lrn(d: Draw) -> Case:
    x, dt, axis, _ = _mix_x(d, 3, 5)
    size = d.int(1, 6)
    kw = {"alpha": d.choice([1e-4, 0.5, 2.0]), "beta": d.choice([0.75, 0.5, 1.0]),
          "k": d.choice([1.0, 2.0]), "alpha_over_size": d.bool(),
          "window": d.choice(["torch", "onnx"]), "axis": axis}
    expect = None
    if d.rare():
        size = d.choice([0, -3])
        expect = ValueError
    out = _out_kw(d, x, kw)
    a = {k: v for k, v in kw.items() if k != "out"}

    def ref_fn(v):
        return refs.lrn(v["x"], size, **a)

    def check(res):
        _check_out(out, res)
        assert_close(_first(res), ref_fn({"x": np.array(x)}), dt)

    return Case(rn.local_response_norm, (x, size), kw, expect, check, [x], ref_fn, {"x": x})


def build_frn(d: Draw) -> Case:
    x, dt, axis, c = _mix_x(d, 2, 5)
    kw: dict = {"axis": axis}
    w = b = tau = le = None
    if d.bool():
        w = kw["weight"] = param(d, c)
    if d.bool():
        b = kw["bias"] = param(d, c)
    if d.bool():
        tau = kw["tau"] = param(d, c)
    if d.bool():
        le = kw["learned_eps"] = d.choice([1e-3, np.array([0.01]), param(d, c)])
    kw["eps"], ok = eps_value(d, 1e-6)
    expect = None if ok else ValueError
    kw["return_stats"] = d.bool()
    out = _out_kw(d, x, kw)

    def ref_fn(v):
        return refs.frn(v["x"], v.get("weight"), v.get("bias"), v.get("tau"), kw["eps"],
                        v.get("learned_eps", le), axis)

    def check(res):
        _check_out(out, res)
        assert_close(_first(res), ref_fn({"x": np.array(x), "weight": w, "bias": b,
                                          "tau": tau}), dt)
        if kw["return_stats"]:
            xa = np.array(x, F64)
            assert_close(res[1].rstd, refs.frn_rstd(xa, kw["eps"], le, axis),
                         stats_dtype(dt), "rstd")

    diff = {"x": x, "weight": w, "bias": b, "tau": tau}
    if isinstance(le, np.ndarray) and le.size == c:
        diff["learned_eps"] = le
    return Case(rn.filter_response_norm, (x,), kw, expect, check, [x, w, b, tau], ref_fn, diff)


def build_tlu(d: Draw) -> Case:
    x, dt, axis, c = _mix_x(d, 2, 5)
    tau = param(d, c)
    kw: dict = {"axis": axis}
    expect = None
    if d.rare():
        tau = param(d, c + 1)
        expect = ValueError
    out = _out_kw(d, x, kw)

    def ref_fn(v):
        return refs.tlu(v["x"], v["tau"], axis)

    def check(res):
        _check_out(out, res)
        assert_close(_first(res), ref_fn({"x": np.array(x), "tau": tau}), dt)

    return Case(rn.tlu, (x, tau), kw, expect, check, [x, tau], ref_fn, {"x": x, "tau": tau})


def build_gdn(d: Draw) -> Case:
    x, dt, axis, c = _mix_x(d, 2, 4)
    beta = param(d, c, positive=True)
    gamma = np.abs(param(d, 0, shape=(c, c))) * 0.2
    kw: dict = {"inverse": d.bool(), "variant": d.choice(["gdn", "gdn1"]), "axis": axis}
    expect = None
    if d.rare() and c:
        if d.bool():
            beta = beta.copy()
            beta[0] = d.choice([0.0, -1.0])
        else:
            gamma = gamma.copy()
            gamma[0, -1] = -0.5
        expect = ValueError
    out = _out_kw(d, x, kw)
    a = {k: v for k, v in kw.items() if k != "out"}

    def ref_fn(v):
        return refs.gdn(v["x"], v["beta"], v["gamma"], **a)

    def check(res):
        _check_out(out, res)
        y = ref_fn({"x": np.array(x), "beta": beta, "gamma": gamma})
        assert_close(_first(res), y, dt)

    return Case(rn.gdn, (x, beta, gamma), kw, expect, check, [x, beta, gamma], ref_fn,
                {"x": x, "beta": beta, "gamma": gamma})


def build_mvn(d: Draw) -> Case:
    x, dt, _, _ = _mix_x(d, 1, 4, 1, 4)
    nd = x.ndim
    if nd == 4 and d.bool():
        axes = None
        eff = (0, 2, 3)
    else:
        k = d.int(1, nd)
        eff = tuple(sorted(d.rng.choice(nd, size=k, replace=False).tolist()))
        axes = eff if d.bool() else tuple(a - nd for a in eff)
    kw: dict = {}
    eps, ok = eps_value(d, 1e-9)
    kw["eps"] = eps
    expect = None if ok else ValueError
    if d.rare():
        axes = (nd,)
        expect = ValueError
    out = _out_kw(d, x, kw)

    def ref_fn(v):
        return refs.mvn(v["x"], eff, eps)

    def check(res):
        _check_out(out, res)
        y = ref_fn({"x": np.array(x)})
        # (x − mean)/(std + eps) is not scale-free: values far below 1 need an absolute floor.
        assert_close(_first(res), y, dt)

    case = Case(rn.mean_variance_norm, (x, axes), kw, expect, check, [x], ref_fn, {"x": x})
    if x.size and ok:
        # y = (x − mean)/(sqrt(var) + eps) has a kink at var = 0 (sqrt): a group whose spread
        # is within a finite-difference step of it gives no usable difference quotient.
        xa = np.array(x, F64)
        sd = xa.std(axis=eff)
        case.nondiff = bool((sd <= 1e-6 * (np.abs(xa).max() + 1)).any())
    return case


def build_normalize(d: Draw) -> Case:
    x, dt, _, _ = _mix_x(d, 1, 4)
    nd = x.ndim
    axis = d.int(-nd, nd - 1)
    p = d.choice([2.0, 1.0, 3.0, 0.5, math.inf])
    eps = d.choice([1e-12, 1e-6, 1.0])
    kw: dict = {}
    expect = None
    if d.rare():
        p = d.choice([0.0, -1.0, math.nan])
        expect = ValueError
    elif d.rare():
        eps = d.choice([-1.0, math.nan])
        expect = ValueError
    out = _out_kw(d, x, kw)

    def ref_fn(v):
        return refs.lp_normalize(v["x"], p, axis, eps)

    def check(res):
        _check_out(out, res)
        assert_close(_first(res), ref_fn({"x": np.array(x)}), dt)

    case = Case(rn.normalize, (x, p, axis, eps), kw, expect, check, [x], ref_fn, {"x": x})
    if math.isinf(p) and x.size:
        # max|x| with ties (e.g. a broadcast row) is not differentiable: no finite difference.
        a = np.abs(np.array(x, F64))
        ties = (a == a.max(axis=axis, keepdims=True)).sum(axis=axis) > 1
        case.nondiff = bool(ties.any())
    return case


# -- GDN parameter helpers -------------------------------------------------------------


def build_gdn_params(d: Draw) -> Case:
    c = d.int(0, 5)
    beta = d.rng.uniform(1e-6, 3, c) if d.bool() else d.rng.standard_normal(c)
    gamma = d.rng.standard_normal((c, c))

    def run():
        pb, pg = rn.gdn_params_to_compressai(np.maximum(beta, 1e-6), np.abs(gamma))
        b2, g2 = rn.gdn_params_from_compressai(pb, pg)
        return b2, g2

    def check(res):
        b2, g2 = res
        np.testing.assert_allclose(b2, np.maximum(beta, 1e-6), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g2, np.abs(gamma), rtol=1e-9, atol=1e-9)

    return Case(run, (), {}, None, check)


def build_gdn_params_backward(d: Draw) -> Case:
    c = d.int(0, 4)
    pb = d.rng.uniform(-1, 2, c)
    pg = d.rng.uniform(-1, 2, (c, c))
    gb = d.rng.standard_normal(c)
    gg = d.rng.standard_normal((c, c))

    def run():
        return rn.gdn_params_from_compressai_backward(gb, gg, pb, pg)

    def check(res):
        h = 1e-7
        for k, (p, g) in enumerate(((pb, gb), (pg, gg))):
            grad = res[k]
            assert grad.shape == p.shape
            for idx in np.ndindex(p.shape):
                a = p.copy()
                a[idx] += h
                bb = p.copy()
                bb[idx] -= h
                fa = rn.gdn_params_from_compressai(a if k == 0 else pb, a if k == 1 else pg)[k]
                fb = rn.gdn_params_from_compressai(bb if k == 0 else pb, bb if k == 1 else pg)[k]
                fd = (fa - fb)[idx] * g[idx] / (2 * h)
                if fd != 0:  # away from the bound the chain rule is the plain derivative
                    np.testing.assert_allclose(grad[idx], fd, rtol=1e-5, atol=1e-7)

    return Case(run, (), {}, None, check)


def build_gdn_init(d: Draw) -> Case:
    c = d.int(0, 6)

    def check(res):
        b, g = res
        assert np.array_equal(b, np.ones(c)) and np.array_equal(g, 0.1 * np.eye(c))

    return Case(rn.gdn_init, (c,), {}, None, check)


# -- threads, build info ------------------------------------------------------------------


def build_set_num_threads(d: Draw) -> Case:
    n = d.choice([0, 1, 2, 3, 16, -1, 1025, 10**6, 2**63, 2**70, -(2**70)])
    expect = ValueError if (n < 0 or n > 1024) else None
    before = rn.get_num_threads()

    def run():
        try:
            rn.set_num_threads(n)
            return rn.get_num_threads()
        finally:
            rn.set_num_threads(before)

    def check(got):
        assert got >= 1 and (n == 0 or got == n)

    return Case(run, (), {}, expect, check)


def build_get_num_threads(d: Draw) -> Case:
    return Case(rn.get_num_threads, (), {}, None, lambda n: n >= 1)


def build_build_info(d: Draw) -> Case:
    def check(info):
        assert isinstance(info, dict) and info

    return Case(rn.build_info, (), {}, None, check)


# ------------------------------------------------------------------------------- backward


def backward_of(fwd_name: str, build_fwd: Callable[[Draw], Case]) -> Callable[[Draw], Case]:
    """Gradient op: the forward's case without out/return_stats; each returned gradient is
    checked against a central finite difference of the float64 forward reference along a random
    direction (float64 and float32 inputs; float16 only for shape, dtype and finiteness)."""

    def build(d: Draw) -> Case:
        fc = build_fwd(d)
        kw = {k: v for k, v in fc.kwargs.items() if k not in ("out", "return_stats")}
        x = fc.args[0]
        gy = layout(d, d.rng.standard_normal(x.shape).astype(x.dtype))
        fn = getattr(rn, fwd_name + "_backward")
        frozen_before = [None if a is None else np.array(a, copy=True) for a in fc.frozen]
        expect = fc.expect
        if getattr(fc, "soft", False):
            expect = "either"
        if isinstance(x, np.ndarray) and np.isnan(np.asarray(x, F64)).any():
            nan_in = True
        else:
            nan_in = False

        def check(res):
            dt = x.dtype
            gx = res.x if hasattr(res, "x") else _first(res)
            assert gx.dtype == dt and gx.shape == x.shape
            if nan_in or dt == F16 or x.size == 0 or getattr(fc, "nondiff", False):
                return
            gy64 = np.array(gy, F64)
            base = {k: (None if v is None else np.array(v, F64)) for k, v in fc.diff.items()}
            # The problem's own conditioning (float64): how far dx moves when x moves by its
            # rounding (three draws of up to 2 ulps). With a rounded mean the standard formulas
            # carry an error of about u·|x|/σ times the gradient's natural scale: for a
            # near-degenerate group (two values near 1e4, 1e-2 apart, eps = 1e-12) the exact dx
            # is 1e-8 of that scale, and neither rsnorm nor PyTorch's float64 backward (the same
            # to the last digit) gets it to 1e-4 relative (found by the long fuzz run; checked
            # against 60-digit arithmetic: 300 such cases all within this allowance).
            cond_x = None
            if dt == F64 and isinstance(x, np.ndarray) and x.ndim > 0 and np.isfinite(x).all():
                g0 = np.asarray(gx, F64)
                cond_x = np.zeros(x.shape)
                for _ in range(3):
                    xp = x * (1 + 4e-16 * d.rng.uniform(-1, 1, x.shape))
                    g2 = fn(gy, xp, *fc.args[1:], **kw)
                    g2 = np.asarray(g2.x if hasattr(g2, "x") else _first(g2), F64)
                    cond_x = np.maximum(cond_x, np.abs(g2 - g0))
            for name, arr in fc.diff.items():
                if arr is None:
                    continue
                g = gx if name == "x" else getattr(res, name, None)
                if g is None:
                    raise AssertionError(f"no gradient for {name}")
                g = np.asarray(g, F64)
                assert g.shape == np.shape(arr), (name, g.shape, np.shape(arr))
                b = base[name]
                spread = float(np.std(b)) if b.size > 1 else 1.0
                h0 = max(1e-4 * spread, 1e-10 * float(np.abs(b).max(initial=0)), 1e-8)
                # A random direction, and the gradient's own (no cancellation in <g, v>, so a
                # gradient off by a factor shows at once).
                dirs = [d.rng.standard_normal(np.shape(arr))]
                if np.isfinite(g).all() and np.abs(g).max(initial=0) > 0:
                    dirs.append(g / np.abs(g).max())
                for v in dirs:
                    cond = 0.0
                    if name == "x" and cond_x is not None:
                        cond = 4.0 * float(np.sum(cond_x * np.abs(v)))
                    _check_direction(fc.ref_fn, base, gy64, name, g, v, h0, dt, expect, cond,
                                     float(np.abs(b).max(initial=0)) / spread if spread else 1.0)

        case = Case(fn, (gy,) + fc.args, kw, expect, check, fc.frozen)
        case.frozen_before = frozen_before
        return case

    return build


def _check_direction(ref_fn, base, gy64, name, g, v, h0, dt, expect, cond=0.0, kappa=1.0):
    """<g, v> against central differences of L(t) = Σ gy·f(base + t·v) in float64; `cond`: how
    much <g, v> moves when the input moves by its own rounding (added to the tolerance);
    `kappa`: max|input| / its spread, how much the float64 reference's rounding is amplified
    when it centres the input (1e7 for an offset of 1e4 over a spread of 1e-3)."""

    def at(t_):
        vals = dict(base)
        vals[name] = base[name] + t_ * v
        y = ref_fn(vals)
        return float(np.sum(gy64 * y)), float(np.sum(np.abs(gy64 * y)))

    got = float(np.sum(g * v))
    rel = 1e-4 if dt == F64 else 1e-3
    # The gradient's own rounding: float32 results carry ~1e-7 relative error per element.
    own = (1e-10 if dt == F64 else 3e-5) * float(np.sum(np.abs(g * v)))
    own += GPU_FD_ATOL * float(np.abs(g).max(initial=0)) * float(np.sum(np.abs(v)))
    own += cond
    # Near-constant groups with a tiny eps curve on the scale sqrt(eps): the finite difference
    # converges only for small steps, so accept a match at any of ten. The two steps above h0
    # are for the opposite case: large offsets over small spreads (MVN of two float32 values
    # near -50, 1e-3 apart) make the float64 loss round at u·|x|/σ of its terms, far above the
    # noise estimate below, and only a longer step averages that out (found by the long fuzz
    # run; the gradient was right to 2e-8 against 60-digit arithmetic).
    fds, noises = [], []
    for k in range(-2, 8):
        h = h0 * 10.0**-k
        (lp, tp), (lm, tm) = at(h), at(-h)
        fd = (lp - lm) / (2 * h)
        fds.append(fd)
        # Rounding of the float64 loss itself, pessimistically (its terms may cancel to 0
        # exactly at the base point, e.g. a constant row, so they are measured at the steps).
        noise = 1e-15 * max(tp, tm) / h
        noises.append(noise * max(kappa, 1.0))
        tol_k = rel * (abs(fd) + abs(got)) + own
        if abs(got - fd) <= 0.1 * tol_k:
            return  # a match this close is no coincidence, whatever the step's rounding
        if noise <= tol_k and abs(got - fd) <= tol_k:
            return
        if k == -2 and max(abs(got), abs(fd)) <= own + 100 * noise:
            return  # both at the rounding level of the loss: a zero derivative
        if k > -2:
            # Two successive steps: their spread estimates the quotient's own error (float64
            # references of ill-conditioned groups round well above machine precision).
            # noises[-1] / 5: the realistic rounding of the loss, amplified by the centring
            # of an offset input (MVN over pairs of float64 values near -50 with eps 1e-9:
            # both quotients 1e-3 off the 80-digit derivative, which rsnorm matched to 1e-6;
            # found by the long fuzz run).
            spread = abs(fd - fds[-2])
            if spread <= 5e-3 * abs(fd) and min(abs(got - fd), abs(got - fds[-2])) <= (
                    tol_k + spread + noises[-1] / 5):
                return
    if expect == "either" and np.isnan(got) and np.isnan(fds).all():
        return  # an invalid parameter accepted: NaN in, NaN out
    # Two quotients that agree by chance inside the reference's own rounding are no estimate:
    # a pair counts only where both stand clear of that rounding, amplified by the centring of
    # an offset input (IterNorm of float32 values 1e4 ± 1e-3: quotients -0.01435, -0.01441 at
    # steps where the loss rounds at ~16 / h; found by the long fuzz run).
    clear = [abs(f) > 20 * n for f, n in zip(fds, noises)]
    steady = [abs(a - b) <= 5e-3 * max(abs(a), abs(b)) and a != 0 and ca and cb
              for (a, b), (ca, cb) in zip(itertools.pairwise(fds), itertools.pairwise(clear))]
    if not any(steady):
        # The difference quotients never settle to 0.5 %: not differentiable here, or the
        # float64 reference itself is ill-conditioned (MVN's 1/(sqrt(var) + eps) at a constant
        # group with eps = 1e-12, offsets of 1e4 on spreads of 1e-3); nothing to compare with.
        return
    raise AssertionError(f"d/d{name}: <grad, v> = {got!r}, finite differences {fds!r}")


# ------------------------------------------------------------------------------- simple calls


def _nchw(rng, dtype, shape=(4, 6, 5, 3)):
    return ref.make_input(rng, shape, dtype)


def _w(c, dtype=F32, seed=0):
    return np.linspace(0.5, 1.5, c).astype(dtype)


SIMPLE: dict[str, Callable] = {
    "batch_norm": lambda x: rn.batch_norm(x, training=True, return_stats=True),
    "layer_norm": lambda x: rn.layer_norm(x, (5, 3), return_stats=True),
    "rms_norm": lambda x: rn.rms_norm(x, 3, return_stats=True),
    "group_norm": lambda x: rn.group_norm(x, 3, _w(6), _w(6), return_stats=True),
    "instance_norm": lambda x: rn.instance_norm(x, return_stats=True),
    "moments": lambda x: tuple(rn.moments(x)[1:]),
    "iter_norm": lambda x: rn.iter_norm(x, num_groups=2, return_stats=True)[0],
    "local_response_norm": lambda x: rn.local_response_norm(x, 3, alpha=0.5),
    "filter_response_norm": lambda x: rn.filter_response_norm(
        x, _w(6), _w(6), -_w(6), return_stats=True),
    "tlu": lambda x: rn.tlu(x, np.linspace(-1, 1, 6)),
    "gdn": lambda x: rn.gdn(x, np.ones(6), 0.1 * np.ones((6, 6))),
    "mean_variance_norm": lambda x: rn.mean_variance_norm(x),
    "normalize": lambda x: rn.normalize(x),
}
SIMPLE_BWD_ARGS: dict[str, Callable] = {
    "batch_norm": lambda gy, x: rn.batch_norm_backward(gy, x, weight=_w(6), bias=_w(6),
                                                       training=True),
    "layer_norm": lambda gy, x: rn.layer_norm_backward(gy, x, (5, 3), _w(15).reshape(5, 3),
                                                       _w(15).reshape(5, 3)),
    "rms_norm": lambda gy, x: rn.rms_norm_backward(gy, x, 3, _w(3)),
    "group_norm": lambda gy, x: rn.group_norm_backward(gy, x, 3, _w(6), _w(6)),
    "instance_norm": lambda gy, x: rn.instance_norm_backward(gy, x, weight=_w(6), bias=_w(6)),
    "iter_norm": lambda gy, x: rn.iter_norm_backward(gy, x, num_groups=2),
    "local_response_norm": lambda gy, x: rn.local_response_norm_backward(gy, x, 3, alpha=0.5),
    "filter_response_norm": lambda gy, x: rn.filter_response_norm_backward(
        gy, x, _w(6), _w(6), -_w(6)),
    "tlu": lambda gy, x: rn.tlu_backward(gy, x, np.linspace(-1, 1, 6)),
    "gdn": lambda gy, x: rn.gdn_backward(gy, x, np.ones(6), 0.1 * np.ones((6, 6))),
    "mean_variance_norm": lambda gy, x: rn.mean_variance_norm_backward(gy, x),
    "normalize": lambda gy, x: rn.normalize_backward(gy, x),
}
# Ops whose rows along axis 0 are independent (HOSTILE 15), as called in SIMPLE.
ROWWISE = {"layer_norm", "rms_norm", "group_norm", "instance_norm", "local_response_norm",
           "filter_response_norm", "tlu", "gdn", "normalize"}
# Ops with out= (forward).
HAS_OUT = set(SIMPLE) - {"moments"}

FORWARD_BUILDERS: dict[str, Callable[[Draw], Case]] = {
    "batch_norm": build_batch_norm,
    "layer_norm": build_layer_norm,
    "rms_norm": build_rms_norm,
    "group_norm": build_group_norm,
    "instance_norm": build_instance_norm,
    "moments": build_moments,
    "iter_norm": build_iter_norm,
    "local_response_norm": build_lrn,
    "filter_response_norm": build_frn,
    "tlu": build_tlu,
    "gdn": build_gdn,
    "mean_variance_norm": build_mvn,
    "normalize": build_normalize,
}

ENTRIES: dict[str, Entry] = {}
for _name, _b in FORWARD_BUILDERS.items():
    ENTRIES[_name] = Entry(build=_b, call=SIMPLE[_name], rowwise=_name in ROWWISE,
                           has_out=_name in HAS_OUT)
    if _name != "moments":
        ENTRIES[_name + "_backward"] = Entry(build=backward_of(_name, _b),
                                             call=SIMPLE_BWD_ARGS[_name])
ENTRIES.update({
    "Whitening": Entry(build=build_whitening),
    "gdn_init": Entry(build=build_gdn_init),
    "gdn_params_to_compressai": Entry(build=build_gdn_params),
    "gdn_params_from_compressai": Entry(build=build_gdn_params),
    "gdn_params_from_compressai_backward": Entry(build=build_gdn_params_backward),
    "set_num_threads": Entry(build=build_set_num_threads),
    "get_num_threads": Entry(build=build_get_num_threads),
    "build_info": Entry(build=build_build_info),
})
# Not callables: nothing to fuzz.
NOT_CALLABLE = {"__version__"}


def exempt(name: str) -> bool:
    """Result types and exception classes are data, not operations."""
    if name in NOT_CALLABLE:
        return True
    obj = getattr(rn, name)
    return isinstance(obj, type) and (issubclass(obj, tuple) or issubclass(obj, BaseException))


def public_ops() -> list[str]:
    return [n for n in rn.__all__ if not exempt(n)]


def present(name: str) -> bool:
    return hasattr(rn, name)


def nchw(rng, dtype, shape=(4, 6, 5, 3)):
    return _nchw(rng, dtype, shape)
