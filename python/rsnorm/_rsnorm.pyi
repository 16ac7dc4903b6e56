"""Type stubs for the native module ``rsnorm._rsnorm`` (docstrings mirror the Rust ``///`` text).

Conventions shared by every op:

* ``x``: a NumPy array of float16, float32 or float64 (any strides; never copied or cast).
  The output has x's dtype and shape. Other dtypes or a non-native byte order: ``TypeError``.
* Parameters (weight, bias, running statistics): float16/32/64 arrays, read exactly as float64;
  running statistics are updated in place in their own dtype.
* ``axis``: the channel axis (default 1; ``-1`` for channels-last arrays such as NHWC). The
  batch axis is 0; all other axes are spatial.
* ``out``: write the result into this array (x's dtype and shape, writable, not overlapping x).
* ``return_stats=True``: return ``(y, Stats(mean, rstd))`` with ``rstd = 1/sqrt(var + eps)``
  per normalization group (float64 for float64 x, else float32).
* Bad shapes or parameters raise ``RsnormError`` (a ``ValueError``); ``ShapeError`` is its
  subclass for shape problems.
"""

from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

__version__: str

class RsnormError(ValueError): ...
class ShapeError(RsnormError): ...

_Arr: TypeAlias = NDArray[Any]

def batch_norm(
    x: _Arr,
    running_mean: _Arr | None = None,
    running_var: _Arr | None = None,
    weight: _Arr | None = None,
    bias: _Arr | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    out: _Arr | None = None,
    return_stats: bool = False,
    num_batches_tracked: _Arr | None = None,
    momentum_convention: str = "torch",
) -> Any:
    """Batch normalization per channel over the batch and spatial axes.

    ``y = (x − mean_c)/sqrt(var_c + eps)·weight_c + bias_c``. Training (or eval without running
    statistics): batch mean and biased variance; running stats, if given, are updated in place
    with the unbiased variance, ``new = (1−m)·old + m·batch`` (``momentum_convention="onnx"``:
    ``new = m·old + (1−m)·batch`` with the biased variance). ``momentum=None``: cumulative
    average, ``m = 1/(num_batches_tracked + 1)``; ``num_batches_tracked`` (0-d int64) is
    incremented in place. Eval with running stats normalizes with them.
    """

def layer_norm(
    x: _Arr,
    normalized_shape: int | Sequence[int],
    weight: _Arr | None = None,
    bias: _Arr | None = None,
    eps: float = 1e-5,
    *,
    out: _Arr | None = None,
    return_stats: bool = False,
) -> Any:
    """Layer normalization over the trailing ``normalized_shape`` dims:
    ``y = (x − mean)/sqrt(var + eps)·weight + bias``; stats have shape
    ``x.shape[:-len(normalized_shape)]``."""

def rms_norm(
    x: _Arr,
    normalized_shape: int | Sequence[int],
    weight: _Arr | None = None,
    eps: float | None = None,
    *,
    out: _Arr | None = None,
    return_stats: bool = False,
) -> Any:
    """RMS normalization: ``y = x/sqrt(mean(x²) + eps)·weight`` over the trailing dims;
    ``eps=None`` is ``finfo(float32).eps`` (float16/32) or ``finfo(float64).eps``.
    Stats: ``Stats(None, rstd)``."""

def group_norm(
    x: _Arr,
    num_groups: int,
    weight: _Arr | None = None,
    bias: _Arr | None = None,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    out: _Arr | None = None,
    return_stats: bool = False,
) -> Any:
    """Group normalization: statistics per (n, group of C/G channels), per-channel affine.
    Stats have shape (N, G)."""

def instance_norm(
    x: _Arr,
    running_mean: _Arr | None = None,
    running_var: _Arr | None = None,
    weight: _Arr | None = None,
    bias: _Arr | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    axis: int = 1,
    out: _Arr | None = None,
    return_stats: bool = False,
) -> Any:
    """Instance normalization: statistics per (n, c) over the spatial axes. Running stats, if
    given with ``use_input_stats``, are updated with the batch average of the per-instance
    statistics (unbiased variance); ``use_input_stats=False`` normalizes with them.
    Stats have shape (N, C)."""

# Backward (issue 4). Each returns ``rsnorm.Grads(x, weight, bias)``: the input gradient and the
# gradient of each parameter that was given (None otherwise), arrays in x's dtype with the
# parameters' shapes. ``stats``: the ``Stats`` of the forward's ``return_stats=True`` (skips
# recomputing them). Sums are accumulated in float64, in a fixed order: bitwise identical for
# any thread count and memory layout. Errors as the forward's; grad_y must have x's shape and
# dtype.
# Given stats are used as they are: the float32 stats of a float16/32 forward carry the mean's
# float32 rounding, which costs about |mean|/std·6e-8 of relative accuracy in the gradient;
# pass no stats (exact float64 recomputation) when the data sits far from zero.

def batch_norm_backward(
    grad_y: _Arr,
    x: _Arr,
    running_mean: _Arr | None = None,
    running_var: _Arr | None = None,
    weight: _Arr | None = None,
    bias: _Arr | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    stats: Any = None,
    *,
    axis: int = 1,
    momentum_convention: str = "torch",
    num_batches_tracked: _Arr | None = None,
) -> Any:
    """Gradients of ``batch_norm``. Training (or no running statistics): through the batch
    statistics, ``dx = w·rstd·(dy − mean(dy) − x̂·mean(dy·x̂))``; eval with running statistics:
    the affine map ``dx = w·rstd·dy``. ``dweight = Σ dy·x̂``, ``dbias = Σ dy`` per channel.
    ``momentum``, ``momentum_convention`` and ``num_batches_tracked`` are validated, not used."""

def layer_norm_backward(
    grad_y: _Arr,
    x: _Arr,
    normalized_shape: int | Sequence[int],
    weight: _Arr | None = None,
    bias: _Arr | None = None,
    eps: float = 1e-5,
    stats: Any = None,
) -> Any:
    """Gradients of ``layer_norm``: per row, ``g = w·dy``,
    ``dx = rstd·(g − mean(g) − x̂·mean(g·x̂))``; ``dweight = Σ_rows dy·x̂``, ``dbias = Σ_rows dy``.
    Over one element dx = 0 and dweight = 0 exactly."""

def rms_norm_backward(
    grad_y: _Arr,
    x: _Arr,
    normalized_shape: int | Sequence[int],
    weight: _Arr | None = None,
    eps: float | None = None,
    stats: Any = None,
) -> Any:
    """Gradients of ``rms_norm``: ``dx = rstd·(g − x·rstd²·mean(g·x))``, ``g = w·dy``;
    ``dweight = Σ_rows dy·x·rstd``."""

def group_norm_backward(
    grad_y: _Arr,
    x: _Arr,
    num_groups: int,
    weight: _Arr | None = None,
    bias: _Arr | None = None,
    eps: float = 1e-5,
    stats: Any = None,
    *,
    axis: int = 1,
) -> Any:
    """Gradients of ``group_norm`` (per (n, group), ``g = w_c·dy``); channels-last gives
    bitwise the channels-first result, weight gradient included."""

def instance_norm_backward(
    grad_y: _Arr,
    x: _Arr,
    running_mean: _Arr | None = None,
    running_var: _Arr | None = None,
    weight: _Arr | None = None,
    bias: _Arr | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stats: Any = None,
    *,
    axis: int = 1,
) -> Any:
    """Gradients of ``instance_norm``: through the per-(n, c) statistics, or with
    ``use_input_stats=False`` the affine map ``dx = w·rstd(running_var)·dy``."""

def moments(x: _Arr, axis: int = 1) -> tuple[int, NDArray[np.float64], NDArray[np.float64]]:
    """Per-channel (count, mean, M2) over every axis but ``axis``, float64."""

def covariance_moments(
    x: _Arr, num_groups: int = 1, *, axis: int = 1
) -> tuple[int, NDArray[np.float64], NDArray[np.float64]]:
    """Per-channel mean and per-group co-moment of x: (count, mean (C,), comoment (G, C/G, C/G)),
    float64, two-pass, deterministic."""

def whitening_matrix(
    cov: _Arr, method: str = "zca", eps: float = 1e-5
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Whitening matrix of a (d, d) covariance: (W, W_inv, eigenvalues descending), float64."""

def group_whiten_apply(
    x: _Arr,
    mats: _Arr,
    sub: _Arr,
    add: _Arr | None = None,
    *,
    axis: int = 1,
    out: _Arr | None = None,
) -> _Arr:
    """y[p, g] = A_g (x[p, g] − sub_g) + add_g per group of channels; y has x's dtype."""

def group_cross_moments(
    a: _Arr, b: _Arr, mean_b: _Arr, num_groups: int = 1, *, axis: int = 1
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-channel sums of a and per-group cross co-moments Σ_p a_p (b_p − mean_b)ᵀ:
    (sum (C,), cross (G, C/G, C/G)), float64, deterministic."""

def group_whiten_apply2(
    a: _Arr,
    b: _Arr,
    mats_a: _Arr,
    mats_b: _Arr,
    offset: _Arr,
    *,
    axis: int = 1,
    out: _Arr | None = None,
) -> _Arr:
    """y[p, g] = A_g a[p, g] + B_g b[p, g] + offset_g per group of channels; y has a's dtype."""

def iter_norm(
    x: _Arr,
    running_mean: _Arr | None = None,
    running_wm: _Arr | None = None,
    num_groups: int = 1,
    T: int = 5,
    eps: float = 1e-5,
    training: bool = True,
    momentum: float = 0.1,
    *,
    axis: int = 1,
    out: _Arr | None = None,
    return_stats: bool = False,
) -> Any:
    """Iterative normalization (forward). Returns y, or (y, (mean, sigma, wm)) with
    `return_stats=True`: mean (G, C/G), sigma = Σ + eps·I (G, C/G, C/G) (None in eval), wm
    (G, C/G, C/G); float64 for float64 x, else float32."""

def set_num_threads(n: int) -> None:
    """Threads for the kernels (0: default, RAYON_NUM_THREADS or the CPU count)."""

def get_num_threads() -> int: ...
def build_info() -> dict[str, Any]: ...

# --- channel-mixing family: LRN, FRN + TLU, GDN, MVN, Lp normalize -------------------------

def local_response_norm(
    x: _Arr,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    *,
    alpha_over_size: bool = True,
    window: str = "torch",
    axis: int = 1,
    out: _Arr | None = None,
) -> Any:
    """Local response normalization across channels (input of rank >= 3).

    ``y_c = x_c / (k + α'·Σ_{j∈W(c)} x_j²)^β`` with zero padding; ``α' = α/size`` when
    ``alpha_over_size`` (PyTorch, ONNX, Caffe), else ``α`` (AlexNet paper, TensorFlow).
    ``window="torch"``: ``W(c) = [c − ⌊n/2⌋, c + ⌊(n−1)/2⌋]``; ``"onnx"``:
    ``[c − ⌊(n−1)/2⌋, c + ⌈(n−1)/2⌉]`` (they differ for even sizes). ``size`` may exceed C;
    ``size <= 0`` raises ``RsnormError``. O(1) work per element in the window size, with no
    add/subtract running sum (which drifts after a large value).
    """

def _local_response_norm_backward(
    grad_y: _Arr,
    x: _Arr,
    size: int,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    *,
    alpha_over_size: bool = True,
    window: str = "torch",
    axis: int = 1,
) -> _Arr:
    """Gradient of local_response_norm with respect to x."""

def filter_response_norm(
    x: _Arr,
    weight: _Arr | None = None,
    bias: _Arr | None = None,
    tau: _Arr | None = None,
    eps: float = 1e-6,
    *,
    learned_eps: float | _Arr | None = None,
    axis: int = 1,
    out: _Arr | None = None,
    return_stats: bool = False,
) -> Any:
    """Filter response normalization (Singh & Krishnan 2019) with the TLU fused when ``tau``
    is given.

    ``ν² = mean(x²)`` over the spatial axes per (n, c);
    ``y = max(γ·x/sqrt(ν² + eps + |learned_eps|) + β, τ)``. weight, bias, tau: (C,);
    learned_eps: a number, shape () / (1,), or (C,). One spatial element gives
    ``x/sqrt(x² + eps)`` exactly. Stats: ``Stats(None, rstd)`` of shape (N, C).
    """

def _filter_response_norm_backward(
    grad_y: _Arr,
    x: _Arr,
    weight: _Arr | None = None,
    bias: _Arr | None = None,
    tau: _Arr | None = None,
    eps: float = 1e-6,
    *,
    learned_eps: float | _Arr | None = None,
    axis: int = 1,
    stats: Any = None,
) -> tuple[_Arr, _Arr | None, _Arr | None, _Arr | None, _Arr | None]:
    """Gradients of filter_response_norm: (dx, dweight, dbias, dtau, dlearned_eps)."""

def tlu(x: _Arr, tau: _Arr, *, axis: int = 1, out: _Arr | None = None) -> Any:
    """Thresholded linear unit ``y = max(x, τ_c)``, τ of shape (C,) (NaN propagates)."""

def _tlu_backward(grad_y: _Arr, x: _Arr, tau: _Arr, *, axis: int = 1) -> tuple[_Arr, _Arr]:
    """Gradients of tlu: (dx, dtau)."""

def gdn(
    x: _Arr,
    beta: _Arr,
    gamma: _Arr,
    *,
    inverse: bool = False,
    variant: str = "gdn",
    axis: int = 1,
    out: _Arr | None = None,
) -> Any:
    """Generalized divisive normalization (Ballé et al. 2016) across channels, any rank >= 2.

    ``D_i = β_i + Σ_j γ_ij·x_j²``, ``y_i = x_i/sqrt(D_i)`` (``inverse=True``, IGDN:
    ``x_i·sqrt(D_i)``); ``variant="gdn1"``: ``D_i = β_i + Σ_j γ_ij·|x_j|``, ``y_i = x_i/D_i``
    (inverse: ``x_i·D_i``). β: (C,), all > 0; γ: (C, C), all >= 0, ``γ[i, j]`` = output i,
    input j (CompressAI's layout). The per-position mixing is a GEMM, float64 inside.
    """

def _gdn_backward(
    grad_y: _Arr,
    x: _Arr,
    beta: _Arr,
    gamma: _Arr,
    *,
    inverse: bool = False,
    variant: str = "gdn",
    axis: int = 1,
) -> tuple[_Arr, _Arr, _Arr]:
    """Gradients of gdn: (dx, dbeta, dgamma)."""

def mean_variance_norm(
    x: _Arr,
    axes: int | Sequence[int] | None = None,
    eps: float = 1e-9,
    *,
    out: _Arr | None = None,
) -> Any:
    """Mean-variance normalization (ONNX MeanVarianceNormalization) over ``axes`` (default
    (0, 2, 3)): ``y = (x − mean)/(sqrt(var) + eps)``, biased variance, eps added to the
    standard deviation as in ONNX's function body."""

def _mean_variance_norm_backward(
    grad_y: _Arr,
    x: _Arr,
    axes: int | Sequence[int] | None = None,
    eps: float = 1e-9,
) -> _Arr:
    """Gradient of mean_variance_norm with respect to x."""

def normalize(
    x: _Arr,
    p: float = 2.0,
    axis: int = 1,
    eps: float = 1e-12,
    *,
    out: _Arr | None = None,
) -> Any:
    """Lp normalization along ``axis`` (PyTorch ``F.normalize``):
    ``y = x / max(‖x‖_p, eps)``, ``‖x‖_p = (Σ|x|^p)^(1/p)`` (``p = inf``: max |x|); p > 0.
    The norm is computed without overflow or underflow (power-of-two scaling)."""

def _normalize_backward(
    grad_y: _Arr, x: _Arr, p: float = 2.0, axis: int = 1, eps: float = 1e-12
) -> _Arr:
    """Gradient of normalize with respect to x."""
