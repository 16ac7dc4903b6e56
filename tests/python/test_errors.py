"""Errors (SPEC §4, HOSTILE 1-19): TypeError for dtypes, ValueError (rn.RsnormError) for shapes
and parameters, messages naming the argument and shapes; zero-size inputs; aliasing.

`pytest.raises(rn.RsnormError)` / `(TypeError)` never catch PyO3's PanicException (a BaseException),
so a panic fails these tests.
"""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

F32 = np.float32


def _x(shape=(4, 3, 5), dtype=F32):
    return (np.arange(int(np.prod(shape))) % 7 - 2.5).astype(dtype).reshape(shape)


# Every op called on x with its minimal arguments.
CALLS = {
    "batch_norm": lambda x, **kw: rn.batch_norm(x, **kw),
    "batch_norm_train": lambda x, **kw: rn.batch_norm(x, training=True, **kw),
    "layer_norm": lambda x, **kw: rn.layer_norm(x, x.shape[-1:], **kw),
    "rms_norm": lambda x, **kw: rn.rms_norm(x, x.shape[-1:], **kw),
    "group_norm": lambda x, **kw: rn.group_norm(x, 1, **kw),
    "instance_norm": lambda x, **kw: rn.instance_norm(x, **kw),
    "moments": lambda x, **kw: rn.moments(x, **kw),
}
OUT_OPS = [k for k in CALLS if k != "moments"]


def test_rsnorm_error_is_value_error():
    assert issubclass(rn.RsnormError, ValueError)


BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, object, "U3"]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", list(CALLS))
def test_bad_dtype_is_type_error_naming_it(op, dtype):
    x = np.ones((4, 3, 5), dtype=dtype)
    name = np.dtype(dtype).name
    with pytest.raises(TypeError) as info:
        CALLS[op](x)
    msg = str(info.value)
    # The dtype by name ("int32", "bool", "complex64", "object", "str"/"<U3"), and what is accepted.
    names = {name, np.dtype(dtype).str, str(np.dtype(dtype)), name.rstrip("0123456789") or name}
    assert any(n in msg for n in names), msg
    assert "float32" in msg or "float" in msg, msg


@pytest.mark.parametrize("call", [
    lambda x: rn.batch_norm(x), lambda x: rn.layer_norm(x, (5,)), lambda x: rn.rms_norm(x, (5,)),
    lambda x: rn.group_norm(x, 1), lambda x: rn.instance_norm(x), lambda x: rn.moments(x),
], ids=["batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm", "moments"])
def test_non_array_kind_is_type_error(call):
    with pytest.raises(TypeError):
        call("not an array")


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
@pytest.mark.parametrize("op", list(CALLS))
def test_big_endian_is_correct_or_type_error(op, dtype):
    x = _x().astype(dtype)
    native = x.astype(x.dtype.newbyteorder("="))
    try:
        got = CALLS[op](x)
    except TypeError as e:
        assert re.search(r"(?i)byte.?order|endian|>f|big|non-native", str(e)), str(e)
        return
    want = CALLS[op](native)
    if op == "moments":
        np.testing.assert_array_equal(got.mean, want.mean)
        np.testing.assert_array_equal(got.m2, want.m2)
    else:
        np.testing.assert_array_equal(np.asarray(got, dtype=np.float64),
                                      np.asarray(want, dtype=np.float64))


# ---- parameter shapes ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("training", [False, True])
def test_batch_norm_param_shape(which, training):
    x = _x((4, 3, 5))
    kw = {"running_mean": np.zeros(3, F32), "running_var": np.ones(3, F32),
          "weight": np.ones(3, F32), "bias": np.zeros(3, F32)}
    kw[which] = np.ones(7, F32)
    rm0 = kw["running_mean"].copy()
    with pytest.raises(rn.RsnormError, match=which) as info:
        rn.batch_norm(x, training=training, **kw)
    msg = str(info.value)
    assert re.search(r"\b7\b", msg) and re.search(r"\b3\b", msg), msg
    if which != "running_mean":
        np.testing.assert_array_equal(kw["running_mean"], rm0)


@pytest.mark.parametrize("which", ["weight", "bias", "running_mean", "running_var"])
def test_instance_norm_param_shape(which):
    x = _x((4, 3, 5))
    kw = {which: np.ones(7, F32)}
    if which.startswith("running"):
        kw = {"running_mean": np.zeros(3, F32), "running_var": np.ones(3, F32)}
        kw[which] = np.ones(7, F32)
    with pytest.raises(rn.RsnormError, match=which):
        rn.instance_norm(x, **kw)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_group_norm_param_shape(which):
    with pytest.raises(rn.RsnormError, match=which) as info:
        rn.group_norm(_x((4, 6, 5)), 2, **{which: np.ones(7, F32)})
    assert re.search(r"\b7\b", str(info.value)) and re.search(r"\b6\b", str(info.value))


@pytest.mark.parametrize("bad", [(7,), (5, 1), (1, 5), (3, 5)])
def test_layer_norm_param_shape(bad):
    x = _x((4, 3, 5))
    with pytest.raises(rn.RsnormError, match="weight"):
        rn.layer_norm(x, (5,), np.ones(bad, F32))
    with pytest.raises(rn.RsnormError, match="bias"):
        rn.layer_norm(x, (5,), None, np.ones(bad, F32))
    with pytest.raises(rn.RsnormError, match="weight"):
        rn.rms_norm(x, (5,), np.ones(bad, F32))


@pytest.mark.parametrize("op", ["batch_norm", "layer_norm", "group_norm"])
def test_param_of_wrong_dtype(op):
    # HOSTILE 7 says ValueError, HOSTILE 12 TypeError for dtypes: either, never a panic or cast.
    x = _x((4, 3, 5))
    w = np.ones(5 if op == "layer_norm" else 3, np.int64)
    with pytest.raises((TypeError, ValueError)):
        if op == "batch_norm":
            rn.batch_norm(x, weight=w)
        elif op == "layer_norm":
            rn.layer_norm(x, (5,), w)
        else:
            rn.group_norm(x, 1, w)


# ---- scalar parameters -----------------------------------------------------------------------

BAD_EPS = [-1e-5, float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("eps", BAD_EPS)
@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_train", "layer_norm", "rms_norm",
                                "group_norm", "instance_norm"])
def test_bad_eps(op, eps):
    with pytest.raises(rn.RsnormError, match="eps"):
        CALLS[op](_x(), eps=eps)


@pytest.mark.parametrize("momentum", [float("nan"), -0.1, 1.5, float("inf")])
def test_bad_momentum(momentum):
    x = _x()
    rm, rv = np.zeros(3, F32), np.ones(3, F32)
    with pytest.raises(rn.RsnormError, match="momentum"):
        rn.batch_norm(x, rm, rv, training=True, momentum=momentum)
    with pytest.raises(rn.RsnormError, match="momentum"):
        rn.instance_norm(x, rm, rv, momentum=momentum)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


@pytest.mark.parametrize("groups", [0, -1, -3])
def test_num_groups_not_positive(groups):
    with pytest.raises(rn.RsnormError):
        rn.group_norm(_x((4, 6, 5)), groups)


@pytest.mark.parametrize("c,g", [(6, 4), (5, 2), (3, 6)])
def test_channels_not_divisible_by_groups(c, g):
    with pytest.raises(rn.RsnormError) as info:
        rn.group_norm(_x((2, c, 3)), g)
    msg = str(info.value)
    assert re.search(rf"\b{c}\b", msg) and re.search(rf"\b{g}\b", msg), msg


def test_group_norm_needs_rank_2():
    with pytest.raises(rn.RsnormError):
        rn.group_norm(np.ones(6, F32), 2)


@pytest.mark.parametrize("axis", [3, 4, -4, -5, 100])
@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_train", "group_norm", "instance_norm",
                                "moments"])
def test_axis_out_of_range(op, axis):
    x = _x((2, 3, 5))
    with pytest.raises(rn.RsnormError, match="axis"):
        CALLS[op](x, axis=axis)


@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_train", "moments"])
def test_zero_dim_input(op):
    with pytest.raises(rn.RsnormError):
        CALLS[op](np.array(1.0, F32))


@pytest.mark.parametrize("fn", [rn.layer_norm, rn.rms_norm])
@pytest.mark.parametrize("ns", [(4,), (3, 6), (2, 3, 5, 1), (5, 5), ()])
def test_normalized_shape_mismatch(fn, ns):
    x = _x((2, 3, 5))
    with pytest.raises(rn.RsnormError) as info:
        fn(x, ns)
    msg = str(info.value)
    assert "normalized_shape" in msg or "shape" in msg, msg
    if ns:
        # quotes the actual trailing dims
        assert re.search(r"\b5\b", msg), msg


@pytest.mark.parametrize("fn", [rn.layer_norm, rn.rms_norm])
def test_layer_norm_of_0d_input(fn):
    with pytest.raises(rn.RsnormError):
        fn(np.array(2.0, F32), (1,))
    with pytest.raises(rn.RsnormError):
        fn(np.array(2.0, F32), ())


# ---- out= ------------------------------------------------------------------------------------

def _aliases(x):
    buf = np.empty(x.size + 1, x.dtype)
    return {
        "same": lambda: (x, x),
        "view": lambda: (x, x[...]),
        "reshaped_view": lambda: (x, x.reshape(-1).reshape(x.shape)),
        "shifted": lambda: (buf[1:].reshape(x.shape), buf[:-1].reshape(x.shape)),
    }


@pytest.mark.parametrize("kind", ["same", "view", "reshaped_view", "shifted"])
@pytest.mark.parametrize("op", OUT_OPS)
def test_out_overlapping_input(op, kind):
    x0 = _x()
    xin, out = _aliases(x0.copy())[kind]()
    xin[...] = x0
    before = xin.copy()
    with pytest.raises(rn.RsnormError):
        CALLS[op](xin, out=out)
    ref.assert_bitwise_equal(xin, before, "input overwritten despite the error")


def test_out_overlapping_weight():
    x = _x((2, 3, 5))
    buf = np.ones((2, 3, 5), F32)
    with pytest.raises(rn.RsnormError):
        rn.layer_norm(x, (5,), buf[0, 0], None, out=buf)


@pytest.mark.parametrize("op", OUT_OPS)
def test_read_only_out(op):
    x = _x()
    out = np.zeros_like(x)
    out.setflags(write=False)
    with pytest.raises(rn.RsnormError, match="read-only"):
        CALLS[op](x, out=out)
    np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("op", OUT_OPS)
def test_out_of_wrong_shape(op):
    x = _x()
    with pytest.raises(rn.RsnormError):
        CALLS[op](x, out=np.zeros((4, 3, 6), F32))
    with pytest.raises(rn.RsnormError):
        CALLS[op](x, out=np.zeros((60,), F32))


@pytest.mark.parametrize("op", OUT_OPS)
def test_out_of_wrong_dtype(op):
    with pytest.raises((TypeError, ValueError)):
        CALLS[op](_x(), out=np.zeros((4, 3, 5), np.float64))


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_read_only_running_stats_in_training(which):
    x = _x()
    stats = {"running_mean": np.zeros(3, F32), "running_var": np.ones(3, F32)}
    stats[which].setflags(write=False)
    with pytest.raises(rn.RsnormError, match="read-only"):
        rn.batch_norm(x, training=True, **stats)
    np.testing.assert_array_equal(stats["running_mean"], 0)
    np.testing.assert_array_equal(stats["running_var"], 1)
    with pytest.raises(rn.RsnormError, match="read-only"):
        rn.instance_norm(x, **stats)
    # In eval they are only read: fine.
    y = rn.batch_norm(x, training=False, **stats)
    assert y.shape == x.shape


def test_read_only_num_batches_tracked():
    nbt = np.array(0, np.int64)
    nbt.setflags(write=False)
    with pytest.raises(rn.RsnormError, match="read-only"):
        rn.batch_norm(_x(), np.zeros(3, F32), np.ones(3, F32), training=True, momentum=None,
                      num_batches_tracked=nbt)


@pytest.mark.parametrize("bad", [np.array(0, np.int32), np.array(0.0), 3])
def test_num_batches_tracked_must_be_0d_int64_array(bad):
    with pytest.raises((TypeError, ValueError)):
        rn.batch_norm(_x(), np.zeros(3, F32), np.ones(3, F32), training=True, momentum=None,
                      num_batches_tracked=bad)


def test_bad_momentum_convention():
    with pytest.raises(rn.RsnormError, match="momentum_convention"):
        rn.batch_norm(_x(), np.zeros(3, F32), np.ones(3, F32), training=True,
                      momentum_convention="keras")


# ---- aliasing between parameters (HOSTILE 18) ------------------------------------------------

def test_same_array_as_running_mean_and_bias_eval():
    x = _x()
    shared = np.array([0.5, -1.0, 2.0], F32)
    rv = np.array([1.0, 2.0, 0.5], F32)
    want = rn.batch_norm(x, shared.copy(), rv, None, shared.copy())
    got = rn.batch_norm(x, shared, rv, None, shared)
    ref.assert_bitwise_equal(got, want)


def test_same_array_as_running_mean_and_bias_training():
    x = _x()
    shared = np.array([0.5, -1.0, 2.0], F32)
    rm_sep, b_sep = shared.copy(), shared.copy()
    rv_sep, rv = np.ones(3, F32), np.ones(3, F32)
    want = rn.batch_norm(x, rm_sep, rv_sep, None, b_sep, training=True)
    got = rn.batch_norm(x, shared, rv, None, shared, training=True)
    ref.assert_bitwise_equal(got, want)
    ref.assert_bitwise_equal(shared, rm_sep)
    ref.assert_bitwise_equal(rv, rv_sep)


def test_same_array_as_weight_and_bias():
    x = _x()
    wb = np.array([0.5, 1.5, 2.0], F32)
    ref.assert_bitwise_equal(rn.batch_norm(x, weight=wb, bias=wb, training=True),
                             rn.batch_norm(x, weight=wb.copy(), bias=wb.copy(), training=True))
    ref.assert_bitwise_equal(rn.group_norm(x, 3, wb, wb), rn.group_norm(x, 3, wb.copy(), wb.copy()))


# ---- zero-size inputs (HOSTILE 19) ------------------------------------------------------------

def _quiet(fn):
    with np.errstate(all="ignore"):
        return fn()


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4), (0, 3, 4, 4)])
def test_zero_size_layer_and_rms_norm(shape):
    x = np.zeros(shape, F32)
    y, stats = rn.layer_norm(x, shape[-1:], return_stats=True)
    assert y.shape == shape and y.dtype == F32
    assert stats.mean.shape == shape[:-1]
    if shape[-1] == 0:
        assert np.all(np.isnan(stats.mean)), "statistics over an empty axis are NaN"
    y, stats = rn.rms_norm(x, shape[-1:], return_stats=True)
    assert y.shape == shape and stats.rstd.shape == shape[:-1]


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
@pytest.mark.parametrize("op", OUT_OPS)
def test_zero_size_out(op, shape):
    # NumPy gives empty arrays zero strides; an empty `out` has no elements to overlap.
    x = np.zeros(shape, F32)
    out = np.empty(shape, F32)
    if op == "instance_norm" and len(shape) == 2:
        return  # rank 2 has one spatial element: a documented ValueError, tested below
    if op in ("group_norm",):
        got = rn.group_norm(x, 1, out=out)
    else:
        got = CALLS[op](x, out=out)
    assert got is out


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4), (0, 3, 4, 4)])
@pytest.mark.parametrize("training", [False, True])
def test_zero_size_batch_norm(shape, training):
    x = np.zeros(shape, F32)
    c = shape[1]
    rm = np.arange(c, dtype=F32)
    rv = np.arange(c, dtype=F32) + 1
    y = rn.batch_norm(x, rm, rv, training=training)
    assert y.shape == shape and y.dtype == F32
    np.testing.assert_array_equal(rm, np.arange(c, dtype=F32))
    np.testing.assert_array_equal(rv, np.arange(c, dtype=F32) + 1)
    y, stats = rn.batch_norm(x, training=training, return_stats=True)
    assert y.shape == shape and stats.mean.shape == (c,)
    if x.size == 0 and c > 0:
        assert np.all(np.isnan(stats.mean))


@pytest.mark.parametrize("shape", [(0, 6), (0, 6, 4), (2, 0, 4), (0, 6, 2, 2)])
def test_zero_size_group_norm(shape):
    x = np.zeros(shape, F32)
    g = 1 if shape[1] == 0 else 3
    y, stats = rn.group_norm(x, g, return_stats=True)
    assert y.shape == shape
    assert stats.mean.shape == (shape[0], g)


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 5)])
def test_zero_size_instance_norm(shape):
    x = np.zeros(shape, F32)
    try:
        y, stats = rn.instance_norm(x, return_stats=True)
    except ValueError as e:
        # Only the documented refusal: rank 2 has one spatial element per instance.
        assert len(shape) == 2 and "spatial" in str(e), str(e)
        return
    assert y.shape == shape
    assert stats.mean.shape == (shape[0], shape[1])
    if len(shape) > 2 and shape[2] == 0 and shape[0] * shape[1] > 0:
        assert np.all(np.isnan(stats.mean))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
def test_zero_size_moments(shape):
    m = rn.moments(np.zeros(shape, F32))
    assert m.mean.shape == (shape[1],) and m.m2.shape == (shape[1],)
    # count = values per channel = product of the other dims, whether or not it is zero.
    assert m.count == int(np.prod(shape[:1] + shape[2:]))


def test_zero_size_with_out_and_params():
    x = np.zeros((0, 4), np.float64)
    w = np.ones(4)
    out = np.empty((0, 4))
    assert rn.layer_norm(x, (4,), w, w, out=out) is out
    assert rn.group_norm(x, 2, w, w, out=np.empty((0, 4))).shape == (0, 4)


@pytest.mark.parametrize("training", [False, True])
def test_input_aliasing_running_mean_is_correct_or_refused(training):
    # x and running_mean share memory: either refused, or the same as with separate arrays.
    buf = (np.arange(24, dtype=F32).reshape(8, 3) % 5) / 2
    x_copy, rm_copy, rv_copy, rv = buf.copy(), buf[0].copy(), np.ones(3, F32), np.ones(3, F32)
    want = rn.batch_norm(x_copy, rm_copy, rv_copy, training=training)
    try:
        got = rn.batch_norm(buf, buf[0], rv, training=training)
    except ValueError:
        return
    ref.assert_bitwise_equal(got, want)
    ref.assert_bitwise_equal(buf[0], rm_copy)
    ref.assert_bitwise_equal(rv, rv_copy)


# ---- rank limits and counters ---------------------------------------------------------------

@pytest.mark.parametrize("ndim", [32, 33, 40, 64])
@pytest.mark.parametrize("op", ["batch_norm", "layer_norm", "rms_norm", "group_norm",
                                "instance_norm", "moments"])
def test_many_dimensions_correct_or_value_error(op, ndim):
    # NumPy 2 allows 64 dimensions; whatever rsnorm supports must work, the rest be refused
    # with ValueError (never PanicException, which pytest.raises(rn.RsnormError) would not catch).
    base = _x((2, 3, 5))
    x = base.reshape((2, 3) + (1,) * (ndim - 3) + (5,))
    calls = {
        "batch_norm": lambda a: rn.batch_norm(a, training=True),
        "layer_norm": lambda a: rn.layer_norm(a, (5,)),
        "rms_norm": lambda a: rn.rms_norm(a, (5,)),
        "group_norm": lambda a: rn.group_norm(a, 3),
        "instance_norm": lambda a: rn.instance_norm(a),
        "moments": lambda a: rn.moments(a),
    }
    try:
        got = calls[op](x)
    except ValueError:
        return
    want = calls[op](base)
    if op == "moments":
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-15)
        assert got.count == want.count
    else:
        np.testing.assert_allclose(got.reshape(base.shape), want, rtol=1e-6)


@pytest.mark.parametrize("count", [-1, -5])
def test_negative_num_batches_tracked(count):
    # momentum=None divides by the incremented count: -1 would give 1/0 and NaN statistics.
    rm, rv = np.zeros(3, F32), np.ones(3, F32)
    nbt = np.array(count, np.int64)
    with pytest.raises(rn.RsnormError, match="num_batches_tracked"):
        rn.batch_norm(_x(), rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    assert int(nbt) == count


@pytest.mark.parametrize("kind", ["interleaved", "halves"])
def test_out_sharing_a_buffer_without_overlap_works(rng, kind):
    # "Overlap" is about elements, not buffers: disjoint views of one buffer are fine.
    if kind == "interleaved":
        buf = rng.standard_normal(120).astype(F32)
        x, out = buf[::2].reshape(4, 3, 5), buf[1::2].reshape(4, 3, 5)
    else:
        buf = rng.standard_normal((2, 4, 3, 5)).astype(F32)
        x, out = buf[0], buf[1]
    want = rn.layer_norm(x.copy(), (5,))
    x0 = x.copy()
    assert rn.layer_norm(x, (5,), out=out) is out
    ref.assert_bitwise_equal(out, want)
    ref.assert_bitwise_equal(x, x0)


# numpy.ma.MaskedArray: masks are not honoured, so a masked argument is a TypeError naming it —
# never a result computed from the data behind the mask with the mask silently dropped.
def _masked(a):
    return np.ma.masked_array(a, mask=np.zeros(a.shape, bool))


_X4 = _x((2, 3, 4, 5)) + 3.0  # positive values keep every op's domain (GDN, FRN) valid
_C3 = np.ones(3, F32)
MASKED_CALLS = {
    **{op: functools.partial(lambda f, m: f(m(_X4)), f) for op, f in CALLS.items()},
    "local_response_norm": lambda m: rn.local_response_norm(m(_X4), 3),
    "filter_response_norm": lambda m: rn.filter_response_norm(m(_X4), _C3, _C3 * 0),
    "tlu": lambda m: rn.tlu(m(_X4), _C3 * 0),
    "gdn": lambda m: rn.gdn(m(_X4), _C3, np.eye(3, dtype=F32) * 0.1),
    "mean_variance_norm": lambda m: rn.mean_variance_norm(m(_X4)),
    "normalize": lambda m: rn.normalize(m(_X4)),
    "whitening": lambda m: rn.Whitening().fit(m(_X4.reshape(-1, 5).astype(np.float64))),
    "layer_norm_backward": lambda m: rn.layer_norm_backward(m(_X4), _X4, (5,)),
    "batch_norm_weight": lambda m: rn.batch_norm(_X4, weight=m(_C3)),
    "layer_norm_out": lambda m: rn.layer_norm(_X4, (5,), out=m(np.empty_like(_X4))),
}


@pytest.mark.parametrize("call", list(MASKED_CALLS))
def test_masked_array_is_type_error(call):
    with pytest.raises(TypeError, match="MaskedArray") as info:
        MASKED_CALLS[call](_masked)
    assert ".filled(" in str(info.value) or "plain ndarray" in str(info.value)
    # The same call on plain arrays works: the refusal is about the mask alone.
    MASKED_CALLS[call](lambda a: a)


class _Tagged(np.ndarray):
    """An ndarray subclass without a mask (like np.memmap): its data is the array."""


def test_other_ndarray_subclasses_are_read_as_arrays():
    x = _x((3, 5))
    t = x.view(_Tagged)
    np.testing.assert_array_equal(rn.layer_norm(t, (5,)), rn.layer_norm(x, (5,)))
    np.testing.assert_array_equal(rn.batch_norm(t, training=True), rn.batch_norm(x, training=True))
