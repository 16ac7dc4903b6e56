"""Building blocks shared by every GPU op: argument preparation, the reduction descriptions,
the block planner that splits work at binding and dispatch limits, and the passes
(statistics, apply, backward sums) that encode dispatches.

Layout model. A contiguous input is viewed as ``(O, C, I)`` around its channel axis (O = product of
the dims before it, I = product after), and, for per-sample norms, ``O = N * S1`` with the batch on
axis 0. A *reduction* lists, for each group q = o * n_g + g, the elements
``base(q) + (k // run_len) * run_stride + k % run_len`` for k < len with
``base(q) = o * outer_stride + g * g_stride``: batch norm (a channel over all rows), group and
instance norm (a (sample, channel-group) block), layer/RMS norm (a row) and the per-channel
parameter sums of backward are all of this form. A *group map* says which normalization group an
element belongs to: ``c = (i // I) % C``; group ``c // cpg`` (mode 0) or
``(i // a_stride) * G + c // cpg`` (mode 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _device
from ._array import (
    GPUArray,
    _upload_checked,
    check_dtype,
    empty,
    reject_masked,
    shape_error,
    value_error,
)
from ._device import APPLY_WG, PER, SMALL_WG, pack

# Global element indices are u32 in the shaders; grid-stride loops need some headroom.
MAX_ELEMENTS = 2**32 - 2**26
# Bytes of one `Part` (common.wgsl).
PART_BYTES = 20
# Groups of up to this many chunks are normalized by norm_fused.wgsl (16384 elements).
FUSED_CHUNKS = 4
# From this many chunks per group on, the finalize passes merge with a workgroup tree instead of
# one invocation walking all chunks (which starves the GPU for few large groups, e.g. BN).
TREE_CHUNKS = 8


@dataclass(frozen=True)
class Reduction:
    n_groups: int
    n_g: int
    outer_stride: int
    g_stride: int
    run_len: int
    run_stride: int
    length: int

    @property
    def wg(self) -> int:
        """Invocations per reduction workgroup: 64 for groups up to 1024 elements (so short rows
        keep every invocation busy), else 256. A function of the group length only, like the
        whole reduction order. ``_device._limits(red_wg=...)`` forces one (the GPU benchmark's
        ``--red-wg`` sweep; results then differ in the last bits from the default)."""
        forced = _device._overrides.get("red_wg")
        if forced:
            return int(forced)
        return 64 if self.length <= 64 * PER else 256

    @property
    def chunk(self) -> int:
        return self.wg * PER

    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil(self.length / self.chunk))

    def base(self, q: int) -> int:
        return (q // self.n_g) * self.outer_stride + (q % self.n_g) * self.g_stride

    def addr(self, k: int) -> int:
        return (k // self.run_len) * self.run_stride + k % self.run_len


def red_channels(O: int, C: int, I: int) -> Reduction:
    """Per channel over all other axes (batch norm, moments, parameter gradients)."""
    return Reduction(C, C, 0, I, max(I, 1), C * I, O * I)


def red_grouped(N: int, S1: int, C: int, I: int, G: int) -> Reduction:
    """Per (sample, channel group) over the spatial axes (group, instance, FRN)."""
    cpg = C // G
    return Reduction(N * G, G, S1 * C * I, cpg * I, max(cpg * I, 1), C * I, S1 * cpg * I)


def red_rows(R: int, F: int) -> Reduction:
    """Per row of F contiguous elements (layer, RMS)."""
    return Reduction(R, 1, F, 0, max(F, 1), F, F)


@dataclass(frozen=True)
class GroupMap:
    I: int
    C: int
    a_stride: int
    G: int
    cpg: int
    mode: int

    def fields(self) -> list:
        return [(self.I, "u"), (self.C, "u"), (max(self.a_stride, 1), "u"), (self.G, "u"),
                (max(self.cpg, 1), "u"), (self.mode, "u")]


def map_channels(C: int, I: int) -> GroupMap:
    return GroupMap(max(I, 1), max(C, 1), 1, C, 1, 0)


def map_grouped(S1: int, C: int, I: int, G: int) -> GroupMap:
    return GroupMap(max(I, 1), max(C, 1), S1 * C * I, G, C // G, 1)


def map_rows(F: int) -> GroupMap:
    return GroupMap(1, max(F, 1), F, 1, F, 1)


# ----------------------------------------------------------------------------- arguments


def check_x(x, name: str = "x"):
    """Validate the kind and dtype of a data argument; returns True for NumPy (host) input."""
    if isinstance(x, GPUArray):
        return False
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{name} must be a NumPy array or an rsnorm.gpu device array, got {type(x).__name__}"
        )
    reject_masked(x, name)
    check_dtype(x.dtype, name)
    return True


def check_size(x) -> None:
    if x.size >= MAX_ELEMENTS:
        raise value_error(
            f"x has {x.size} elements; the GPU path indexes with 32 bits and takes fewer than "
            f"{MAX_ELEMENTS}"
        )


def norm_axis(axis, ndim: int, name: str = "axis") -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    ax = int(axis) + ndim if axis < 0 else int(axis)
    if not 0 <= ax < ndim:
        raise value_error(f"{name}={axis} is out of range for an input of rank {ndim}")
    return ax


def check_eps(eps, name: str = "eps") -> float:
    try:
        v = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {type(eps).__name__}") from None
    if not math.isfinite(v) or v < 0:
        raise value_error(f"{name} must be finite and >= 0, got {eps}")
    return v


def check_param(p, shape: tuple, name: str):
    """A parameter vector: NumPy float16/32/64 (read as float32 on the device) or a float32
    device array, of exactly ``shape``."""
    if p is None:
        return None
    if isinstance(p, GPUArray):
        if p.dtype != np.float32:
            raise TypeError(f"{name} on the device must be float32, got {p.dtype}")
    elif isinstance(p, np.ndarray):
        if p.dtype.kind != "f":
            raise TypeError(
                f"{name} has unsupported dtype {p.dtype}; accepted dtypes: float16, float32, "
                "float64"
            )
    else:
        raise TypeError(f"{name} must be a NumPy array or a device array, got {type(p).__name__}")
    if tuple(p.shape) != tuple(shape):
        raise shape_error(f"{name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
    return p


def param_buffer(ctx, p):
    if p is None:
        return None
    if isinstance(p, GPUArray):
        return p._live_buffer(ctx)
    reject_masked(p, "parameter")
    return _device.upload(ctx, np.ascontiguousarray(p, dtype=np.float32))


def check_out(out, x, host: bool):
    if out is None:
        return None
    if host:
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a NumPy array for NumPy input, got {type(out).__name__}")
        reject_masked(out, "out")
        if out.shape != x.shape:
            raise shape_error(f"out must have the input's shape {x.shape}, got {out.shape}")
        if out.dtype != x.dtype:
            raise TypeError(f"out must have the input's dtype {x.dtype}, got {out.dtype}")
        if not out.flags.writeable:
            raise value_error("out is read-only")
        if np.shares_memory(out, x):
            raise value_error("out overlaps the input x")
    else:
        if not isinstance(out, GPUArray):
            raise TypeError(
                f"out must be a device array for device input, got {type(out).__name__}")
        if out.shape != x.shape:
            raise shape_error(f"out must have the input's shape {x.shape}, got {out.shape}")
        if out.dtype != x.dtype:
            raise TypeError(f"out must have the input's dtype {x.dtype}, got {out.dtype}")
        if out._buffer is x._buffer:
            raise value_error("out overlaps the input x")
    return out


class Data:
    """An input on the device, with what the passes need to bind it."""

    def __init__(self, ctx, x, host: bool):
        self.ctx = ctx
        self.host = host
        self.shape = tuple(x.shape)
        self.dtype = np.dtype(x.dtype).newbyteorder("=")
        if host:
            self.arr = _upload_checked(ctx, x)
        else:
            x._live_buffer(ctx)
            self.arr = x
        self.storage = self.arr._storage
        self.itemsize = 2 if self.storage == "f16" else 4
        self.buffer = self.arr._buffer
        self.size = math.prod(self.shape)

    def like(self, out=None) -> GPUArray:
        if out is not None and not self.host:
            return out
        return empty(self.ctx, self.shape, self.dtype, self.storage)

    def vec(self, shape) -> GPUArray:
        """A new device array of x's dtype (parameter gradients)."""
        return empty(self.ctx, shape, self.dtype, self.storage)


def f32_array(ctx, shape) -> GPUArray:
    return empty(ctx, shape, np.float32, "f32")


def collect(ctx, host: bool, arrays: list, extra: list = ()):
    """Results of an op: NumPy arrays for host input (one readback for all of them, plus the raw
    ``extra`` buffers ``[(buffer, nbytes)]``), else the device arrays themselves."""
    if not host and not extra:
        return list(arrays), []
    items = []
    if host:
        for a in arrays:
            if a is not None:
                items.append((a._buffer, a.size * a.storage_dtype.itemsize))
    items.extend(extra)
    raws = _device.download(ctx, items) if items else []
    res = []
    i = 0
    if host:
        for a in arrays:
            if a is None:
                res.append(None)
                continue
            raw = raws[i]
            i += 1
            v = np.frombuffer(raw, dtype=a.storage_dtype, count=a.size).reshape(a.shape)
            res.append(v.astype(a.dtype, copy=True))
    else:
        res = list(arrays)
    return res, raws[i:]


# ----------------------------------------------------------------------------- planning


def _window(ctx, lo: int, hi: int, itemsize: int):
    off = (lo * itemsize) // ctx.align * ctx.align
    size = _device.pad4(hi * itemsize - off)
    return off, size


def plan_blocks(ctx, red: Reduction, itemsize: int):
    """Cover all (group, chunk) pairs with rectangular blocks whose input span fits one binding
    and whose workgroups fit one 2-D grid. Returns ``[(q0, q1, j0, j1, lo, hi)]``."""
    nch = red.n_chunks
    ng = red.n_groups
    maxb = ctx.max_binding
    maxwg = ctx.max_wg**2

    def span(q0, q1, j0, j1):
        lo = red.base(q0) + red.addr(j0 * red.chunk)
        hi = red.base(q1 - 1) + red.addr(min(j1 * red.chunk, red.length) - 1) + 1
        return lo, hi

    def fits(q0, q1, j0, j1):
        if (q1 - q0) * (j1 - j0) > maxwg:
            return False
        lo, hi = span(q0, q1, j0, j1)
        return _window(ctx, lo, hi, itemsize)[1] <= maxb

    blocks = []
    q = 0
    while q < ng:
        if fits(q, q + 1, 0, nch):
            a, b = q + 1, ng
            while a < b:
                mid = (a + b + 1) // 2
                if fits(q, mid, 0, nch):
                    a = mid
                else:
                    b = mid - 1
            blocks.append((q, a, 0, nch, *span(q, a, 0, nch)))
            q = a
            continue
        j = 0
        while j < nch:
            if not fits(q, q + 1, j, j + 1):
                lo, hi = span(q, q + 1, j, j + 1)
                raise value_error(
                    f"rsnorm.gpu: one reduction chunk of {red.chunk} elements spans "
                    f"{(hi - lo) * itemsize} bytes of this layout, more than one storage binding "
                    f"({maxb} bytes); use a layout with the channel axis first"
                )
            a, b = j + 1, nch
            while a < b:
                mid = (a + b + 1) // 2
                if fits(q, q + 1, j, mid):
                    a = mid
                else:
                    b = mid - 1
            blocks.append((q, q + 1, j, a, *span(q, q + 1, j, a)))
            j = a
        q += 1
    return blocks


COL_RB = 256  # rows per block in col_stats.wgsl / col_sums.wgsl
COL_WG = 64


def column_shape(red: Reduction):
    """``(N, R, C)`` when the reduction is "every column of a row-major (N, R, C) tensor over its
    R rows" (channels-last batch/instance norm, layer-norm parameter gradients), else None."""
    if red.run_len == 1 and red.g_stride == 1 and red.run_stride == red.n_g and red.length > 0:
        n = red.n_groups // red.n_g
        if n == 1 or red.outer_stride == red.length * red.n_g:
            return n, red.length, red.n_g
    return None


def col_blocks(ctx, N: int, R: int, C: int, itemsize: int):
    """Dispatch blocks ``(n0, nn, rb0, nrb, lo, hi)`` of the column kernels: whole row blocks
    whose input span fits one binding, workgroups within one 2-D grid."""
    n_rb = math.ceil(R / COL_RB)
    n_cb = math.ceil(C / COL_WG)
    maxwg = ctx.max_wg**2
    total = N * R * C
    if _window(ctx, 0, total, itemsize)[1] <= ctx.max_binding and N * n_rb * n_cb <= maxwg:
        return [(0, N, 0, n_rb, 0, total)]
    rows = (ctx.max_binding - ctx.align - 4) // (C * itemsize)
    per = min(rows // COL_RB, max(maxwg // n_cb, 1))
    if per < 1:
        raise value_error(
            f"rsnorm.gpu: {COL_RB} rows of {C} channels ({COL_RB * C * itemsize} bytes) do not "
            f"fit in one storage binding ({ctx.max_binding} bytes)"
        )
    blocks = []
    for n in range(N):
        for rb in range(0, n_rb, per):
            rb1 = min(rb + per, n_rb)
            lo = (n * R + rb * COL_RB) * C
            hi = (n * R + min(rb1 * COL_RB, R)) * C
            blocks.append((n, 1, rb, rb1 - rb, lo, hi))
    return blocks


def _check_small(ctx, nbytes: int, what: str):
    # Per-group buffers are bound whole; their size is tied to the number of groups.
    limit = ctx.limits["max-storage-buffer-binding-size"]
    if nbytes > limit:
        raise value_error(
            f"rsnorm.gpu: {what} need {nbytes} bytes, more than one storage binding ({limit}); "
            "there are too many normalization groups for the GPU path"
        )


# ----------------------------------------------------------------------------- passes


class GroupStats(NamedTuple):
    gstat: object  # GStat records (buffer)
    mean: GPUArray  # user-facing float32 mean (NaN for mean-square modes)
    rstd: GPUArray
    hi: GPUArray  # mean = hi + lo, for backward's (x - hi) - lo; None from running stats
    lo: GPUArray


def _col_dispatch(enc, data: Data, name: str, consts: dict, col, extra_fields, rest, dy=None):
    """Encode col_stats / col_sums over all blocks; ``rest`` are the bindings after x (and dy)."""
    ctx = data.ctx
    N, R, C = col
    isz = data.itemsize
    n_rb = math.ceil(R / COL_RB)
    n_cb = math.ceil(C / COL_WG)
    for n0, nn, rb0, nrb, lo, hi in col_blocks(ctx, N, R, C, isz):
        off, size = _window(ctx, lo, hi, isz)
        fields = [(R, "u"), (C, "u"), (n_rb, "u"), (n_cb, "u"), (n0, "u"), (nn, "u"),
                  (rb0, "u"), (nrb, "u"), (off // isz, "u")]
        if extra_fields:
            # col_sums: the group map (gI, gC, a_stride, G, cpg, group_mode) and one pad word.
            fields += [*extra_fields, (0, "u")]
        else:
            fields += [(0, "u")] * 3
        binds = [(data.buffer, off, size)]
        if dy is not None:
            binds.append((dy.buffer, off, size))
        enc.dispatch(name, data.storage, consts, pack(fields), binds + rest,
                     _device.grid2d(ctx, nn * nrb * n_cb))


def stats_pass(enc, data: Data, red: Reduction, mode: int, eps: float) -> GroupStats:
    """Encode the two statistics passes."""
    ctx = data.ctx
    col = column_shape(red) if _device._overrides.get("columns", True) else None
    nch = math.ceil(col[1] / COL_RB) if col else red.n_chunks
    ng = red.n_groups
    _check_small(ctx, ng * nch * PART_BYTES, "the reduction partials")
    _check_small(ctx, ng * 32, "the group statistics")
    part = _device.new_buffer(ctx, ng * nch * PART_BYTES)
    isz = data.itemsize
    if col:
        _col_dispatch(enc, data, "col_stats", {"WG": COL_WG}, col, [], [part])
    for q0, q1, j0, j1, lo, hi in ([] if col else plan_blocks(ctx, red, isz)):
        off, size = _window(ctx, lo, hi, isz)
        params = pack([
            (red.n_g, "u"), (red.outer_stride, "u"), (red.g_stride, "u"), (red.run_len, "u"),
            (red.run_stride, "u"), (red.length, "u"), (nch, "u"), (q0, "u"), (j0, "u"),
            (q1 - q0, "u"), (j1 - j0, "u"), (off // isz, "u"),
        ])
        enc.dispatch("stats_partial", data.storage, {"WG": red.wg}, params,
                     [(data.buffer, off, size), part], _device.grid2d(ctx, (q1 - q0) * (j1 - j0)))
    gstat = _device.new_buffer(ctx, ng * 32)
    mean = f32_array(ctx, (ng,))
    rstd = f32_array(ctx, (ng,))
    hi = f32_array(ctx, (ng,))
    lo = f32_array(ctx, (ng,))
    params = pack([(ng, "u"), (nch, "u"), (eps, "f"), (0, "u")])
    tree = nch >= TREE_CHUNKS
    enc.dispatch("stats_finalize", "f32", {"WG": SMALL_WG, "MODE": mode}, params,
                 [part, gstat, mean._buffer, rstd._buffer, hi._buffer, lo._buffer],
                 _device.grid2d(ctx, ng if tree else math.ceil(ng / SMALL_WG)),
                 entry="main_tree" if tree else "main")
    return GroupStats(gstat, mean, rstd, hi, lo)


def fused_pass(enc, data: Data, y: GPUArray, red: Reduction, gmap: GroupMap, mode: int,
               eps: float, w=None, b=None, tau=None):
    """Statistics and apply in one kernel (groups of at most FUSED_CHUNKS chunks; one invocation
    per group for groups of at most PER elements), bitwise equal to the two-pass path; returns
    (mean, rstd) arrays of the groups."""
    ctx = data.ctx
    assert red.n_chunks <= FUSED_CHUNKS
    ng = red.n_groups
    mean = f32_array(ctx, (ng,))
    rstd = f32_array(ctx, (ng,))
    d = ctx.dummy
    isz = data.itemsize
    small = red.length <= PER
    consts = {"WG": SMALL_WG if small else red.wg, "MODE": mode, "HAS_W": int(w is not None),
              "HAS_B": int(b is not None), "HAS_TAU": int(tau is not None)}
    if small:
        consts["TREE_WG"] = red.wg
    elif _device._overrides.get("keep_x"):
        consts["KEEP_X"] = 1
    for q0, q1, _, _, lo, hi in plan_blocks(ctx, red, isz):
        off, size = _window(ctx, lo, hi, isz)
        params = pack([
            (red.n_g, "u"), (red.outer_stride, "u"), (red.g_stride, "u"), (red.run_len, "u"),
            (red.run_stride, "u"), (red.length, "u"), (q0, "u"), (q1 - q0, "u"),
            (off // isz, "u"), (gmap.I, "u"), (gmap.C, "u"), (eps, "f"), (red.n_chunks, "u"),
            (0, "u"), (0, "u"), (0, "u"),
        ])
        nwg = math.ceil((q1 - q0) / SMALL_WG) if small else q1 - q0
        enc.dispatch("norm_small" if small else "norm_fused", data.storage, consts, params,
                     [(data.buffer, off, size), (y._buffer, off, size), w or d, b or d, tau or d,
                      mean._buffer, rstd._buffer], _device.grid2d(ctx, nwg))
    return mean, rstd


def normalize(enc, data: Data, y: GPUArray, red: Reduction, gmap: GroupMap, mode: int,
              eps: float, w=None, b=None, tau=None):
    """Normalize with statistics of the data: the fused kernel for groups of at most
    FUSED_CHUNKS chunks, else the two statistics passes and the apply pass (same bits either
    way). Returns (mean, rstd) device arrays."""
    # Channels-last per-channel groups (instance norm over NHWC) would have each invocation of the
    # fused kernel read one element per row, C apart; the column kernels read whole rows instead.
    if use_fused(red):
        return fused_pass(enc, data, y, red, gmap, mode, eps, w, b, tau)
    st = stats_pass(enc, data, red, mode, eps)
    apply_pass(enc, data, y, gmap, st.gstat, mode, w, b, tau)
    return st.mean, st.rstd


def running_stats_pass(enc, ctx, rm_buf, rv_buf, C: int, eps: float):
    gstat = _device.new_buffer(ctx, C * 32)
    mean = f32_array(ctx, (C,))
    rstd = f32_array(ctx, (C,))
    enc.dispatch("stats_from_running", "f32", {"WG": SMALL_WG},
                 pack([(C, "u"), (eps, "f"), (0, "u"), (0, "u")]),
                 [rm_buf, rv_buf, gstat, mean._buffer, rstd._buffer],
                 (math.ceil(C / SMALL_WG), 1))
    return GroupStats(gstat, mean, rstd, None, None)


def apply_grid(ctx, count: int, gmap: GroupMap):
    """(workgroups, FIXED_C) of an elementwise pass over ``count`` elements. When the groups are
    channels, the workgroup count is made a multiple of the channel period I * C / gcd(I * C, WG)
    so that every invocation stays on one channel (no integer division per element)."""
    want = min(math.ceil(count / APPLY_WG), ctx.max_wg)
    if gmap.mode == 0 and _device._overrides.get("fixed_c", True):
        period = gmap.I * gmap.C // math.gcd(gmap.I * gmap.C, APPLY_WG)
        if period <= ctx.max_wg:
            return max(want // period, 1) * period, 1
    return max(want, 1), 0


def apply_pass(enc, data: Data, y: GPUArray, gmap: GroupMap, gstat, mode: int,
               w=None, b=None, tau=None):
    ctx = data.ctx
    d = ctx.dummy
    for first, count, ws, off, size in _device.element_windows(ctx, data.size, data.itemsize):
        params = pack([(first, "u"), (count, "u"), (ws, "u"), *gmap.fields(),
                       (0, "u"), (0, "u"), (0, "u")])
        nwg, fixed = apply_grid(ctx, count, gmap)
        consts = {"WG": APPLY_WG, "MODE": mode, "HAS_W": int(w is not None), "FIXED_C": fixed,
                  "HAS_B": int(b is not None), "HAS_TAU": int(tau is not None)}
        enc.dispatch("norm_apply", data.storage, consts, params,
                     [(data.buffer, off, size), (y._buffer, off, size), gstat or d, w or d,
                      b or d, tau or d], (nwg, 1))


def sum_pass(enc, data: Data, dy: Data, red: Reduction, gmap: GroupMap, mean, rstd, w,
             center: bool, grads_shape=None, lo=None):
    """Backward sums per reduction group: ``(sum a, sum a * xhat)``, a = dy (* w). With
    ``grads_shape`` also returns device arrays (dweight, dbias) of x's dtype."""
    ctx = data.ctx
    col = column_shape(red) if _device._overrides.get("columns", True) else None
    nch = math.ceil(col[1] / COL_RB) if col else red.n_chunks
    ng = red.n_groups
    _check_small(ctx, ng * nch * 8, "the reduction partials")
    part = _device.new_buffer(ctx, ng * nch * 8)
    isz = data.itemsize
    d = ctx.dummy
    consts = {"WG": red.wg, "USE_W": int(w is not None), "CENTER": int(center),
              "HAS_LO": int(lo is not None)}
    if col:
        consts["WG"] = COL_WG
        _col_dispatch(enc, data, "col_sums", consts, col, gmap.fields(),
                      [mean._buffer if mean is not None else d, rstd._buffer, w or d, part,
                       lo._buffer if lo is not None else d], dy=dy)
    for q0, q1, j0, j1, wlo, whi in ([] if col else plan_blocks(ctx, red, isz)):
        off, size = _window(ctx, wlo, whi, isz)
        params = pack([
            (red.n_g, "u"), (red.outer_stride, "u"), (red.g_stride, "u"), (red.run_len, "u"),
            (red.run_stride, "u"), (red.length, "u"), (nch, "u"), (q0, "u"), (j0, "u"),
            (q1 - q0, "u"), (j1 - j0, "u"), (off // isz, "u"), *gmap.fields(),
            (0, "u"), (0, "u"),
        ])
        enc.dispatch("sum_partial", data.storage, consts, params,
                     [(data.buffer, off, size), (dy.buffer, off, size),
                      mean._buffer if mean is not None else d, rstd._buffer, w or d, part,
                      lo._buffer if lo is not None else d],
                     _device.grid2d(ctx, (q1 - q0) * (j1 - j0)))
    sums = _device.new_buffer(ctx, ng * 8)
    gw = gb = None
    if grads_shape is not None:
        gw = data.vec(grads_shape)
        gb = data.vec(grads_shape)
    tree = nch >= TREE_CHUNKS
    enc.dispatch("sum_finalize", data.storage, {"WG": SMALL_WG, "WRITE_GRADS": int(gw is not None)},
                 pack([(ng, "u"), (nch, "u"), (0, "u"), (0, "u")]),
                 [part, sums, gw._buffer if gw else d, gb._buffer if gb else d],
                 _device.grid2d(ctx, ng if tree else math.ceil(ng / SMALL_WG)),
                 entry="main_tree" if tree else "main")
    return sums, gw, gb


def use_fused(red: Reduction) -> bool:
    """Whether the fused kernels take this reduction (see ``normalize``)."""
    col = column_shape(red) if _device._overrides.get("columns", True) else None
    strided = col is not None and col[2] > 1 and red.length > PER
    return not strided and red.n_chunks <= _device._overrides.get("fused_chunks", FUSED_CHUNKS)


def grad_fused_pass(enc, data: Data, dy: Data, dx: GPUArray, red: Reduction, gmap: GroupMap,
                    mean, rstd, w, center: bool, n: int, eps: float, lo=None):
    """dx of layer/RMS/group norm in one kernel per group (bitwise equal to sum_pass +
    grad_apply_pass)."""
    ctx = data.ctx
    d = ctx.dummy
    isz = data.itemsize
    consts = {"WG": red.wg, "USE_W": int(w is not None), "CENTER": int(center),
              "HAS_LO": int(lo is not None)}
    for q0, q1, _, _, wlo, whi in plan_blocks(ctx, red, isz):
        off, size = _window(ctx, wlo, whi, isz)
        params = pack([
            (red.n_g, "u"), (red.outer_stride, "u"), (red.g_stride, "u"), (red.run_len, "u"),
            (red.run_stride, "u"), (red.length, "u"), (q0, "u"), (q1 - q0, "u"),
            (off // isz, "u"), (gmap.I, "u"), (gmap.C, "u"), (red.n_chunks, "u"),
            (float(n), "f"), (eps, "f"), (0, "u"), (0, "u"),
        ])
        enc.dispatch("grad_fused", data.storage, consts, params,
                     [(data.buffer, off, size), (dy.buffer, off, size), (dx._buffer, off, size),
                      mean._buffer if mean is not None else d, rstd._buffer, w or d,
                      lo._buffer if lo is not None else d], _device.grid2d(ctx, q1 - q0))


def grad_apply_pass(enc, data: Data, dy: Data, dx: GPUArray, gmap: GroupMap, mean, rstd, sums,
                    w, mode: int, n: int, eps: float, w_on_sums: bool = False, lo=None):
    ctx = data.ctx
    d = ctx.dummy
    for first, count, ws, off, size in _device.element_windows(ctx, data.size, data.itemsize):
        params = pack([(first, "u"), (count, "u"), (ws, "u"), *gmap.fields(), (float(n), "f"),
                       (eps, "f"), (0, "u")])
        nwg, fixed = apply_grid(ctx, count, gmap)
        consts = {"WG": APPLY_WG, "MODE": mode, "HAS_W": int(w is not None), "FIXED_C": fixed,
                  "W_ON_SUMS": int(w_on_sums), "HAS_LO": int(lo is not None)}
        enc.dispatch("grad_apply", data.storage, consts, params,
                     [(data.buffer, off, size), (dy.buffer, off, size), (dx._buffer, off, size),
                      mean._buffer if mean is not None else d, rstd._buffer, sums or d, w or d,
                      lo._buffer if lo is not None else d],
                     (nwg, 1))


def gstat_host(raw: bytes, n_groups: int):
    """Decode GStat records into float64 (count, mean, m2) on the host (exact rescaling)."""
    rec = np.frombuffer(raw, dtype=np.dtype([
        ("hi_s", "<f4"), ("rstd_s", "<f4"), ("m2_s", "<f4"), ("e", "<i4"), ("n", "<u4"),
        ("mean", "<f4"), ("rstd", "<f4"), ("lo_s", "<f4")]), count=n_groups)
    e = rec["e"].astype(np.float64)
    mean = (rec["hi_s"].astype(np.float64) + rec["lo_s"]) * np.exp2(e)
    m2 = rec["m2_s"].astype(np.float64) * np.exp2(2 * e)
    return rec["n"].astype(np.int64), mean, m2


__all__ = [
    "Data",
    "GroupMap",
    "Reduction",
    "apply_pass",
    "check_eps",
    "check_out",
    "check_param",
    "check_size",
    "check_x",
    "collect",
    "f32_array",
    "fused_pass",
    "grad_apply_pass",
    "grad_fused_pass",
    "gstat_host",
    "map_channels",
    "map_grouped",
    "map_rows",
    "norm_axis",
    "normalize",
    "param_buffer",
    "plan_blocks",
    "red_channels",
    "red_grouped",
    "red_rows",
    "running_stats_pass",
    "stats_pass",
    "sum_pass",
    "use_fused",
]
