"""HOSTILE.md items 12-13: dtypes and byte order, for every array op in the registry."""

from __future__ import annotations

import re

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

from .registry import ENTRIES, SIMPLE

F32, F64 = np.float32, np.float64
OPS = sorted(n for n, e in ENTRIES.items() if e.call is not None)
BAD = [np.int8, np.int32, np.int64, np.uint16, bool, np.complex64, np.complex128, object,
       "U3", "S2", "datetime64[s]", np.longdouble]


def _present(name):
    if not hasattr(rn, name):
        pytest.skip(f"{name} not public yet")


def _inputs(name, dtype):
    x = ref.make_input(np.random.default_rng(0), (4, 6, 5, 3), F64)
    if name.endswith("_backward"):
        return (np.cos(x).astype(dtype), x.astype(dtype))
    return (x.astype(dtype),)


@pytest.mark.parametrize("dtype", BAD, ids=str)
@pytest.mark.parametrize("name", OPS)
def test_12_bad_dtype_is_type_error_naming_it(name, dtype):
    _present(name)
    arrays = [a.astype(dtype) if np.dtype(dtype) != object else a.astype(object)
              for a in _inputs(name, F64)]
    dt = re.escape(str(np.dtype(dtype)))
    with pytest.raises(TypeError, match=rf"dtype {dt}.*float16, float32, float64|{dt}"):
        ENTRIES[name].call(*arrays)


@pytest.mark.parametrize("name", OPS)
def test_12_non_array_is_type_error(name):
    _present(name)
    arrays = [a.tolist() for a in _inputs(name, F32)]
    with pytest.raises(TypeError, match=r"numpy.ndarray|ndarray"):
        ENTRIES[name].call(*arrays)


@pytest.mark.parametrize("wdtype", [np.float16, F32, F64])
@pytest.mark.parametrize("xdtype", [np.float16, F32, F64])
def test_12_mixed_dtypes_output_has_x_dtype(xdtype, wdtype):
    """Parameters of any float dtype are read exactly as float64; y has x's dtype."""
    rng = np.random.default_rng(1)
    x = ref.make_input(rng, (4, 6, 5), xdtype)
    w = (0.5 + rng.random(6)).astype(wdtype)
    b = rng.standard_normal(6).astype(wdtype)
    y = rn.group_norm(x, 3, w, b)
    want = ref.group_norm(x, 3, w, b)[0]
    ref.assert_output_close(y, want, xdtype)
    y = rn.batch_norm(x, weight=w, bias=b, training=True)
    ref.assert_output_close(y, ref.batch_norm(x, weight=w, bias=b, training=True)[0], xdtype)


def test_12_out_of_another_dtype_is_type_error():
    x = np.ones((2, 3), F32)
    with pytest.raises(TypeError, match=r"out has dtype float64, but the result has dtype "
                                        r"float32"):
        rn.layer_norm(x, 3, out=np.empty((2, 3), F64))


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2"])
@pytest.mark.parametrize("name", OPS)
def test_13_big_endian_is_type_error_naming_byte_order(name, dtype):
    _present(name)
    arrays = _inputs(name, np.dtype(dtype).newbyteorder("="))
    arrays = [a.astype(dtype) for a in arrays]
    with pytest.raises(TypeError, match=r"non-native byte order"):
        ENTRIES[name].call(*arrays)


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_13_big_endian_parameter_is_type_error(dtype):
    x = np.ones((4, 3), F32)
    with pytest.raises(TypeError, match=r"^weight has non-native byte order"):
        rn.batch_norm(x, weight=np.ones(3, dtype))
    with pytest.raises(TypeError, match=r"^running_mean has non-native byte order"):
        rn.batch_norm(x, np.zeros(3, dtype), np.ones(3), training=True)


def test_13_never_a_silent_reinterpretation():
    x = np.arange(12, dtype=">f4").reshape(4, 3)
    raised = False
    try:
        y = rn.batch_norm(x, training=True)
    except TypeError:
        raised = True
    if not raised:  # correct values are the other allowed outcome
        ref.assert_output_close(y, ref.batch_norm(x.astype(F32), training=True)[0], F32)


def test_simple_calls_cover_every_forward_op():
    assert set(SIMPLE) <= set(ENTRIES)
