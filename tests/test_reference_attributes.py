"""Attributes that refer to a function's attribute (ref_attr_name) in a graph, not a function.

Such an attribute has a value only inside a function body, yet onnx.checker passes it in a graph
(and onnxruntime reads the value fields beside the reference). The pass does not guess: when it
must read one to match a block, the model is refused with a one-line error (exit 2, nothing
written); one it never reads (here a MaxPool after the block) leaves the rest to fuse, and the
proof reads no window from it.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_repvgg import UnsupportedModel, fuse
from onnx_repvgg.cli import main

C = 4


def _model(referring: str) -> onnx.ModelProto:
    """Conv3x3(x) + Conv1x1(x) -> MaxPool 3x3; the 3x3 Conv's or the MaxPool's pads refer to a
    function attribute 'p' (with the value [1, 1, 1, 1] beside it)."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((C, C, k, k)).astype(np.float32), f"w{k}") for k in (3, 1)]
    conv = helper.make_node("Conv", ["x", "w3"], ["a"], name="conv3x3")
    pool = helper.make_node("MaxPool", ["s"], ["y"], name="pool", kernel_shape=[3, 3])
    pads = helper.make_attribute("pads", [1, 1, 1, 1])
    pads.ref_attr_name = "p"
    (conv if referring == "conv" else pool).attribute.append(pads)
    if referring != "conv":
        conv.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    nodes = [conv, helper.make_node("Conv", ["x", "w1"], ["b"]), helper.make_node("Add", ["a", "b"], ["s"]), pool]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)  # passed
    return model


def test_a_reference_attribute_the_pass_must_read_refuses_the_model(tmp_path, capsys):
    model = _model("conv")
    with pytest.raises(UnsupportedModel, match="Conv 'conv3x3' has an attribute 'pads' that refers to a "
                                               "function's attribute 'p' outside a function"):
        fuse(model)
    path, out = str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx")
    onnx.save(model, path)
    before = open(path, "rb").read()
    capsys.readouterr()
    assert main([path, out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refers to a function's attribute 'p'" in err and "Traceback" not in err
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == ["m.onnx"]
    assert open(path, "rb").read() == before


def test_a_reference_attribute_the_pass_never_reads_lets_the_block_fuse(tmp_path, capsys):
    model = _model("pool")
    fused, report = fuse(model)
    assert [b.branches for b in report.fused] == [["3x3", "1x1"]]
    assert [n.op_type for n in fused.graph.node] == ["Conv", "MaxPool"]
    assert fused.graph.node[1].SerializeToString() == model.graph.node[3].SerializeToString()
    path, out = str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx")
    onnx.save(model, path)
    assert main([path, out]) == 0  # validated in onnxruntime: the window scans skip the MaxPool
    assert "validation: passed" in capsys.readouterr().out
