"""HOSTILE.md items 14-19: memory layouts, read-only arrays, aliasing, zero-size arrays, for
every array op in the registry (forward and backward)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

from .registry import ENTRIES, HAS_OUT, ROWWISE, SIMPLE

F16, F32, F64 = np.float16, np.float32, np.float64
OPS = sorted(n for n, e in ENTRIES.items() if e.call is not None)


def _present(name):
    if not hasattr(rn, name):
        pytest.skip(f"{name} not public yet")


def _inputs(name, dtype, shape=(4, 6, 5, 3), seed=0):
    rng = np.random.default_rng(seed)
    x = ref.make_input(rng, shape, F64)
    if name.endswith("_backward"):
        return [rng.standard_normal(shape).astype(dtype), x.astype(dtype)]
    return [x.astype(dtype)]


def _flat(res):
    if isinstance(res, tuple):
        out = []
        for r in res:
            out += _flat(r)
        return out
    return [] if res is None else [np.asarray(res)]


def _assert_same(a, b, msg):
    fa, fb = _flat(a), _flat(b)
    assert len(fa) == len(fb)
    for u, v in zip(fa, fb):
        ref.assert_bitwise_equal(u, v, msg)


def _views(a):
    """(name, view) pairs: the same values (broadcast: its own values) in other strides."""
    big = np.zeros((a.shape[0], 2 * a.shape[1]) + a.shape[2:], a.dtype)
    big[:, ::2] = a
    rev = np.ascontiguousarray(a[::-1])[::-1]
    rev2 = np.ascontiguousarray(a[:, :, ::-1])[:, :, ::-1]
    nhwc = np.ascontiguousarray(np.moveaxis(a, 1, -1))
    ro = a.copy()
    ro.flags.writeable = False
    yield "slice_c", big[:, ::2]
    yield "neg_n", rev
    yield "neg_h", rev2
    yield "fortran", np.asfortranarray(a)
    yield "channels_last_view", np.moveaxis(nhwc, -1, 1)
    yield "transpose_hw", np.ascontiguousarray(a.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    yield "broadcast_n", np.broadcast_to(a[:1], a.shape)
    yield "readonly", ro


# 14 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F16, F32, F64])
@pytest.mark.parametrize("name", OPS)
def test_14_strided_equals_contiguous_bitwise(name, dtype):
    _present(name)
    call = ENTRIES[name].call
    arrays = _inputs(name, dtype)
    for i in range(len(arrays)):
        for vname, view in _views(arrays[i]):
            args = list(arrays)
            args[i] = view
            contig = [np.ascontiguousarray(a) for a in args]
            _assert_same(call(*args), call(*contig), f"{name} arg {i} as {vname}")


# 15 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name", sorted(ROWWISE))
def test_15_rows_are_independent(name, dtype):
    _present(name)
    x = _inputs(name, dtype, (7, 6, 5, 3))[0]
    full = SIMPLE[name](x)
    part = SIMPLE[name](x[:-1])
    for u, v in zip(_flat(full), _flat(part)):
        ref.assert_bitwise_equal(u[:-1], v, name)


# 16 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(HAS_OUT))
def test_16_read_only_out_is_value_error(name):
    _present(name)
    x = _inputs(name, F32)[0]
    out = np.empty_like(x)
    out.flags.writeable = False
    with pytest.raises(rn.RsnormError, match=r"^out is read-only"):
        _call_out(name, x, out)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("op", ["batch_norm", "instance_norm"])
def test_16_read_only_running_stats_that_must_be_updated(op, which):
    x = _inputs(op, F32)[0]
    rs = {"running_mean": np.zeros(6), "running_var": np.ones(6)}
    rs[which].flags.writeable = False
    kw = {"training": True} if op == "batch_norm" else {}
    with pytest.raises(rn.RsnormError, match=rf"^{which} is read-only"):
        getattr(rn, op)(x, rs["running_mean"], rs["running_var"], **kw)
    assert np.array_equal(rs["running_mean"], np.zeros(6))
    # Eval reads them only: read-only is fine there.
    kw = {"training": False} if op == "batch_norm" else {"use_input_stats": False}
    getattr(rn, op)(x, rs["running_mean"], rs["running_var"], **kw)


def test_16_read_only_num_batches_tracked():
    nbt = np.array(0, np.int64)
    nbt.flags.writeable = False
    with pytest.raises(rn.RsnormError, match=r"num_batches_tracked is read-only"):
        rn.batch_norm(_inputs("batch_norm", F32)[0], np.zeros(6), np.ones(6), training=True,
                      momentum=None, num_batches_tracked=nbt)


# 17 ------------------------------------------------------------------------------------------
def _call_out(name, x, out):
    # SIMPLE's calls with out= (same parameters, no stats).
    calls = {
        "batch_norm": lambda: rn.batch_norm(x, training=True, out=out),
        "layer_norm": lambda: rn.layer_norm(x, (5, 3), out=out),
        "rms_norm": lambda: rn.rms_norm(x, 3, out=out),
        "group_norm": lambda: rn.group_norm(x, 3, out=out),
        "instance_norm": lambda: rn.instance_norm(x, out=out),
        "iter_norm": lambda: rn.iter_norm(x, num_groups=2, out=out),
        "local_response_norm": lambda: rn.local_response_norm(x, 3, out=out),
        "filter_response_norm": lambda: rn.filter_response_norm(x, out=out),
        "tlu": lambda: rn.tlu(x, np.zeros(6), out=out),
        "gdn": lambda: rn.gdn(x, np.ones(6), np.eye(6), out=out),
        "mean_variance_norm": lambda: rn.mean_variance_norm(x, out=out),
        "normalize": lambda: rn.normalize(x, out=out),
    }
    return calls[name]()


@pytest.mark.parametrize("kind", ["same", "slice", "two_views", "reshaped"])
@pytest.mark.parametrize("name", sorted(HAS_OUT))
def test_17_out_overlapping_input_is_value_error(name, kind):
    _present(name)
    x = _inputs(name, F32)[0]
    before = x.copy()
    if kind == "same":
        out = x
    elif kind == "slice":
        buf = np.concatenate([x.ravel(), x.ravel()[:7]])
        x = buf[:x.size].reshape(x.shape)
        out = buf[7:7 + x.size].reshape(x.shape)
    elif kind == "two_views":
        out = x[:, :, :, :]
    else:
        out = x.reshape(-1).reshape(x.shape)
    with pytest.raises(rn.RsnormError, match=r"^out overlaps an input"):
        _call_out(name, x, out)
    assert np.array_equal(x, before[: x.shape[0]].reshape(x.shape)) or kind == "slice"


@pytest.mark.parametrize("name", sorted(HAS_OUT))
def test_17_out_in_same_buffer_without_overlap_works(name):
    _present(name)
    x = _inputs(name, F32)[0]
    buf = np.empty((2,) + x.shape, F32)
    buf[0] = x
    got = _call_out(name, buf[0], buf[1])
    assert got is buf[1] or np.shares_memory(got, buf)
    want = _call_out(name, x, np.empty_like(x))
    ref.assert_bitwise_equal(buf[1], want, name)


# 18 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [False, True])
def test_18_same_array_as_running_mean_and_bias(training):
    x = _inputs("batch_norm", F32)[0]
    shared = np.linspace(-0.5, 0.5, 6)
    rv = np.linspace(0.5, 2.0, 6)
    a_rm, a_b, a_rv = shared.copy(), shared.copy(), rv.copy()
    want = rn.batch_norm(x, a_rm, a_rv, bias=a_b, training=training)
    got = rn.batch_norm(x, shared, rv.copy(), bias=shared, training=training)
    ref.assert_bitwise_equal(got, want)
    # The update lands in the shared array, as it does in the separate running_mean.
    ref.assert_bitwise_equal(shared, a_rm)


def test_18_same_array_as_weight_bias_running_var():
    x = _inputs("instance_norm", F64)[0]
    s = np.linspace(0.5, 2.0, 6)
    want = rn.instance_norm(x, None, None, s.copy(), s.copy())
    ref.assert_bitwise_equal(rn.instance_norm(x, None, None, s, s), want)


# 19 ------------------------------------------------------------------------------------------
ZERO = [(0, 6), (3, 0), (2, 0, 4), (0, 6, 5), (2, 6, 0), (0, 6, 5, 3), (4, 6, 0, 3)]


@pytest.mark.parametrize("shape", ZERO)
@pytest.mark.parametrize("name", OPS)
def test_19_zero_size_gives_empty_output(name, shape):
    _present(name)
    e = ENTRIES[name]
    base = name.removesuffix("_backward")
    if base in ("layer_norm", "rms_norm") and len(shape) < 4:
        pytest.skip("normalized_shape (5, 3) needs 4-D here; covered by the fuzzer")
    if len(shape) < 3 and base in ("local_response_norm",):
        with pytest.raises(rn.ShapeError, match=r"at least 3 dimensions"):
            e.call(*[np.zeros(shape, F32) for _ in _inputs(name, F32)])
        return
    if base in ("group_norm", "iter_norm", "tlu", "gdn", "filter_response_norm",
                "instance_norm", "batch_norm", "local_response_norm") and (
            len(shape) < 2 or shape[1] != 6):
        pytest.skip("the parameters in registry.SIMPLE are for 6 channels")
    if base in ("layer_norm", "rms_norm") and shape[-2:] != (5, 3):
        pytest.skip("normalized_shape (5, 3)")
    if base == "mean_variance_norm" and len(shape) != 4:
        pytest.skip("default axes (0, 2, 3) need 4-D; other ranks are fuzzed")
    arrays = [np.zeros(shape, F32) for _ in _inputs(name, F32)]
    try:
        res = e.call(*arrays)
    except rn.RsnormError as err:
        # Documented: statistics that need at least one value (iter_norm's covariance).
        assert base == "iter_norm" and "at least one value" in str(err), err
        return
    for r in _flat(res):
        if r.shape == shape:
            assert r.size == 0
    first = _flat(res)[0]
    want = (shape[1],) if base == "moments" else shape
    assert first.shape == want
    assert first.dtype == (F64 if base == "moments" else F32)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
def test_19_zero_size_statistics_are_nan(shape):
    x = np.zeros(shape, F32)
    m = rn.moments(x, 1)
    assert m.count == (0 if 0 in (shape[0],) + shape[2:] else m.count)
    if m.count == 0:
        assert np.isnan(m.mean).all()
    y, st = rn.batch_norm(x, training=True, return_stats=True)
    assert y.shape == shape and st.mean.shape == (shape[1],)
    if m.count == 0:
        assert np.isnan(st.mean).all()
