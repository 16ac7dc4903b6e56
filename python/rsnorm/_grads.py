"""Gradient results of the ``<op>_backward`` functions.

One generic NamedTuple serves the whole statistics family (batch, layer, RMS, group and instance
norm): ``Grads(x, weight, bias)``. ``x`` is always the input gradient; ``weight`` and ``bias`` are
arrays (x's dtype, the parameter's shape) when that parameter was given to the backward and
``None`` otherwise, so ``dx, dw, db = rn.layer_norm_backward(...)`` unpacks the same way for every
op. Ops with other parameters (FRN's ``tau``/``learned_eps``, GDN's ``beta``/``gamma``) define their
own NamedTuples here, always with ``x`` first, so a layer can read each parameter's gradient by
its name (``getattr(grads, name)``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Grads"]


class Grads(NamedTuple):
    """Gradients in x's dtype: ``x`` always; ``weight`` / ``bias`` when that parameter was given
    (``None`` otherwise)."""

    x: np.ndarray
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
