"""Loads an ONNX backend node test (onnx==1.22.0 ships the data): attributes and data set 0."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper, numpy_helper

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"


def load(name):
    d = DATA / name
    model = onnx.load(str(d / "model.onnx"))
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ds = d / "test_data_set_0"
    inputs = [numpy_helper.to_array(onnx.load_tensor(str(p)))
              for p in sorted(ds.glob("input_*.pb"))]
    outputs = [numpy_helper.to_array(onnx.load_tensor(str(p)))
               for p in sorted(ds.glob("output_*.pb"))]
    return node.op_type, attrs, inputs, outputs
