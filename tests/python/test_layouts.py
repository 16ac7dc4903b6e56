"""Any strides, read in place (SPEC §2, HOSTILE 14-16): a strided input gives results bitwise
equal to its contiguous copy's; row-wise norms are row independent; inputs are never modified.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

DTYPES = [np.float16, np.float32, np.float64]
# (N, C, H, W) big enough that blocked / parallel code paths are used.
SHAPE = (16, 12, 32, 32)  # float32: above the parallel threshold; its halves below it


def _outputs(res):
    """Flatten an op's result (array, (y, stats) or Moments) to a list of arrays."""
    if isinstance(res, rn.Moments):
        return [np.asarray(res.count), res.mean, res.m2]
    if isinstance(res, tuple):
        y, stats = res
        return [y] + [s for s in (stats.mean, stats.rstd) if s is not None]
    return [res]


# Each op is called as op(x, axis) on an array whose channel axis is `axis` (1 or -1). The
# row-wise norms normalize over the trailing dims (they ignore `axis`).
OPS = {
    "batch_norm_train": lambda x, axis: rn.batch_norm(x, training=True, axis=axis,
                                                      return_stats=True),
    "batch_norm_eval": lambda x, axis: rn.batch_norm(
        x, np.linspace(-1, 1, x.shape[axis]), np.linspace(0.5, 2, x.shape[axis]),
        np.linspace(0.5, 1.5, x.shape[axis]), np.linspace(-0.2, 0.2, x.shape[axis]), axis=axis),
    "layer_norm_1": lambda x, axis: rn.layer_norm(x, x.shape[-1:], return_stats=True),
    "layer_norm_2": lambda x, axis: rn.layer_norm(
        x, x.shape[-2:], np.linspace(0.5, 1.5, x.shape[-1]) * np.ones(x.shape[-2:]),
        np.full(x.shape[-2:], 0.25), return_stats=True),
    "rms_norm_1": lambda x, axis: rn.rms_norm(x, x.shape[-1:], return_stats=True),
    "rms_norm_3": lambda x, axis: rn.rms_norm(x, x.shape[-3:], return_stats=True),
    "group_norm": lambda x, axis: rn.group_norm(
        x, 3, np.linspace(0.5, 1.5, x.shape[axis]), np.linspace(-1, 1, x.shape[axis]),
        axis=axis, return_stats=True),
    "instance_norm": lambda x, axis: rn.instance_norm(x, axis=axis, return_stats=True),
    "moments": lambda x, axis: rn.moments(x, axis=axis),
}


def _variants(base):
    """Strided views of (N, C, H, W) data; each keeps the channel axis at 1."""
    ro = base.copy()
    ro.setflags(write=False)
    small = base[:, :, :1, :]
    return {
        "channel_step": base[:, ::2],  # 6 channels: still divisible by 3 groups
        "reversed_batch": base[::-1],
        "reversed_last": base[..., ::-1],
        "step_last": base[..., ::2],
        "offset_slices": base[1:-1, :, 2:, 3:],
        "fortran": np.asfortranarray(base),
        "transposed_spatial": base.transpose(0, 1, 3, 2),
        "broadcast": np.broadcast_to(small, base.shape),
        "readonly": ro,
    }


VARIANT_NAMES = list(_variants(np.zeros((2, 2, 2, 2))))


def _check_same(op, v, axis):
    got = _outputs(op(v, axis))
    want = _outputs(op(np.ascontiguousarray(v), axis))
    for k, (g, w) in enumerate(zip(got, want)):
        ref.assert_bitwise_equal(g, w, f"output {k}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("op", list(OPS))
def test_strided_equals_contiguous(rng, op, variant, dtype):
    base = ref.make_input(rng, SHAPE, dtype)
    v = _variants(base)[variant]
    before = v.copy()
    _check_same(OPS[op], v, 1)
    ref.assert_bitwise_equal(v, before, "input was modified")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", [o for o in OPS if not o.startswith(("layer", "rms"))])
def test_channels_last_transpose_of_nchw_buffer(rng, op, dtype):
    base = ref.make_input(rng, SHAPE, dtype)
    nhwc_view = base.transpose(0, 2, 3, 1)  # no copy: channels-last view of an NCHW buffer
    assert not nhwc_view.flags.c_contiguous
    _check_same(OPS[op], nhwc_view, -1)
    # And the channels-last result agrees with the NCHW one on the same data (not bitwise:
    # the reduction order may differ), for ops whose result has the input's layout.
    if op != "moments":
        y_cl = _outputs(OPS[op](nhwc_view, -1))[0]
        y_nc = _outputs(OPS[op](base, 1))[0]
        tol = {np.float16: 4e-3, np.float32: 1e-5, np.float64: 1e-12}[dtype]
        np.testing.assert_allclose(np.moveaxis(y_cl, -1, 1).astype(np.float64),
                                   y_nc.astype(np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("op", ["layer_norm_1", "rms_norm_1", "layer_norm_2", "rms_norm_3"])
def test_row_norms_on_transposed_views(rng, op):
    base = ref.make_input(rng, SHAPE, np.float32)
    for perm in [(0, 1, 3, 2), (3, 2, 1, 0), (2, 0, 3, 1)]:
        _check_same(OPS[op], base.transpose(perm), 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["layer_norm_1", "layer_norm_2", "rms_norm_1", "rms_norm_3",
                                "group_norm", "instance_norm"])
def test_row_independence(rng, op, dtype):
    # Rows (samples) are normalized independently: dropping the last one changes nothing else.
    x = ref.make_input(rng, SHAPE, dtype)
    full = _outputs(OPS[op](x, 1))
    part = _outputs(OPS[op](x[:-1], 1))
    for k, (f, p) in enumerate(zip(full, part)):
        ref.assert_bitwise_equal(f[:-1], p, f"output {k}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_short_rows_independent(rng, dtype):
    x = ref.make_input(rng, (4099, 7), dtype)
    ref.assert_bitwise_equal(rn.layer_norm(x, (7,))[:-1], rn.layer_norm(x[:-1], (7,)))
    ref.assert_bitwise_equal(rn.rms_norm(x, (7,))[:-1], rn.rms_norm(x[:-1], (7,)))
    ref.assert_bitwise_equal(rn.layer_norm(x, (7,))[1:], rn.layer_norm(x[1:], (7,)))


def test_strided_parameters(rng):
    x = ref.make_input(rng, (5, 6, 7), np.float32)
    buf = rng.random((4, 12)).astype(np.float32) + 0.5
    w_view, b_view = buf[0, ::2], buf[1, 1::2]
    rm_view, rv_view = buf[2, ::-2], buf[3, ::2]
    args = (w_view, b_view, rm_view, rv_view)
    copies = tuple(np.ascontiguousarray(a) for a in args)
    y_view = rn.batch_norm(x, rm_view, rv_view, w_view, b_view)
    y_copy = rn.batch_norm(x, copies[2], copies[3], copies[0], copies[1])
    ref.assert_bitwise_equal(y_view, y_copy)
    ref.assert_bitwise_equal(rn.group_norm(x, 2, w_view, b_view),
                             rn.group_norm(x, 2, copies[0], copies[1]))
    w2 = rng.random((7, 2)).astype(np.float32)
    ref.assert_bitwise_equal(rn.layer_norm(x, (7,), w2[:, 0], w2[:, 1]),
                             rn.layer_norm(x, (7,), w2[:, 0].copy(), w2[:, 1].copy()))


def test_strided_running_stats_updated_in_place(rng):
    x = ref.make_input(rng, (5, 6, 7), np.float32)
    buf = np.arange(24, dtype=np.float32).reshape(2, 12) / 10 + 1
    untouched = buf.copy()
    rm_view, rv_view = buf[0, ::2], buf[1, ::-2]
    rm_c, rv_c = rm_view.copy(), rv_view.copy()
    rn.batch_norm(x, rm_view, rv_view, training=True)
    rn.batch_norm(x, rm_c, rv_c, training=True)
    ref.assert_bitwise_equal(rm_view, rm_c)
    ref.assert_bitwise_equal(rv_view, rv_c)
    ref.assert_bitwise_equal(buf[0, 1::2], untouched[0, 1::2], "neighbours overwritten")
    ref.assert_bitwise_equal(buf[1, -2::-2], untouched[1, -2::-2], "neighbours overwritten")


@pytest.mark.parametrize("kind", ["strided", "fortran"])
def test_non_contiguous_out_is_written_correctly_or_refused(rng, kind):
    x = ref.make_input(rng, (6, 5, 8), np.float32)
    want = rn.layer_norm(x, (8,))
    if kind == "strided":
        out = np.zeros((6, 5, 16), np.float32)[..., ::2]
    else:
        out = np.asfortranarray(np.zeros((6, 5, 8), np.float32))
    try:
        got = rn.layer_norm(x, (8,), out=out)
    except ValueError:
        return  # refusing a non-contiguous out is allowed
    assert got is out
    ref.assert_bitwise_equal(out, want)


def test_inputs_and_parameters_never_modified(rng):
    x = ref.make_input(rng, (4, 6, 5, 5), np.float32)
    w = (1 + rng.random(6)).astype(np.float32)
    b = rng.random(6).astype(np.float32)
    rm = rng.random(6).astype(np.float32)
    rv = (1 + rng.random(6)).astype(np.float32)
    w5 = (1 + rng.random((5, 5))).astype(np.float64)
    b5 = rng.random((5, 5)).astype(np.float16)
    arrays = (x, w, b, rm, rv, w5, b5)
    before = [a.copy() for a in arrays]
    rn.batch_norm(x, rm, rv, w, b, training=False)
    rn.batch_norm(x, None, None, w, b, training=True)
    rn.layer_norm(x, (5, 5), w5, b5)
    rn.rms_norm(x, (5, 5), w5)
    rn.group_norm(x, 2, w, b)
    rn.instance_norm(x, None, None, w, b)
    rn.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    rn.moments(x)
    for a, a0 in zip(arrays, before):
        ref.assert_bitwise_equal(a, a0, "an input was modified")


@pytest.mark.parametrize("op", [o for o in OPS if not o.startswith(("layer", "rms"))])
def test_positive_and_negative_axis_agree(rng, op):
    x = ref.channels_last(ref.make_input(rng, (4, 6, 5, 7), np.float32))
    for a, b in zip(_outputs(OPS[op](x, -1)), _outputs(OPS[op](x, 3))):
        ref.assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 37), (7, 1000), (65, 64), (1, 5), (5, 1), (130, 2),
                                   (3000, 24)])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_fortran_two_dimensional_row_norm_backward(rng, op, shape, dtype):
    # 2-D Fortran-order x and grad_y take the block path of the row backward (features of a
    # block of rows read side by side from the transposed memory; (3000, 24) spans several
    # tasks of parameter partials). Bitwise the contiguous result: dx, dweight, dbias, with the
    # statistics recomputed or given, with and without parameters, on 1 and 2 threads; -0.0
    # in grad_y must not leak a sign.
    x = ref.make_input(rng, shape, dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    gy[::3, ::2] = -0.0
    f = shape[1]
    w = np.linspace(0.5, 1.5, f).astype(dtype)
    fwd = getattr(rn, op)
    bwd = getattr(rn, op + "_backward")
    params = [(w, w[::-1].copy()), (None, None), (w, None)] if op == "layer_norm" else [(w,), (None,)]
    for p in params:
        _, stats = fwd(np.ascontiguousarray(x), f, *p, return_stats=True)
        for st in (None, stats):
            want = bwd(np.ascontiguousarray(gy), np.ascontiguousarray(x), f, *p, stats=st)
            for v, g in ((np.asfortranarray(x), np.asfortranarray(gy)),
                         (np.ascontiguousarray(x.T).T, np.asfortranarray(gy))):
                for threads in (1, 2):
                    rn.set_num_threads(threads)
                    try:
                        got = bwd(g, v, f, *p, stats=st)
                    finally:
                        rn.set_num_threads(0)
                    for a, e in zip(got, want):
                        if e is None:
                            assert a is None
                        else:
                            ref.assert_bitwise_equal(a, e, f"{op} backward {shape} {p is None}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 37), (7, 1000), (65, 64), (1, 5), (5, 1), (130, 2)])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_fortran_two_dimensional_row_norms(rng, op, shape, dtype):
    # 2-D Fortran-order inputs (and transposes of C-contiguous arrays) take the block path:
    # the rows of a block summed side by side from the transposed memory. Bitwise the
    # contiguous result (outputs and statistics), with out= in either order.
    x = ref.make_input(rng, shape, dtype)
    f = shape[1]
    w = np.linspace(0.5, 1.5, f).astype(dtype)

    def run(v, out=None):
        if op == "layer_norm":
            return rn.layer_norm(v, f, w, w[::-1].copy(), out=out, return_stats=True)
        return rn.rms_norm(v, f, w, out=out, return_stats=True)

    want = run(np.ascontiguousarray(x))
    for v in (np.asfortranarray(x), np.ascontiguousarray(x.T).T):
        assert v.flags.f_contiguous
        for out in (None, np.empty_like(x, order="F"), np.empty_like(x, order="C")):
            got = run(v, out)
            for g, e in zip(_outputs(got), _outputs(want)):
                ref.assert_bitwise_equal(g, e, f"{op} {shape}")
