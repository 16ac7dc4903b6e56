"""Synchronized batch normalization over MPI (mpi4py), for a batch split across processes.

Each rank computes the partial statistics of its own slice of the batch (``rsnorm.moments``:
count, mean and ``M2 = Σ(x − mean)²`` per channel, float64), the parts are all-gathered and merged
exactly in rank order (``Moments.merge``, Chan et al.), and every rank normalizes its slice with
the statistics of the whole batch::

    mean_c = merge(ranks).mean,   var_c = M2_c / N,   y = (x − mean_c)/sqrt(var_c + eps)·w_c + b_c

Because every rank merges the same parts in the same order, the statistics, the running statistics
and the parameter gradients are bitwise identical on every rank, and the result equals
``rsnorm.batch_norm`` on the concatenated batch. Uneven slices and ranks with no samples are
allowed. Any mpi4py communicator works (``MPI.COMM_WORLD`` by default, or a sub-communicator
from ``comm.Split`` for groups of ranks); in fact any object with mpi4py's lower-case
``allgather`` does.

Errors raised on one rank before the exchange (a wrong dtype, a weight of the wrong shape) are
raised on every rank of the communicator instead of leaving the others waiting in a collective.

Install with the extra ``rsnorm[distributed]`` (mpi4py and the ``mpich`` wheel), then run
``mpiexec -n 4 python train.py``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

import rsnorm as _rn
from rsnorm._types import Moments, Stats

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormGrads",
    "convert_sync_batchnorm",
    "sync_batch_norm",
    "sync_batch_norm_backward",
]

_F64 = np.float64
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class SyncBatchNormGrads(NamedTuple):
    """Gradients of :func:`sync_batch_norm`: ``x`` for this rank's slice; ``weight`` and ``bias``
    (``None`` when that parameter was not given), all in x's dtype."""

    x: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None


class _SelfComm:
    """A one-rank communicator: normalizes with local statistics, without MPI."""

    rank = 0
    size = 1

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def allgather(self, obj):
        return [obj]


_SELF = _SelfComm()


def _default_comm(comm):
    if comm is not None:
        return comm
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "rsnorm.distributed needs mpi4py and an MPI runtime: "
            "pip install 'rsnorm[distributed]' (mpi4py + the mpich wheel), or pass comm="
        ) from e
    return MPI.COMM_WORLD


def _rank(comm) -> int:
    return int(comm.Get_rank()) if hasattr(comm, "Get_rank") else int(comm.rank)


def _collective(comm, local):
    """Runs ``local()`` on this rank and all-gathers its result in rank order.

    If ``local`` raised on any rank, every rank raises: the failing rank its own exception, the
    others a ``RsnormError`` naming the failing ranks, so no rank is left waiting in a later
    collective while another unwinds.
    """
    try:
        payload = (True, local())
        error = None
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        payload = (False, f"{type(e).__name__}: {e}")
        error = e
    gathered = comm.allgather(payload)
    if error is not None:
        raise error
    failed = [(r, msg) for r, (ok, msg) in enumerate(gathered) if not ok]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        raise _rn.RsnormError(f"sync batch norm failed on rank(s) {ranks}: {failed[0][1]}")
    return [value for _, value in gathered]


def _check_x(x, name="x") -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(
            f"{name} has dtype {x.dtype}; accepted dtypes are float16, float32 and float64"
        )
    return x


def _check_vec(v, name, c):
    if v is None:
        return
    if not isinstance(v, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray or None, got {type(v).__name__}")
    if v.dtype not in _FLOATS:
        raise TypeError(
            f"{name} has dtype {v.dtype}; accepted dtypes are float16, float32 and float64"
        )
    if v.shape != (c,):
        raise _rn.ShapeError(f"{name} must have shape ({c},) (one value per channel), got {v.shape}")


def _check_eps(eps):
    if not (isinstance(eps, (int, float, np.floating)) and math.isfinite(eps) and eps >= 0):
        raise _rn.RsnormError(f"eps must be a finite number >= 0, got {eps!r}")


def _channel_axis(x, axis) -> int:
    if not -x.ndim <= axis < x.ndim or x.ndim < 2:
        raise _rn.RsnormError(f"axis {axis} is out of range for an input of shape {x.shape}")
    return axis % x.ndim


def _bshape(ndim, ax):
    shape = [1] * ndim
    shape[ax] = -1
    return tuple(shape)


def _local_moments(x, ax) -> Moments:
    """``rsnorm.moments(x, ax)``."""
    if x.ndim == 2 and ax == 1:
        # A (rows, C) table seen as one (1, rows, C) channels-last sample: the same statistics
        # (to rounding), but the core's 2-D path is ~15x slower today (2026-11).
        return _rn.moments(x[None], -1)
    return _rn.moments(x, ax)


def _check_running(running_mean, running_var, num_batches_tracked, momentum):
    """The checks of ``rsnorm.batch_norm`` on what a training call updates in place."""
    if momentum is not None and not (isinstance(momentum, (int, float, np.floating))
                                     and 0 <= momentum <= 1):
        raise _rn.RsnormError(f"momentum must be in [0, 1], got {momentum!r}")
    if running_mean is None:
        return
    if momentum is None and num_batches_tracked is None:
        raise _rn.RsnormError("momentum=None (cumulative average) needs num_batches_tracked=")
    for name, v in (("running_mean", running_mean), ("running_var", running_var),
                    ("num_batches_tracked", num_batches_tracked)):
        if isinstance(v, np.ndarray) and not v.flags.writeable:
            raise _rn.RsnormError(f"{name} is read-only")
    if num_batches_tracked is not None and not (
            isinstance(num_batches_tracked, np.ndarray) and num_batches_tracked.shape == ()
            and num_batches_tracked.dtype.kind == "i"):
        raise TypeError("num_batches_tracked must be a 0-d integer numpy array (updated in "
                        "place)")


def _global_moments(x, axis, comm, params=(), check=None) -> Moments:
    """Moments of the batch spread over ``comm``, merged in rank order (bitwise equal on every
    rank). ``params``: (name, array) pairs, and ``check()``, checked locally before the
    exchange."""

    def local():
        _check_x(x)
        ax = _channel_axis(x, axis)
        for name, v in params:
            _check_vec(v, name, x.shape[ax])
        if check is not None:
            check()
        m = _local_moments(x, ax)
        return (int(m.count), np.asarray(m.mean, _F64), np.asarray(m.m2, _F64))

    parts = _collective(comm, local)
    return Moments.merge(*[Moments(*p) for p in parts])


def _update_running(running_mean, running_var, g: Moments, momentum, num_batches_tracked,
                    convention):
    n = g.count
    if momentum is None:
        if num_batches_tracked is None:
            raise _rn.RsnormError("momentum=None (cumulative average) needs num_batches_tracked=")
        factor = 1.0 / (int(num_batches_tracked) + 1)
    else:
        factor = float(momentum)
    if num_batches_tracked is not None:
        num_batches_tracked[...] = int(num_batches_tracked) + 1
    old_m = running_mean.astype(_F64)
    old_v = running_var.astype(_F64)
    if convention == "torch":
        running_mean[...] = (1 - factor) * old_m + factor * g.mean
        running_var[...] = (1 - factor) * old_v + factor * (g.m2 / (n - 1))
    else:  # onnx: the momentum weighs the old value, the variance is the biased one
        running_mean[...] = old_m * factor + g.mean * (1 - factor)
        running_var[...] = old_v * factor + (g.m2 / n) * (1 - factor)


def sync_batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                    training=False, momentum=0.1, eps=1e-5, *, comm=None, axis=1, out=None,
                    return_stats=False, num_batches_tracked=None, momentum_convention="torch"):
    """Batch normalization of a batch split over the ranks of ``comm`` (default
    ``MPI.COMM_WORLD``); each rank passes its own slice ``x`` and gets its slice of ``y``::

        y = (x − mean_c)/sqrt(var_c + eps)·weight_c + bias_c

    with ``mean_c`` and the biased ``var_c`` those of the whole batch (all ranks' slices), from
    the per-rank ``moments`` merged exactly in rank order. Arguments and defaults are those of
    ``rsnorm.batch_norm``; every rank must pass the same parameters, ``training``, ``momentum``,
    ``eps`` and ``axis``, and call it collectively.

    Training: the running statistics (if given) are updated in place on every rank, identically,
    with the global unbiased variance (PyTorch's ``new = (1−m)·old + m·batch``; ``momentum=None``
    is the cumulative average and needs ``num_batches_tracked``). One value per channel over all
    ranks raises the ``ValueError`` of ``batch_norm``; an empty batch on every rank gives empty
    outputs and leaves the running statistics alone. Ranks may hold any number of samples, zero
    included.

    Eval: normalizes with the running statistics and does no communication; with no running
    statistics the local batch statistics are used, as ``torch.nn.SyncBatchNorm`` does.

    ``return_stats=True`` returns ``(y, Stats(mean, rstd))`` with the statistics used, float64
    for every input dtype (they are global, so :func:`sync_batch_norm_backward` needs them at full
    precision).
    """
    if momentum_convention not in ("torch", "onnx"):
        raise _rn.RsnormError(
            f"momentum_convention must be 'torch' or 'onnx', got {momentum_convention!r}"
        )
    if (running_mean is None) != (running_var is None):
        raise _rn.RsnormError("running_mean and running_var must be given together")
    if not training:
        # No exchange: the running statistics (or the local batch) define the normalization.
        result = _rn.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps,
                                axis=axis, out=out, return_stats=return_stats)
        if not return_stats:
            return result
        y, _ = result
        if running_mean is not None:
            mean = np.asarray(running_mean, _F64).copy()
            rstd = 1.0 / np.sqrt(np.asarray(running_var, _F64) + eps)
        else:
            m = _rn.moments(x, axis)
            mean, rstd = m.mean, 1.0 / np.sqrt(m.var() + eps)
        return y, Stats(mean, rstd)

    comm = _default_comm(comm)
    _check_eps(eps)
    g = _global_moments(
        x, axis, comm,
        (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
         ("bias", bias)),
        lambda: _check_running(running_mean, running_var, num_batches_tracked, momentum))
    if g.count == 0:
        # An empty batch on every rank: an empty output and untouched running statistics, as
        # batch_norm does.
        y = _rn.batch_norm(x, None, None, weight, bias, True, eps=eps, axis=axis, out=out)
        nan = np.full(np.shape(g.mean), np.nan)
        return (y, Stats(nan, nan.copy())) if return_stats else y
    if g.count == 1:
        raise _rn.RsnormError(
            "Expected more than 1 value per channel when training, got input size "
            f"{tuple(x.shape)} on this rank and {g.count} value per channel over all ranks"
        )
    var = g.m2 / g.count
    if x.ndim == 2 and axis % 2 == 1:
        # (N, C) seen as one (1, N, C) channels-last sample: the same values bitwise, but the
        # core's 2-D path (one-element planes) is slower today (2x, 2026-11).
        y = _rn.batch_norm(x[None], g.mean, var, weight, bias, False, eps=eps, axis=-1,
                           out=None if out is None else out[None])[0]
    else:
        y = _rn.batch_norm(x, g.mean, var, weight, bias, False, eps=eps, axis=axis, out=out)
    if running_mean is not None:
        _update_running(running_mean, running_var, g, momentum, num_batches_tracked,
                        momentum_convention)
    if return_stats:
        return y, Stats(g.mean, 1.0 / np.sqrt(var + eps))
    return y


def sync_batch_norm_backward(grad_y, x, weight=None, bias=None, *, stats=None, comm=None,
                             axis=1, eps=1e-5, training=True, param_grads="global"):
    """Gradients of :func:`sync_batch_norm` for this rank's slice.

    Training (the forward used the global batch statistics)::

        x̂ = (x − mean)·rstd,   Σdy_c, Σ(dy·x̂)_c summed over all ranks (in rank order)
        dx = weight·rstd·(dy − Σdy/N − x̂·Σ(dy·x̂)/N),   dweight = Σ(dy·x̂),   dbias = Σdy

    with ``N`` the global number of values per channel. Eval (``training=False``: the running
    statistics were constants): ``dx = weight·rstd·dy``.

    ``stats``: the ``Stats(mean, rstd)`` returned by the forward with ``return_stats=True``;
    without it the global statistics are recomputed (one more exchange; training only, with
    ``eps``). ``param_grads="global"`` (default) returns ``dweight``/``dbias`` of the whole batch,
    identical on every rank: do not all-reduce them again. ``"local"`` returns this rank's share
    (their sum over ranks is the global value), the convention of ``torch.nn.SyncBatchNorm``
    under DDP, where parameter gradients are all-reduced with the others. The local arithmetic is
    float64; results are in x's dtype.
    """
    if param_grads not in ("global", "local"):
        raise _rn.RsnormError(f"param_grads must be 'global' or 'local', got {param_grads!r}")
    comm = _default_comm(comm)
    _check_x(x)
    _check_x(grad_y, "grad_y")
    if grad_y.shape != x.shape:
        raise _rn.ShapeError(f"grad_y has shape {grad_y.shape} but x has shape {x.shape}")
    ax = _channel_axis(x, axis)
    c = x.shape[ax]
    if stats is None:
        if not training:
            raise _rn.RsnormError("eval-mode backward needs stats= (the running statistics used)")
        _check_eps(eps)
        g = _global_moments(x, ax, comm)
        mean, rstd = g.mean, 1.0 / np.sqrt(g.m2 / max(g.count, 1) + eps)
    else:
        mean = np.asarray(stats[0], _F64).reshape(-1)
        rstd = np.asarray(stats[1], _F64).reshape(-1)
        if mean.shape != (c,) or rstd.shape != (c,):
            raise _rn.ShapeError(
                f"stats must hold ({c},) mean and rstd, got {mean.shape} and {rstd.shape}"
            )
    bshape = _bshape(x.ndim, ax)
    red = tuple(i for i in range(x.ndim) if i != ax)
    dy = grad_y.astype(_F64, copy=False)
    # In place on one float64 copy of x: the backward is memory-bound, temporaries cost time.
    xhat = x.astype(_F64)
    xhat -= mean.reshape(bshape)
    xhat *= rstd.reshape(bshape)
    w = np.ones(c) if weight is None else np.asarray(weight, _F64)
    want_params = weight is not None or bias is not None

    def local():
        _check_vec(weight, "weight", c)
        _check_vec(bias, "bias", c)
        count = int(np.prod([d for i, d in enumerate(x.shape) if i != ax]))
        return (count, dy.sum(axis=red), (dy * xhat).sum(axis=red))

    if training or (want_params and param_grads == "global"):
        parts = _collective(comm, local)
        rank = _rank(comm)
        n = sum(p[0] for p in parts)
        sum_dy = np.zeros(c)
        sum_dy_xhat = np.zeros(c)
        for _, s1, s2 in parts:  # rank order: the same rounding on every rank
            sum_dy += s1
            sum_dy_xhat += s2
        mine = parts[rank]
    else:
        mine = local()
        n, sum_dy, sum_dy_xhat = mine
    n = max(n, 1)  # no values anywhere: dx is empty and the sums are 0
    if training:
        # dx = w·rstd·(dy − Σdy/N − x̂·Σ(dy·x̂)/N), reusing x̂'s buffer.
        dx = xhat
        dx *= (-sum_dy_xhat / n).reshape(bshape)
        dx += dy
        dx -= (sum_dy / n).reshape(bshape)
        dx *= (w * rstd).reshape(bshape)
    else:
        dx = (w * rstd).reshape(bshape) * dy
    if param_grads == "local":
        sum_dy, sum_dy_xhat = mine[1], mine[2]
    dt = x.dtype
    return SyncBatchNormGrads(
        dx.astype(dt, copy=False),
        None if weight is None else sum_dy_xhat.astype(dt),
        None if bias is None else sum_dy.astype(dt),
    )


class SyncBatchNorm:
    """Batch normalization layer whose batch is split over the ranks of ``comm``.

    The interface of ``rsnorm.nn.BatchNorm2d`` (and of ``torch.nn.SyncBatchNorm``): PyTorch's
    constructor arguments and defaults, ``train()``/``eval()``, ``__call__(x)``,
    ``backward(grad_y)`` (returns the input gradient and accumulates the parameter gradients,
    which are those of the whole batch, identical on every rank), ``parameters()``/``grads()``,
    ``zero_grad()`` and ``state_dict()``/``load_state_dict()`` with PyTorch's key names. Any input
    rank ≥ 2 with the channels on ``axis``. Parameters are ``dtype`` arrays (float32 by default).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, comm=None,
                 axis: int = 1, dtype: Any = np.float32):
        c = int(num_features)
        if c <= 0:
            raise _rn.RsnormError(f"num_features must be positive, got {num_features}")
        self.num_features = c
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.comm = comm
        self.axis = axis
        self.training = True
        self.weight = np.ones(c, dtype) if affine else None
        self.bias = np.zeros(c, dtype) if affine else None
        self.weight_grad = np.zeros(c, dtype) if affine else None
        self.bias_grad = np.zeros(c, dtype) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(c, dtype)
            self.running_var = np.ones(c, dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._saved = None

    def __repr__(self) -> str:
        return (f"SyncBatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats})")

    def train(self, mode: bool = True) -> SyncBatchNorm:
        self.training = bool(mode)
        return self

    def eval(self) -> SyncBatchNorm:
        return self.train(False)

    def _comm(self):
        return _default_comm(self.comm)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.training:
            track = self.track_running_stats
            y, st = sync_batch_norm(
                x, self.running_mean if track else None, self.running_var if track else None,
                self.weight, self.bias, True, self.momentum, self.eps, comm=self._comm(),
                axis=self.axis, return_stats=True,
                num_batches_tracked=self.num_batches_tracked if track else None)
            self._saved = (x, st, True, self._comm())
        elif self.running_mean is not None:
            y, st = sync_batch_norm(x, self.running_mean, self.running_var, self.weight,
                                    self.bias, False, eps=self.eps, axis=self.axis,
                                    return_stats=True)
            self._saved = (x, st, False, _SELF)
        else:
            # Eval without running statistics: local batch statistics, as PyTorch does.
            y, st = sync_batch_norm(x, None, None, self.weight, self.bias, False, eps=self.eps,
                                    axis=self.axis, return_stats=True)
            self._saved = (x, st, True, _SELF)
        return y

    forward = __call__

    def backward(self, grad_y: np.ndarray) -> np.ndarray:
        if self._saved is None:
            raise RuntimeError("backward() called before a forward pass")
        x, st, training, comm = self._saved
        g = sync_batch_norm_backward(grad_y, x, self.weight, self.bias, stats=st, comm=comm,
                                     axis=self.axis, training=training)
        if self.affine:
            self.weight_grad += g.weight
            self.bias_grad += g.bias
        return g.x

    def parameters(self) -> list:
        return [self.weight, self.bias] if self.affine else []

    def grads(self) -> list:
        return [self.weight_grad, self.bias_grad] if self.affine else []

    def zero_grad(self) -> None:
        for g in self.grads():
            g[...] = 0

    def _entries(self) -> dict:
        out = {}
        if self.affine:
            out["weight"] = self.weight
            out["bias"] = self.bias
        if self.track_running_stats:
            out["running_mean"] = self.running_mean
            out["running_var"] = self.running_var
            out["num_batches_tracked"] = self.num_batches_tracked
        return out

    def state_dict(self) -> dict:
        """Copies of the parameters and buffers under PyTorch's key names."""
        return {k: np.array(v, copy=True) for k, v in self._entries().items()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copies ``state`` into the layer's arrays in place (shapes must match; values are cast
        to the layer's dtype). ``num_batches_tracked`` may be missing, as in old checkpoints."""
        own = self._entries()
        if strict:
            missing = [k for k in own if k not in state and k != "num_batches_tracked"]
            unexpected = [k for k in state if k not in own]
            if missing or unexpected:
                raise KeyError(f"load_state_dict: missing keys {missing}, unexpected {unexpected}")
        for k, dst in own.items():
            if k not in state:
                continue
            src = np.asarray(state[k])
            if src.shape != dst.shape:
                raise _rn.ShapeError(f"load_state_dict: {k} has shape {src.shape}, "
                                     f"the layer's has {dst.shape}")
            dst[...] = src

    @staticmethod
    def convert_sync_batchnorm(layers, comm=None):
        return convert_sync_batchnorm(layers, comm)


def _is_batch_norm(layer) -> bool:
    if isinstance(layer, SyncBatchNorm):
        return False
    names = {cls.__name__ for cls in type(layer).__mro__}
    return bool(names & {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "_BatchNorm"}) and all(
        hasattr(layer, a) for a in ("num_features", "eps", "momentum", "running_mean")
    )


def convert_sync_batchnorm(layers, comm=None):
    """Replaces every ``rsnorm.nn.BatchNorm1d/2d/3d`` in ``layers`` by a :class:`SyncBatchNorm`
    over ``comm``, like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.

    ``layers`` may be one layer, a list or tuple of layers (nested ones too), or a dict; a new
    container is returned and other layers are kept as they are. The new layers share the
    parameter and running-statistics arrays of the old ones (an optimizer holding them keeps
    working) and keep their train/eval mode.
    """
    if isinstance(layers, list):
        return [convert_sync_batchnorm(v, comm) for v in layers]
    if isinstance(layers, tuple):
        return tuple(convert_sync_batchnorm(v, comm) for v in layers)
    if isinstance(layers, dict):
        return {k: convert_sync_batchnorm(v, comm) for k, v in layers.items()}
    if not _is_batch_norm(layers):
        return layers
    old = layers
    new = SyncBatchNorm.__new__(SyncBatchNorm)
    new.num_features = int(old.num_features)
    new.eps = old.eps
    new.momentum = old.momentum
    new.affine = bool(getattr(old, "affine", getattr(old, "weight", None) is not None))
    new.track_running_stats = getattr(old, "running_mean", None) is not None
    new.comm = comm
    new.axis = getattr(old, "axis", 1)
    new.training = bool(getattr(old, "training", True))
    new.weight = getattr(old, "weight", None)
    new.bias = getattr(old, "bias", None)
    if new.affine:
        new.weight_grad = getattr(old, "weight_grad", None)
        new.bias_grad = getattr(old, "bias_grad", None)
        if new.weight_grad is None:
            new.weight_grad = np.zeros_like(new.weight)
        if new.bias_grad is None:
            new.bias_grad = np.zeros_like(new.bias)
    else:
        new.weight_grad = new.bias_grad = None
    new.running_mean = getattr(old, "running_mean", None)
    new.running_var = getattr(old, "running_var", None)
    nbt = getattr(old, "num_batches_tracked", None)
    if new.track_running_stats and nbt is None:
        nbt = np.zeros((), np.int64)
    new.num_batches_tracked = nbt
    new._saved = None
    return new
