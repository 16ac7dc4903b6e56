"""ONNX backend conformance data (onnx==1.22.0, the last wheel that ships the node test data).

Cases are discovered, not listed: every single-node model under node/, pytorch-converted/,
pytorch-operator/ and simple/ whose node is one of the five statistics ops becomes a case, and so
does every `_expanded` directory of those ops (its data are run with the attributes of the
un-expanded sibling). An unknown attribute, an unsupported opset or a missing output fails the
case instead of skipping it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import reference as ref
import rsnorm as rn
from onnx import numpy_helper

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
OPS = {
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "RMSNormalization",
}
# Name fragments of the node-test directories of these ops; used to find the `_expanded`
# variants (whose graphs are the function body, so they contain none of the op types above).
NAME_PATTERNS = ("batchnorm", "instancenorm", "layer_normalization", "group_normalization",
                 "rms_normalization")
SUBDIRS = ("node", "pytorch-converted", "pytorch-operator", "simple")
EXPANDED = re.compile(r"_expanded(_ver\d+)?$")

# Attributes each op may carry, with their defaults; anything else fails the case.
KNOWN_ATTRS = {
    # is_test / spatial / consumed_inputs exist in opset <= 7 BatchNormalization.
    "BatchNormalization": {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0, "is_test": 0,
                           "spatial": 1},
    "InstanceNormalization": {"epsilon": 1e-5},
    "LayerNormalization": {"axis": -1, "epsilon": 1e-5, "stash_type": 1},
    "GroupNormalization": {"epsilon": 1e-5, "num_groups": None, "stash_type": 1},
    "RMSNormalization": {"axis": -1, "epsilon": 1e-5, "stash_type": 1},
}


def _single_node(model):
    nodes = list(model.graph.node)
    if len(nodes) == 1 and nodes[0].op_type in OPS:
        return nodes[0]
    return None


def _discover():
    cases = []
    for sub in SUBDIRS:
        for model_path in sorted((DATA / sub).glob("*/model.onnx")):
            d = model_path.parent
            if sub == "node" and EXPANDED.search(d.name):
                if any(p in d.name for p in NAME_PATTERNS):
                    cases.append(f"{sub}/{d.name}")
                continue
            model = onnx.load(str(model_path), load_external_data=False)
            if any(n.op_type in OPS for n in model.graph.node):
                cases.append(f"{sub}/{d.name}")
    return cases


CASES = _discover()


def test_inventory():
    # The onnx 1.22.0 wheel holds these; fewer means the data moved and cases were lost.
    def count(pattern):
        return sum(1 for c in CASES if re.search(pattern, c))

    assert count(r"^node/test_batchnorm_") == 4
    assert count(r"training_mode") == 2
    assert count(r"^node/test_instancenorm_") == 2
    assert count(r"^node/test_layer_normalization_.*(?<!_expanded)(?<!_ver18)$") == 19
    assert count(r"^node/test_layer_normalization_") == 57
    assert count(r"^node/test_group_normalization_") == 4
    assert count(r"^node/test_rms_normalization_") == 38
    assert count(r"^pytorch-converted/test_BatchNorm.*_eval$") == 5
    assert "pytorch-operator/test_operator_symbolic_override" in CASES  # InstanceNormalization


def _load_tensor(path):
    return numpy_helper.to_array(onnx.TensorProto.FromString(path.read_bytes()))


def _load_case(case):
    """Returns (node, opset, inputs by graph-input name, list of data sets of outputs)."""
    d = DATA / case
    model = onnx.load(str(d / "model.onnx"), load_external_data=False)
    base_model = model
    if EXPANDED.search(d.name):
        base_dir = d.parent / EXPANDED.sub("", d.name)
        assert base_dir.is_dir(), f"no un-expanded sibling for {case}"
        base_model = onnx.load(str(base_dir / "model.onnx"), load_external_data=False)
    node = _single_node(base_model)
    assert node is not None, f"{case}: not a single-node model of a supported op"
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in initializers]
    datasets = []
    for ds in sorted(d.glob("test_data_set_*")):
        ins = dict(initializers)
        for k, name in enumerate(graph_inputs):
            ins[name] = _load_tensor(ds / f"input_{k}.pb")
        outs = [_load_tensor(p) for p in sorted(ds.glob("output_*.pb"),
                                                key=lambda p: int(p.stem.split("_")[1]))]
        datasets.append((ins, outs))
    assert datasets, f"{case}: no test_data_set_*"
    return node, opset, datasets, model


def _attrs(node):
    known = KNOWN_ATTRS[node.op_type]
    got = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    unknown = set(got) - set(known)
    assert not unknown, f"unmapped attributes {unknown} of {node.op_type}"
    out = dict(known)
    out.update(got)
    return out


def _inputs(node, ins):
    return [ins[name] if name else None for name in node.input]


def _tol(dtype):
    # The expected outputs were produced by ONNX's float32 NumPy reference (single-pass float32
    # sums), so they carry float32 rounding of their own.
    return {"rtol": 1e-5, "atol": 1e-5} if dtype != np.float64 else {"rtol": 1e-10,
                                                                       "atol": 1e-10}


def run_case(node, opset, ins, n_outputs):
    """Map one ONNX node onto rsnorm; returns the list of ONNX outputs rsnorm produced."""
    a = _attrs(node)
    args = _inputs(node, ins)
    op = node.op_type
    if op == "BatchNormalization":
        x, scale, bias, mean, var = args
        assert a["spatial"] == 1, "per-activation (spatial=0) batch norm is not an rsnorm op"
        eps = float(a["epsilon"])
        if a["training_mode"]:
            rm = mean.copy()
            rv = var.copy()
            y = rn.batch_norm(x, rm, rv, scale, bias, training=True, momentum=float(a["momentum"]),
                              eps=eps, momentum_convention="onnx")
            return [y, rm, rv][:n_outputs]
        assert n_outputs == 1, "opset<=6 training outputs are not mapped"
        return [rn.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)]
    if op == "InstanceNormalization":
        x, scale, bias = args
        return [rn.instance_norm(x, weight=scale, bias=bias, eps=float(a["epsilon"]))]
    if op == "LayerNormalization":
        x, scale = args[0], args[1]
        bias = args[2] if len(args) > 2 else None
        axis = a["axis"] % x.ndim
        shape = x.shape[axis:]
        y, stats = rn.layer_norm(x, shape, np.broadcast_to(scale, shape),
                                 None if bias is None else np.broadcast_to(bias, shape),
                                 eps=float(a["epsilon"]), return_stats=True)
        stat_shape = x.shape[:axis] + (1,) * (x.ndim - axis)
        assert stats.mean.shape == x.shape[:axis], (stats.mean.shape, x.shape[:axis])
        assert stats.rstd.shape == x.shape[:axis], (stats.rstd.shape, x.shape[:axis])
        return [y, stats.mean.reshape(stat_shape), stats.rstd.reshape(stat_shape)][:n_outputs]
    if op == "GroupNormalization":
        # Before opset 21 the scale and bias were per group, not per channel (a different op).
        assert opset >= 21, f"GroupNormalization opset {opset} < 21 has per-group scale"
        x, scale, bias = args
        return [rn.group_norm(x, int(a["num_groups"]), scale, bias, eps=float(a["epsilon"]))]
    if op == "RMSNormalization":
        x, scale = args
        axis = a["axis"] % x.ndim
        shape = x.shape[axis:]
        return [rn.rms_norm(x, shape, np.broadcast_to(scale, shape), eps=float(a["epsilon"]))]
    raise AssertionError(f"unmapped op {op}")


@pytest.mark.parametrize("case", CASES)
def test_onnx_case(case):
    node, opset, datasets, _ = _load_case(case)
    for ins, outs in datasets:
        got = run_case(node, opset, ins, len(outs))
        assert len(got) == len(outs), f"{case}: {len(outs)} outputs expected"
        for k, (g, want) in enumerate(zip(got, outs)):
            g = np.asarray(g)
            assert g.shape == want.shape, (case, k, g.shape, want.shape)
            assert g.dtype == want.dtype, (case, k, g.dtype, want.dtype)
            np.testing.assert_allclose(g, want, err_msg=f"{case} output {k}", **_tol(want.dtype))


@pytest.mark.parametrize("case", [c for c in CASES if "training_mode" in c])
def test_onnx_training_uses_biased_running_var(case):
    """ONNX's training-mode running_var blends in the *biased* batch variance; check that the data
    say so (against our float64 formula), so the `onnx` convention is pinned to the data."""
    node, _, datasets, _ = _load_case(case)
    a = _attrs(node)
    m = float(a["momentum"])
    for ins, outs in datasets:
        x, scale, bias, mean, var = _inputs(node, ins)
        _, bmean, _, rm, rv = ref.batch_norm(x, mean, var, scale, bias, training=True, momentum=m,
                                             eps=float(a["epsilon"]), momentum_convention="onnx")
        np.testing.assert_allclose(outs[1], rm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(outs[2], rv, rtol=1e-5, atol=1e-6)
        # And not the unbiased one (n/(n-1) differs by >1% here).
        n = x.size // x.shape[1]
        bvar = ((ref.f64(x) - bmean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
        unbiased = ref.f64(var) * m + bvar * n / (n - 1) * (1 - m)
        assert not np.allclose(outs[2], unbiased, rtol=1e-4, atol=0)
        # rsnorm with the onnx convention reproduces it.
        rm_got = mean.copy()
        rv_got = var.copy()
        rn.batch_norm(x, rm_got, rv_got, scale, bias, training=True, momentum=m,
                      eps=float(a["epsilon"]), momentum_convention="onnx")
        np.testing.assert_allclose(rv_got, outs[2], rtol=1e-5, atol=1e-6)
