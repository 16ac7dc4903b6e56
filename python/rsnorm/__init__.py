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
from ._gdn_params import (
    gdn_init,
    gdn_params_from_compressai,
    gdn_params_from_compressai_backward,
    gdn_params_to_compressai,
)
from ._grads import Grads
from ._grads_mixing import (
    FilterResponseNormGrads,
    GDNGrads,
    LocalResponseNormGrads,
    MeanVarianceNormGrads,
    NormalizeGrads,
    TLUGrads,
    filter_response_norm_backward,
    gdn_backward,
    local_response_norm_backward,
    mean_variance_norm_backward,
    normalize_backward,
    tlu_backward,
)
from ._rsnorm import (
    RsnormError,
    ShapeError,
    batch_norm,
    batch_norm_backward,
    build_info,
    filter_response_norm,
    gdn,
    get_num_threads,
    group_norm,
    group_norm_backward,
    instance_norm,
    instance_norm_backward,
    layer_norm,
    layer_norm_backward,
    local_response_norm,
    mean_variance_norm,
    normalize,
    rms_norm,
    rms_norm_backward,
    set_num_threads,
    tlu,
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
    "FilterResponseNormGrads",
    "GDNGrads",
    "Grads",
    "IterNormGrads",
    "IterNormStats",
    "LocalResponseNormGrads",
    "MeanVarianceNormGrads",
    "Moments",
    "NormalizeGrads",
    "RsnormError",
    "ShapeError",
    "Stats",
    "TLUGrads",
    "Whitening",
    "__version__",
    "batch_norm",
    "batch_norm_backward",
    "build_info",
    "filter_response_norm",
    "filter_response_norm_backward",
    "gdn",
    "gdn_backward",
    "gdn_init",
    "gdn_params_from_compressai",
    "gdn_params_from_compressai_backward",
    "gdn_params_to_compressai",
    "get_num_threads",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "iter_norm",
    "iter_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "local_response_norm",
    "local_response_norm_backward",
    "mean_variance_norm",
    "mean_variance_norm_backward",
    "moments",
    "normalize",
    "normalize_backward",
    "rms_norm",
    "rms_norm_backward",
    "set_num_threads",
    "tlu",
    "tlu_backward",
]
