"""rsnorm.dask: chunked normalization of Dask arrays equals the in-memory rsnorm result.

Chunkings cover one chunk, uneven chunks, an empty chunk, and chunks along and across the
normalized axes; schedulers: synchronous, threaded and a ``dask.distributed.LocalCluster`` of two
workers. References: the in-memory rsnorm ops (float64 tolerance 1e-12) and, for the statistics
and ``standardize``, plain float64 NumPy formulas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="dask is not installed (pip install 'rsnorm[dask]')")
import dask
import rsnorm as rn
import rsnorm.dask as rd
from reference import batch_norm as ref_batch_norm

ROOT = Path(__file__).resolve().parents[2]
F32, F64 = np.float32, np.float64

SHAPE = (13, 6, 5, 4)
CHUNKINGS = {
    "one": SHAPE,
    "batch_uneven": ((5, 1, 7), 6, 5, 4),
    "batch_empty_chunk": ((0, 6, 7), 6, 5, 4),
    "channels": (13, (2, 3, 1), 5, 4),
    "spatial": (13, 6, (2, 3), (1, 3)),
    "all": ((4, 4, 5), (3, 3), (1, 4), (2, 2)),
}


def close(got, ref, dtype=F64):
    got = np.asarray(got)
    assert got.shape == ref.shape and got.dtype == np.dtype(dtype)
    if np.dtype(dtype) == F64:
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_allclose(got, ref, rtol=3e-6, atol=3e-6)


@pytest.fixture(params=["sync", "threads"])
def scheduler(request):
    with dask.config.set(scheduler=request.param):
        yield request.param


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip(
        "dask.distributed", reason="dask.distributed is not installed (pip install distributed)")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as c:
        yield c


def data(rng, shape=SHAPE, dtype=F64):
    return (0.7 + 2.0 * rng.standard_normal(shape)).astype(dtype)


# ---------------------------------------------------------------------------------------------
# moments and batch norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_moments(rng, chunks, scheduler):
    x = data(rng)
    m = rd.moments(da.from_array(x, chunks=chunks), axis=1, split_every=2)
    mean, m2 = dask.compute(m.mean, m.m2)
    assert m.count == 13 * 5 * 4
    ref_mean = x.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(m2, ((x - ref_mean[:, None, None]) ** 2).sum(axis=(0, 2, 3)),
                               rtol=1e-13)


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_batch_norm_training(rng, chunks, scheduler):
    x = data(rng)
    w, b = rng.uniform(0.5, 1.5, 6), rng.standard_normal(6)
    y, st = rd.batch_norm(da.from_array(x, chunks=chunks), None, None, w, b, training=True,
                          return_stats=True)
    assert isinstance(y, da.Array) and y.chunks == da.from_array(x, chunks=chunks).chunks
    want, want_st = rn.batch_norm(x, None, None, w, b, training=True, return_stats=True)
    close(y.compute(), want)
    np.testing.assert_allclose(st.mean.compute(), want_st.mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(st.rstd.compute(), want_st.rstd, rtol=1e-13)


@pytest.mark.parametrize("chunks", [CHUNKINGS["all"], CHUNKINGS["batch_empty_chunk"]],
                         ids=["all", "batch_empty_chunk"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_batch_norm_running_stats(rng, chunks, dtype):
    x = data(rng, dtype=dtype)
    xd = da.from_array(x, chunks=chunks)
    rm0, rv0 = rng.standard_normal(6).astype(dtype), rng.uniform(0.5, 2, 6).astype(dtype)
    rm, rv, srm, srv = rm0.copy(), rv0.copy(), rm0.copy(), rv0.copy()
    y = rd.batch_norm(xd, rm, rv, training=True, momentum=0.3)
    want = rn.batch_norm(x, srm, srv, training=True, momentum=0.3)
    # The running statistics are updated at the call, before y is computed.
    _, _, _, ref_rm, ref_rv = ref_batch_norm(x, rm0, rv0, training=True, momentum=0.3)
    if dtype == F64:
        np.testing.assert_allclose(rm, ref_rm, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(rv, ref_rv, rtol=1e-12)
    else:
        np.testing.assert_allclose(rm, srm, rtol=2.5e-7, atol=1e-7)
        np.testing.assert_allclose(rv, srv, rtol=2.5e-7)
    close(y.compute(), want.astype(F64) if dtype == F64 else want, dtype)

    # Eval with running statistics: a pure map_blocks, the same kernel on every chunk.
    ye = rd.batch_norm(xd, rm, rv)
    rm_before = rm.copy()
    rm += 100.0  # the lazy graph took a snapshot
    close(ye.compute(), rn.batch_norm(x, rm_before, rv), dtype)


def test_batch_norm_channels_last_and_2d(rng, scheduler):
    x = data(rng, (7, 3, 4, 5))
    y = rd.batch_norm(da.from_array(x, chunks=((3, 4), 3, (1, 3), (2, 3))), training=True,
                      axis=-1)
    close(y.compute(), rn.batch_norm(x, training=True, axis=-1))
    t = data(rng, (50, 7))
    y = rd.batch_norm(da.from_array(t, chunks=((20, 30), (3, 4))), training=True)
    close(y.compute(), rn.batch_norm(t, training=True))


def test_batch_norm_empty_batch():
    rm, rv, nbt = np.zeros(3), np.ones(3), np.array(2, np.int64)
    y = rd.batch_norm(da.zeros((0, 3, 4), chunks=(1, 2, 4)), rm, rv, training=True,
                      num_batches_tracked=nbt)
    assert y.compute().shape == (0, 3, 4)
    assert not rm.any() and np.array_equal(rv, np.ones(3)) and int(nbt) == 2


def test_batch_norm_momentum_none_and_onnx(rng):
    x = data(rng)
    xd = da.from_array(x, chunks=CHUNKINGS["all"])
    rm, rv, nbt = np.zeros(6), np.ones(6), np.array(3, np.int64)
    rd.batch_norm(xd, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    _, _, _, ref_rm, ref_rv = ref_batch_norm(x, np.zeros(6), np.ones(6), training=True,
                                             momentum=None, num_batches_tracked=np.array(3))
    assert int(nbt) == 4
    np.testing.assert_allclose(rm, ref_rm, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rv, ref_rv, rtol=1e-12)
    rm, rv = np.zeros(6), np.ones(6)
    rd.batch_norm(xd, rm, rv, training=True, momentum=0.9, momentum_convention="onnx")
    _, _, _, ref_rm, ref_rv = ref_batch_norm(x, np.zeros(6), np.ones(6), training=True,
                                             momentum=0.9, momentum_convention="onnx")
    np.testing.assert_allclose(rm, ref_rm, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rv, ref_rv, rtol=1e-12)


class Counter:
    """Counts the chunks of x that were read, to check what is lazy and what is not."""

    def __init__(self):
        self.n = 0
        self.lock = threading.Lock()

    def __call__(self, block):
        with self.lock:
            self.n += 1
        return block


def test_laziness_and_compute_stats(rng):
    x = data(rng)
    reads = Counter()
    xd = da.from_array(x, chunks=CHUNKINGS["all"]).map_blocks(
        reads, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))
    nblocks = xd.npartitions
    y = rd.batch_norm(xd, training=True)
    assert reads.n == 0, "training without running stats must stay lazy"
    y.compute(scheduler="sync")
    assert reads.n == nblocks  # each chunk read once: statistics and normalize share it
    reads.n = 0
    y = rd.batch_norm(xd, training=True, compute_stats=True)
    assert reads.n == nblocks  # the statistics pass, now
    close(y.compute(scheduler="sync"), rn.batch_norm(x, training=True))
    assert reads.n == 2 * nblocks  # the normalize pass reads x again


# ---------------------------------------------------------------------------------------------
# standardize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", [(40, 5), ((17, 0, 23), (2, 3)), ((1, 39), 5)],
                         ids=["one", "uneven_empty", "single_row"])
def test_standardize(rng, chunks, scheduler):
    x = rng.standard_normal((40, 5)) * [1, 10, 1e-3, 5, 1] + [0, 100, -3, 1e4, 2]
    x[:, 4] = 2.5  # a constant feature is only centered
    y, st = rd.standardize(da.from_array(x, chunks=chunks), return_stats=True)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[4] = 1.0
    close(y.compute(), (x - mean) / std)
    np.testing.assert_allclose(st.mean.compute(), mean, rtol=1e-13)
    y1 = rd.standardize(da.from_array(x, chunks=chunks), ddof=1, compute_stats=True)
    s1 = x.std(axis=0, ddof=1)
    s1[4] = 1.0
    close(y1.compute(), (x - mean) / s1)


def test_standardize_nd_and_numpy_input(rng):
    x = data(rng, (6, 4, 3))
    y = rd.standardize(x, axis=1, eps=1e-3)  # a NumPy array is wrapped as one chunk
    mean = x.mean(axis=(0, 2), keepdims=True)
    close(y.compute(), (x - mean) / np.sqrt(x.var(axis=(0, 2), keepdims=True) + 1e-3))
    v = rng.standard_normal(30)
    close(rd.standardize(da.from_array(v, chunks=7)).compute(), (v - v.mean()) / v.std())


# ---------------------------------------------------------------------------------------------
# per-row norms
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
def test_row_norms(rng, chunks, scheduler):
    x = data(rng)
    xd = da.from_array(x, chunks=chunks)
    wl, bl = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    close(rd.layer_norm(xd, (5, 4), wl, bl).compute(), rn.layer_norm(x, (5, 4), wl, bl))
    close(rd.layer_norm(xd, 4).compute(), rn.layer_norm(x, 4))
    close(rd.rms_norm(xd, (5, 4), wl).compute(), rn.rms_norm(x, (5, 4), wl))
    w, b = rng.standard_normal(6), rng.standard_normal(6)
    for g in (1, 2, 3, 6):
        close(rd.group_norm(xd, g, w, b).compute(), rn.group_norm(x, g, w, b))
    close(rd.instance_norm(xd, weight=w, bias=b).compute(),
          rn.instance_norm(x, weight=w, bias=b))


def test_group_norm_channel_chunks_at_group_boundaries(rng):
    x = data(rng, (4, 8, 3))
    xd = da.from_array(x, chunks=(2, (4, 2, 2), 3))
    y = rd.group_norm(xd, 4, rechunk=False)  # chunks of whole groups need no rechunk
    assert y.chunks == xd.chunks
    close(y.compute(), rn.group_norm(x, 4))
    with pytest.raises(ValueError, match="rechunk"):
        rd.group_norm(da.from_array(x, chunks=(2, (3, 5), 3)), 4, rechunk=False)
    close(rd.group_norm(da.from_array(x, chunks=(2, (3, 5), 3)), 4).compute(),
          rn.group_norm(x, 4))
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    close(rd.group_norm(da.from_array(xl, chunks=(1, 2, 4)), 2, axis=-1).compute(),
          rn.group_norm(xl, 2, axis=-1))


def test_rechunk_false_names_the_axes(rng):
    xd = da.from_array(data(rng), chunks=CHUNKINGS["spatial"])
    with pytest.raises(ValueError, match=r"axes \(2, 3\)"):
        rd.layer_norm(xd, (5, 4), rechunk=False)
    with pytest.raises(ValueError, match="rechunk"):
        rd.instance_norm(xd, rechunk=False)
    rd.layer_norm(da.from_array(data(rng), chunks=CHUNKINGS["batch_uneven"]), (5, 4),
                  rechunk=False)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_instance_norm_running_stats(rng, dtype):
    x = data(rng, dtype=dtype)
    xd = da.from_array(x, chunks=CHUNKINGS["all"])
    rm0, rv0 = rng.standard_normal(6).astype(dtype), rng.uniform(0.5, 2, 6).astype(dtype)
    rm, rv, srm, srv = rm0.copy(), rv0.copy(), rm0.copy(), rv0.copy()
    y = rd.instance_norm(xd, rm, rv, momentum=0.2)
    want = rn.instance_norm(x, srm, srv, momentum=0.2)
    close(y.compute(), want, dtype)
    tol = {"rtol": 1e-12, "atol": 1e-15} if dtype == F64 else {"rtol": 2.5e-7, "atol": 1e-7}
    np.testing.assert_allclose(rm, srm, **tol)
    np.testing.assert_allclose(rv, srv, **tol)
    ye = rd.instance_norm(xd, rm, rv, use_input_stats=False)
    close(ye.compute(), rn.instance_norm(x, rm, rv, use_input_stats=False), dtype)


def test_float32_and_float16(rng):
    for dtype in (F32, np.float16):
        x = data(rng, dtype=dtype)
        xd = da.from_array(x, chunks=CHUNKINGS["all"])
        y = rd.batch_norm(xd, training=True).compute()
        assert y.dtype == dtype
        # The chunked statistics differ from the in-memory ones only in the last float64 bits.
        np.testing.assert_allclose(y.astype(F64), rn.batch_norm(x, training=True).astype(F64),
                                   rtol=0, atol=2 * float(np.finfo(dtype).eps) * 4)
        assert rd.layer_norm(xd, (5, 4)).compute().dtype == dtype


# ---------------------------------------------------------------------------------------------
# schedulers: the same bits everywhere
# ---------------------------------------------------------------------------------------------

def test_same_bits_on_every_scheduler(rng, client):
    x = data(rng)
    xd = da.from_array(x, chunks=CHUNKINGS["all"])
    w = rng.standard_normal(6)
    graphs = {
        "bn": rd.batch_norm(xd, None, None, w, None, training=True),
        "std": rd.standardize(xd, axis=1),
        "ln": rd.layer_norm(xd, (5, 4)),
        "gn": rd.group_norm(xd, 3, w),
        "in": rd.instance_norm(xd),
    }
    sync = dask.compute(graphs, scheduler="sync")[0]
    threads = dask.compute(graphs, scheduler="threads")[0]
    cluster = client.compute(graphs, sync=True)
    for k in graphs:
        assert sync[k].tobytes() == threads[k].tobytes() == cluster[k].tobytes(), k
    close(cluster["bn"], rn.batch_norm(x, None, None, w, None, training=True))
    close(cluster["gn"], rn.group_norm(x, 3, w))
    # Training with running statistics computes them through the default scheduler: the client.
    rm, rv = np.zeros(6), np.ones(6)
    srm, srv = rm.copy(), rv.copy()
    with dask.config.set(scheduler=client.get):
        y = rd.batch_norm(xd, rm, rv, training=True)
    rn.batch_norm(x, srm, srv, training=True)
    np.testing.assert_allclose(rm, srm, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(rv, srv, rtol=1e-12)
    close(client.compute(y, sync=True), rn.batch_norm(x, training=True))


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_errors(rng):
    xd = da.from_array(data(rng), chunks=CHUNKINGS["all"])
    with pytest.raises(TypeError, match="int32"):
        rd.batch_norm(da.zeros((4, 3), dtype=np.int32), training=True)
    with pytest.raises(TypeError, match="dask"):
        rd.layer_norm([[1.0, 2.0]], 2)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        rd.batch_norm(da.ones((1, 3)), np.zeros(3), np.ones(3), training=True)
    with pytest.raises(ValueError, match="weight"):
        rd.batch_norm(xd, weight=np.ones(5), training=True)
    with pytest.raises(ValueError, match="axis"):
        rd.batch_norm(xd, axis=4)
    with pytest.raises(ValueError, match="eps"):
        rd.batch_norm(xd, eps=-1.0)
    with pytest.raises(ValueError, match="num_groups"):
        rd.group_norm(xd, 4)
    with pytest.raises(ValueError, match="normalized_shape"):
        rd.layer_norm(xd, (4, 5))
    with pytest.raises(ValueError, match="ddof"):
        rd.standardize(xd, ddof=-1)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        rd.batch_norm(xd, training=True, momentum=1.5)
    ro = np.zeros(6)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean is read-only"):
        rd.batch_norm(xd, ro, np.ones(6), training=True)
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        rd.standardize(xd[xd[:, 0, 0, 0] > 0])


# ---------------------------------------------------------------------------------------------
# the out-of-core example
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for peak memory")
def test_out_of_core_example_has_bounded_memory(tmp_path):
    size_mb, budget_mb = 64, 8
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "out_of_core.py"), "--size-mb", str(size_mb),
         "--budget-mb", str(budget_mb), "--verify", "--json", "--dir", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, RAYON_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["verified"], res
    assert res["size_mb"] >= size_mb - 1
    # The chunks' share is the budget; Dask and the thread pool add a fixed ~10 MiB. Holding
    # the array (as a lazy y whose graph also held the statistics would) needs >= 64 MiB.
    assert res["peak_rss_delta_mb"] < budget_mb + 24, res
