"""Defects a review found, each rebuilt from its repro: rewrites whose constants would broadcast
the tensor into another shape, a proof that passed a wrong block, a proof that failed a right
one, vacuous inputs, and exit codes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_repvgg import ValidationError, fuse, validate
from onnx_repvgg.cli import main
from tests.graphs import run


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _assert_same(model, fused, feeds):
    for e, a in zip(run(model, feeds), run(fused, feeds)):
        assert e.shape == a.shape
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


rng = np.random.default_rng(0)
f32 = np.float32
vi = helper.make_tensor_value_info


def test_a_scale_that_broadcasts_the_channels_is_not_folded_into_the_conv():
    """x has 1 channel, x * s (s of 4 channels) has 4: the Conv reads 4, x alone would give 1."""
    model = _model([helper.make_node("Mul", ["x", "s"], ["y"]), helper.make_node("Conv", ["y", "W"], ["z"])],
                   [vi("x", TensorProto.FLOAT, [1, 1, 5, 5])], [vi("z", TensorProto.FLOAT, [1, 3, 5, 5])],
                   {"W": rng.standard_normal((3, 4, 1, 1)).astype(f32), "s": rng.standard_normal((1, 4, 1, 1)).astype(f32)})
    fused, report = fuse(model)
    assert not report.fused
    _assert_same(model, fused, {"x": rng.standard_normal((1, 1, 5, 5)).astype(f32)})


def test_a_scale_that_raises_the_rank_is_not_folded_into_the_matmul():
    """x of rank 1, x * s with s (1, K): rank 2. Softmax over axis 0 then sees a size-1 axis."""
    model = _model([helper.make_node("Mul", ["x", "s"], ["y"]), helper.make_node("MatMul", ["y", "W"], ["z"]),
                    helper.make_node("Softmax", ["z"], ["p"], axis=0),
                    helper.make_node("Reshape", ["p", "shp"], ["out"])],
                   [vi("x", TensorProto.FLOAT, [4])], [vi("out", TensorProto.FLOAT, [3])],
                   {"W": rng.standard_normal((4, 3)).astype(f32), "s": rng.standard_normal((1, 4)).astype(f32),
                    "shp": np.array([3], np.int64)})
    fused, report = fuse(model)
    assert not report.fused
    _assert_same(model, fused, {"x": rng.standard_normal(4).astype(f32)})


def test_a_size_1_factor_of_rank_3_does_not_make_a_gemm():
    model = _model([helper.make_node("Gemm", ["A", "B"], ["y"]), helper.make_node("Mul", ["y", "a"], ["ya"]),
                    helper.make_node("Add", ["ya", "T"], ["z"])],
                   [vi("A", TensorProto.FLOAT, [2, 3]), vi("T", TensorProto.FLOAT, [2, 4])],
                   [vi("z", TensorProto.FLOAT, [1, 2, 4])],
                   {"B": rng.standard_normal((3, 4)).astype(f32), "a": np.full((1, 1, 1), 0.5, f32)})
    fused, report = fuse(model)
    assert not report.fused
    _assert_same(model, fused, {"A": rng.standard_normal((2, 3)).astype(f32), "T": rng.standard_normal((2, 4)).astype(f32)})


def test_a_matmul_of_unknown_rank_keeps_constants_that_could_raise_it():
    model = _model([helper.make_node("Reshape", ["data", "shp"], ["x"]), helper.make_node("MatMul", ["x", "W"], ["y"]),
                    helper.make_node("Mul", ["y", "s"], ["ys"]), helper.make_node("Add", ["ys", "t"], ["z"])],
                   [vi("data", TensorProto.FLOAT, [4]), vi("shp", TensorProto.INT64, ["r"])],
                   [vi("z", TensorProto.FLOAT, ["d0", "d1"])],
                   {"W": rng.standard_normal((4, 3)).astype(f32), "s": rng.standard_normal((1, 3)).astype(f32),
                    "t": rng.standard_normal((1, 3)).astype(f32)})
    fused, report = fuse(model)
    assert not report.fused
    _assert_same(model, fused, {"data": rng.standard_normal(4).astype(f32), "shp": np.array([4], np.int64)})


def _token_bn(with_shape_reader: bool) -> onnx.ModelProto:
    d = 8
    bn = {k: v.astype(f32) for k, v in zip("gbmv", (rng.uniform(0.5, 2, d), rng.standard_normal(d),
                                                      rng.standard_normal(d), rng.uniform(0.5, 2, d)))}
    if with_shape_reader:  # MatMul -> Flatten -> BN -> Reshape(Shape(M))
        nodes = [helper.make_node("MatMul", ["X", "W"], ["M"]), helper.make_node("Flatten", ["M"], ["F"], axis=2),
                 helper.make_node("BatchNormalization", ["F", "g", "b", "m", "v"], ["B"]),
                 helper.make_node("Shape", ["M"], ["S"], start=1), helper.make_node("Reshape", ["B", "S"], ["R"]),
                 helper.make_node("Relu", ["R"], ["out"])]
        out = vi("out", TensorProto.FLOAT, [5, d])
        extra = {}
    else:  # MatMul -> Reshape -> BN -> Relu: the Add takes the BN's place, the Reshape stays
        nodes = [helper.make_node("MatMul", ["X", "W"], ["M"]), helper.make_node("Reshape", ["M", "shp"], ["R"]),
                 helper.make_node("BatchNormalization", ["R", "g", "b", "m", "v"], ["B"]),
                 helper.make_node("Relu", ["B"], ["out"])]
        out = vi("out", TensorProto.FLOAT, [5, d])
        extra = {"shp": np.array([5, d], np.int64)}
    return _model(nodes, [vi("X", TensorProto.FLOAT, [1, 5, 6])], [out],
                  {"W": rng.standard_normal((6, d)).astype(f32), **bn, **extra})


@pytest.mark.parametrize("with_shape_reader", [False, True])
def test_a_bn_folded_into_a_token_matmul_validates(with_shape_reader):
    """The scaled product gets a name of its own: a name never changes its value, so the
    proof's end-to-end comparison by name holds."""
    model = _token_bn(with_shape_reader)
    fused, report = fuse(model)
    assert len(report.fused) == 1 and not any(n.op_type == "BatchNormalization" for n in fused.graph.node)
    _assert_same(model, fused, {"X": rng.standard_normal((1, 5, 6)).astype(f32)})
    result = validate(model, fused)
    assert result.passed, (result.tensors, result.blocks)
    assert all(b.checked for b in result.blocks)


def _gated_identity_copies() -> onnx.ModelProto:
    """Block B reads two Identity copies of a tensor computed after an ArgMax; fusing B leaves
    one copy (the other is dead), so B's original reaches a tensor the fused block does not read."""
    c = 4
    w = {k: rng.standard_normal((c, c, 3, 3)).astype(f32) for k in ("a1", "a2", "b1", "b2")}

    def conv(i, weight, o):
        return helper.make_node("Conv", [i, weight], [o], pads=[1, 1, 1, 1], name=o)

    nodes = [conv("X", "a1", "A1"), conv("X", "a2", "A2"), helper.make_node("Add", ["A1", "A2"], ["SA"]),
             helper.make_node("Relu", ["SA"], ["out_a"]),
             helper.make_node("ArgMax", ["SA"], ["idx"], axis=1, keepdims=1),
             helper.make_node("Cast", ["idx"], ["G"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["X", "G"], ["Z"]),
             helper.make_node("Identity", ["Z"], ["Y1"]), helper.make_node("Identity", ["Z"], ["Y2"]),
             conv("Y1", "b1", "B1"), conv("Y2", "b2", "B2"), helper.make_node("Add", ["B1", "B2"], ["out_b"])]
    return _model(nodes, [vi("X", TensorProto.FLOAT, [1, c, 8, 8])],
                  [vi("out_a", TensorProto.FLOAT, [1, c, 8, 8]), vi("out_b", TensorProto.FLOAT, [1, c, 8, 8])], w)


def test_a_block_whose_original_reads_more_is_checked_alone_and_a_wrong_one_fails():
    model = _gated_identity_copies()
    fused, report = fuse(model)
    assert len(report.fused) == 2
    good = validate(model, fused)
    assert good.passed and all(b.checked for b in good.blocks)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(fused)
    conv_b = next(n for n in wrong.graph.node if n.op_type == "Conv" and n.input[0] == "Y1")
    for t in wrong.graph.initializer:
        if t.name == conv_b.input[1]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 3, t.name))
    bad = validate(model, wrong)
    assert not bad.passed
    assert [b.passed for b in bad.blocks if b.checked].count(False) == 1


def test_zero_sized_dims_are_refused(tmp_path, capsys):
    b_model = _token_bn(False)
    onnx.save(b_model, str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--input-shape", "X:0,5,6"]) == 2
    assert "dims must be >= 1" in capsys.readouterr().err
    fused, _ = fuse(b_model)
    with pytest.raises(ValidationError, match="dim of 0"):
        validate(b_model, fused, input_shapes={"X": [0, 5, 6]})


@pytest.mark.parametrize("args, words", [(["--rtol", "-1"], "--rtol must be >= 0"),
                                         (["--atol", "nan"], "--atol must be >= 0"),
                                         (["-v", "-q"], "contradict")])
def test_bad_option_values_are_usage_errors(tmp_path, capsys, args, words):
    onnx.save(_token_bn(False), str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), *args]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_input_data_of_another_kind_is_refused(tmp_path, capsys):
    onnx.save(_token_bn(False), str(tmp_path / "in.onnx"))
    np.save(tmp_path / "x.npy", np.ones((1, 5, 6), np.int64))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--input-data", f"X:{tmp_path / 'x.npy'}"]) == 2
    err = capsys.readouterr().err
    assert "int64" in err and "tensor(float)" in err and len(err.strip().splitlines()) == 1


def test_a_sparse_weight_is_named_as_one_not_as_computed_or_outer():
    """(The check for values read from an enclosing graph took a main-graph sparse initializer
    for one: helper-21's review.)"""
    c = 4
    rng = np.random.default_rng(0)
    dense = numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w3")
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, np.float32), "w1"),
                                       numpy_helper.from_array(np.array([0, 5], np.int64), "w1_idx"), [c, c, 1, 1])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w3"], ["a"], pads=[1, 1, 1, 1]),
                               helper.make_node("Conv", ["x", "w1"], ["b"]),
                               helper.make_node("Add", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])], [dense],
                              sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    _, report = fuse(model)
    [skip] = report.skipped
    assert "'w1' of Conv" in skip.reason and "(a sparse initializer: the rules read dense ones)" in skip.reason
