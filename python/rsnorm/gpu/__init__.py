"""rsnorm.gpu -- the normalization ops on any WebGPU device (wgpu-py + WGSL compute shaders).

One code path for Vulkan, Metal, D3D12 and GL adapters (and Mesa's lavapipe, a software Vulkan
driver, on machines without a GPU). Install with ``pip install 'rsnorm[gpu]'`` (wgpu-py needs
CPython >= 3.11). ``import rsnorm`` never imports wgpu; ``import rsnorm.gpu`` does not either:
the device is created on the first call that needs it.

Device and arrays
-----------------
``is_available()``
    True when wgpu-py is installed and an adapter exists (never raises).
``info()``
    dict describing the adapter in use: name, vendor, backend, adapter type, fallback flag,
    ``shader-f16`` / ``timestamp-query`` support and the binding, buffer and dispatch limits.
``adapters()``
    list of such dicts, one per adapter wgpu can see.
``empty_cache()``
    free the recycled output buffers (outputs are reused when their arrays die, because wgpu
    zero-fills every new buffer; at most 2 GiB is kept).
``asarray(a, dtype=None) -> GPUArray``
    upload a float16/float32 NumPy array. A ``GPUArray`` has ``shape``, ``dtype``, ``size``,
    ``ndim``, ``nbytes``, ``reshape(...)`` (a view, no copy) and ``numpy()`` (read back).

The adapter is wgpu's high-performance choice; set ``RSNORM_GPU_ADAPTER`` to a substring of an
adapter's name (e.g. ``nvidia``) to pick one. No adapter (or no wgpu) -> ``RuntimeError`` with
an explanation. A lost device is replaced on the next call; arrays of the lost device then raise
``RuntimeError`` ("upload again").

Example::

    import numpy as np
    from rsnorm import gpu

    x = np.random.default_rng(0).standard_normal((32, 64, 56, 56), dtype=np.float32)
    y = gpu.batch_norm(x, training=True)             # NumPy in, NumPy out
    xd = gpu.asarray(x)                              # or keep the data on the device:
    h = gpu.group_norm(gpu.layer_norm(xd, (56, 56)), 8)
    h.numpy()                                        # the only readback

Ops
---
The CPU names and signatures (``rsnorm.<op>``, SPEC section 1), with keyword-only ``axis=``
(channel axis; -1 = channels-last), ``out=`` and ``return_stats=``:

    batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, return_stats=False,
               num_batches_tracked=None, momentum_convention="torch")
    layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               return_stats=False)
    rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, return_stats=False)
    group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               return_stats=False)
    instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  return_stats=False)
    filter_response_norm(x, weight=None, bias=None, tau=None, eps=1e-6, *, learned_eps=None,
                         axis=1, out=None, return_stats=False)
    tlu(x, tau, *, axis=1, out=None)
    local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0, *, alpha_over_size=True,
                        window="torch", axis=1, out=None)
    gdn(x, beta, gamma, *, inverse=False, variant="gdn", axis=1, out=None)
    moments(x, axis=1) -> Moments(count, mean: float64[C], m2: float64[C])

and backward for the statistics family, returning ``Grads(x, weight, bias)`` (``weight`` /
``bias`` are None unless that parameter was given):

    batch_norm_backward(grad_y, x, running_mean=None, running_var=None, weight=None, bias=None,
                        training=False, momentum=0.1, eps=1e-5, stats=None, *, axis=1)
    layer_norm_backward(grad_y, x, normalized_shape, weight=None, bias=None, eps=1e-5, stats=None)
    rms_norm_backward(grad_y, x, normalized_shape, weight=None, eps=None, stats=None)
    group_norm_backward(grad_y, x, num_groups, weight=None, bias=None, eps=1e-5, stats=None, *,
                        axis=1)

NumPy in -> NumPy out (upload, compute, one readback of everything the call returns). Device array
in -> device arrays out, nothing read back, so a chain of ops makes no round trips (batch norm with
NumPy running statistics reads back its C batch statistics to update them in float64; instance
norm's running-statistics update always runs on the host).

Dtypes and parameters
---------------------
x: float32 or float16 (float64 raises ``TypeError``: WebGPU has no float64; convert explicitly or
use the CPU op). Outputs have x's dtype, statistics are float32. float16 is stored as f16 where the
adapter has ``shader-f16`` and always accumulated in f32; without the feature, float16 data is
stored and computed as float32 on the device and rounded to float16 on the way back (same
results up to the final rounding). Parameters (weight, bias, running stats, tau, beta, gamma) may be
NumPy float16/32/64 (read as float32) or float32 device arrays. Errors match the CPU path:
``TypeError`` for kinds/dtypes, ``ValueError`` (``rsnorm.RsnormError``) for shapes and parameters,
all raised in Python before any GPU work.

Numerics and tolerances
-----------------------
Statistics are float32 (count, mean, M2) partials: each invocation holds at most 16 values in
registers and does a true two-pass, then a workgroup (64 invocations for groups up to 1024
elements, else 256) merges them by Chan's formula in a fixed pairwise tree, and the chunk
partials (64 or 256 x 16 elements) of a group are merged left to right (by a fixed tree from 8
chunks on). Never E[x^2]-E[x]^2. The mean is carried as pivot + offset (a data value plus a
small correction) and x - mean is formed as (x - pivot) - offset, so the float32 rounding of a
mean like 1e4 (0.5 ulp = 5e-4) never reaches the output. Groups of up to 4 chunks (layer/RMS
rows up to 16384, most group/instance/FRN groups) are normalized by one fused kernel (x read
from memory once, y written once), groups of up to 16 elements by one invocation each; longer
groups take a statistics pass and an apply pass. All three give the same bits. Channels-last
per-channel reductions (batch and instance norm over NHWC, layer-norm parameter gradients) use
column kernels instead, in which consecutive invocations read consecutive channels (coalesced),
256 rows per partial.
The reduction order depends only on the group length, so results are bitwise identical run to
run and whether or not an input is split across bindings. Values are scaled by a power of two
when |x| >= 2^47, so statistics of data up to 3.4e38 stay finite. A NaN or infinity makes its
own group NaN. Documented float32 tolerance against a float64 reference on the same values:

* batch/layer/RMS/group/instance/filter-response norm, moments, TLU: ``rtol=1e-4, atol=1e-5``
  on the normalized output, also for the adversarial sets ``1e4 + N(0,1)``, ``1e6 + N(0,1)``,
  ``3e7 + N(0,1)`` (measured: below 1e-6 absolute), constant groups give exactly 0 (+bias) and
  rows like ``[v, -v, v/2, 0]`` with v up to 3e38 are correct;
* local response norm and GDN: ``rtol=1e-4, atol=1e-5`` (pow as exp2/log2 in float32);
* backward (dx, dweight, dbias): ``rtol=1e-3, atol=1e-4`` relative to the largest gradient;
* float16: the float32 result rounded to float16 (``rtol=2e-3, atol=2e-3``).

Backward works in the unscaled domain and is meant for |x| < 1e18; with ``stats=`` given it
centres with the rounded float32 mean (recomputed statistics keep the pivot + offset form).

Benchmark
---------
``rsnorm.gpu.bench.main(argv) -> int`` (``rsnorm bench --backend gpu``, ``benches/gpu_bench.py``):
kernel time from timestamp queries, wall time, NumPy round trip, GB/s against a same-run buffer
copy and nominal HBM, and PyTorch CUDA on the same device when installed.

Threads and processes
---------------------
Ops may be called from several threads; GPU work is serialized on one lock (wgpu-native aborts
when threads encode at once). wgpu does not survive ``fork()``: in a child forked after the
parent used the GPU, calls raise ``RuntimeError`` (use the ``spawn`` start method). A call is not
interrupted by Ctrl-C while it waits for the GPU (as NumPy ufuncs are not); the interrupt is
raised when it returns.

Large inputs
------------
Inputs larger than one storage binding (``max-storage-buffer-binding-size``, 128 MiB by default)
are processed in windows bound at aligned offsets, split on reduction-chunk and row boundaries
(bitwise equal to an unsplit run); more than 65 535 workgroups use a 2-D grid or a grid-stride
loop. Outputs are recycled buffers (see ``empty_cache``). Limits: fewer than 2^32 - 2^26
elements (32-bit indices), one array within the device's ``max-buffer-size``; LRN and GDN need
one slice x[o] (all channels of one outer index) to fit in one binding, and a channels-last
reduction needs 256 rows of C channels to fit in one binding.
"""

from __future__ import annotations

from ._array import GPUArray, asarray
from ._backward import (
    Grads,
    batch_norm_backward,
    group_norm_backward,
    layer_norm_backward,
    rms_norm_backward,
)
from ._ops import (
    Moments,
    Stats,
    batch_norm,
    filter_response_norm,
    gdn,
    group_norm,
    instance_norm,
    layer_norm,
    local_response_norm,
    moments,
    rms_norm,
    tlu,
)

__all__ = [
    "GPUArray",
    "Grads",
    "Moments",
    "Stats",
    "adapters",
    "asarray",
    "batch_norm",
    "batch_norm_backward",
    "empty_cache",
    "filter_response_norm",
    "gdn",
    "group_norm",
    "group_norm_backward",
    "info",
    "instance_norm",
    "is_available",
    "layer_norm",
    "layer_norm_backward",
    "local_response_norm",
    "moments",
    "rms_norm",
    "rms_norm_backward",
    "tlu",
]


def empty_cache() -> None:
    """Free the output buffers rsnorm.gpu keeps for reuse (wgpu zero-fills every new buffer, so
    outputs are recycled when their device arrays die; at most 2 GiB is kept)."""
    from . import _device

    _device.empty_cache()


def is_available() -> bool:
    """True when wgpu-py is installed and a GPU adapter (or lavapipe) can be used."""
    from . import _device

    try:
        _device.context()
    except RuntimeError:
        return False
    return True


def _describe(adapter, limits=None, features=None) -> dict:
    inf = dict(adapter.info)
    limits = dict(limits if limits is not None else adapter.limits)
    features = set(features if features is not None else adapter.features)
    return {
        "adapter": inf.get("device", ""),
        "vendor": inf.get("vendor", ""),
        "description": inf.get("description", ""),
        "backend": inf.get("backend_type", ""),
        "adapter_type": inf.get("adapter_type", ""),
        "fallback": bool(getattr(adapter, "is_fallback_adapter", False))
        or inf.get("adapter_type") == "CPU",
        "shader_f16": "shader-f16" in features,
        "timestamp_query": "timestamp-query" in features,
        "max_storage_binding": limits.get("max-storage-buffer-binding-size"),
        "max_buffer": limits.get("max-buffer-size"),
        "max_workgroups_per_dim": limits.get("max-compute-workgroups-per-dimension"),
    }


def info() -> dict:
    """The adapter and device in use (raises ``RuntimeError`` when there is none)."""
    from . import _device

    ctx = _device.context()
    return _describe(ctx.adapter, ctx.limits, ctx.features)


def adapters() -> list:
    """One description per adapter wgpu can enumerate (empty without wgpu or drivers)."""
    try:
        import wgpu

        found = wgpu.gpu.enumerate_adapters_sync()
    except Exception:  # noqa: BLE001 - no wgpu, no driver: there is nothing to list
        return []
    return [_describe(a) for a in found]
