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


def test_bench_rejects_unknown_op():
    with pytest.raises(SystemExit):
        bench.main(["--ops", "nope"])
