"""rsnorm — deep-learning normalization layers for NumPy, exact and fast.

A Rust core (ndarray + rayon) exposed as zero-copy NumPy functions with PyTorch's names,
argument order and defaults. Statistics are exact two-pass sums accumulated in float64, and
results are bitwise identical for any thread count and memory layout.

>>> import numpy as np, rsnorm as rn
>>> x = np.random.default_rng(0).standard_normal((8, 16, 4, 4)).astype(np.float32)
>>> y = rn.batch_norm(x, training=True)
>>> bool(abs(y.mean()) < 1e-6)
True

The GPU path is ``rsnorm.gpu`` (optional extra ``rsnorm[gpu]``), imported on first use.
"""

from __future__ import annotations

from . import _rsnorm
from ._grads import Grads
from ._rsnorm import (
    RsnormError,
    ShapeError,
    batch_norm,
    batch_norm_backward,
    build_info,
    get_num_threads,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    rms_norm,
    rms_norm_backward,
    set_num_threads,
)
from ._types import Moments, Stats
from .whitening import (
    IterNormGrads,
    IterNormStats,
    Whitening,
    iter_norm,
    iter_norm_backward,
)

__version__: str = _rsnorm.__version__


def moments(x, axis: int = 1) -> Moments:
    """Per-channel partial statistics of ``x`` over every axis but ``axis``.

    Returns ``Moments(count, mean, m2)`` in float64, with ``m2 = Σ(x − mean)²`` computed by an
    exact two-pass sum. ``Moments.merge(*parts)`` combines the moments of the parts of a split
    batch into those of the whole batch (the base of sync batch norm and chunked work).
    """
    count, mean, m2 = _rsnorm.moments(x, axis)
    return Moments(count, mean, m2)


def __getattr__(name: str):
    # The optional front ends import wgpu, mpi4py or dask: load them only when asked for, so
    # `import rsnorm` stays light and works without those extras.
    if name in ("gpu", "dask", "distributed", "nn", "demo_train"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'rsnorm' has no attribute {name!r}")


__all__ = [
    "Grads",
    "IterNormGrads",
    "IterNormStats",
    "Moments",
    "RsnormError",
    "ShapeError",
    "Stats",
    "Whitening",
    "__version__",
    "batch_norm",
    "batch_norm_backward",
    "build_info",
    "get_num_threads",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "iter_norm",
    "iter_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "moments",
    "rms_norm",
    "rms_norm_backward",
    "set_num_threads",
]
