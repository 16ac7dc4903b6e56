"""Whitening: the ``Whitening`` transformer (ZCA, PCA, Cholesky) and iterative normalization.

The numerics run in the Rust core in float64: the two-pass covariance (blocked, bitwise
identical for any thread count), the symmetric eigendecomposition and Cholesky factorization
(nalgebra), and the whitening map ``(X − mean)·Wᵀ`` (a blocked GEMM). The output has X's
dtype (float16, float32 or float64; anything else is a ``TypeError``).

>>> import numpy as np, rsnorm as rn
>>> X = np.random.default_rng(0).standard_normal((500, 3)) @ [[2, 0, 0], [1, 1, 0], [0, 0, 3]]
>>> Y = rn.Whitening("zca", eps=0).fit(X).transform(X)
>>> bool(np.allclose(np.cov(Y.T, bias=True), np.eye(3)))
True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import _rsnorm
from ._rsnorm import RsnormError, ShapeError

__all__ = [
    "IterNormGrads",
    "IterNormStats",
    "Whitening",
    "iter_norm",
    "iter_norm_backward",
]

_METHODS = ("zca", "pca", "cholesky")


class Whitening:
    """Decorrelating linear transform fitted on samples: ``Y = (X − mean_)·Wᵀ``, cov(Y) ≈ I.

    X has shape (n_samples, n_features). With Σ the covariance (divided by n, or n − 1 when
    ``unbiased``) and Σ = U diag(λ) Uᵀ (λ descending)::

        zca:      W = U diag((λ + eps)^-½) Uᵀ   symmetric; the whitened data stays closest to X
        pca:      W = diag((λ + eps)^-½) Uᵀ     rows are the principal axes, scaled
        cholesky: W = L⁻¹,  Σ + eps·I = L Lᵀ    lower triangular

    PCA sign convention: each eigenvector (column of U) has its entry of largest magnitude
    positive (the first such entry on ties). Eigenvalues that rounding makes slightly negative
    are taken as 0, so a rank-deficient covariance gives finite results for any eps > 0;
    ``eps=0`` with a singular covariance is a ``ValueError``. The covariance of the output is
    ``diag(λ/(λ + eps))`` (ZCA/PCA), i.e. the identity when eps = 0.

    Attributes (after ``fit``): ``mean_`` (n_features,), ``covariance_`` (n_features,
    n_features), ``whitening_matrix_`` W, ``inverse_whitening_matrix_`` W⁻¹, ``eigenvalues_``
    (of the covariance, without eps, descending), ``n_samples_seen_``, ``n_features_in_``; all
    float64.

    ``partial_fit`` accumulates (count, mean, co-moment) and merges chunks exactly (Chan, Golub
    & LeVeque), so fitting in chunks equals fitting all rows at once up to rounding; the matrix
    is recomputed after each chunk once at least 2 samples were seen.
    """

    def __init__(self, method: str = "zca", eps: float = 1e-5, unbiased: bool = False):
        if not isinstance(method, str) or method.lower() not in _METHODS:
            raise RsnormError(f"method must be 'zca', 'pca' or 'cholesky', got {method!r}")
        if not (np.isfinite(eps) and eps >= 0):
            raise RsnormError(f"eps must be a finite number >= 0, got {eps}")
        self.method = method.lower()
        self.eps = float(eps)
        self.unbiased = bool(unbiased)
        self._reset()

    def _reset(self) -> None:
        self.n_samples_seen_ = 0
        self.n_features_in_: int | None = None
        self.mean_: np.ndarray | None = None
        self._comoment: np.ndarray | None = None
        self.covariance_: np.ndarray | None = None
        self.whitening_matrix_: np.ndarray | None = None
        self.inverse_whitening_matrix_: np.ndarray | None = None
        self.eigenvalues_: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"Whitening(method={self.method!r}, eps={self.eps!r}, unbiased={self.unbiased!r})"

    @staticmethod
    def _check_2d(X, name: str = "X") -> None:
        if not isinstance(X, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(X).__name__}")
        if X.ndim != 2:
            raise ShapeError(f"{name} must be 2-D (n_samples, n_features), got shape {X.shape}")

    def fit(self, X) -> Whitening:
        """Fits on all rows of X (n_samples ≥ 2, else ``ValueError``)."""
        self._check_2d(X)
        if X.shape[0] <= 1:
            raise RsnormError(
                f"Whitening.fit needs at least 2 samples to estimate a covariance, got {X.shape[0]}"
            )
        self._reset()
        return self.partial_fit(X)

    def partial_fit(self, X) -> Whitening:
        """Adds the rows of X to the running statistics and refits the matrix."""
        self._check_2d(X)
        count, mean, cm = _rsnorm.covariance_moments(X, 1, axis=1)
        cm = cm[0]
        if self.n_features_in_ is not None and X.shape[1] != self.n_features_in_:
            raise ShapeError(
                f"X has {X.shape[1]} features, but this Whitening was fitted with "
                f"{self.n_features_in_}"
            )
        self.n_features_in_ = X.shape[1]
        if count == 0:
            return self
        if self.n_samples_seen_ == 0:
            self.mean_, self._comoment = mean, cm
        else:
            # Chan et al.'s exact merge of (count, mean, co-moment), in arrival order.
            na, nb = float(self.n_samples_seen_), float(count)
            n = na + nb
            d = mean - self.mean_
            self.mean_ = self.mean_ + d * (nb / n)
            self._comoment = self._comoment + cm + np.outer(d, d) * (na * nb / n)
        self.n_samples_seen_ += int(count)
        if self.n_samples_seen_ >= 2:
            self._refit()
        return self

    def _refit(self) -> None:
        n = self.n_samples_seen_
        self.covariance_ = self._comoment / (n - 1 if self.unbiased else n)
        w, w_inv, lam = _rsnorm.whitening_matrix(self.covariance_, self.method, self.eps)
        self.whitening_matrix_, self.inverse_whitening_matrix_, self.eigenvalues_ = w, w_inv, lam

    def _check_fitted(self, X) -> None:
        self._check_2d(X)
        if self.whitening_matrix_ is None:
            raise RsnormError(
                "this Whitening is not fitted yet (fit it on at least 2 samples first)"
            )
        if X.shape[1] != self.n_features_in_:
            raise ShapeError(
                f"X has {X.shape[1]} features, but this Whitening was fitted with "
                f"{self.n_features_in_}"
            )

    def transform(self, X, *, out=None) -> np.ndarray:
        """``(X − mean_)·Wᵀ`` in X's dtype (computed in float64, rounded once)."""
        self._check_fitted(X)
        return _rsnorm.group_whiten_apply(X, self.whitening_matrix_, self.mean_, axis=1, out=out)

    def fit_transform(self, X) -> np.ndarray:
        return self.fit(X).transform(X)

    def inverse_transform(self, Y, *, out=None) -> np.ndarray:
        """``Y·W⁻ᵀ + mean_``: undoes ``transform`` (exactly up to rounding, eps included)."""
        self._check_fitted(Y)
        zero = np.zeros(self.n_features_in_)
        return _rsnorm.group_whiten_apply(
            Y, self.inverse_whitening_matrix_, zero, self.mean_, axis=1, out=out
        )


class IterNormStats(NamedTuple):
    """What ``iter_norm(..., return_stats=True)`` computed, per group of C/G channels.

    ``mean`` (G, C/G): the mean used; ``sigma`` (G, C/G, C/G): Σ + eps·I of the batch (None in
    eval mode); ``wm`` (G, C/G, C/G): the whitening matrix used. float64 for float64 x, else
    float32.
    """

    mean: np.ndarray
    sigma: np.ndarray | None
    wm: np.ndarray


class IterNormGrads(NamedTuple):
    """Gradients of ``iter_norm``: ``x`` in x's dtype."""

    x: np.ndarray


def iter_norm(
    x,
    running_mean=None,
    running_wm=None,
    num_groups: int = 1,
    T: int = 5,
    eps: float = 1e-5,
    training: bool = True,
    momentum: float = 0.1,
    *,
    axis: int = 1,
    out=None,
    return_stats: bool = False,
):
    """Iterative normalization (Huang et al., CVPR 2019): group whitening by Newton iterations.

    Channels are split into ``num_groups`` contiguous groups of d = C/G; per group, over the
    batch and spatial positions (m of them)::

        μ = mean(x),   Σ = (x − μ)(x − μ)ᵀ/m + eps·I,   Σ_N = Σ / tr(Σ)
        P₀ = I,  P_{k+1} = ½(3 P_k − P_k³ Σ_N)  for k < T,   W = P_T / sqrt(tr(Σ))
        y = W (x − μ)

    as in the authors' reference implementation (huangleiBuaa/IterNorm): biased covariance, eps
    added before the trace normalization, no affine (apply weight/bias afterwards). W → Σ^-½
    as T grows (quadratically once close; Σ_N has eigenvalues in (0, 1], so it converges).
    Caveat (inherent to this uncoupled Newton–Schulz form, in the reference too; Higham 1986):
    for an ill-conditioned Σ (κ ≳ 9) rounding errors grow with every step after convergence,
    so T in the tens can overflow; the paper's T = 5 (partial whitening) is the intended use.

    Training with ``running_mean`` (C values, e.g. the reference's (G, d, 1) buffer) and
    ``running_wm`` ((G, d, d)) updates them in place: ``new = (1 − momentum)·old +
    momentum·batch``. Eval (``training=False``) uses them: ``y = running_wm (x − running_mean)``.
    ``return_stats=True`` returns ``(y, IterNormStats(mean, sigma, wm))``.
    """
    r = _rsnorm.iter_norm(
        x, running_mean, running_wm, num_groups, T, eps, training, momentum,
        axis=axis, out=out, return_stats=return_stats,
    )
    if not return_stats:
        return r
    y, (mean, sigma, wm) = r
    return y, IterNormStats(mean, sigma, wm)


def _groups(a: np.ndarray, axis: int, g: int) -> np.ndarray:
    """(N, C, S…) with channel ``axis`` → float64 (G, C/G, m), positions in logical order."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, 0)
    return a.reshape(g, a.shape[0] // g, -1)


def _tp(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def _newton_backward(sigma: np.ndarray, d_wm: np.ndarray, T: int):
    """(W, ∂L/∂Σ) for W = newton(Σ) given ∂L/∂W, batched over groups, float64.

    Reverse mode through W = P_T·r^½, r = 1/tr(Σ), Σ_N = r·Σ, P_{k+1} = 1.5 P_k − 0.5 P_k³ Σ_N:
    for Y = P P P S with adjoint A, ∂P = A(P²S)ᵀ + Pᵀ A (PS)ᵀ + (P²)ᵀ A Sᵀ and ∂S = (P³)ᵀ A.
    """
    g, d, _ = sigma.shape
    eye = np.eye(d)
    r = 1.0 / np.trace(sigma, axis1=1, axis2=2)[:, None, None]
    sn = sigma * r
    ps = [np.broadcast_to(eye, (g, d, d))]
    for _ in range(T):
        p = ps[-1]
        ps.append(1.5 * p - 0.5 * (p @ p @ p @ sn))
    wm = ps[-1] * np.sqrt(r)
    d_p = d_wm * np.sqrt(r)
    d_r = np.sum(d_wm * ps[-1], axis=(1, 2), keepdims=True) * 0.5 / np.sqrt(r)
    d_sn = np.zeros((g, d, d))
    for k in range(T - 1, -1, -1):
        p = ps[k]
        p2 = p @ p
        d_sn += -0.5 * (_tp(p2 @ p) @ d_p)
        d_p = 1.5 * d_p - 0.5 * (
            d_p @ _tp(p2 @ sn) + _tp(p) @ d_p @ _tp(p @ sn) + _tp(p2) @ d_p @ _tp(sn)
        )
    d_r = d_r + np.sum(d_sn * sigma, axis=(1, 2), keepdims=True)
    d_sigma = d_sn * r + (-d_r * r * r) * eye
    return wm, d_sigma


_MAX_T = 1000


def _check_eps(eps) -> float:
    """eps as the forward takes it: a real number (else TypeError), finite and >= 0 (else
    RsnormError), so backward refuses what the forward refuses, in both modes."""
    if isinstance(eps, (str, bytes)) or not hasattr(eps, "__float__"):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    e = float(eps)
    if not (math.isfinite(e) and e >= 0):
        raise RsnormError(f"eps must be a finite number >= 0, got {e}")
    return e


def iter_norm_backward(
    grad_y,
    x,
    running_mean=None,
    running_wm=None,
    num_groups: int = 1,
    T: int = 5,
    eps: float = 1e-5,
    training: bool = True,
    momentum: float = 0.1,
    *,
    axis: int = 1,
    stats: IterNormStats | None = None,
) -> IterNormGrads:
    """Gradient of ``iter_norm`` with respect to x, through the batch statistics in training.

    Training: reverse mode through y = W(x − μ), W = P_T·tr(Σ)^-½, the T Newton steps
    ``P_{k+1} = 1.5 P_k − 0.5 P_k³ Σ_N`` (every factor of each step), Σ_N = Σ/tr(Σ) and
    Σ = (x − μ)(x − μ)ᵀ/m + eps·I, so the gradient is exact for the finite T (not that of the
    exact Σ^-½)::

        ∂L/∂W = Σ_p dy_p (x_p − μ)ᵀ,   dx_p = Wᵀ(dy_p − mean(dy)) + (∂L/∂Σ + ∂L/∂Σᵀ)(x_p − μ)/m

    Eval: ``dx = running_wmᵀ dy``. ``stats`` (from ``return_stats=True``) skips the mean and
    covariance pass. The per-element passes (the cross moment Σ dy (x − μ)ᵀ and the final
    two-term map) run in the Rust core (float64, deterministic for any thread count and
    layout); the d × d reverse pass through the Newton steps runs in float64 NumPy. grad_y and
    x must share a dtype; the result has it.
    """
    for name, a in (("grad_y", grad_y), ("x", x)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if grad_y.dtype != x.dtype:
        raise TypeError(f"grad_y has dtype {grad_y.dtype} but x has {x.dtype}; they must match")
    if grad_y.shape != x.shape:
        raise ShapeError(f"grad_y must have x's shape {x.shape}, got {grad_y.shape}")
    if x.ndim < 2:
        raise ShapeError(f"iter_norm expects at least 2 dimensions (N, C, ...), got {x.shape}")
    eps = _check_eps(eps)
    if not (isinstance(T, (int, np.integer)) and 0 <= T <= _MAX_T):
        # The forward's bound (src/norm/iternorm.rs MAX_T): an absurd T would hang the loop.
        raise RsnormError(f"T (the number of Newton iterations) must be in [0, {_MAX_T}], got {T}")
    if not -x.ndim <= axis < x.ndim or axis % x.ndim == 0:
        raise RsnormError(f"axis={axis} is not a channel axis for an input of shape {x.shape}")
    ax = axis % x.ndim
    c = x.shape[ax]
    g = int(num_groups)
    if g <= 0 or c % g:
        raise RsnormError(f"num_groups must be positive and divide C={c}, got {num_groups}")
    if T < 0:
        raise RsnormError(f"T must be >= 0, got {T}")
    d = c // g
    if not training:
        wm = running_wm if stats is None else stats.wm
        if wm is None:
            raise RsnormError("iter_norm_backward in eval mode needs running_wm (or stats)")
        wm_t = _tp(np.asarray(wm, dtype=np.float64).reshape(g, d, d))
        dx = _rsnorm.group_whiten_apply(grad_y, np.ascontiguousarray(wm_t), np.zeros(c),
                                        axis=ax)
        return IterNormGrads(dx)
    m = math.prod(s for i, s in enumerate(x.shape) if i != ax)
    if m == 0:
        raise RsnormError(
            f"iter_norm in training needs at least one value per channel, got {x.shape}"
        )
    if stats is not None and stats.sigma is not None:
        mu = np.asarray(stats.mean, dtype=np.float64).reshape(c)
        sigma = np.asarray(stats.sigma, dtype=np.float64).reshape(g, d, d)
    else:
        _, mu, cm = _rsnorm.covariance_moments(x, g, axis=ax)
        sigma = cm / m + eps * np.eye(d)
    gsum, d_wm = _rsnorm.group_cross_moments(grad_y, x, mu, g, axis=ax)
    wm, d_sigma = _newton_backward(sigma, d_wm, int(T))
    a = np.ascontiguousarray(_tp(wm))
    k = (d_sigma + _tp(d_sigma)) / m
    offset = -(a @ (gsum / m).reshape(g, d, 1) + k @ mu.reshape(g, d, 1)).reshape(c)
    dx = _rsnorm.group_whiten_apply2(grad_y, x, a, k, offset, axis=ax)
    return IterNormGrads(dx)


def _demo_cases():
    """(label, run) pairs for ``rsnorm demo``: each ``run()`` returns a one-line summary."""

    def whiten(method: str):
        def run() -> str:
            rng = np.random.default_rng(0)
            mix = rng.standard_normal((32, 32))
            X = (rng.standard_normal((4096, 32)) @ mix).astype(np.float32)
            Y = Whitening(method, eps=1e-6).fit(X).transform(X).astype(np.float64)
            err = np.abs(np.cov(Y.T, bias=True) - np.eye(32)).max()
            return f"max |cov(Y) − I| = {err:.1e} (X condition ~{np.linalg.cond(np.cov(X.T)):.0e})"

        return run

    def itn(t: int):
        def run() -> str:
            rng = np.random.default_rng(1)
            x = rng.standard_normal((16, 32, 8, 8))
            x[:, 1] += 0.8 * x[:, 0]
            y = iter_norm(x, num_groups=4, T=t)
            yg = _groups(y, 1, 4)
            err = max(np.abs(np.cov(yg[i], bias=True) - np.eye(8)).max() for i in range(4))
            return f"max |cov(y) − I| over groups = {err:.1e}"

        return run

    return [
        ("Whitening('zca') on (4096, 32) float32", whiten("zca")),
        ("Whitening('pca') on (4096, 32) float32", whiten("pca")),
        ("Whitening('cholesky') on (4096, 32) float32", whiten("cholesky")),
        ("iter_norm (16, 32, 8, 8), 4 groups, T=5", itn(5)),
        ("iter_norm (16, 32, 8, 8), 4 groups, T=20", itn(20)),
    ]
