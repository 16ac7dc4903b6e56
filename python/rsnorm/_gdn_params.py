"""GDN parameters as CompressAI stores them.

CompressAI's ``GDN`` (``compressai/layers/gdn.py``) does not store β and γ: it stores
parameters ``p`` that a ``NonNegativeParametrizer`` (``compressai/ops/parametrizers.py``) maps
to the effective ones, so that training keeps β ≥ β_min > 0 and γ ≥ 0::

    pedestal = reparam_offset²                          reparam_offset = 2⁻¹⁸
    bound    = sqrt(minimum + pedestal)                 minimum: β_min = 1e-6 for β, 0 for γ
    value    = max(p, bound)² − pedestal                (forward: the lower bound, squared)
    p        = sqrt(max(value + pedestal, pedestal))    (init: the inverse map)

and initializes β = 1, γ = γ_init·I with γ_init = 0.1. :func:`gdn_params_from_compressai`
turns the stored ``beta``/``gamma`` tensors of a trained model (as NumPy arrays) into the β, γ
that :func:`rsnorm.gdn` takes, so ``rn.gdn(x, *gdn_params_from_compressai(b, g))`` equals
CompressAI's ``GDN`` output.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "GDN_BETA_MIN",
    "GDN_GAMMA_INIT",
    "GDN_REPARAM_OFFSET",
    "gdn_init",
    "gdn_params_from_compressai",
    "gdn_params_from_compressai_backward",
    "gdn_params_to_compressai",
]

GDN_BETA_MIN = 1e-6
GDN_GAMMA_INIT = 0.1
GDN_REPARAM_OFFSET = 2.0**-18


def _bound(minimum, offset):
    return float(np.sqrt(minimum + offset**2))


def _forward(p, minimum, offset):
    p = np.asarray(p, dtype=np.float64)
    return np.maximum(p, _bound(minimum, offset)) ** 2 - offset**2


def _init(v, offset):
    v = np.asarray(v, dtype=np.float64)
    ped = offset**2
    return np.sqrt(np.maximum(v + ped, ped))


def gdn_params_from_compressai(beta_param, gamma_param, *, beta_min=GDN_BETA_MIN,
                               reparam_offset=GDN_REPARAM_OFFSET):
    """Effective ``(beta, gamma)`` (float64) from CompressAI's stored ``beta`` (C,) and
    ``gamma`` (C, C) parameters: ``max(p, sqrt(minimum + offset²))² − offset²`` with
    minimum β_min for β and 0 for γ."""
    return (_forward(beta_param, beta_min, reparam_offset),
            _forward(gamma_param, 0.0, reparam_offset))


def gdn_params_to_compressai(beta, gamma, *, reparam_offset=GDN_REPARAM_OFFSET):
    """The stored parameters CompressAI would hold for effective ``(beta, gamma)``:
    ``sqrt(max(v + offset², offset²))`` (its ``NonNegativeParametrizer.init``)."""
    return _init(beta, reparam_offset), _init(gamma, reparam_offset)


def gdn_init(channels, *, gamma_init=GDN_GAMMA_INIT):
    """CompressAI's initial effective parameters: ``beta = 1``, ``gamma = gamma_init·I``."""
    return np.ones(channels), gamma_init * np.eye(channels)


def gdn_params_from_compressai_backward(grad_beta, grad_gamma, beta_param, gamma_param, *,
                                        beta_min=GDN_BETA_MIN,
                                        reparam_offset=GDN_REPARAM_OFFSET):
    """Chain rule through the reparametrization, as CompressAI's ``LowerBound`` does: the
    gradient ``2·max(p, bound)·grad`` passes where ``p ≥ bound`` or where it would push ``p``
    up (its sign is negative), else 0. Returns the gradients of the stored parameters."""
    out = []
    for g, p, minimum in ((grad_beta, beta_param, beta_min), (grad_gamma, gamma_param, 0.0)):
        g = np.asarray(g, dtype=np.float64)
        p = np.asarray(p, dtype=np.float64)
        b = _bound(minimum, reparam_offset)
        glb = 2.0 * np.maximum(p, b) * g
        out.append(np.where((p >= b) | (glb < 0), glb, 0.0))
    return tuple(out)
