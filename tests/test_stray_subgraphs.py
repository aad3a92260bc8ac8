"""Subgraphs on nodes of ops that are neither control flow nor custom ("stray" subgraphs).

onnx.checker passes an attribute named "__..." (its internal symbols) on any op, a subgraph too,
and such a subgraph reads outer values by name. onnxruntime refuses the node itself unless its
optimizer removes it (then it runs the model). The rules keep, copy and move nodes they match by
op type, so the pass leaves a model with a stray subgraph as it is, and says so (Report.left_alone;
the CI gate, --dry-run --exit-code, then exits 1: the model was not searched). The loader's
survey tells whether a model has one (graph.has_stray_subgraphs); the API walks the model to tell.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import onnx
import onnx.inliner
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


def _reads_names(*values: str) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node("Identity", [v], [f"copy_{v}"]) for v in values], "reads", [],
                             [helper.make_tensor_value_info(f"copy_{v}", TensorProto.FLOAT, None) for v in values])


def _token_bn_model() -> onnx.ModelProto:
    """MatMul -> Reshape -> BN -> Reshape (LeViT's LinearNorm), and Shape(MatMul output), whose
    stray subgraph reads the MatMul output: the fold would copy the Shape to read the new output."""
    rng = np.random.default_rng(4)
    d = 8
    inits = [numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([-1, d], np.int64), "flat"),
             numpy_helper.from_array(np.array([1, 4, d], np.int64), "back")]
    inits += [numpy_helper.from_array((rng.random(d) + 0.5).astype(np.float32), name) for name in ("g", "v")]
    inits += [numpy_helper.from_array(rng.random(d).astype(np.float32), name) for name in ("be", "mu")]
    shape = helper.make_node("Shape", ["M"], ["s"])
    shape.attribute.append(helper.make_attribute("__g", _reads_names("M")))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["M"]), helper.make_node("Reshape", ["M", "flat"], ["f"]),
             helper.make_node("BatchNormalization", ["f", "g", "be", "mu", "v"], ["b"]),
             helper.make_node("Reshape", ["b", "back"], ["y"]), shape]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, d]),
                               helper.make_tensor_value_info("s", TensorProto.INT64, [3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _transpose_model() -> onnx.ModelProto:
    """Transpose(x * c) beside Transpose(x) (tf2onnx's NHWC input), whose stray subgraph reads a
    value computed after it: the rule would move that Transpose ahead of the value."""
    t2 = helper.make_node("Transpose", ["x"], ["t2"], perm=[0, 3, 1, 2])
    t2.attribute.append(helper.make_attribute("__g", _reads_names("z")))
    nodes = [helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Transpose", ["m"], ["y1"], perm=[0, 3, 1, 2]),
             helper.make_node("Relu", ["x"], ["z"]), t2,
             helper.make_node("Transpose", ["t2"], ["t3"], perm=[0, 2, 3, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 4])],
                              [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 4, 8, 8]),
                               helper.make_tensor_value_info("t3", TensorProto.FLOAT, [1, 8, 8, 4])],
                              [numpy_helper.from_array(np.arange(1, 5, dtype=np.float32), "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


STRAY_MODELS = {"relu reads a block value": lambda: _model("relu"), "nested in an If": lambda: _model("nested"),
                "reads the input only": lambda: _model("harmless"), "Shape beside a token BN": _token_bn_model,
                "Transpose beside an affine": _transpose_model}


def test_a_model_with_a_stray_subgraph_is_left_as_it_is(tmp_path, capsys):
    for label, make in STRAY_MODELS.items():
        model = make()
        onnx.checker.check_model(model)
        assert has_stray_subgraphs(model.graph), label
        for base_dir in (None, str(tmp_path)):  # (the pass walks the model's tensors, or only its nodes)
            fused, report = fuse(model, base_dir=base_dir)
            assert not report.blocks and fused.SerializeToString() == model.SerializeToString(), label
            assert "holds a subgraph" in report.left_alone and report.to_dict()["left_alone"] == report.left_alone
            assert "not searched: " in report.to_text() and "deploy form" not in report.to_text()
            assert report.after.nodes == report.before.nodes == len(model.graph.node)

        path, out = str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx")
        onnx.save(model, path)
        assert rio.load(path).stray_subgraphs, label
        capsys.readouterr()
        assert main([path, out, "--no-check"]) == 0, label
        assert "holds a subgraph" in capsys.readouterr().out
        assert onnx.load(out).graph.SerializeToString() == model.graph.SerializeToString(), label
        # the CI gate cannot say such a model is in deploy form: it was not searched
        assert main([path, "--dry-run", "--exit-code", "-q"]) == 1, label


def test_the_relu_model_runs_in_onnxruntime_before_and_after(tmp_path):
    """(onnxruntime runs it only because its optimizer removes the Relu: before this rule the pass
    fused the block and left a model whose subgraph read a value no node computed)."""
    path = str(tmp_path / "m.onnx")
    onnx.save(_model("relu"), path)
    main([path, str(tmp_path / "out.onnx"), "--no-check", "-q"])
    feed = {"x": np.random.default_rng(0).standard_normal((1, C, 8, 8)).astype(np.float32)}
    outputs = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, feed)[0]
               for p in (path, str(tmp_path / "out.onnx"))]
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_models_without_stray_subgraphs_are_told_so_and_fuse_the_same():
    """Control flow and custom ops hold subgraphs as ever; the sample models have none. Told there
    are none, the pass gives the model it gives when it looks."""
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
        told, told_report = fuse(loaded.model, _stray_subgraphs=False)
        read, read_report = fuse(loaded.model)
        assert told.SerializeToString() == read.SerializeToString() and read_report.fused
        assert read_report.left_alone is None and "left_alone" not in read_report.to_dict()


def _function_model(body_ops):
    """A model whose graph calls a model-local function twice; the function's body is `body_ops`
    (a conv+BN block sum, or a Relu)."""
    c = 4
    rng = np.random.default_rng(0)
    if body_ops == "block":
        nodes = [helper.make_node("Conv", ["x", "w3"], ["a"], pads=[1, 1, 1, 1]),
                 helper.make_node("Conv", ["x", "w1"], ["b"]),
                 helper.make_node("Add", ["a", "b"], ["y"])]
        inputs = ["x", "w3", "w1"]
    else:
        nodes, inputs = [helper.make_node("Relu", ["x"], ["y"])], ["x"]
    function = helper.make_function("local", "Block", inputs, ["y"], nodes, [helper.make_opsetid("", 17)])
    weights = [numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w3"),
               numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "w1")]
    extra = ["w3", "w1"] if body_ops == "block" else []
    calls = [helper.make_node("Block", ["x"] + extra, ["h"], domain="local"),
             helper.make_node("Block", ["h"] + extra, ["out"], domain="local")]
    graph = helper.make_graph(calls, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c, 8, 8])],
                              weights if body_ops == "block" else [])
    return helper.make_model(graph, functions=[function],
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])


def test_blocks_inside_local_functions_are_said_to_be_unsearched(tmp_path, capsys):
    """A TorchScript export with export_modules_as_functions puts each block in a model-local
    function; the pass searches graphs only. It said 'nothing to fuse ... already in deploy form'
    and the CI gate passed the model."""
    model = _function_model("block")
    onnx.checker.check_model(model)
    fused, report = fuse(model)
    assert not report.blocks and "2 calls of model-local functions that hold layers (Block x2)" in report.unsearched
    assert "inline_local_functions" in report.unsearched and report.to_dict()["unsearched"] == report.unsearched
    text = report.to_text()
    assert "not searched: 2 calls" in text and "deploy form" not in text
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    assert main([path, "--dry-run", "--exit-code", "-q"]) == 1
    inlined = str(tmp_path / "inlined.onnx")  # what the note advises: then the blocks fuse
    onnx.save(onnx.inliner.inline_local_functions(model), inlined)
    capsys.readouterr()
    assert main([inlined, str(tmp_path / "out.onnx")]) == 0
    assert "blocks: 2 fused, 0 skipped" in capsys.readouterr().out

    plain = _function_model("relu")  # a function without layers: nothing to say
    _, report = fuse(plain)
    assert report.unsearched is None and "unsearched" not in report.to_dict()


def test_a_block_in_an_if_body_reading_outer_weights_says_where_they_come_from():
    c = 4
    rng = np.random.default_rng(0)
    body = helper.make_graph([helper.make_node("Conv", ["x", "w3"], ["a"], pads=[1, 1, 1, 1]),
                              helper.make_node("Conv", ["x", "w1"], ["b"]),
                              helper.make_node("Add", ["a", "b"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, c, 8, 8])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, c, 8, 8])])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=other)], "g",
                              [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])],
                              [numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w3"),
                               numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), "w1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    _, report = fuse(model)
    [skip] = report.skipped
    assert skip.reason_code == "non_constant" and "read from the enclosing graph" in skip.reason
    assert "computed at run time" not in skip.reason


def test_a_function_whose_layers_sit_under_control_flow_or_in_a_called_function_is_unsearched():
    model = _function_model("block")
    body = model.functions[0]
    branch = helper.make_graph(list(body.node), "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    outer = helper.make_function("local", "Gated", ["x", "w3", "w1", "c"], ["z"],
                                 [helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch)],
                                 [helper.make_opsetid("", 17)])
    wrapper = helper.make_function("local", "Wrapper", ["x", "w3", "w1", "c"], ["z"],
                                   [helper.make_node("Gated", ["x", "w3", "w1", "c"], ["z"], domain="local")],
                                   [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    del model.functions[:]
    model.functions.extend([outer, wrapper])
    model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    del model.graph.node[:]
    model.graph.node.extend([helper.make_node("Wrapper", ["x", "w3", "w1", "c"], ["out"], domain="local")])
    _, report = fuse(model)
    assert report.unsearched is not None and "1 calls of model-local functions that hold layers (Wrapper x1)" in \
        report.unsearched
