"""Smoke test of the GPU benchmark (lavapipe numbers are not performance; this checks it runs,
checks outputs against the references and writes sane JSON)."""

from __future__ import annotations

import json
import math

import pytest

gpu = pytest.importorskip("rsnorm.gpu", reason="rsnorm.gpu needs wgpu-py")
if not gpu.is_available():
    pytest.skip("no GPU adapter (not even lavapipe)", allow_module_level=True)

from rsnorm.gpu import bench


def test_bench_smoke(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    rc = bench.main(["--smoke", "--ops", "bn,ln,rms,gn,lrn,ln_bwd,bn_bwd", "--no-torch",
                     "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())
    assert [r["op"] for r in rows] == ["bn", "ln", "rms", "gn", "lrn", "ln_bwd", "bn_bwd"]
    for r in rows:
        assert r["wall_ms"] > 0 and math.isfinite(r["gbps"]) and r["gbps"] > 0
        assert r["numpy_roundtrip_ms"] > 0
        if r["max_err_over_tol"] is not None:
            assert r["max_err_over_tol"] <= 1.0
    text = capsys.readouterr().out
    assert "GB/s" in text and "smoke test" in text


def test_bench_reduction_workgroup_sweep(tmp_path, capsys):
    # --red-wg times each op again with the reduction workgroup size forced (checked against the
    # reference under each), and leaves the default afterwards.
    path = tmp_path / "sweep.json"
    rc = bench.main(["--smoke", "--ops", "ln,gn_bwd", "--no-torch", "--red-wg", "64,128",
                     "--keep-x", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())
    assert [(r["op"], r["variant"]) for r in rows] == [
        (op, v) for op in ("ln", "gn_bwd") for v in (None, "64", "128", "keep_x")]
    assert [r["red_wg"] for r in rows[:4]] == [None, 64, 128, None]
    assert all(r["max_err_over_tol"] is None or r["max_err_over_tol"] <= 1.0 for r in rows)
    text = capsys.readouterr().out
    assert "ln@64" in text and "ln@keep_x" in text
    assert not gpu._device._overrides
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--red-wg", "48"])


def test_bench_rejects_unknown_op():
    with pytest.raises(SystemExit):
        bench.main(["--ops", "nope"])


@pytest.mark.parametrize("op", ["bn", "ln", "rms", "gn", "gdn", "ln_bwd", "bn_bwd"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_torch_side_runs(op, layout):
    # The torch half of the comparison only runs on CUDA machines; exercise its code on the CPU.
    pytest.importorskip("torch")
    import numpy as np

    shape, kw = bench._shapes(op, 2**14, layout)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32) if op.endswith("_bwd") else None
    C = shape[-1] if kw.get("axis") == -1 or op in ("ln", "rms", "ln_bwd") else shape[1]
    res = bench._torch_bench(op, x, dy, bench._params(rng, C), kw, 2, dev="cpu")
    assert res is not None and res[0] > 0 and res[1] > 0
