"""The ``rsnorm`` command line: info, demo, check, bench (SPEC §7), and the references it uses."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import rsnorm
from rsnorm import _bench, _reference, cli

CORE_OPS = ("batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm", "moments")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsnorm", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


# --------------------------------------------------------------------------------------------
# Subcommands, end to end
# --------------------------------------------------------------------------------------------


def test_info_reports_version_threads_and_gpu():
    p = run_cli("info")
    assert p.returncode == 0, p.stderr
    assert rsnorm.__version__ in p.stdout
    assert "threads:" in p.stdout
    assert "gpu" in p.stdout
    if hasattr(rsnorm, "build_info"):
        simd = rsnorm.build_info().get("simd")
        if simd is not None:
            assert str(simd) in p.stdout


def test_demo_passes_and_lists_every_implemented_op():
    p = run_cli("demo")
    assert p.returncode == 0, p.stdout + p.stderr
    for op in CORE_OPS:
        assert op in p.stdout, op
    for case in cli.DEMO_CASES:
        if hasattr(rsnorm, case.op):
            assert case.op in p.stdout, case.op
    assert "FAIL" not in p.stdout and "ERROR" not in p.stdout
    assert "checks passed" in p.stdout


def test_check_passes():
    p = run_cli("check")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "check: passed" in p.stdout
    if importlib.util.find_spec("onnx") is not None:
        line = next(ln for ln in p.stdout.splitlines() if ln.startswith("onnx conformance"))
        # With onnx==1.22.0 the node data exists, so the core ops must actually be exercised.
        passed = int(line.split(":")[1].split()[0])
        assert passed > 0 or "no node test data" in p.stdout, line


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out


def test_bench_quick_json_and_plot(tmp_path):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    args = ["bench", "--quick", "--ops", "layer_norm", "--json", str(out),
            "--max-elements", "4096", "--min-time", "0.001", "--min-samples", "2",
            "--peers", "numpy,onnxruntime", "--threads", "1"]
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    if have_mpl:
        args += ["--plot", str(png)]
    p = run_cli(*args, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(out.read_text())
    for key in ("schema", "rsnorm_version", "versions", "machine", "threads", "quick",
                "results", "summary"):
        assert key in doc, key
    assert doc["threads"] == 1 and doc["quick"] is True
    assert doc["rsnorm_version"] == rsnorm.__version__
    results = doc["results"]
    assert results and all(r["op"] == "layer_norm" for r in results)
    for r in results:
        if r["function"] == "layer_norm_backward" and "rsnorm" in r["skipped"]:
            assert not r["impls"]  # not implemented yet: listed, nothing timed
            continue
        for key in ("workload", "shape", "dtype", "bytes", "copy", "impls", "ratios",
                    "ratios_out", "skipped"):
            assert key in r, key
        assert np.prod(r["shape"]) <= 4096
        arrays = 3 if r["function"].endswith("_backward") else 2  # + dy for backward
        assert r["bytes"] == arrays * np.prod(r["shape"]) * np.dtype(r["dtype"]).itemsize
        assert {"rsnorm", "numpy"} <= set(r["impls"])
        for name, i in r["impls"].items():
            assert 0 < i["min_s"] <= i["median_s"], name
            assert i["gbps"] == pytest.approx(r["bytes"] / i["median_s"] / 1e9)
            assert i["pct_copy"] == pytest.approx(100 * i["gbps"] / r["copy"]["gbps"])
        # The naive NumPy peer computes the same layer norm: a real cross-check of rsnorm.
        tol = 1e-4 if r["dtype"] == "float32" else 1e-10
        assert r["impls"]["numpy"]["max_abs_diff_vs_rsnorm"] < tol
        assert r["ratios"]["numpy"] == pytest.approx(
            r["impls"]["numpy"]["median_s"] / r["impls"]["rsnorm"]["median_s"])
        if "onnxruntime" in r["impls"]:
            assert r["impls"]["onnxruntime"]["max_abs_diff_vs_rsnorm"] < tol * 10
            assert r["ratios"]["peer"] == r["ratios"]["onnxruntime"]
    forward = [r for r in results if r["function"] == "layer_norm"]
    assert any(r["dtype"] == "float64" for r in forward)
    assert all("rsnorm_out" in r["impls"] for r in forward)
    assert "ratios.numpy.median" in doc["summary"]
    assert "ratios" in p.stdout  # the printed table
    if have_mpl:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_list_and_unknown_op():
    p = run_cli("bench", "--list", "--quick")
    assert p.returncode == 0
    names = p.stdout.splitlines()
    assert all("[quick]" in n for n in names)
    assert {n.split()[0] for n in names} >= {"batch_norm", "layer_norm", "rms_norm"}
    p = run_cli("bench", "--ops", "no_such_op", "--list")
    assert p.returncode != 0 and "no_such_op" in p.stderr


def test_bench_gpu_backend_delegates_or_exits_2(monkeypatch, capsys):
    try:
        import rsnorm.gpu as gpu_pkg
    except ImportError:  # no wgpu here: the GPU benchmark cannot exist
        assert cli.main(["bench", "--backend", "gpu"]) == 2
        assert "GPU" in capsys.readouterr().err
        return
    # Without rsnorm.gpu.bench: a clear message and exit code 2.
    monkeypatch.delattr(gpu_pkg, "bench", raising=False)
    monkeypatch.setitem(sys.modules, "rsnorm.gpu.bench", None)
    assert cli.main(["bench", "--backend", "gpu"]) == 2
    assert "GPU benchmark is not available" in capsys.readouterr().err
    # With it: every other option is handed over.
    calls = []
    fake = types.ModuleType("rsnorm.gpu.bench")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "rsnorm.gpu.bench", fake)
    monkeypatch.setattr(gpu_pkg, "bench", fake, raising=False)
    assert cli.main(["bench", "--quick", "--backend", "gpu", "--json", "x.json"]) == 0
    assert calls == [["--quick", "--json", "x.json"]]


# --------------------------------------------------------------------------------------------
# The demo machinery really fails on wrong results (in process, on stand-in modules)
# --------------------------------------------------------------------------------------------


def _case(op):
    return next(c for c in cli.DEMO_CASES if c.op == op)


def test_demo_case_fails_on_wrong_result():
    def bad_layer_norm(x, ns, w=None, b=None, eps=1e-5, **kw):
        y = rsnorm.layer_norm(x, ns, w, b, eps, **kw)
        return y * np.asarray(1.0001, dtype=y.dtype)  # 1e-4 relative: far above tolerance

    fake = types.SimpleNamespace(layer_norm=bad_layer_norm)
    (res,) = cli.run_cases(fake, [_case("layer_norm")], timing=False)
    assert res.status == "FAIL" and res.failed
    assert "outside" in res.detail


def test_demo_case_fails_on_biased_running_var():
    # PyTorch's convention updates the running variance with the unbiased batch variance;
    # a biased update is a classic porting bug that the demo must catch.
    def biased_bn(x, rm, rv, w, b, training, momentum, eps, **kw):
        y = rsnorm.batch_norm(x, None, None, w, b, training, momentum, eps, **kw)
        axis = kw.get("axis", 1) % x.ndim
        red = tuple(i for i in range(x.ndim) if i != axis)
        rm[...] = (1 - momentum) * rm + momentum * x.mean(axis=red)
        rv[...] = (1 - momentum) * rv + momentum * x.var(axis=red)
        return y

    fake = types.SimpleNamespace(batch_norm=biased_bn)
    (res,) = cli.run_cases(fake, [_case("batch_norm")], timing=False)
    assert res.status == "FAIL" and "running_var" in res.detail


def test_demo_case_errors_and_skips():
    def boom(*a, **k):
        raise ValueError("boom")

    results = cli.run_cases(types.SimpleNamespace(rms_norm=boom),
                            [_case("rms_norm"), _case("gdn")], timing=False)
    assert [r.status for r in results] == ["ERROR", "skipped"]
    assert "boom" in results[0].detail


def test_demo_exit_code_reflects_failure(monkeypatch, capsys):
    def bad(x, *a, **k):
        return np.zeros_like(x)

    monkeypatch.setattr(rsnorm, "rms_norm", bad)
    assert cli.main(["demo", "--ops", "rms_norm", "--no-timing"]) == 1
    assert "FAIL" in capsys.readouterr().err


def test_compare_arrays_nan_and_ulp():
    ref = np.array([1.0, np.nan, -2.0])
    ok, max_abs, ulp, _ = cli.compare_arrays(ref.astype(np.float32), ref)
    assert ok and max_abs == 0 and ulp == 0
    got = np.array([1.0, 0.0, -2.0], dtype=np.float32)  # a NaN lost is a failure
    assert not cli.compare_arrays(got, ref)[0]
    one_ulp = np.array([np.nextafter(np.float32(1), np.float32(2))], dtype=np.float32)
    assert cli.compare_arrays(one_ulp, np.array([1.0]))[2] == pytest.approx(1.0)
    assert not cli.compare_arrays(np.zeros(2, np.float32), np.zeros(3))[0]


# --------------------------------------------------------------------------------------------
# The references cross-checked through identities between the ops (independent of rsnorm)
# --------------------------------------------------------------------------------------------


def test_reference_identities():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 6, 4, 5)) * 3 + 1
    # GroupNorm with G=C is InstanceNorm, G=1 is LayerNorm over (C, H, W).
    np.testing.assert_allclose(_reference.group_norm(x, 6),
                               _reference.instance_norm(x)[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_reference.group_norm(x, 1),
                               _reference.layer_norm(x, x.shape[1:]), rtol=1e-12, atol=1e-12)
    # Channels-last equals channels-first after a transpose.
    xl = np.moveaxis(x, 1, -1)
    np.testing.assert_allclose(np.moveaxis(_reference.group_norm(xl, 3, axis=-1), -1, 1),
                               _reference.group_norm(x, 3), rtol=1e-12, atol=1e-12)
    # Batch norm of (N, C) data has zero mean and unit (biased) variance per column.
    y = _reference.batch_norm(x[:, :, 0, 0], training=True, eps=0.0)[0]
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=0), 1, rtol=1e-12)
    # LRN with size 1, k=0, alpha_over_size: x / (alpha x^2)^beta, element-wise.
    np.testing.assert_allclose(_reference.local_response_norm(x, 1, 2.0, 0.5, 0.0),
                               x / np.sqrt(2.0 * x**2), rtol=1e-12)
    # Torch and ONNX windows agree for odd sizes only.
    np.testing.assert_allclose(_reference.local_response_norm(x, 3),
                               _reference.local_response_norm(x, 3, window="onnx"))
    assert not np.allclose(_reference.local_response_norm(x, 4, alpha=1.0),
                           _reference.local_response_norm(x, 4, alpha=1.0, window="onnx"))
    # GDN with a diagonal gamma is a per-element formula, and IGDN(x) * GDN(x) = x**2.
    beta = np.full(6, 0.5)
    gamma = np.diag(np.full(6, 0.25))
    np.testing.assert_allclose(_reference.gdn(x, beta, gamma),
                               x / np.sqrt(0.5 + 0.25 * x**2), rtol=1e-12)
    np.testing.assert_allclose(_reference.gdn(x, beta, gamma, inverse=True)
                               * _reference.gdn(x, beta, gamma), x**2, rtol=1e-12)
    # RMS norm output has unit mean square (eps=0); normalize gives unit norms.
    r = _reference.rms_norm(x, (4, 5), eps=0.0)
    np.testing.assert_allclose((r**2).mean(axis=(2, 3)), 1, rtol=1e-12)
    n = _reference.normalize(x, 2.0, 1)
    np.testing.assert_allclose(np.sqrt((n**2).sum(axis=1)), 1, rtol=1e-12)
    # FRN without affine and a huge tau is max(., tau) = tau everywhere.
    np.testing.assert_allclose(_reference.filter_response_norm(x, tau=np.full(6, 1e9)), 1e9)
    # Moments: m2 / count is the biased variance.
    count, mean, m2 = _reference.moments(x, 1)
    assert count == 3 * 4 * 5
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(m2 / count, x.transpose(1, 0, 2, 3).reshape(6, -1).var(axis=1))


def test_reference_rms_norm_large_float64_values():
    x = np.array([[1e200, -1e200, 3e200]])
    y = _reference.rms_norm(x, 3)
    np.testing.assert_allclose(y, x / np.sqrt(np.mean((x / 1e200) ** 2)) / 1e200, rtol=1e-14)


def test_bench_shrink_keeps_channel_axis():
    small = _bench.shrink((16, 256, 32, 32), 4096, keep=[1])
    assert small[1] == 256 and np.prod(small) <= 4096 and min(small) >= 1
    assert np.prod(_bench.shrink((8192, 1024), 1000)) <= 1000
    assert _bench.shrink((4, 16), 1 << 20) == (4, 16)


def _fd_grad(f, a, h=1e-6):
    """Central finite differences of the scalar ``f`` with respect to every element of ``a``."""
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("op", ["batch_norm", "batch_norm_eval", "layer_norm", "rms_norm",
                                "group_norm", "group_norm_nhwc", "instance_norm"])
def test_reference_backward_matches_finite_differences(op):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 2, 3)) * 1.5 + 0.5
    dy = rng.standard_normal(x.shape)
    c = 4
    w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
    rm, rv = rng.standard_normal(c), rng.uniform(0.5, 1.5, c)
    ns = (2, 3)
    wl, bl = rng.uniform(0.5, 1.5, ns), rng.standard_normal(ns)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dyl = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    ref = _reference
    forward, grads, params = {
        "batch_norm": (lambda: ref.batch_norm(x, None, None, w, b, True)[0],
                       lambda: ref.batch_norm_backward(dy, x, None, None, w, b, True), (w, b)),
        "batch_norm_eval": (lambda: ref.batch_norm(x, rm, rv, w, b, False)[0],
                            lambda: ref.batch_norm_backward(dy, x, rm, rv, w, b, False),
                            (w, b)),
        "layer_norm": (lambda: ref.layer_norm(x, ns, wl, bl),
                       lambda: ref.layer_norm_backward(dy, x, ns, wl, bl), (wl, bl)),
        "rms_norm": (lambda: ref.rms_norm(x, ns, wl, 1e-6),
                     lambda: ref.rms_norm_backward(dy, x, ns, wl, 1e-6), (wl,)),
        "group_norm": (lambda: ref.group_norm(x, 2, w, b),
                       lambda: ref.group_norm_backward(dy, x, 2, w, b), (w, b)),
        "group_norm_nhwc": (lambda: ref.group_norm(xl, 2, w, b, axis=-1),
                            lambda: ref.group_norm_backward(dyl, xl, 2, w, b, axis=-1), (w, b)),
        "instance_norm": (lambda: ref.instance_norm(x, weight=w, bias=b)[0],
                          lambda: ref.instance_norm_backward(dy, x, w, b), (w, b)),
    }[op]
    upstream = dyl if op.endswith("nhwc") else dy
    got = grads()
    inputs = {"x": xl if op.endswith("nhwc") else x, "weight": params[0]}
    if len(params) > 1:
        inputs["bias"] = params[1]
    assert set(got) == set(inputs)
    for name, arr in inputs.items():
        fd = _fd_grad(lambda: float(np.sum(forward() * upstream)), arr)
        np.testing.assert_allclose(got[name], fd, rtol=1e-6, atol=1e-7, err_msg=name)


def test_bench_run_in_process_with_thread_scaling():
    before = rsnorm.get_num_threads()
    try:
        env = _bench.Env(2, ["numpy"])
        wl = next(w for w in _bench.WORKLOADS if w.op == "rms_norm" and not w.backward)
        (res,) = _bench.run([wl], env, min_time=0.001, min_samples=2, max_elements=2048,
                            scaling=True)
        assert rsnorm.get_num_threads() == 2  # restored after the one-thread timing
    finally:
        rsnorm.set_num_threads(before)
    assert res["function"] == "rms_norm" and np.prod(res["shape"]) <= 2048
    assert res["thread_scaling"] == pytest.approx(
        res["rsnorm_1thread_median_s"] / res["impls"]["rsnorm"]["median_s"])
    assert res["impls"]["numpy"]["max_abs_diff_vs_rsnorm"] < 1e-5
    assert res["skipped"]["torch"] == "not selected"
    summary = _bench.summarize([res])
    assert summary["thread_scaling.median"] == res["thread_scaling"]


def test_plain_text_tables_without_rich(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_have_rich", lambda: False)
    assert cli.main(["demo", "--ops", "layer_norm", "--no-timing"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.startswith("case"))
    assert "max abs err" in header and "max ulp" in header and "status" in header
    rows = [ln for ln in lines if ln.startswith("layer_norm")]
    assert len(rows) == sum(c.op == "layer_norm" for c in cli.DEMO_CASES)
    assert all(ln.split()[-1] == "ok" for ln in rows)


def test_reference_iter_norm_converges_to_zca_and_whitening_whitens():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 4)) @ np.diag([1.0, 1.3, 1.6, 1.2]) + 2
    # Newton iterations converge to Σ^-½: many steps give the ZCA map of the same Σ + eps·I.
    y = _reference.iter_norm(x, num_groups=1, T=40, eps=1e-5)[0]
    np.testing.assert_allclose(y, _reference.whiten(x, "zca", 1e-5)[0], atol=1e-10)
    for method in ("zca", "pca", "cholesky"):
        w, mean, lam = _reference.whiten(x, method, eps=0.0)
        np.testing.assert_allclose(np.cov(w.T, bias=True), np.eye(4), atol=1e-10)
        np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
        assert np.all(np.diff(lam) <= 0)
