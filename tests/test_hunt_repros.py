"""Defects found by a hunt over checker-valid variants of small block models (helper-15), each
rebuilt from its repro: the CLI and the proof, not the fusion (which gave no wrong output)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_repvgg import fuse
from onnx_repvgg.cli import main

C = 4


def _weights(rng) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(rng.standard_normal((C, C, k, k)).astype(np.float32) * 0.3, f"W{k}") for k in (3, 1)]


def test_an_initializer_that_is_a_graph_output_is_validated(tmp_path, capsys):
    """ONNX lets a graph output be an initializer (onnxruntime returns its value); validation
    looked for outputs among node outputs and inputs only, and failed every such model."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W3"], ["c3"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W1"], ["c1"]), helper.make_node("Add", ["c3", "c1"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 7, 7]),
                               helper.make_tensor_value_info("W1", TensorProto.FLOAT, [C, C, 1, 1])], _weights(rng))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path, out = str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx")
    onnx.save(model, path)
    assert main([path, out]) == 0
    assert "validation: passed" in capsys.readouterr().out
    fused = onnx.load(out)
    assert [n.op_type for n in fused.graph.node] == ["Conv"] and [o.name for o in fused.graph.output] == ["y", "W1"]
    feed = {"x": rng.standard_normal((1, C, 7, 7)).astype(np.float32)}
    expected = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)
    actual = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(actual[1], expected[1])


def test_a_negative_seed_is_a_usage_error(tmp_path, capsys):
    """numpy refuses a negative seed; the message blamed the model ("the original model does
    not run in onnxruntime")."""
    assert main(["models/repvgg_tiny_g4_ts.onnx", str(tmp_path / "out.onnx"), "--seed", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "onnx-repvgg: error: --seed must be 0 or more"
    assert not (tmp_path / "out.onnx").exists()


def test_an_inf_constant_is_refused_without_numpy_warnings(tmp_path, capsys):
    """conv3x3(x) + x * k with an inf in k: skipped ('overflow'), and numpy's warnings about the
    inf no longer reach stderr (under -q, nothing does)."""
    rng = np.random.default_rng(0)
    k = numpy_helper.from_array(np.array([np.inf, 1, 2, 3], np.float32).reshape(C, 1, 1), "k")
    nodes = [helper.make_node("Conv", ["x", "W3"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Mul", ["x", "k"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 6, 6])],
                              [_weights(rng)[0], k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning would raise here
        fused, report = fuse(model)
    assert [b.reason_code for b in report.skipped] == ["overflow"]
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    capsys.readouterr()
    assert main([path, str(tmp_path / "out.onnx"), "-q", "--no-check"]) == 0
    assert capsys.readouterr().err == ""


def test_a_model_with_empty_inputs_is_not_said_to_differ(tmp_path, capsys):
    """A declared batch of 0: every input is empty, so validation proves nothing and fails; the
    error said "the fused model differs from the original", which nothing showed."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W3"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W1"], ["b"]), helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [0, C, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [0, C, 7, 7])], _weights(rng))
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    capsys.readouterr()
    assert main([path, str(tmp_path / "out.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("onnx-repvgg: error: the fused model could not be proven equal to the original "
                   "(every input is empty: nothing was compared); nothing written")
    assert not (tmp_path / "out.onnx").exists()


def test_a_batchnorm_with_empty_optional_outputs_is_validated(tmp_path):
    """BatchNormalization-9 whose four optional outputs are empty names (not produced: the
    checker passes it). onnxruntime crashes running it (SIGSEGV), and validation ran it in this
    process: the CLI died without a word. The proof now drops trailing empty output names, which
    changes nothing, from what it hands onnxruntime (in a subprocess here: a crash fails the test)."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    inits = [_weights(rng)[0]] + [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
        ("g", rng.uniform(0.5, 1.5, C)), ("b", rng.uniform(-1, 1, C)), ("m", rng.uniform(-1, 1, C)),
        ("v", rng.uniform(0.5, 2, C)))]
    nodes = [helper.make_node("Conv", ["x", "W3"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["y", "", "", "", ""], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 7, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.checker.check_model(model, full_check=True)
    path, out = str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx")
    onnx.save(model, path)
    run = subprocess.run([sys.executable, "-m", "onnx_repvgg", path, out], capture_output=True, text=True)
    assert run.returncode == 0, (run.returncode, run.stderr)
    assert "validation: passed" in run.stdout
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Conv"]
    from onnx_repvgg import validate
    before = model.SerializeToString()
    assert validate(model, onnx.load(out)).passed
    assert model.SerializeToString() == before  # the empty names are back


def test_input_data_that_proves_nothing_or_contradicts_a_shape_is_refused(tmp_path, capsys):
    """--input-data holding NaN (every output it reaches is NaN on both sides: validation passed
    vacuously), and --input-shape contradicting --input-data (the data's shape won, silently)."""
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((1, 3, 32, 32), np.nan, dtype=np.float32))
    ok = tmp_path / "ok.npy"
    np.save(ok, np.zeros((1, 3, 32, 32), dtype=np.float32))
    model, out = "models/repvgg_tiny_g4_ts.onnx", str(tmp_path / "out.onnx")
    name = onnx.load(model).graph.input[0].name
    for args, text in (([f"--input-data={name}:{nan}"], "holds NaN"),
                       ([f"--input-data={name}:{ok}", f"--input-shape={name}:1,3,64,64"],
                        f"--input-shape {name}:1,3,64,64 contradicts --input-data {name}, of shape 1,3,32,32")):
        capsys.readouterr()
        assert main([model, out, *args]) == 2
        assert text in capsys.readouterr().err and not (tmp_path / "out.onnx").exists()
