"""Result types shared by the native module and the Python layers."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Moments", "Stats"]


class Stats(NamedTuple):
    """Per-group statistics a forward computed, for backward: ``rstd = 1/sqrt(var + eps)``.

    ``mean`` is ``None`` for RMS norm. float64 for float64 inputs, float32 otherwise.
    """

    mean: np.ndarray | None
    rstd: np.ndarray


class Moments(NamedTuple):
    """Per-channel partial statistics: ``count`` values per channel, their ``mean`` and
    ``m2 = Σ(x − mean)²`` (float64). Parts of a split batch merge exactly with :meth:`merge`.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def var(self, ddof: int = 0) -> np.ndarray:
        """Variance per channel: ``m2 / (count - ddof)`` (NaN when that is not positive)."""
        d = self.count - ddof
        if d <= 0:
            return np.full_like(self.mean, np.nan)
        return self.m2 / d

    @staticmethod
    def merge(*parts: Moments) -> Moments:
        """Merges parts in the order given (Chan, Golub & LeVeque 1979)::

            n = nₐ + n_b,  δ = mean_b − meanₐ,  mean = meanₐ + δ·n_b/n,
            M2 = M2ₐ + M2_b + δ²·nₐ·n_b/n

        The order fixes the rounding, so every process merging the same parts in the same
        order gets bitwise the same result. Empty parts (count 0) are skipped.
        """
        if len(parts) == 1 and not isinstance(parts[0], Moments):
            parts = tuple(parts[0])
        if not parts:
            raise ValueError("Moments.merge needs at least one part")
        shapes = {np.shape(p.mean) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"Moments.merge: parts have different channel shapes {sorted(shapes)}")
        live = [p for p in parts if p.count > 0]
        if not live:
            return parts[0]
        count = int(live[0].count)
        mean = np.array(live[0].mean, dtype=np.float64, copy=True)
        m2 = np.array(live[0].m2, dtype=np.float64, copy=True)
        for p in live[1:]:
            na, nb = float(count), float(p.count)
            n = na + nb
            d = p.mean - mean
            mean += d * nb / n
            m2 += p.m2 + d * d * na * nb / n
            count += int(p.count)
        return Moments(count, mean, m2)
