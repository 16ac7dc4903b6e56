"""Stateful normalization layers for NumPy training loops, with PyTorch's names and defaults.

Each layer keeps its parameters (``weight``, ``bias``) and buffers (``running_mean``,
``running_var``, ``num_batches_tracked``) as NumPy arrays under PyTorch's key names, so a
PyTorch checkpoint converted to NumPy loads unchanged::

    >>> import numpy as np, rsnorm.nn as rnn
    >>> bn = rnn.BatchNorm2d(8)
    >>> x = np.random.default_rng(0).standard_normal((4, 8, 5, 5)).astype(np.float32)
    >>> y = bn(x)                       # training mode: batch statistics, running stats updated
    >>> dx = bn.backward(np.ones_like(y))
    >>> [k for k in bn.state_dict()]
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']

* ``__call__(x)`` runs the forward and remembers ``x`` and the statistics it used (no copy of
  ``x``: do not modify it before calling ``backward``).
* ``backward(grad_y)`` returns the input gradient and **adds** the parameter gradients to
  ``grads()`` (as PyTorch accumulates into ``.grad``); ``zero_grad()`` resets them.
* ``parameters()`` / ``grads()`` are lists in the same order (``named_parameters()`` has names),
  so plain SGD is ``for p, g in zip(m.parameters(), m.grads()): p -= lr * g``.
* ``state_dict()`` returns copies; ``load_state_dict(d)`` copies values into the layer's arrays
  (in their dtype) after checking every key and shape; a missing or unexpected key or a shape
  mismatch raises :class:`rsnorm.RsnormError` naming them, and nothing is changed.
* Extra keyword ``axis`` (default 1) selects the channel axis of the channel layers (``-1`` for
  channels-last arrays); PyTorch's layouts need no change.

New layers subclass :class:`Module`, register arrays with ``_param`` / ``_buffer`` and implement
``_forward(x) -> (y, ctx)`` and ``_backward(grad_y, ctx) -> NamedTuple`` whose fields name the
parameters (``x`` first), as the ``rsnorm`` ``*_backward`` functions return.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

import numpy as np

from . import _rsnorm
from ._grads import Grads
from ._rsnorm import RsnormError

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "Module",
    "RMSNorm",
]


def _exact(stats):
    """The forward's statistics if they are float64, else None (the backward then recomputes
    them in float64). float16/32 inputs report float32 statistics, and a float32-rounded mean
    costs about |mean|/std·6e-8 of relative accuracy in the gradient (6e-4 on 1e4 + N(0, 1)
    data); recomputing is exact and costs one or two passes over x."""
    return stats if np.asarray(stats.rstd).dtype == np.float64 else None


def _dtype(dtype) -> np.dtype:
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt not in (np.float16, np.float32, np.float64):
        raise TypeError(f"dtype must be float16, float32 or float64, got {dt}")
    return dt


class Module:
    """Base of the layers: parameters, buffers, train/eval mode, gradients and state dicts."""

    def __init__(self) -> None:
        self.training = True
        self._params: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._buffers: OrderedDict[str, np.ndarray | None] = OrderedDict()
        self._grads: dict[str, np.ndarray] = {}
        self._ctx: Any = None

    # -- registration ------------------------------------------------------------------------
    def _param(self, name: str, value: np.ndarray | None) -> None:
        self._params[name] = value

    def _buffer(self, name: str, value: np.ndarray | None) -> None:
        self._buffers[name] = value

    def __getattr__(self, name: str):
        # Parameters and buffers read as attributes (``bn.weight``, ``bn.running_mean``), as in
        # PyTorch. Only called when normal lookup fails.
        d = self.__dict__
        for store in ("_params", "_buffers"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        # ``bn.weight = arr`` replaces the registered array, as in PyTorch.
        d = self.__dict__
        for store in ("_params", "_buffers"):
            if store in d and name in d[store]:
                d[store][name] = None if value is None else np.asarray(value)
                return
        object.__setattr__(self, name, value)

    # -- mode --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        self.training = bool(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    # -- forward / backward ------------------------------------------------------------------
    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        y, self._ctx = self._forward(x)
        return y

    def backward(self, grad_y):
        """Returns dL/dx for the last forward and accumulates the parameter gradients."""
        if self._ctx is None:
            raise RsnormError(f"{type(self).__name__}.backward called before a forward")
        g = self._backward(grad_y, self._ctx)
        for name, p in self._params.items():
            if p is None:
                continue
            gp = getattr(g, name)
            if gp is None:
                continue
            gp = np.asarray(gp, dtype=p.dtype).reshape(p.shape)
            if name in self._grads:
                self._grads[name] += gp
            else:
                self._grads[name] = gp.copy()
        return g.x

    def _forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _backward(self, grad_y, ctx):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- parameters and gradients ------------------------------------------------------------
    def named_parameters(self) -> list[tuple[str, np.ndarray]]:
        return [(k, v) for k, v in self._params.items() if v is not None]

    def parameters(self) -> list[np.ndarray]:
        """The parameter arrays themselves (update them in place)."""
        return [v for _, v in self.named_parameters()]

    def grads(self) -> list[np.ndarray]:
        """Accumulated gradients, in the order of :meth:`parameters` (zeros before backward)."""
        return [self._grads.get(k, np.zeros_like(v)) for k, v in self.named_parameters()]

    def named_grads(self) -> dict[str, np.ndarray]:
        return {k: self._grads.get(k, np.zeros_like(v)) for k, v in self.named_parameters()}

    def zero_grad(self) -> None:
        self._grads.clear()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> OrderedDict[str, np.ndarray]:
        """Copies of the parameters then the buffers, under PyTorch's keys."""
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for store in (self._params, self._buffers):
            for k, v in store.items():
                if v is not None:
                    out[k] = v.copy()
        return out

    def load_state_dict(self, state_dict, strict: bool = True) -> None:
        """Copies values into the layer's arrays (cast to their dtypes). PyTorch tensors are
        accepted if they convert with ``np.asarray``. Errors are checked before any copy."""
        own = self.state_dict()
        targets = {
            k: v
            for store in (self._params, self._buffers)
            for k, v in store.items()
            if v is not None
        }
        given = {k: np.asarray(v) for k, v in dict(state_dict).items()}
        missing = [k for k in own if k not in given]
        unexpected = [k for k in given if k not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing key(s): {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected key(s): {', '.join(unexpected)}")
        for k, v in given.items():
            if k not in targets:
                continue
            t = targets[k]
            if v.shape != t.shape:
                problems.append(
                    f"size mismatch for {k}: expected shape {t.shape}, got {v.shape}")
            elif t.dtype.kind == "i" and v.dtype.kind not in "iu":
                problems.append(f"{k} must hold integers, got dtype {v.dtype}")
            elif t.dtype.kind == "f" and v.dtype.kind not in "fiu":
                problems.append(f"{k} must hold real numbers, got dtype {v.dtype}")
        if problems:
            raise RsnormError(
                f"Error(s) in loading state_dict for {type(self).__name__}: "
                + "; ".join(problems))
        for k, v in given.items():
            if k in targets:
                np.copyto(targets[k], v, casting="unsafe")

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


# ---------------------------------------------------------------------------------------------
# Batch norm
# ---------------------------------------------------------------------------------------------


class _BatchNorm(Module):
    _ndims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, axis: int = 1) -> None:
        super().__init__()
        if device not in (None, "cpu"):
            raise RsnormError(f"rsnorm.nn layers run on the CPU, got device={device!r}")
        dt = _dtype(dtype)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        c = self.num_features
        self._param("weight", np.ones(c, dt) if affine else None)
        self._param("bias", np.zeros(c, dt) if affine else None)
        if track_running_stats:
            self._buffer("running_mean", np.zeros(c, dt))
            self._buffer("running_var", np.ones(c, dt))
            self._buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        else:
            self._buffer("running_mean", None)
            self._buffer("running_var", None)
            self._buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def _check_input(self, x) -> None:
        nd = np.ndim(x)
        if nd not in self._ndims:
            want = " or ".join(f"{d}D" for d in self._ndims)
            raise RsnormError(f"{type(self).__name__} expected {want} input (got {nd}D input)")

    def _forward(self, x):
        self._check_input(x)
        # As PyTorch: eval uses the running statistics when they are tracked; otherwise (or in
        # training) the batch statistics; running stats are updated only in training.
        use_running = self.training and self.track_running_stats
        batch_stats = self.training or self.running_mean is None
        kw = {}
        if use_running:
            kw["num_batches_tracked"] = self.num_batches_tracked
        rm = self.running_mean if (use_running or not self.training) else None
        rv = self.running_var if (use_running or not self.training) else None
        y, stats = _rsnorm.batch_norm(
            x, rm, rv, self.weight, self.bias, batch_stats, self.momentum, self.eps,
            axis=self.axis, return_stats=True, **kw)
        return y, (x, _exact(stats), batch_stats)

    def _backward(self, grad_y, ctx):
        x, stats, batch_stats = ctx
        if batch_stats:
            return _rsnorm.batch_norm_backward(
                grad_y, x, None, None, self.weight, self.bias, True, None, self.eps, stats,
                axis=self.axis)
        return _rsnorm.batch_norm_backward(
            grad_y, x, self.running_mean, self.running_var, self.weight, self.bias, False,
            None, self.eps, stats, axis=self.axis)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) inputs (PyTorch's ``BatchNorm1d``)."""

    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) inputs (PyTorch's ``BatchNorm2d``)."""

    _ndims = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) inputs (PyTorch's ``BatchNorm3d``)."""

    _ndims = (5,)


# ---------------------------------------------------------------------------------------------
# Instance norm
# ---------------------------------------------------------------------------------------------


class _InstanceNorm(Module):
    _ndim: int = 0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = False, track_running_stats: bool = False, device=None,
                 dtype=None, *, axis: int = 1) -> None:
        super().__init__()
        if device not in (None, "cpu"):
            raise RsnormError(f"rsnorm.nn layers run on the CPU, got device={device!r}")
        dt = _dtype(dtype)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
        c = self.num_features
        self._param("weight", np.ones(c, dt) if affine else None)
        self._param("bias", np.zeros(c, dt) if affine else None)
        if track_running_stats:
            self._buffer("running_mean", np.zeros(c, dt))
            self._buffer("running_var", np.ones(c, dt))
            # PyTorch registers it (so checkpoints carry it) but instance norm never advances it.
            self._buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        else:
            self._buffer("running_mean", None)
            self._buffer("running_var", None)
            self._buffer("num_batches_tracked", None)

    def _forward(self, x):
        nd = np.ndim(x)
        if nd not in (self._ndim, self._ndim - 1):
            raise RsnormError(
                f"{type(self).__name__} expected {self._ndim - 1}D (unbatched) or {self._ndim}D "
                f"(batched) input (got {nd}D input)")
        unbatched = nd == self._ndim - 1
        xb = x[np.newaxis] if unbatched else x
        use_input = self.training or not self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        y, stats = _rsnorm.instance_norm(
            xb, self.running_mean, self.running_var, self.weight, self.bias, use_input,
            momentum, self.eps, axis=self.axis, return_stats=True)
        return (y[0] if unbatched else y), (xb, _exact(stats), use_input, unbatched)

    def _backward(self, grad_y, ctx):
        xb, stats, use_input, unbatched = ctx
        gb = grad_y[np.newaxis] if unbatched else grad_y
        if use_input:
            g = _rsnorm.instance_norm_backward(
                gb, xb, None, None, self.weight, self.bias, True, 0.1, self.eps, stats,
                axis=self.axis)
        else:
            g = _rsnorm.instance_norm_backward(
                gb, xb, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1,
                self.eps, axis=self.axis)
        return g._replace(x=g.x[0]) if unbatched else g

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class InstanceNorm1d(_InstanceNorm):
    """Instance norm over (N, C, L) or unbatched (C, L) inputs."""

    _ndim = 3


class InstanceNorm2d(_InstanceNorm):
    """Instance norm over (N, C, H, W) or unbatched (C, H, W) inputs."""

    _ndim = 4


class InstanceNorm3d(_InstanceNorm):
    """Instance norm over (N, C, D, H, W) or unbatched (C, D, H, W) inputs."""

    _ndim = 5


# ---------------------------------------------------------------------------------------------
# Layer, RMS and group norm
# ---------------------------------------------------------------------------------------------


def _shape(normalized_shape) -> tuple[int, ...]:
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


class LayerNorm(Module):
    """Layer norm over the trailing ``normalized_shape`` dims (PyTorch's ``LayerNorm``)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if device not in (None, "cpu"):
            raise RsnormError(f"rsnorm.nn layers run on the CPU, got device={device!r}")
        dt = _dtype(dtype)
        self.normalized_shape = _shape(normalized_shape)
        self.eps = float(eps)
        self.elementwise_affine = bool(elementwise_affine)
        s = self.normalized_shape
        self._param("weight", np.ones(s, dt) if elementwise_affine else None)
        self._param("bias", np.zeros(s, dt) if (elementwise_affine and bias) else None)

    def _forward(self, x):
        y, stats = _rsnorm.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps,
                                      return_stats=True)
        return y, (x, _exact(stats))

    def _backward(self, grad_y, ctx):
        x, stats = ctx
        return _rsnorm.layer_norm_backward(grad_y, x, self.normalized_shape, self.weight,
                                           self.bias, self.eps, stats)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class RMSNorm(Module):
    """RMS norm over the trailing ``normalized_shape`` dims (PyTorch's ``RMSNorm``;
    ``eps=None`` is the machine epsilon of the input's statistics type)."""

    def __init__(self, normalized_shape, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if device not in (None, "cpu"):
            raise RsnormError(f"rsnorm.nn layers run on the CPU, got device={device!r}")
        dt = _dtype(dtype)
        self.normalized_shape = _shape(normalized_shape)
        self.eps = None if eps is None else float(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self._param("weight", np.ones(self.normalized_shape, dt) if elementwise_affine else None)

    def _forward(self, x):
        y, stats = _rsnorm.rms_norm(x, self.normalized_shape, self.weight, self.eps,
                                    return_stats=True)
        return y, (x, _exact(stats))

    def _backward(self, grad_y, ctx):
        x, stats = ctx
        return _rsnorm.rms_norm_backward(grad_y, x, self.normalized_shape, self.weight, self.eps,
                                         stats)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class GroupNorm(Module):
    """Group norm: ``num_channels`` split into ``num_groups`` groups (PyTorch's ``GroupNorm``)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *, axis: int = 1) -> None:
        super().__init__()
        if device not in (None, "cpu"):
            raise RsnormError(f"rsnorm.nn layers run on the CPU, got device={device!r}")
        if num_groups <= 0 or num_channels % num_groups != 0:
            raise RsnormError(
                f"num_channels must be divisible by num_groups: C={num_channels}, "
                f"num_groups={num_groups}")
        dt = _dtype(dtype)
        self.num_groups = int(num_groups)
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.affine = bool(affine)
        self.axis = axis
        self._param("weight", np.ones(num_channels, dt) if affine else None)
        self._param("bias", np.zeros(num_channels, dt) if affine else None)

    def _forward(self, x):
        y, stats = _rsnorm.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                      axis=self.axis, return_stats=True)
        return y, (x, _exact(stats))

    def _backward(self, grad_y, ctx):
        x, stats = ctx
        return _rsnorm.group_norm_backward(grad_y, x, self.num_groups, self.weight, self.bias,
                                           self.eps, stats, axis=self.axis)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


# ---------------------------------------------------------------------------------------------
# Channel-mixing layers: defined only when the functional ops exist in this build (they are
# another family's work and land separately).
# ---------------------------------------------------------------------------------------------


def _ops():
    # The package namespace (imported before this submodule), where those ops are exported.
    return sys.modules[__name__.rpartition(".")[0]]


def _have(*names: str) -> bool:
    pkg = _ops()
    return all(hasattr(pkg, n) for n in names)


if _have("local_response_norm", "local_response_norm_backward"):

    class LocalResponseNorm(Module):
        """Local response norm across channels (PyTorch's ``LocalResponseNorm``; no
        parameters): ``y_c = x_c / (k + α/size·Σ_{j∈W(c)} x_j²)^β``."""

        def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0,
                     *, axis: int = 1) -> None:
            super().__init__()
            self.size, self.alpha, self.beta, self.k = int(size), float(alpha), float(beta), k
            self.axis = axis

        def _forward(self, x):
            y = _ops().local_response_norm(x, self.size, self.alpha, self.beta, self.k,
                                           axis=self.axis)
            return y, x

        def _backward(self, grad_y, x):
            return _ops().local_response_norm_backward(grad_y, x, self.size, self.alpha,
                                                       self.beta, self.k, axis=self.axis)

        def extra_repr(self) -> str:
            return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"

    __all__ += ["LocalResponseNorm"]


if _have("tlu", "tlu_backward"):

    class TLU(Module):
        """Thresholded linear unit ``max(x, τ_c)`` (Singh & Krishnan 2019); parameter ``tau``
        (C,), initialized to 0."""

        def __init__(self, num_features: int, device=None, dtype=None, *,
                     axis: int = 1) -> None:
            super().__init__()
            if device not in (None, "cpu"):
                raise RsnormError(f"rsnorm.nn layers run on the CPU, got device={device!r}")
            self.num_features = int(num_features)
            self.axis = axis
            self._param("tau", np.zeros(self.num_features, _dtype(dtype)))

        def _forward(self, x):
            return _ops().tlu(x, self.tau, axis=self.axis), x

        def _backward(self, grad_y, x):
            return _ops().tlu_backward(grad_y, x, self.tau, axis=self.axis)

        def extra_repr(self) -> str:
            return f"{self.num_features}"

    __all__ += ["TLU"]


if _have("filter_response_norm", "filter_response_norm_backward"):

    class FilterResponseNorm(Module):
        """Filter response norm with its fused TLU (Singh & Krishnan 2019):
        ``y = max(γ·x/sqrt(mean_spatial(x²) + eps + |learned_eps|) + β, τ)``.

        Parameters ``weight`` (γ, ones), ``bias`` (β, zeros), ``tau`` (τ, zeros; absent with
        ``tlu=False``) of shape (C,), and with ``learnable_eps=True`` a ``learned_eps`` of shape
        (1,) initialized to ``1e-4``."""

        def __init__(self, num_features: int, eps: float = 1e-6, learnable_eps: bool = False,
                     tlu: bool = True, device=None, dtype=None, *, axis: int = 1) -> None:
            super().__init__()
            if device not in (None, "cpu"):
                raise RsnormError(f"rsnorm.nn layers run on the CPU, got device={device!r}")
            dt = _dtype(dtype)
            c = self.num_features = int(num_features)
            self.eps = float(eps)
            self.axis = axis
            self._param("weight", np.ones(c, dt))
            self._param("bias", np.zeros(c, dt))
            self._param("tau", np.zeros(c, dt) if tlu else None)
            self._param("learned_eps", np.full(1, 1e-4, dt) if learnable_eps else None)

        def _forward(self, x):
            y, stats = _ops().filter_response_norm(
                x, self.weight, self.bias, self.tau, self.eps, learned_eps=self.learned_eps,
                axis=self.axis, return_stats=True)
            return y, (x, stats)

        def _backward(self, grad_y, ctx):
            x, stats = ctx
            return _ops().filter_response_norm_backward(
                grad_y, x, self.weight, self.bias, self.tau, self.eps,
                learned_eps=self.learned_eps, axis=self.axis, stats=stats)

        def extra_repr(self) -> str:
            return f"{self.num_features}, eps={self.eps}"

    __all__ += ["FilterResponseNorm"]


if _have("iter_norm", "iter_norm_backward"):

    class IterNorm(Module):
        """Iterative normalization (Huang et al., CVPR 2019): group whitening by T Newton
        iterations, then a per-channel affine, as the authors' ``IterNorm`` module
        (huangleiBuaa/IterNorm) with its constructor arguments and state-dict keys:
        ``weight`` / ``bias`` of shape (1, C, 1, 1) (``dim=4``) or (1, C) (``dim=2``),
        buffers ``running_mean`` (G, C/G, 1) and ``running_wm`` (G, C/G, C/G, identity at
        start). ``num_channels`` (channels per group) overrides ``num_groups`` as there."""

        def __init__(self, num_features: int, num_groups: int = 1, num_channels=None,
                     T: int = 5, dim: int = 4, eps: float = 1e-5, momentum: float = 0.1,
                     affine: bool = True, dtype=None) -> None:
            super().__init__()
            dt = _dtype(dtype)
            c = self.num_features = int(num_features)
            if num_channels is not None:
                num_groups = (c - 1) // int(num_channels) + 1
            if num_groups <= 0 or c % num_groups != 0:
                raise RsnormError(f"num_features={c} is not divisible by num_groups={num_groups}")
            self.num_groups, self.T, self.dim = int(num_groups), int(T), int(dim)
            self.eps, self.momentum, self.affine = float(eps), float(momentum), bool(affine)
            d = c // self.num_groups
            shape = (1, c) + (1,) * (self.dim - 2)
            self._param("weight", np.ones(shape, dt) if affine else None)
            self._param("bias", np.zeros(shape, dt) if affine else None)
            self._buffer("running_mean", np.zeros((self.num_groups, d, 1), dt))
            self._buffer("running_wm", np.broadcast_to(np.eye(d, dtype=dt),
                                                       (self.num_groups, d, d)).copy())

        def _forward(self, x):
            if np.ndim(x) != self.dim:
                raise RsnormError(f"IterNorm(dim={self.dim}) expected {self.dim}D input "
                                  f"(got {np.ndim(x)}D input)")
            xn, stats = _ops().iter_norm(
                x, self.running_mean, self.running_wm, self.num_groups, self.T, self.eps,
                self.training, self.momentum, return_stats=True)
            y = xn
            if self.affine:
                y = (xn * self.weight + self.bias).astype(xn.dtype, copy=False)
            return y, (x, xn, stats, self.training)

        def _backward(self, grad_y, ctx):
            x, xn, stats, training = ctx
            gy = grad_y
            grads = {}
            if self.affine:
                red = tuple(i for i in range(x.ndim) if i != 1)
                g64 = np.asarray(grad_y, dtype=np.float64)
                grads["weight"] = (g64 * xn).sum(axis=red, keepdims=True).astype(x.dtype)
                grads["bias"] = g64.sum(axis=red, keepdims=True).astype(x.dtype)
                gy = (g64 * self.weight).astype(x.dtype)
            gx = _ops().iter_norm_backward(
                gy, x, self.running_mean, self.running_wm, self.num_groups, self.T, self.eps,
                training, self.momentum, stats=stats)
            return Grads(gx.x, grads.get("weight"), grads.get("bias"))

        def extra_repr(self) -> str:
            return (f"{self.num_features}, num_groups={self.num_groups}, T={self.T}, "
                    f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}")

    __all__ += ["IterNorm"]


if _have("gdn", "gdn_backward", "gdn_params_from_compressai",
         "gdn_params_from_compressai_backward", "gdn_params_to_compressai", "gdn_init"):

    class GDN(Module):
        """Generalized divisive normalization (Ballé et al. 2016) as CompressAI's ``GDN``:
        ``y_i = x_i / sqrt(β_i + Σ_j γ_ij x_j²)`` (``inverse=True``: IGDN, multiplied;
        ``variant="gdn1"``: CompressAI's ``GDN1``, ``x_i / (β_i + Σ_j γ_ij |x_j|)``).

        Stores what CompressAI stores, under its keys, so its checkpoints load unchanged: the
        reparametrized parameters ``beta`` (C,) and ``gamma`` (C, C) (effective
        ``max(p, bound)² − pedestal``, which keeps β ≥ ``beta_min`` and γ ≥ 0 during
        training) and the buffers ``beta_reparam.pedestal``, ``beta_reparam.lower_bound.bound``,
        ``gamma_reparam.pedestal``, ``gamma_reparam.lower_bound.bound`` (shape (1,)). Gradients
        are those of the stored parameters (chain rule through the reparametrization, as
        CompressAI's ``LowerBound``). Initialized as CompressAI: β = 1, γ = ``gamma_init``·I."""

        def __init__(self, in_channels: int, inverse: bool = False, beta_min: float = 1e-6,
                     gamma_init: float = 0.1, dtype=None, *, variant: str = "gdn",
                     axis: int = 1) -> None:
            super().__init__()
            ops = _ops()
            dt = _dtype(dtype)
            c = self.in_channels = int(in_channels)
            self.inverse, self.beta_min = bool(inverse), float(beta_min)
            self.variant, self.axis = variant, axis
            beta, gamma = ops.gdn_init(c, gamma_init=gamma_init)
            bp, gp = ops.gdn_params_to_compressai(beta, gamma)
            self._param("beta", np.asarray(bp, dt))
            self._param("gamma", np.asarray(gp, dt))
            offset = 2.0**-18
            ped = offset**2
            self._buffer("beta_reparam.pedestal", np.array([ped], dt))
            self._buffer("beta_reparam.lower_bound.bound",
                         np.array([np.sqrt(self.beta_min + ped)], dt))
            self._buffer("gamma_reparam.pedestal", np.array([ped], dt))
            self._buffer("gamma_reparam.lower_bound.bound", np.array([np.sqrt(ped)], dt))

        def effective(self):
            """The effective (β, γ) in float64."""
            return _ops().gdn_params_from_compressai(self.beta, self.gamma,
                                                     beta_min=self.beta_min)

        def _forward(self, x):
            beta, gamma = self.effective()
            y = _ops().gdn(x, beta, gamma, inverse=self.inverse, variant=self.variant,
                           axis=self.axis)
            return y, (x, beta, gamma)

        def _backward(self, grad_y, ctx):
            x, beta, gamma = ctx
            g = _ops().gdn_backward(grad_y, x, beta, gamma, inverse=self.inverse,
                                    variant=self.variant, axis=self.axis)
            db, dg = _ops().gdn_params_from_compressai_backward(
                g.beta, g.gamma, self.beta, self.gamma, beta_min=self.beta_min)
            return g._replace(beta=db, gamma=dg)

        def extra_repr(self) -> str:
            return f"{self.in_channels}, inverse={self.inverse}, variant={self.variant!r}"

    __all__ += ["GDN"]
