"""Whitening (ZCA / PCA / Cholesky) against plain float64 NumPy constructions."""

from __future__ import annotations

import numpy as np
import pytest
import rsnorm as rn
from rsnorm import _rsnorm


def _data(rng, n=400, d=5, dtype=np.float64):
    # Correlated features with a spread of scales, well conditioned enough for 1e-8 checks.
    mix = rng.standard_normal((d, d)) + 2 * np.eye(d)
    return (rng.standard_normal((n, d)) @ mix + rng.uniform(-3, 3, d)).astype(dtype)


def _cov(X, unbiased=False):
    X = np.asarray(X, dtype=np.float64)
    xc = X - X.mean(axis=0)
    return xc.T @ xc / (len(X) - (1 if unbiased else 0))


def _eigh_desc(cov):
    lam, u = np.linalg.eigh(cov)
    return lam[::-1], u[:, ::-1]


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_output_covariance_is_identity(rng, method):
    X = _data(rng)
    w = rn.Whitening(method, eps=0.0).fit(X)
    Y = w.transform(X)
    assert Y.dtype == np.float64 and Y.shape == X.shape
    np.testing.assert_allclose(_cov(Y), np.eye(5), rtol=0, atol=1e-8)
    np.testing.assert_allclose(Y.mean(axis=0), 0, atol=1e-12)


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_output_covariance_with_eps(rng, method):
    X = _data(rng)
    eps = 0.3
    w = rn.Whitening(method, eps=eps).fit(X)
    lam = np.linalg.eigvalsh(_cov(X))[::-1]
    got = np.sort(np.linalg.eigvalsh(_cov(w.transform(X))))[::-1]
    np.testing.assert_allclose(got, lam / (lam + eps), rtol=1e-10)


def test_zca_symmetric_and_matches_eigh(rng):
    X = _data(rng, d=7)
    eps = 1e-3
    w = rn.Whitening("zca", eps=eps).fit(X)
    W = w.whitening_matrix_
    assert np.array_equal(W, W.T)
    lam, u = np.linalg.eigh(_cov(X))
    ref = u @ np.diag(1 / np.sqrt(lam + eps)) @ u.T
    np.testing.assert_allclose(W, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(w.mean_, X.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(w.covariance_, _cov(X), rtol=1e-12)
    np.testing.assert_allclose(w.eigenvalues_, lam[::-1], rtol=1e-12)
    assert np.all(np.diff(w.eigenvalues_) <= 0)


def test_zca_unique_with_repeated_eigenvalues():
    # Σ with a 3-fold eigenvalue: U is not unique, ZCA's W is (= Σ^-½ exactly).
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    cov = q @ np.diag([4.0, 1.0, 1.0, 1.0]) @ q.T
    cov = (cov + cov.T) / 2
    W, W_inv, lam = _rsnorm.whitening_matrix(cov, "zca", 0.0)
    ref = q @ np.diag([0.5, 1, 1, 1]) @ q.T
    np.testing.assert_allclose(W, ref, atol=1e-13)
    np.testing.assert_allclose(W_inv, q @ np.diag([2.0, 1, 1, 1]) @ q.T, atol=1e-13)
    np.testing.assert_allclose(lam, [4, 1, 1, 1], atol=1e-13)


def test_pca_up_to_signs_and_convention(rng):
    X = _data(rng, d=6)
    eps = 1e-4
    w = rn.Whitening("pca", eps=eps).fit(X)
    lam, u = _eigh_desc(_cov(X))
    ref = np.diag(1 / np.sqrt(lam + eps)) @ u.T
    W = w.whitening_matrix_
    # Rows may differ from the reference only by their sign.
    signs = np.sign(np.sum(W * ref, axis=1))
    assert np.all(np.abs(signs) == 1)
    np.testing.assert_allclose(W, signs[:, None] * ref, rtol=1e-9, atol=1e-12)
    # The documented convention: each row's largest-magnitude entry is positive.
    rows = np.arange(6)
    assert np.all(W[rows, np.argmax(np.abs(W), axis=1)] > 0)
    # Components are uncorrelated and ordered by decreasing variance before scaling.
    Y = w.transform(X)
    np.testing.assert_allclose(_cov(Y), np.diag(lam / (lam + eps)), atol=1e-9)


def test_cholesky_matches_numpy(rng):
    X = _data(rng, d=6)
    eps = 1e-2
    w = rn.Whitening("cholesky", eps=eps).fit(X)
    L = np.linalg.cholesky(_cov(X) + eps * np.eye(6))
    np.testing.assert_allclose(w.inverse_whitening_matrix_, L, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(w.whitening_matrix_, np.linalg.inv(L), rtol=1e-10, atol=1e-12)
    assert np.all(np.triu(w.whitening_matrix_, 1) == 0)
    np.testing.assert_allclose(w.eigenvalues_, np.linalg.eigvalsh(_cov(X))[::-1], rtol=1e-12)


def test_unbiased(rng):
    X = _data(rng, n=20)
    w = rn.Whitening("zca", eps=0.0, unbiased=True).fit(X)
    np.testing.assert_allclose(w.covariance_, np.cov(X.T), rtol=1e-12)
    np.testing.assert_allclose(np.cov(w.transform(X).T), np.eye(5), atol=1e-10)


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_rank_deficient_is_finite(rng, method):
    X = _data(rng, n=50, d=4)
    dup = np.concatenate([X, X[:, :1]], axis=1)  # duplicated feature: Σ singular
    few = rng.standard_normal((3, 8))  # n < d: rank ≤ 2
    const = np.ones((10, 3))  # Σ = 0
    for A in (dup, few, const):
        w = rn.Whitening(method, eps=1e-5).fit(A)
        Y = w.transform(A)
        assert np.all(np.isfinite(w.whitening_matrix_))
        assert np.all(np.isfinite(Y))
    if method != "cholesky":
        # The duplicated direction is scaled by 1/sqrt(eps), not blown up to inf.
        lam = rn.Whitening(method, eps=1e-5).fit(dup).eigenvalues_
        assert abs(lam[-1]) < 1e-10
    with pytest.raises(ValueError, match="singular"):
        rn.Whitening(method, eps=0.0).fit(const)


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_samples(n):
    with pytest.raises(ValueError, match="at least 2 samples"):
        rn.Whitening().fit(np.zeros((n, 3)))


def test_partial_fit_equals_fit(rng):
    X = _data(rng, n=301, d=6)
    X[:, 2] += 1e3  # a large offset makes a naive merge lose digits
    for method in ("zca", "pca", "cholesky"):
        full = rn.Whitening(method, eps=1e-6).fit(X)
        part = rn.Whitening(method, eps=1e-6)
        for a, b in ((0, 7), (7, 180), (180, 301)):
            part.partial_fit(X[a:b])
        assert part.n_samples_seen_ == full.n_samples_seen_ == 301
        np.testing.assert_allclose(part.mean_, full.mean_, rtol=1e-12)
        scale = np.abs(full.covariance_).max()
        np.testing.assert_allclose(part.covariance_, full.covariance_, rtol=1e-12,
                                   atol=1e-12 * scale)
        np.testing.assert_allclose(part.eigenvalues_, full.eigenvalues_, rtol=1e-12)
        wscale = np.abs(full.whitening_matrix_).max()
        np.testing.assert_allclose(part.whitening_matrix_, full.whitening_matrix_, rtol=1e-12,
                                   atol=1e-12 * wscale)


def test_partial_fit_one_sample_then_more(rng):
    X = _data(rng, n=30)
    w = rn.Whitening("zca")
    w.partial_fit(X[:1])
    assert w.whitening_matrix_ is None and w.n_samples_seen_ == 1
    with pytest.raises(ValueError, match="not fitted"):
        w.transform(X)
    w.partial_fit(X[1:])
    ref = rn.Whitening("zca").fit(X)
    np.testing.assert_allclose(w.whitening_matrix_, ref.whitening_matrix_, rtol=1e-11)


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_inverse_transform_roundtrip(rng, method):
    X = _data(rng)
    w = rn.Whitening(method, eps=1e-3).fit(X)
    back = w.inverse_transform(w.transform(X))
    np.testing.assert_allclose(back, X, rtol=1e-11, atol=1e-11)
    new = rng.standard_normal((10, 5))
    np.testing.assert_allclose(w.inverse_transform(w.transform(new)), new, atol=1e-11)


def test_transform_matches_numpy_formula(rng):
    X = _data(rng)
    w = rn.Whitening("pca", eps=1e-3).fit(X)
    new = rng.standard_normal((33, 5))
    np.testing.assert_allclose(
        w.transform(new), (new - w.mean_) @ w.whitening_matrix_.T, rtol=1e-12, atol=1e-13
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_path(rng, dtype):
    X64 = _data(rng, n=2000, d=4)
    X = X64.astype(dtype)
    w = rn.Whitening("zca", eps=0.0).fit(X)
    # Statistics are exact float64 of the stored values.
    ref = rn.Whitening("zca", eps=0.0).fit(X.astype(np.float64))
    np.testing.assert_allclose(w.whitening_matrix_, ref.whitening_matrix_, rtol=1e-12)
    Y = w.transform(X)
    assert Y.dtype == dtype
    exact = (X.astype(np.float64) - w.mean_) @ w.whitening_matrix_.T
    # Computed in float64, rounded once.
    np.testing.assert_array_equal(Y, exact.astype(dtype))
    tol = 1e-5 if dtype == np.float32 else 5e-3
    np.testing.assert_allclose(_cov(Y), np.eye(4), atol=tol)


@pytest.mark.parametrize("bad", [np.int64, np.int32, np.complex128, bool])
def test_wrong_dtype_is_type_error(bad):
    X = np.ones((5, 3), dtype=bad)
    with pytest.raises(TypeError, match="dtype"):
        rn.Whitening().fit(X)
    w = rn.Whitening().fit(np.random.default_rng(0).standard_normal((5, 3)))
    with pytest.raises(TypeError, match="dtype"):
        w.transform(X)


def test_errors(rng):
    with pytest.raises(ValueError, match="method"):
        rn.Whitening("svd")
    with pytest.raises(ValueError, match="eps"):
        rn.Whitening(eps=-1.0)
    with pytest.raises(rn.ShapeError):
        rn.Whitening().fit(np.zeros(5))
    with pytest.raises(TypeError):
        rn.Whitening().fit([[1.0, 2.0], [3.0, 4.0]])
    w = rn.Whitening().fit(_data(rng))
    with pytest.raises(rn.ShapeError, match="features"):
        w.transform(np.zeros((3, 4)))
    with pytest.raises(rn.ShapeError, match="features"):
        w.partial_fit(np.zeros((3, 4)))
    bad = _data(rng)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rn.Whitening().fit(bad)


def test_nan_rows_isolated(rng):
    X = _data(rng)
    w = rn.Whitening("zca").fit(X)
    new = rng.standard_normal((6, 5))
    new[2, 3] = np.nan
    Y = w.transform(new)
    assert np.all(np.isnan(Y[2]))
    assert np.all(np.isfinite(np.delete(Y, 2, axis=0)))


def test_layouts_bitwise(rng):
    X = _data(rng, n=700, d=9)
    w = rn.Whitening("zca").fit(X)
    ref_y = w.transform(X)
    ref_cov = _rsnorm.covariance_moments(X)
    for v in (np.asfortranarray(X), X[::-1][::-1], np.ascontiguousarray(X[::-1])[::-1]):
        assert np.array_equal(w.transform(v), ref_y)
        got = _rsnorm.covariance_moments(v)
        assert got[0] == ref_cov[0]
        assert np.array_equal(got[1], ref_cov[1]) and np.array_equal(got[2], ref_cov[2])
    big = np.empty((700, 18))
    big[:, ::2] = X
    assert np.array_equal(w.transform(big[:, ::2]), ref_y)


def test_threads_bitwise(rng, restore_threads):
    X = _data(rng, n=40000, d=16)  # above the parallel threshold
    res = []
    for t in (1, 2):
        rn.set_num_threads(t)
        w = rn.Whitening("zca").fit(X)
        res.append((w.mean_, w.covariance_, w.whitening_matrix_, w.transform(X)))
    for a, b in zip(*res):
        assert np.array_equal(a, b)


def test_out_argument(rng):
    X = _data(rng)
    w = rn.Whitening("cholesky").fit(X)
    out = np.empty_like(X)
    r = w.transform(X, out=out)
    assert r is out
    np.testing.assert_array_equal(out, w.transform(X))


def test_covariance_moments_groups(rng):
    x = rng.standard_normal((3, 6, 4, 5))
    count, mean, cm = _rsnorm.covariance_moments(x, 2, axis=1)
    assert count == 60 and cm.shape == (2, 3, 3)
    flat = np.moveaxis(x, 1, 0).reshape(6, -1)
    np.testing.assert_allclose(mean, flat.mean(axis=1), rtol=1e-13)
    xc = flat - flat.mean(axis=1, keepdims=True)
    for g in range(2):
        blk = xc[3 * g:3 * g + 3]
        np.testing.assert_allclose(cm[g], blk @ blk.T, rtol=1e-12)
    # channels-last gives the same statistics.
    count2, mean2, cm2 = _rsnorm.covariance_moments(np.moveaxis(x, 1, -1), 2, axis=-1)
    assert count2 == count
    np.testing.assert_allclose(mean2, mean, rtol=1e-13)
    np.testing.assert_allclose(cm2, cm, rtol=1e-12)


def test_zero_size(rng):
    w = rn.Whitening().fit(_data(rng))
    assert w.transform(np.zeros((0, 5))).shape == (0, 5)
    assert w.inverse_transform(np.zeros((0, 5), np.float32)).dtype == np.float32
    before = w.whitening_matrix_.copy()
    w.partial_fit(np.zeros((0, 5)))  # an empty chunk changes nothing
    assert w.n_samples_seen_ == 400 and np.array_equal(w.whitening_matrix_, before)
    for method in ("zca", "pca", "cholesky"):
        w0 = rn.Whitening(method).fit(np.zeros((4, 0)))
        assert w0.whitening_matrix_.shape == (0, 0)
        assert w0.transform(np.zeros((4, 0))).shape == (4, 0)
