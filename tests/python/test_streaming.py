"""Streaming stores (src/stream.rs): outputs of 8 MiB or more are written around the caches.

The streamed kernel must give bitwise the cached one's result, whatever the alignment of the
output (the kernel writes an unaligned head and a tail with the scalar formula) and whatever
the dtype. The cached reference is the same op writing into a strided output (those never
stream), or the same rows computed from a small array.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import rsnorm as rn

STREAM_MIN = 8 << 20


def _strided_out(shape, dtype):
    """A writable non-contiguous array of `shape` (every other element of a bigger one)."""
    big = np.empty(shape[:-1] + (2 * shape[-1],), dtype)
    return big[..., ::2]


def _misaligned_out(shape, dtype, shift):
    """A C-contiguous output whose data starts `shift` elements past a 64-byte boundary."""
    n = int(np.prod(shape))
    buf = np.empty(n + 64, dtype)
    start = (-buf.ctypes.data // buf.itemsize) % (64 // buf.itemsize)
    return buf[start + shift:start + shift + n].reshape(shape)


OPS = {
    "layer_norm_affine": lambda x, **kw: rn.layer_norm(
        x, x.shape[-1:], np.linspace(0.5, 1.5, x.shape[-1]), np.linspace(-1, 1, x.shape[-1]),
        **kw),
    "layer_norm": lambda x, **kw: rn.layer_norm(x, x.shape[-1:], **kw),
    "rms_norm": lambda x, **kw: rn.rms_norm(x, x.shape[-1:], np.linspace(0.5, 2, x.shape[-1]),
                                            **kw),
    "batch_norm_train": lambda x, **kw: rn.batch_norm(
        x.reshape(x.shape[0], 8, -1, 7), training=True, **kw),
    "batch_norm_eval": lambda x, **kw: rn.batch_norm(
        x.reshape(x.shape[0], 8, -1, 7), np.linspace(-1, 1, 8), np.linspace(0.5, 2, 8),
        np.linspace(0.5, 1.5, 8), np.linspace(-0.2, 0.2, 8), **kw),
    # 16 channels: whole 64-byte lines per row, the rows that stream.
    "batch_norm_train_nhwc": lambda x, **kw: rn.batch_norm(
        x.reshape(x.shape[0], 7, -1, 16), training=True, axis=-1, **kw),
    "batch_norm_eval_nhwc": lambda x, **kw: rn.batch_norm(
        x.reshape(x.shape[0], 7, -1, 16), np.linspace(-1, 1, 16), np.linspace(0.5, 2, 16),
        np.linspace(0.5, 1.5, 16), np.linspace(-0.2, 0.2, 16), axis=-1, **kw),
    "instance_norm_nhwc": lambda x, **kw: rn.instance_norm(
        x.reshape(x.shape[0], 7, -1, 16), axis=-1, **kw),
    "instance_norm": lambda x, **kw: rn.instance_norm(x.reshape(x.shape[0], 8, -1, 7), **kw),
    "group_norm": lambda x, **kw: rn.group_norm(
        x.reshape(x.shape[0], 8, -1, 7), 4, np.linspace(0.5, 1.5, 8), np.linspace(-1, 1, 8),
        **kw),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", sorted(OPS))
def test_streamed_output_is_bitwise_the_cached_one(op, dtype):
    rng = np.random.default_rng(7)
    itemsize = np.dtype(dtype).itemsize
    # Rows of 7·8·k + odd lengths: vector bodies, heads and tails all occur.
    cols = 16 * 7 * 37
    rows = STREAM_MIN // (cols * itemsize) + 3
    x = (rng.standard_normal((rows, cols)) * 3 + 1e3).astype(dtype)
    fn = OPS[op]
    y = fn(x)
    assert y.nbytes >= STREAM_MIN
    cached = fn(x, out=_strided_out(y.shape, dtype))
    ref.assert_bitwise_equal(y, cached, op)
    for shift in (1, 3):
        got = fn(x, out=_misaligned_out(y.shape, dtype, shift))
        ref.assert_bitwise_equal(got, cached, f"{op} shift={shift}")
    assert np.isfinite(y).all()


def test_streamed_layer_norm_matches_the_float64_formula():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((2100, 1031)) + 1e4).astype(np.float32)
    assert x.nbytes >= STREAM_MIN
    w, b = np.linspace(0.5, 1.5, 1031), np.linspace(-1, 1, 1031)
    y = rn.layer_norm(x, (1031,), w, b)
    ref.assert_output_close(y, ref.layer_norm(x, (1031,), w, b)[0], np.float32)


_BACKWARD_SCRIPT = """
import sys, numpy as np, rsnorm as rn
rng = np.random.default_rng(11)
x = (rng.standard_normal((8, 16, 130, 131)) * 2 + 3).astype(np.float32)
gy = rng.standard_normal(x.shape).astype(np.float32)
w, b = np.linspace(0.5, 1.5, 16), np.linspace(-1, 1, 16)
bn = rn.batch_norm_backward(gy, x, None, None, w, b, training=True)
gn = rn.group_norm_backward(gy, x, 4, w, b)
r = x.reshape(-1, 131)
gr = gy.reshape(-1, 131)
wr = np.linspace(0.5, 1.5, 131)
ln = rn.layer_norm_backward(gr, r, (131,), wr, wr)
ln0 = rn.layer_norm_backward(gr, r, (131,))
rms = rn.rms_norm_backward(gr, r, (131,), wr)
# Rows whose 32-value chunks are whole aligned cache lines (1024) or end in a half chunk (144):
# the grouped row path streams dx.
rows = {}
for f in (1024, 144):
    xr = (rng.standard_normal((2 * 2**21 // f + 3, f)) * 2 + 3).astype(np.float32)
    gq = rng.standard_normal(xr.shape).astype(np.float32)
    wq = np.linspace(0.5, 1.5, f)
    g = rn.layer_norm_backward(gq, xr, f, wq, wq)
    rows[f"ln{f}"], rows[f"ln{f}_w"], rows[f"ln{f}_b"] = g.x, g.weight, g.bias
    rows[f"rms{f}"] = rn.rms_norm_backward(gq, xr, f, wq).x
np.savez(sys.argv[1], bn=bn.x, bn_w=bn.weight, gn=gn.x, gn_w=gn.weight, ln=ln.x, ln_w=ln.weight,
         ln0=ln0.x, rms=rms.x, **rows)
"""


def test_streamed_backward_is_bitwise_the_cached_one(tmp_path):
    """dx of batch, group, layer and RMS norm (8.7 MB: streamed) equals the run with streaming
    off, for rows that the grouped row path streams too."""
    import os
    import subprocess
    import sys

    out = {}
    for mode in ("default", "off"):
        env = dict(os.environ)
        if mode == "off":
            env["RSNORM_STREAM_MIN_MB"] = "off"
        path = tmp_path / f"{mode}.npz"
        subprocess.run([sys.executable, "-c", _BACKWARD_SCRIPT, str(path)], env=env,
                       check=True)
        out[mode] = np.load(path)
    assert out["default"]["bn"].nbytes >= STREAM_MIN
    assert out["default"]["ln1024"].nbytes >= STREAM_MIN
    assert out["default"]["ln144"].nbytes >= STREAM_MIN
    for key in ("bn", "bn_w", "gn", "gn_w", "ln", "ln_w", "ln0", "rms", "ln1024", "ln1024_w",
                "ln1024_b", "rms1024", "ln144", "ln144_w", "ln144_b", "rms144"):
        ref.assert_bitwise_equal(out["default"][key], out["off"][key], key)
