"""Device arrays and the argument checks shared by the GPU ops (all done before any wgpu call)."""

from __future__ import annotations

import math

import numpy as np

from . import _device

ACCEPTED = "float16, float32 (the GPU path has no float64)"


def _error_class():
    # The CPU package defines RsnormError(ValueError); fall back to ValueError when the native
    # module is not built, so the GPU path raises the same kinds either way.
    try:
        import rsnorm

        return getattr(rsnorm, "RsnormError", ValueError)
    except ImportError:  # pragma: no cover
        return ValueError


def value_error(msg: str) -> Exception:
    return _error_class()(msg)


def shape_error(msg: str) -> Exception:
    """``rsnorm.ShapeError`` (a ``RsnormError``, so a ``ValueError``) for shape mismatches, as
    the CPU path raises."""
    try:
        import rsnorm

        cls = getattr(rsnorm, "ShapeError", None)
    except ImportError:  # pragma: no cover
        cls = None
    return (cls or _error_class())(msg)


class GPUArray:
    """A C-contiguous float32/float16 array in one wgpu storage buffer.

    ``shape``, ``dtype``, ``size``, ``ndim``, ``nbytes``, ``numpy()`` (read back to the host) and
    ``reshape``. Arrays made by :func:`asarray` or returned by GPU ops stay on the device, so a
    chain of ops makes no round trips. On adapters without ``shader-f16`` a float16 array is
    stored as float32 (``dtype`` stays float16; ``numpy()`` rounds to float16).
    """

    __slots__ = ("__weakref__", "_dtype", "_gen", "_owner", "_shape", "_storage")

    def __init__(self, owner, shape, dtype, storage, generation):
        # owner: a _device.Block (recycled when the last array using it dies) or a raw buffer.
        self._owner = owner
        self._shape = tuple(int(s) for s in shape)
        self._dtype = np.dtype(dtype)
        self._storage = storage
        self._gen = generation

    @property
    def _buffer(self):
        o = self._owner
        return o.buffer if isinstance(o, _device.Block) else o

    @property
    def shape(self) -> tuple:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def size(self) -> int:
        return math.prod(self._shape)

    @property
    def nbytes(self) -> int:
        return self.size * self._dtype.itemsize

    @property
    def storage_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self._storage == "f16" else np.float32)

    def _live_buffer(self, ctx):
        if self._gen != ctx.generation:
            raise RuntimeError(
                "rsnorm.gpu: this device array belongs to a GPU device that was lost; "
                "upload the data again with rsnorm.gpu.asarray"
            )
        return self._buffer

    def numpy(self) -> np.ndarray:
        """Read the array back into a new NumPy array of ``dtype``."""
        sd = self.storage_dtype
        n = self.size * sd.itemsize
        if n == 0:
            return np.empty(self._shape, self._dtype)
        ctx = _device.context()
        (raw,) = _device.download(ctx, [(self._live_buffer(ctx), n)])
        out = np.frombuffer(raw, dtype=sd, count=self.size).reshape(self._shape)
        return out.astype(self._dtype, copy=True)

    def reshape(self, *shape) -> GPUArray:
        """A view with another shape over the same buffer (no copy)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = list(shape)
        if shape.count(-1) == 1:
            rest = math.prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = self.size // rest if rest else 0
        if math.prod(shape) != self.size:
            raise shape_error(f"cannot reshape a device array of shape {self._shape} into {shape}")
        return GPUArray(self._owner, shape, self._dtype, self._storage, self._gen)

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of a 0-d device array")
        return self._shape[0]

    def __repr__(self) -> str:
        return f"rsnorm.gpu.GPUArray(shape={self._shape}, dtype={self._dtype})"


def reject_masked(a, name: str) -> None:
    """Masks are not honoured, so a masked array is refused rather than silently unmasked
    (the CPU ops raise the same TypeError)."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a numpy.ma.MaskedArray; rsnorm does not honour masks and will not drop "
            f"one silently: pass {name}.filled(value) (masked entries replaced) or "
            f"np.asarray({name}) (the data with the mask ignored)"
        )


def check_dtype(dtype, name: str) -> None:
    dt = np.dtype(dtype)
    if dt.kind != "f" or dt.itemsize not in (2, 4):
        if dt.kind == "f" and dt.itemsize == 8:
            raise TypeError(
                f"{name} has dtype float64, which the GPU path cannot compute (WebGPU has no "
                f"float64); accepted dtypes: {ACCEPTED}. Convert with .astype(np.float32) or use "
                "the CPU op rsnorm.<op>."
            )
        raise TypeError(f"{name} has unsupported dtype {dt}; accepted dtypes: {ACCEPTED}")


def storage_for(ctx, dtype) -> str:
    return "f16" if np.dtype(dtype) == np.float16 and ctx.has_f16 else "f32"


def asarray(a, dtype=None) -> GPUArray:
    """Upload a NumPy array (float16 or float32) to the device; device arrays pass through.

    ``dtype`` converts first (an explicit cast, e.g. ``dtype=np.float32`` for float64 data).
    """
    if isinstance(a, GPUArray):
        if dtype is not None and np.dtype(dtype) != a.dtype:
            raise TypeError(f"device array has dtype {a.dtype}; no device-side cast to {dtype}")
        return a
    if not isinstance(a, (np.ndarray, np.generic)):
        raise TypeError(
            f"rsnorm.gpu.asarray expects a NumPy array, got {type(a).__name__}"
        )
    reject_masked(a, "array")
    arr = np.asarray(a)
    if dtype is not None:
        arr = arr.astype(dtype)
    check_dtype(arr.dtype, "array")
    ctx = _device.context()
    return _upload_checked(ctx, arr)


def _upload_checked(ctx, arr: np.ndarray) -> GPUArray:
    storage = storage_for(ctx, arr.dtype)
    host = np.ascontiguousarray(arr, dtype=np.float16 if storage == "f16" else np.float32)
    block = _device.upload_block(ctx, host)
    return GPUArray(block, arr.shape, arr.dtype.newbyteorder("="), storage, ctx.generation)


def empty(ctx, shape, dtype, storage=None) -> GPUArray:
    storage = storage or storage_for(ctx, dtype)
    isz = 2 if storage == "f16" else 4
    block = _device.alloc(ctx, math.prod(shape) * isz)
    return GPUArray(block, shape, dtype, storage, ctx.generation)
