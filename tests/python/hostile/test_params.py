"""HOSTILE.md items 1-11: parameters and shapes. Exact exception types and message regexes,
or exact results. Ops that other branches are adding are skipped until they are public."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

F32, F64 = np.float32, np.float64


def need(*names):
    missing = [n for n in names if not hasattr(rn, n)]
    return pytest.mark.skipif(bool(missing), reason=f"not public yet: {missing}")


def data(shape, dtype=F32, seed=0):
    return ref.make_input(np.random.default_rng(seed), shape, dtype)


# 1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "axis"), [((1, 3), 1), ((1, 3, 1, 1), 1), ((1, 3), -1),
                                             ((1, 1, 1, 3), -1), ((1, 1, 3), 2)])
def test_1_bn_training_one_value_per_channel(shape, axis):
    x = data(shape)
    c = shape[axis]
    rm, rv = np.full(c, 0.25), np.full(c, 2.0)
    rm0, rv0 = rm.copy(), rv.copy()
    msg = (r"^Expected more than 1 value per channel when training, got input size "
           + re.escape(str(shape)))
    with pytest.raises(ValueError, match=msg) as ei:
        rn.batch_norm(x, rm, rv, training=True, axis=axis)
    assert isinstance(ei.value, rn.RsnormError)
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)


# 2 -------------------------------------------------------------------------------------------
def test_2_bn_training_empty_batch():
    x = np.ones((0, 3, 4, 4), F32)
    rm, rv = np.full(3, 0.25), np.full(3, 2.0)
    nbt = np.array(5, np.int64)
    y = rn.batch_norm(x, rm, rv, np.ones(3), np.zeros(3), training=True, momentum=None,
                      num_batches_tracked=nbt)
    assert y.shape == x.shape and y.dtype == F32
    assert np.array_equal(rm, np.full(3, 0.25)) and np.array_equal(rv, np.full(3, 2.0))


@need("batch_norm_backward")
def test_2_bn_training_empty_batch_zero_grads():
    x = np.ones((0, 3, 4, 4), F32)
    g = rn.batch_norm_backward(x, x, weight=np.ones(3), bias=np.zeros(3), training=True)
    assert g.x.shape == x.shape
    assert np.array_equal(g.weight, np.zeros(3, F32)) and np.array_equal(g.bias, np.zeros(3, F32))


# 3 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 3, 1, 1), (7, 3, 1), (5, 3)])
def test_3_instance_norm_one_spatial_element(shape):
    with pytest.raises(rn.RsnormError,
                       match=r"^Expected more than 1 spatial element when training, got input "
                             r"size " + re.escape(str(shape))):
        rn.instance_norm(data(shape))


# 4 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("c", "g"), [(3, 2), (6, 4), (5, 10)])
def test_4_gn_channels_not_divisible(c, g):
    with pytest.raises(rn.RsnormError, match=rf"C={c} is not divisible by num_groups={g}"):
        rn.group_norm(data((2, c, 3)), g)


def test_4_gn_one_value_per_group_is_bias_exactly():
    x = data((3, 4, 1, 1))
    b = np.array([0.5, -1.25, 3.0, 0.0], F32)
    y = rn.group_norm(x, 4, np.array([2.0, 3.0, 4.0, 5.0], F32), b)
    assert np.array_equal(y, np.broadcast_to(b.reshape(1, 4, 1, 1), y.shape))


@need("group_norm_backward")
def test_4_gn_one_value_per_group_zero_weight_grad():
    x = data((3, 4, 1, 1))
    g = rn.group_norm_backward(data((3, 4, 1, 1), seed=1), x, 4, np.ones(4, F32),
                               np.zeros(4, F32))
    assert np.array_equal(g.weight, np.zeros(4, F32))
    assert np.array_equal(g.x, np.zeros_like(x))


# 5 -------------------------------------------------------------------------------------------
def test_5_ln_over_one_element_is_bias_exactly():
    x = data((6, 1))
    b = np.array([0.75], F32)
    assert np.array_equal(rn.layer_norm(x, (1,), np.array([3.0], F32), b),
                          np.full((6, 1), 0.75, F32))


@need("layer_norm_backward")
def test_5_ln_over_one_element_zero_weight_grad():
    x = data((6, 1))
    g = rn.layer_norm_backward(data((6, 1), seed=3), x, (1,), np.array([3.0], F32),
                               np.array([0.75], F32))
    assert np.array_equal(g.weight, np.zeros(1, F32))
    assert np.array_equal(g.x, np.zeros_like(x))


# 6 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [rn.layer_norm, rn.rms_norm])
@pytest.mark.parametrize(("shape", "ns"), [((2, 3), (4,)), ((2, 3), ()), ((2, 3), (2, 3, 1)),
                                           ((2, 3, 4), (3,)), ((), (1,)), ((), ())])
def test_6_normalized_shape_mismatch(fn, shape, ns):
    pat = (r"normalized_shape " + re.escape(str(tuple(ns))) + r".*input shape "
           + re.escape(str(tuple(shape))))
    with pytest.raises(rn.ShapeError, match=pat):
        fn(np.ones(shape, F32), ns)


# 7 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["weight", "bias", "running_mean", "running_var"])
def test_7_bn_param_wrong_shape(which):
    kw = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    kw[which] = np.ones(4)
    with pytest.raises(rn.ShapeError, match=rf"^{which} must have shape \(3,\)"):
        rn.batch_norm(data((4, 3, 2)), **kw)


@pytest.mark.parametrize("which", ["weight", "bias"])
@pytest.mark.parametrize("dtype", [np.int64, np.complex64, bool])
def test_7_param_wrong_dtype_is_type_error(which, dtype):
    with pytest.raises(TypeError, match=rf"^{which} has dtype {np.dtype(dtype)}; rsnorm accepts "
                                        r"float16, float32, float64"):
        rn.group_norm(data((2, 4, 3)), 2, **{which: np.ones(4, dtype)})


def test_7_ln_weight_wrong_shape():
    with pytest.raises(rn.ShapeError, match=r"weight.*\(3, 4\)"):
        rn.layer_norm(data((2, 3, 4)), (3, 4), np.ones((4, 3), F32))


@need("filter_response_norm", "tlu")
@pytest.mark.parametrize("which", ["weight", "bias", "tau"])
def test_7_frn_param_wrong_shape(which):
    with pytest.raises(ValueError, match=rf"{which}.*\(4,\)"):
        rn.filter_response_norm(data((2, 4, 3, 3)), **{which: np.ones(5, F32)})


@need("gdn")
@pytest.mark.parametrize("bad", ["beta", "gamma"])
def test_7_gdn_param_wrong_shape(bad):
    beta, gamma = np.ones(4), np.eye(4)
    if bad == "beta":
        beta = np.ones(3)
    else:
        gamma = np.eye(3)
    with pytest.raises(ValueError, match=rf"{bad}.*\(4"):
        rn.gdn(data((2, 4, 3)), beta, gamma)


# 8 -------------------------------------------------------------------------------------------
EPS_OPS = {
    "batch_norm": lambda x, e: rn.batch_norm(x, training=True, eps=e),
    "layer_norm": lambda x, e: rn.layer_norm(x, x.shape[-1:], eps=e),
    "rms_norm": lambda x, e: rn.rms_norm(x, x.shape[-1:], eps=e),
    "group_norm": lambda x, e: rn.group_norm(x, 2, eps=e),
    "instance_norm": lambda x, e: rn.instance_norm(x, eps=e),
    "iter_norm": lambda x, e: rn.iter_norm(x, eps=e),
    "filter_response_norm": lambda x, e: rn.filter_response_norm(x, eps=e),
    "mean_variance_norm": lambda x, e: rn.mean_variance_norm(x, eps=e),
}


@pytest.mark.parametrize("op", sorted(EPS_OPS))
@pytest.mark.parametrize("eps", [-1e-5, -math.inf, math.inf, math.nan])
def test_8_bad_eps(op, eps):
    if not hasattr(rn, op):
        pytest.skip(f"{op} not public yet")
    with pytest.raises(rn.RsnormError, match=r"eps must be a finite number >= 0"):
        EPS_OPS[op](data((4, 4, 3, 3)), eps)


@pytest.mark.parametrize("training", [True, False])
def test_8_iter_norm_backward_validates_eps(training):
    x = data((8, 4))
    kw = {} if training else {"running_mean": np.zeros(4), "running_wm": np.eye(4)[None]}
    with pytest.raises(rn.RsnormError, match=r"eps"):
        rn.iter_norm_backward(x, x, training=training, eps=-1.0, **kw)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, math.nan, math.inf])
@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_8_bad_momentum(op, momentum):
    x = data((4, 3, 5))
    with pytest.raises(rn.RsnormError, match=r"^momentum must be in \[0, 1\]"):
        getattr(rn, op)(x, np.zeros(3), np.ones(3), momentum=momentum)


@need("local_response_norm")
@pytest.mark.parametrize("size", [0, -1])
def test_8_lrn_size_not_positive(size):
    with pytest.raises(rn.RsnormError, match=r"size"):
        rn.local_response_norm(data((2, 4, 3)), size)


@pytest.mark.parametrize("groups", [0, -2])
def test_8_num_groups_not_positive(groups):
    with pytest.raises(rn.RsnormError, match=rf"^num_groups must be positive, got {groups}"):
        rn.group_norm(data((2, 4, 3)), groups)


@pytest.mark.parametrize("call", ["axis", "num_groups", "threads"])
def test_8_huge_integers_are_value_errors(call):
    # Found by the fuzzer: integers beyond int64 used to raise OverflowError.
    x = data((2, 4, 3))
    with pytest.raises(rn.RsnormError):
        if call == "axis":
            rn.batch_norm(x, axis=2**70)
        elif call == "num_groups":
            rn.group_norm(x, 2**70)
        else:
            rn.set_num_threads(2**70)


# 9 -------------------------------------------------------------------------------------------
@need("local_response_norm")
@pytest.mark.parametrize("shape", [(4,), (2, 4)])
def test_9_lrn_needs_rank_3(shape):
    with pytest.raises(rn.ShapeError, match=r"at least 3 dimensions.*" + re.escape(str(shape))):
        rn.local_response_norm(np.ones(shape, F32), 3)


@pytest.mark.parametrize("shape", [(), (4,)])
def test_9_gn_needs_rank_2(shape):
    with pytest.raises(rn.ShapeError, match=r"at least 2 dimensions.*" + re.escape(str(shape))):
        rn.group_norm(np.ones(shape, F32), 1)


AXIS_OPS = {
    "batch_norm": lambda x, a: rn.batch_norm(x, axis=a),
    "group_norm": lambda x, a: rn.group_norm(x, 1, axis=a),
    "instance_norm": lambda x, a: rn.instance_norm(x, axis=a),
    "moments": lambda x, a: rn.moments(x, a),
    "iter_norm": lambda x, a: rn.iter_norm(x, axis=a),
    "local_response_norm": lambda x, a: rn.local_response_norm(x, 3, axis=a),
    "filter_response_norm": lambda x, a: rn.filter_response_norm(x, axis=a),
    "tlu": lambda x, a: rn.tlu(x, np.zeros(3, F32), axis=a),
    "gdn": lambda x, a: rn.gdn(x, np.ones(3), np.eye(3), axis=a),
    "normalize": lambda x, a: rn.normalize(x, axis=a),
}


@pytest.mark.parametrize("op", sorted(AXIS_OPS))
@pytest.mark.parametrize("axis", [3, -4, 100])
def test_9_axis_out_of_range(op, axis):
    if not hasattr(rn, op):
        pytest.skip(f"{op} not public yet")
    with pytest.raises(rn.RsnormError, match=rf"axis.*{axis}"):
        AXIS_OPS[op](data((2, 3, 4)), axis)


# 10 ------------------------------------------------------------------------------------------
@need("gdn")
@pytest.mark.parametrize("beta0", [0.0, -1.0, math.nan])
def test_10_gdn_beta_not_positive(beta0):
    beta = np.ones(3)
    beta[1] = beta0
    with pytest.raises(rn.RsnormError, match=r"beta"):
        rn.gdn(data((2, 3, 4)), beta, np.eye(3))


@need("gdn")
def test_10_gdn_gamma_negative():
    gamma = np.eye(3)
    gamma[0, 2] = -1e-9
    with pytest.raises(rn.RsnormError, match=r"gamma"):
        rn.gdn(data((2, 3, 4)), np.ones(3), gamma)


@need("filter_response_norm")
@pytest.mark.parametrize("dtype", [F32, F64])
def test_10_frn_spatial_size_one(dtype):
    x = data((5, 4, 1, 1), dtype)
    eps = 1e-6
    y = rn.filter_response_norm(x, eps=eps)
    x64 = x.astype(F64)
    want = (x64 / np.sqrt(x64 * x64 + eps)).astype(dtype)
    assert np.array_equal(y, want)


# 11 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1])
@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_11_whitening_too_few_samples(n, method):
    with pytest.raises(rn.RsnormError, match=rf"at least 2 samples.*got {n}"):
        rn.Whitening(method).fit(np.ones((n, 3)))


@pytest.mark.parametrize("method", ["zca", "pca", "cholesky"])
def test_11_whitening_rank_deficient_is_finite(method):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 2))
    X = np.column_stack([a, a[:, 0] + a[:, 1], np.zeros(50)])  # rank 2 of 4
    w = rn.Whitening(method, eps=1e-5).fit(X)
    Y = w.transform(X)
    assert np.isfinite(Y).all() and np.isfinite(w.whitening_matrix_).all()
    np.testing.assert_allclose(w.inverse_transform(Y), X, atol=1e-8)


def test_11_iter_norm_rank_deficient_is_finite():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((30, 2))
    x = np.column_stack([a, a[:, :1], np.full((30, 1), 3.0)])
    assert np.isfinite(rn.iter_norm(x)).all()

