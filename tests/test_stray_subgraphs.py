"""Subgraphs on nodes of ops that are neither control flow nor custom.

onnx.checker passes an attribute named "__..." (its internal symbols) on any op, a subgraph too,
and onnxruntime builds such a subgraph and resolves the outer values it reads. A value read there
is used, so a block whose intermediate it reads is not private: left as it is, with the reason.
The loader's survey tells whether a model has such a subgraph; the pass then reads every node's
attributes (graph.has_stray_subgraphs), and spares that walk when it has none.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_repvgg import fuse
from onnx_repvgg.cli import main
from onnx_repvgg.graph import has_stray_subgraphs
from onnx_repvgg.storage import io as rio

C = 4


def _reads(value: str) -> onnx.GraphProto:
    """A subgraph whose one output is an outer value, copied (an Identity of it)."""
    return helper.make_graph([helper.make_node("Identity", [value], ["copy"])], "reads",
                             [], [helper.make_tensor_value_info("copy", TensorProto.FLOAT, None)])


def _model(where: str) -> onnx.ModelProto:
    """Conv3x3(x) + Conv1x1(x) -> Relu, with a subgraph in a "__g" attribute:
    'relu' on the Relu, reading the 3x3 branch's output; 'nested' inside an If's branch (on a
    Sigmoid there), reading it too; 'harmless' on the Relu, reading only the graph input."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((C, C, k, k)).astype(np.float32), f"w{k}") for k in (3, 1)]
    inits.append(numpy_helper.from_array(np.array(True), "cond"))
    nodes = [helper.make_node("Conv", ["x", "w3"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w1"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"])]
    relu = helper.make_node("Relu", ["s"], ["y"])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 8, 8])]
    if where in ("relu", "harmless"):
        relu.attribute.append(helper.make_attribute("__g", _reads("a" if where == "relu" else "x")))
    nodes.append(relu)
    if where == "nested":
        sigmoid = helper.make_node("Sigmoid", ["x"], ["t"])
        sigmoid.attribute.append(helper.make_attribute("__g", _reads("a")))
        then = helper.make_graph([sigmoid], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                  [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
        nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, C, 8, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)  # passed: the "__" attribute is an internal symbol to the checker
    return model


def _loads(path: str) -> None:
    ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def test_a_block_whose_intermediate_a_stray_subgraph_reads_is_left_as_it_is(tmp_path, capsys):
    for where in ("relu", "nested"):
        model = _model(where)
        assert has_stray_subgraphs(model.graph)
        for base_dir in (None, str(tmp_path)):  # (the pass walks the model's tensors, or only its nodes)
            fused, report = fuse(model, base_dir=base_dir)
            assert not report.fused and [b.reason_code for b in report.skipped] == ["intermediate_shared"]
            assert "'a' has 2 uses" in report.skipped[0].reason
            assert fused.graph.SerializeToString() == model.graph.SerializeToString()

        path, out = str(tmp_path / f"{where}.onnx"), str(tmp_path / f"{where}_fused.onnx")
        onnx.save(model, path)
        loaded = rio.load(path)
        assert loaded.stray_subgraphs
        assert main([path, out, "--no-check", "-q"]) == 0
        assert onnx.load(out).graph.SerializeToString() == model.graph.SerializeToString()
        if where == "relu":  # (onnxruntime runs neither form of the other: a Sigmoid keeps its subgraph)
            _loads(path)
            _loads(out)  # before, the fused model read a value it no longer computed: onnxruntime refused it


def test_a_stray_subgraph_that_reads_no_block_value_lets_the_block_fuse(tmp_path):
    model = _model("harmless")
    fused, report = fuse(model)
    assert [b.branches for b in report.fused] == [["3x3", "1x1"]]
    assert [n.op_type for n in fused.graph.node] == ["Conv", "Relu"]
    assert fused.graph.node[1].attribute[0].name == "__g"  # the node that holds it is kept as it is
    path = str(tmp_path / "fused.onnx")
    onnx.save(fused, path)
    _loads(path)
    feed = {"x": np.random.default_rng(0).standard_normal((1, C, 8, 8)).astype(np.float32)}
    options = ort.SessionOptions()  # the original runs with onnxruntime's optimizations only
    original = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)[0],
                               original.run(None, feed)[0], rtol=1e-4, atol=1e-5)


def test_models_without_stray_subgraphs_are_told_so_and_fuse_the_same():
    """Control flow and custom ops hold subgraphs as ever; the sample models have none. Told there
    are none, the pass gives the model it gives when it reads every node's attributes."""
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    control = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)], "g",
                                [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                 helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert not has_stray_subgraphs(control)
    models = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "models", "*.onnx")))
    assert models
    for path in models:
        loaded = rio.load(path)
        assert not loaded.stray_subgraphs and not has_stray_subgraphs(loaded.model.graph)
        told, _ = fuse(loaded.model, _stray_subgraphs=False)
        read, _ = fuse(loaded.model)
        assert told.SerializeToString() == read.SerializeToString()
