"""The one wgpu device of the process, its capabilities, the pipeline cache and the dispatch and
transfer helpers used by every GPU op.

wgpu is imported lazily here, never at ``import rsnorm``. The device is wgpu-py's shared default
device (configured before creation with ``shader-f16`` and ``timestamp-query`` when the adapter
has them, and with the adapter's binding and buffer size limits), so rsnorm cooperates with other
wgpu users in the process. After a device loss a fresh device is requested from the adapter on the
next call; device arrays of the lost device then raise ``RuntimeError``. All GPU work holds one
lock (wgpu-native aborts when several threads encode at once).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np

from .shaders import shader_source

# Bind-group layout of each shader, one letter per binding in order: "u" uniform, "r" read-only
# storage, "w" read-write storage (checked against the shader headers and declarations by
# test_gpu.py::test_every_shader_compiles_and_headers_match_layouts).
BINDINGS = {
    "stats_partial": "urw",
    "stats_finalize": "urwwwww",
    "stats_from_running": "urrwww",
    "bn_running": "urww",
    "norm_apply": "urwrrrr",
    "norm_fused": "urwrrrww",
    "norm_small": "urwrrrww",
    "sum_partial": "urrrrrwr",
    "sum_finalize": "urwww",
    "grad_apply": "urrwrrrrr",
    "grad_fused": "urrwrrrr",
    "col_stats": "urw",
    "col_sums": "urrrrrwr",
    "lrn": "urw",
    "gdn": "urwrr",
}

# Values one invocation holds in the reduction shaders (PER in common.wgsl); a reduction chunk is
# WG * PER elements. The reduction order depends only on the group length, never on the grid or
# splits.
PER = 16
APPLY_WG = 256
SMALL_WG = 64

_NO_ADAPTER = (
    "rsnorm.gpu: no GPU adapter found. wgpu-py found no Vulkan, Metal, D3D12 or GL device; on "
    "Linux without a GPU install Mesa's software Vulkan driver (apt-get install "
    "mesa-vulkan-drivers libvulkan1)."
)

_lock = threading.RLock()
_ctx: Context | None = None
_generation = 0
_lost = False
_configured = False
# Private knobs for tests: smaller limits reach the binding-split and 2-D grid paths with tiny
# arrays; "f16": False forces the no-shader-f16 fallback.
_overrides: dict = {}

COUNTERS = {"reads": 0, "uploads": 0, "submits": 0, "dispatches": 0}

# Set by rsnorm.gpu.bench: a Timing that receives a begin/end timestamp pair for every compute
# pass while it is active (the ops themselves never read it back).
_timing = None


def _wgpu():
    try:
        import wgpu
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "rsnorm.gpu needs wgpu-py: pip install 'rsnorm[gpu]' (CPython >= 3.11)"
        ) from exc
    return wgpu


@dataclass
class Context:
    device: object
    adapter: object
    generation: int
    features: frozenset
    limits: dict
    pipelines: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)
    dummy: object = None

    @property
    def has_f16(self) -> bool:
        return "shader-f16" in self.features and _overrides.get("f16", True)

    @property
    def has_timestamp(self) -> bool:
        return "timestamp-query" in self.features

    @property
    def max_binding(self) -> int:
        """Largest storage binding in bytes for data arrays (may be lowered by tests)."""
        v = self.limits["max-storage-buffer-binding-size"]
        return min(v, _overrides.get("max_binding", v))

    @property
    def max_buffer(self) -> int:
        return self.limits["max-buffer-size"]

    @property
    def max_wg(self) -> int:
        v = self.limits["max-compute-workgroups-per-dimension"]
        return min(v, _overrides.get("max_workgroups", v))

    @property
    def align(self) -> int:
        return self.limits["min-storage-buffer-offset-alignment"]


def _request_adapter(wgpu):
    want = os.environ.get("RSNORM_GPU_ADAPTER", "").strip().lower()
    if want:
        # Pick an adapter by name, e.g. "nvidia" to get the NVIDIA Vulkan device rather than a
        # fallback (benchmarks must name the card they ran on).
        try:
            found = wgpu.gpu.enumerate_adapters_sync()
        except Exception as exc:  # reported as "no adapter"
            raise RuntimeError(f"{_NO_ADAPTER} ({type(exc).__name__}: {exc})") from exc
        for a in found:
            text = " ".join(str(v) for v in dict(a.info).values()).lower()
            if want in text:
                return a
        names = [dict(a.info).get("device", "?") for a in found]
        raise RuntimeError(f"rsnorm.gpu: no GPU adapter matches RSNORM_GPU_ADAPTER={want!r}; "
                           f"found {names}")
    try:
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    except Exception as exc:  # wgpu raises various errors when no driver loads
        raise RuntimeError(f"{_NO_ADAPTER} ({type(exc).__name__}: {exc})") from exc
    if adapter is None:
        raise RuntimeError(_NO_ADAPTER)
    return adapter


def _wanted(adapter):
    feats = {f for f in ("shader-f16", "timestamp-query") if f in adapter.features}
    lim = adapter.limits
    limits = {
        "max-storage-buffer-binding-size": lim["max-storage-buffer-binding-size"],
        "max-buffer-size": lim["max-buffer-size"],
        "max-storage-buffers-per-shader-stage": min(lim["max-storage-buffers-per-shader-stage"], 8),
    }
    return feats, limits


def _create() -> Context:
    global _configured, _generation, _lost
    wgpu = _wgpu()
    device = None
    adapter = None
    wdev = None
    if not _configured and not _lost:
        _configured = True
        try:
            from wgpu.utils import device as wdev
        except ImportError:  # an older wgpu-py without the shared-device helpers
            wdev = None
    if wdev is not None and hasattr(wdev, "preconfigure_default_device"):
        adapter = _request_adapter(wgpu)
        feats, limits = _wanted(adapter)
        try:
            wdev.preconfigure_default_device(
                "rsnorm.gpu", adapter=adapter, preferred_features=feats, required_limits=limits
            )
        except RuntimeError:
            # Another library created the default device first: use it as it is and read its
            # real features and limits below.
            pass
        try:
            device = wdev.get_default_device()
        except Exception as exc:
            raise RuntimeError(f"{_NO_ADAPTER} ({type(exc).__name__}: {exc})") from exc
        adapter = getattr(device, "adapter", adapter)
    else:
        # After a loss the default device is dead (and older wgpu-py cannot preconfigure it):
        # ask the adapter for a device of our own.
        adapter = _request_adapter(wgpu)
        feats, limits = _wanted(adapter)
        try:
            device = adapter.request_device_sync(
                required_features=sorted(feats), required_limits=limits, label="rsnorm.gpu"
            )
        except Exception as exc:
            raise RuntimeError(f"{_NO_ADAPTER} ({type(exc).__name__}: {exc})") from exc
    _generation += 1
    _lost = False
    _pool.clear()
    globals()["_pool_bytes"] = 0
    ctx = Context(
        device=device,
        adapter=adapter,
        generation=_generation,
        features=frozenset(device.features),
        limits=dict(device.limits),
    )
    # 64 bytes: at least one element of every runtime-sized array bound to an unused slot.
    ctx.dummy = device.create_buffer(size=64, usage=wgpu.BufferUsage.STORAGE)
    return ctx


_pid = os.getpid()


def context() -> Context:
    """The live context, created on first use and re-created after a device loss."""
    global _ctx
    if _ctx is not None and os.getpid() != _pid:
        # wgpu-native's instance and threads do not survive fork(): using them in the child hangs.
        raise RuntimeError(
            "rsnorm.gpu was initialized in the parent of this forked process and cannot be used "
            "here; start worker processes with the 'spawn' or 'forkserver' method"
        )
    with _lock:
        if _ctx is None or _lost:
            _ctx = _create()
            globals()["_pid"] = os.getpid()
        return _ctx


def mark_lost() -> None:
    """Record that the device is lost: the next call builds a new device and pipelines."""
    global _lost
    with _lock:
        _lost = True


@contextlib.contextmanager
def _limits(**kw):
    """Private: temporarily lower ``max_binding`` / ``max_workgroups`` or set ``f16=False``."""
    old = dict(_overrides)
    _overrides.update(kw)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(old)


def is_lost_error(exc: BaseException) -> bool:
    return "lost" in str(exc).lower()


# ----------------------------------------------------------------------------- buffers


def pad4(n: int) -> int:
    return max(4, (n + 3) // 4 * 4)


def storage_usage():
    u = _wgpu().BufferUsage
    return u.STORAGE | u.COPY_SRC | u.COPY_DST


def new_buffer(ctx: Context, nbytes: int):
    nbytes = pad4(nbytes)
    if nbytes > ctx.max_buffer:
        raise ValueError(
            f"rsnorm.gpu: an array of {nbytes} bytes exceeds this device's max-buffer-size "
            f"({ctx.max_buffer} bytes)"
        )
    return ctx.device.create_buffer(size=nbytes, usage=storage_usage())


# Output buffers are recycled: wgpu zero-fills every fresh buffer before its first use, which
# would add a full write pass to each op (3N instead of 2N bytes for layer norm). A buffer goes
# back to the pool when the last device array using it dies, and is reused for the next output of
# the same size (queue order makes the reuse safe). Bounded by _POOL_CAP bytes.
_POOL_CAP = 2 * 2**30
_POOL_PER_SIZE = 4
_pool: dict = {}
_pool_bytes = 0


def _bucket(nbytes: int) -> int:
    return max(256, (nbytes + 255) // 256 * 256)


class Block:
    """Owner of one storage buffer shared by a device array and its views."""

    __slots__ = ("__weakref__", "buffer", "gen", "size")

    def __init__(self, buffer, gen: int, size: int):
        self.buffer = buffer
        self.gen = gen
        self.size = size
        # A weakref finalizer, not __del__: the finalizer holds the buffer, so the buffer can
        # never be garbage together with its Block. With __del__, a Block caught in a reference
        # cycle (an exception's traceback holding an op's frame) was collected in the same pass
        # as its buffer: wgpu-py's finalizer released the buffer while ours put it back into
        # the pool, and a later op bound the released (NULL) handle, which wgpu-native answers
        # with an abort of the whole process ("invalid bind group entry").
        fin = weakref.finalize(self, _recycle, buffer, gen, size)
        # At interpreter shutdown there is nothing to recycle into (the driver frees it all).
        fin.atexit = False


def _recycle(buf, gen: int, size: int) -> None:
    global _pool_bytes
    if os.getpid() != _pid:
        return
    with _lock:
        if (_ctx is not None and not _lost and gen == _ctx.generation
                and _pool_bytes + size <= _POOL_CAP
                and len(_pool.get(size, ())) < _POOL_PER_SIZE):
            _pool.setdefault(size, []).append(buf)
            _pool_bytes += size
            return
        with contextlib.suppress(Exception):
            buf.destroy()


def alloc(ctx: Context, nbytes: int) -> Block:
    """A storage buffer of at least ``nbytes`` (recycled when one of that size is free)."""
    global _pool_bytes
    size = _bucket(nbytes)
    with _lock:
        free = _pool.get(size)
        if free:
            _pool_bytes -= size
            return Block(free.pop(), ctx.generation, size)
    return Block(new_buffer(ctx, size), ctx.generation, size)


def empty_cache() -> None:
    """Destroy the recycled buffers (their memory returns to the driver)."""
    global _pool_bytes
    with _lock:
        bufs = [b for lst in _pool.values() for b in lst]
        _pool.clear()
        _pool_bytes = 0
        for b in bufs:
            b.destroy()


def upload_block(ctx: Context, arr: np.ndarray) -> Block:
    """A recycled (or new) storage buffer holding the bytes of a C-contiguous array."""
    data = arr.tobytes()
    if len(data) % 4:
        data += b"\0" * (-len(data) % 4)
    with _lock:
        block = alloc(ctx, len(data))
        if data:
            COUNTERS["uploads"] += 1
            ctx.device.queue.write_buffer(block.buffer, 0, data)
    return block


def upload(ctx: Context, arr: np.ndarray):
    """New storage buffer holding the bytes of a C-contiguous array (padded to 4 bytes)."""
    data = arr.tobytes() if arr.nbytes % 4 == 0 else arr.tobytes() + b"\0" * (-arr.nbytes % 4)
    if len(data) == 0:
        data = b"\0" * 4
    if len(data) > ctx.max_buffer:
        raise ValueError(
            f"rsnorm.gpu: an array of {len(data)} bytes exceeds this device's max-buffer-size "
            f"({ctx.max_buffer} bytes)"
        )
    COUNTERS["uploads"] += 1
    return ctx.device.create_buffer_with_data(data=data, usage=storage_usage())


def download(ctx: Context, items) -> list[bytes]:
    """Copy several ``(buffer, nbytes)`` into one staging buffer in one submit and map it once."""
    with _lock:
        return _download(ctx, items)


def _download(ctx: Context, items) -> list[bytes]:
    wgpu = _wgpu()
    offs = []
    total = 0
    for _, n in items:
        offs.append(total)
        total += pad4(n)
    staging = ctx.device.create_buffer(
        size=max(total, 4), usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST
    )
    enc = ctx.device.create_command_encoder()
    for (buf, n), off in zip(items, offs):
        if n:
            enc.copy_buffer_to_buffer(buf, 0, staging, off, pad4(n))
    ctx.device.queue.submit([enc.finish()])
    COUNTERS["submits"] += 1
    COUNTERS["reads"] += 1
    staging.map_sync(wgpu.MapMode.READ)
    try:
        raw = bytes(staging.read_mapped(0, max(total, 4)))
    finally:
        staging.unmap()
        staging.destroy()
    return [raw[off : off + n] for (_, n), off in zip(items, offs)]


# ----------------------------------------------------------------------------- pipelines


def pipeline(ctx: Context, name: str, storage: str, constants: dict, entry: str = "main"):
    """Compute pipeline for (shader, entry point, storage dtype, override constants), compiled
    once."""
    key = (name, entry, storage, tuple(sorted(constants.items())))
    hit = ctx.pipelines.get(key)
    if hit is not None:
        return hit
    wgpu = _wgpu()
    mkey = (name, storage)
    module = ctx.modules.get(mkey)
    if module is None:
        module = ctx.device.create_shader_module(
            code=shader_source(name, storage), label=f"rsnorm.{name}.{storage}"
        )
        ctx.modules[mkey] = module
    kinds = {
        "u": wgpu.BufferBindingType.uniform,
        "r": wgpu.BufferBindingType.read_only_storage,
        "w": wgpu.BufferBindingType.storage,
    }
    entries = [
        {"binding": i, "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": kinds[k]}}
        for i, k in enumerate(BINDINGS[name])
    ]
    bgl = ctx.device.create_bind_group_layout(entries=entries)
    layout = ctx.device.create_pipeline_layout(bind_group_layouts=[bgl])
    pipe = ctx.device.create_compute_pipeline(
        layout=layout,
        compute={
            "module": module,
            "entry_point": entry,
            "constants": {k: float(v) for k, v in constants.items()},
        },
        label=f"rsnorm.{name}.{storage}",
    )
    ctx.pipelines[key] = (pipe, bgl)
    return ctx.pipelines[key]


def pack(fields: list) -> bytes:
    """Uniform block from ``[(value, 'u'|'i'|'f'), ...]``, padded to 16 bytes."""
    out = b"".join(struct.pack("<" + (k if k != "u" else "I"), v) for v, k in fields)
    return out + b"\0" * (-len(out) % 16)


def grid2d(ctx: Context, nwg: int) -> tuple[int, int]:
    """Near-square 2-D grid holding ``nwg`` workgroups (wastes at most one row)."""
    m = ctx.max_wg
    if nwg <= m:
        return max(nwg, 1), 1
    y = math.ceil(nwg / m)
    x = math.ceil(nwg / y)
    if y > m:
        raise ValueError(f"rsnorm.gpu: {nwg} workgroups exceed a {m} x {m} grid")
    return x, y


class Encoder:
    """Records the dispatches of one op into one command encoder; ``submit`` sends them."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.enc = ctx.device.create_command_encoder()
        self.n = 0

    def dispatch(self, name, storage, constants, params: bytes, bindings, grid, entry="main"):
        """``bindings``: buffers or ``(buffer, offset, size)`` after the uniform at binding 0."""
        wgpu = _wgpu()
        ctx = self.ctx
        pipe, bgl = pipeline(ctx, name, storage, constants, entry)
        ubuf = ctx.device.create_buffer_with_data(data=params, usage=wgpu.BufferUsage.UNIFORM)
        entries = [{"binding": 0, "resource": {"buffer": ubuf, "offset": 0, "size": len(params)}}]
        for i, b in enumerate(bindings, start=1):
            if isinstance(b, tuple):
                buf, off, size = b
            else:
                buf, off, size = b, 0, b.size
            entries.append({"binding": i, "resource": {"buffer": buf, "offset": off, "size": size}})
        bg = ctx.device.create_bind_group(layout=bgl, entries=entries)
        tw = _timing.next_writes() if _timing is not None else None
        if tw:
            cp = self.enc.begin_compute_pass(timestamp_writes=tw)
        else:
            cp = self.enc.begin_compute_pass()
        cp.set_pipeline(pipe)
        cp.set_bind_group(0, bg)
        cp.dispatch_workgroups(int(grid[0]), int(grid[1]), 1)
        cp.end()
        self.n += 1
        COUNTERS["dispatches"] += 1

    def submit(self):
        try:
            self.ctx.device.queue.submit([self.enc.finish()])
        except Exception as exc:
            if is_lost_error(exc):
                mark_lost()
            raise
        COUNTERS["submits"] += 1


def element_windows(ctx: Context, total: int, itemsize: int, slab: int = 1):
    """Split elements ``[0, total)`` into binding windows of whole ``slab``-element blocks.

    Yields ``(first, count, win_start, byte_offset, byte_size)``: process global elements
    ``[first, first + count)`` with a binding that starts at global element ``win_start``.
    """
    maxb = ctx.max_binding
    align = ctx.align
    first = 0
    while first < total:
        off = (first * itemsize) // align * align
        lead = first * itemsize - off
        room = (maxb - lead - 4) // itemsize
        count = min(total - first, room // slab * slab)
        if count <= 0:
            raise ValueError(
                f"rsnorm.gpu: one slab of {slab} elements ({slab * itemsize} bytes) does not fit "
                f"in one storage binding ({maxb} bytes)"
            )
        size = pad4((first + count) * itemsize - off)
        yield first, count, off // itemsize, off, size
        first += count
