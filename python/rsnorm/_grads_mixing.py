"""Backward of the channel-mixing ops: LRN, FRN, TLU, GDN, MVN and Lp normalize.

Each ``<op>_backward(grad_y, x, <the forward's parameters>, stats=None)`` returns a named tuple
whose field ``x`` is ∂L/∂x and whose other fields are the gradients of the parameters (``None``
for a parameter that was not given). Every array has x's dtype; parameter gradients are
accumulated in float64 before the final rounding. Results are bitwise identical for any thread
count and memory layout, like the forwards.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import _rsnorm

__all__ = [
    "FilterResponseNormGrads",
    "GDNGrads",
    "LocalResponseNormGrads",
    "MeanVarianceNormGrads",
    "NormalizeGrads",
    "TLUGrads",
    "filter_response_norm_backward",
    "gdn_backward",
    "local_response_norm_backward",
    "mean_variance_norm_backward",
    "normalize_backward",
    "tlu_backward",
]


class LocalResponseNormGrads(NamedTuple):
    """Gradient of :func:`rsnorm.local_response_norm` (it has no learned parameters)."""

    x: np.ndarray


class FilterResponseNormGrads(NamedTuple):
    """Gradients of :func:`rsnorm.filter_response_norm`; ``None`` where a parameter was not
    given. ``learned_eps`` has the shape it was given in (a scalar's gradient is 0-d)."""

    x: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None
    tau: np.ndarray | None
    learned_eps: np.ndarray | None


class TLUGrads(NamedTuple):
    """Gradients of :func:`rsnorm.tlu`."""

    x: np.ndarray
    tau: np.ndarray


class GDNGrads(NamedTuple):
    """Gradients of :func:`rsnorm.gdn`: ``beta`` (C,) and ``gamma`` (C, C)."""

    x: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray


class MeanVarianceNormGrads(NamedTuple):
    """Gradient of :func:`rsnorm.mean_variance_norm`."""

    x: np.ndarray


class NormalizeGrads(NamedTuple):
    """Gradient of :func:`rsnorm.normalize`."""

    x: np.ndarray


def local_response_norm_backward(grad_y, x, size, alpha=1e-4, beta=0.75, k=1.0, *,
                                 alpha_over_size=True, window="torch", axis=1, stats=None):
    """Backward of :func:`rsnorm.local_response_norm`.

    With ``d_c = k + α'·Σ_{j∈W(c)} x_j²``::

        ∂x_i = g_i·d_i^(−β) − 2α'β·x_i·Σ_{c: i∈W(c)} g_c·x_c·d_c^(−β−1)

    ``stats`` is accepted for a uniform signature; LRN keeps no statistics, so it is unused.
    """
    del stats
    return LocalResponseNormGrads(_rsnorm._local_response_norm_backward(
        grad_y, x, size, alpha, beta, k, alpha_over_size=alpha_over_size, window=window,
        axis=axis))


def filter_response_norm_backward(grad_y, x, weight=None, bias=None, tau=None, eps=1e-6, *,
                                  learned_eps=None, axis=1, stats=None):
    """Backward of :func:`rsnorm.filter_response_norm` (and its fused TLU).

    With ``x̂ = x·rstd``, ``z = γ·x̂ + β``, ``g_z = g·[z > τ]`` (half at ``z = τ``) and
    ``A = Σ_plane g_z·x`` per (n, c)::

        ∂x = γ·rstd·g_z − γ·rstd³·x·A/S      ∂γ = Σ g_z·x̂   ∂β = Σ g_z   ∂τ = Σ (g − g_z)
        ∂learned_eps = −½·sign(learned_eps)·Σ_n γ·rstd³·A

    ``stats`` (from ``return_stats=True``) supplies rstd instead of recomputing it.
    """
    dx, dw, db, dt, dle = _rsnorm._filter_response_norm_backward(
        grad_y, x, weight, bias, tau, eps, learned_eps=learned_eps, axis=axis, stats=stats)
    return FilterResponseNormGrads(dx, dw, db, dt, dle)


def tlu_backward(grad_y, x, tau, *, axis=1, stats=None):
    """Backward of :func:`rsnorm.tlu`: ``∂x = g·[x > τ]``, ``∂τ_c = Σ g·[x < τ]`` (a tie
    ``x = τ`` sends half to each, as PyTorch's ``maximum``). ``stats`` is unused."""
    del stats
    dx, dt = _rsnorm._tlu_backward(grad_y, x, tau, axis=axis)
    return TLUGrads(dx, dt)


def gdn_backward(grad_y, x, beta, gamma, *, inverse=False, variant="gdn", axis=1, stats=None):
    """Backward of :func:`rsnorm.gdn` (all variants), with ``q_i = g_i·∂y_i/∂D_i``::

        ∂β_i = Σ_pos q_i    ∂γ_ij = Σ_pos q_i·u_j    ∂x_j = g_j·y_j/x_j + u'(x_j)·Σ_i q_i·γ_ij

    ``stats`` is unused (the divisor is recomputed, one GEMM).
    """
    del stats
    dx, db, dg = _rsnorm._gdn_backward(grad_y, x, beta, gamma, inverse=inverse,
                                       variant=variant, axis=axis)
    return GDNGrads(dx, db, dg)


def mean_variance_norm_backward(grad_y, x, axes=(0, 2, 3), eps=1e-9, *, stats=None):
    """Backward of :func:`rsnorm.mean_variance_norm`, with ``d = x − μ``, ``D = σ + eps``, M
    values per group::

        ∂x = (g − mean(g))/D − d·Σ(g·d)/(M·σ·D²)      (second term 0 where σ = 0)

    ``stats`` is unused.
    """
    del stats
    return MeanVarianceNormGrads(_rsnorm._mean_variance_norm_backward(grad_y, x, axes, eps))


def normalize_backward(grad_y, x, p=2.0, axis=1, eps=1e-12, *, stats=None):
    """Backward of :func:`rsnorm.normalize`, with ``n = ‖x‖_p`` and ``ŷ = x/n``::

        ∂x_i = (g_i − ⟨g, ŷ⟩·sign(x_i)·|ŷ_i|^(p−1)) / n     where n ≥ eps,
        ∂x = g/eps                                            where n < eps.

    ``p = inf`` shares the norm's gradient equally among the entries at the max. ``stats``
    is unused.
    """
    del stats
    return NormalizeGrads(_rsnorm._normalize_backward(grad_y, x, p, axis, eps))
