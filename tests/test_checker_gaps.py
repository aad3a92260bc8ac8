"""Models onnx.checker passes whose meaning is not settled; the pass does not guess.

- An attribute that refers to a function's attribute (ref_attr_name) in a graph, not a function:
  it has a value only inside a function body (onnxruntime reads the value fields beside the
  reference). When the pass must read one to match a block, the model is refused with a one-line
  error (exit 2, nothing written); one it never reads (here a MaxPool after the block) leaves the
  rest to fuse, and the proof reads no window from it.
- The default opset imported twice with different versions ("" and "ai.onnx", or "" twice):
  onnx.checker reads the last "" entry, onnxruntime the last of either spelling, and an op's
  meaning depends on it (Squeeze's axes, BatchNormalization's training mode, ...). Refused.
  The same version imported twice is one opset.
- A tensor stored as a segment of a larger one (TensorProto.segment), which onnx cannot read:
  refused when the pass must read it; so is one whose raw data is longer than its shape needs
  (onnx.checker passes it, onnxruntime refuses it), raw or typed.
(Subgraphs on ordinary ops: test_stray_subgraphs.py.)
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



def _assert_refused(model: onnx.ModelProto, tmp_path, capsys, pattern: str, text: str) -> None:
    """fuse() raises UnsupportedModel matching `pattern`; the CLI exits 2 with one line on stderr
    holding `text`, writes nothing and leaves the input as it was."""
    with pytest.raises(UnsupportedModel, match=pattern):
        fuse(model)
    path, out = str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx")
    onnx.save(model, path)
    before = open(path, "rb").read()
    capsys.readouterr()
    assert main([path, out, "--no-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and err.count("\n") == 0 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"] and open(path, "rb").read() == before

def test_a_reference_attribute_the_pass_must_read_refuses_the_model(tmp_path, capsys):
    _assert_refused(_model("conv"), tmp_path, capsys, "Conv 'conv3x3' has an attribute 'pads' that refers to a "
                    "function's attribute 'p' outside a function", "refers to a function's attribute 'p'")

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


def _imports_model(imports: list[tuple[str, int]]) -> onnx.ModelProto:
    model = _model("pool")
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in imports)
    return model


def test_a_default_opset_imported_twice_with_different_versions_is_refused(tmp_path, capsys):
    for imports in ([("", 17), ("ai.onnx", 13)], [("ai.onnx", 13), ("", 17)], [("", 17), ("", 13)]):
        _assert_refused(_imports_model(imports), tmp_path, capsys, r"imports the default \(ai.onnx\) opset more than "
                        r"once, as versions \[13, 17\]", "more than once, as versions [13, 17]")
    for imports in ([("", 17), ("ai.onnx", 17)], [("ai.onnx", 17)], [("", 17), ("", 17)]):  # one opset
        fused, report = fuse(_imports_model(imports))
        assert [b.branches for b in report.fused] == [["3x3", "1x1"]], imports


def test_a_weight_stored_as_a_segment_refuses_the_model(tmp_path, capsys):
    """TensorProto.segment (a part of a larger tensor): onnx.checker passes it, onnx cannot read it."""
    model = _model("pool")
    weight = next(t for t in model.graph.initializer if t.name == "w3")
    weight.segment.begin, weight.segment.end = 0, 1
    onnx.checker.check_model(model)
    _assert_refused(model, tmp_path, capsys, "tensor 'w3' is stored as a segment of a larger one", "stored as a segment")

def test_a_weight_with_more_raw_bytes_than_its_shape_needs_refuses_the_model(tmp_path, capsys):
    """onnx.checker passes raw data longer than the shape and type need; onnxruntime refuses it."""
    model = _model("pool")
    weight = next(t for t in model.graph.initializer if t.name == "w3")
    weight.raw_data = weight.raw_data + bytes(4)
    onnx.checker.check_model(model)
    _assert_refused(model, tmp_path, capsys, r"tensor 'w3' holds 580 bytes of raw data where its shape "
                    r"\[4, 4, 3, 3\] and type need 576", "holds 580 bytes")

def test_a_large_weight_left_in_the_file_with_more_raw_bytes_is_refused_at_load(tmp_path, capsys):
    """The loader leaves large weights in the file (read when a block needs them): the same
    refusal, from the wire walk's lengths."""
    from onnx_repvgg.storage.skeleton import MIN_BYTES

    rng = np.random.default_rng(8)
    channels = 96  # a 3x3 kernel of 96 x 96 float32: 331,776 bytes, past MIN_BYTES
    weight = numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32), "w")
    assert len(weight.raw_data) >= MIN_BYTES
    weight.raw_data = weight.raw_data + bytes(4)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 4, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    capsys.readouterr()
    assert main([path, str(tmp_path / "out.onnx"), "--no-check"]) == 2
    err = capsys.readouterr().err
    assert "tensor 'w' holds 331,780 bytes of raw data where its shape [96, 96, 3, 3] and type need 331,776" in err


def test_a_weight_with_more_typed_values_than_its_shape_holds_refuses_the_model(tmp_path, capsys):
    """The same of float_data: the checker passes 145 values for a shape of 144."""
    model = _model("pool")
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == "w3")
    values = numpy_helper.to_array(model.graph.initializer[index]).ravel().tolist() + [0.5]
    weight = onnx.TensorProto(name="w3", data_type=TensorProto.FLOAT, dims=[C, C, 3, 3])
    weight.float_data.extend(values)
    model.graph.initializer[index].CopyFrom(weight)
    onnx.checker.check_model(model)
    _assert_refused(model, tmp_path, capsys, r"tensor 'w3' cannot be read with its shape \[4, 4, 3, 3\]",
                    "cannot be read with its shape")

@pytest.mark.parametrize("attrs", [dict(strides=[0, 0]), dict(dilations=[0, 1]), dict(pads=[-1, 1, 1, 1])],
                         ids=["stride 0", "dilation 0", "negative pad"])
def test_windows_the_operators_forbid_are_left_alone(attrs):
    """Strides or dilations under 1 and negative pads: the checker passes them, onnxruntime
    refuses them, and the pass leaves such a Conv or ConvTranspose as it is (malformed)."""
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(rng.standard_normal((C, C, k, k)).astype(np.float32), f"w{k}") for k in (3, 1)]
    conv_attrs = {"pads": [1, 1, 1, 1], "strides": [1, 1], **attrs}
    one_attrs = {"strides": conv_attrs["strides"]}
    nodes = [helper.make_node("Conv", ["x", "w3"], ["a"], name="c3", **conv_attrs),
             helper.make_node("Conv", ["x", "w1"], ["b"], name="c1", **one_attrs),
             helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("ConvTranspose", ["s", "w3"], ["t"], name="ct", **conv_attrs),
             helper.make_node("Mul", ["t", "k"], ["y"])]
    inits.append(numpy_helper.from_array(np.full((1, C, 1, 1), 2.0, dtype=np.float32), "k"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 10, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    fused, report = fuse(model)
    assert not report.fused and fused.graph.SerializeToString() == model.graph.SerializeToString()
    assert report.blocks and all(b.reason_code == "malformed" for b in report.blocks), \
        [(b.anchor, b.reason_code, b.reason) for b in report.blocks]


def test_a_large_weight_stored_as_a_segment_is_refused_at_load(tmp_path, capsys):
    """A weight the loader leaves in the file (or in a data file) is read through its external
    reference: the segment is refused at load, and by the reader an API caller reaches."""
    rng = np.random.default_rng(10)
    weight = numpy_helper.from_array(rng.standard_normal((96, 96, 3, 3)).astype(np.float32), "w")
    weight.segment.begin, weight.segment.end = 0, 1
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 96, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 96, 4, 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=0)
    capsys.readouterr()
    assert main([path, str(tmp_path / "out.onnx"), "--no-check"]) == 2
    assert "stored as a segment" in capsys.readouterr().err
    from onnx_repvgg.storage.external import UnreadableTensor, read_external
    with pytest.raises(UnreadableTensor, match="stored as a segment"):
        read_external(onnx.load(path, load_external_data=False).graph.initializer[0], str(tmp_path))


def test_external_data_longer_than_the_shape_is_refused_by_the_reader(tmp_path):
    """The loader refuses it; so does the reader behind fuse(model, base_dir=...)."""
    model = _model("pool")
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = onnx.load(path, load_external_data=False)
    weight = next(t for t in loaded.graph.initializer if t.name == "w3")
    entry = next(e for e in weight.external_data if e.key == "length")
    entry.value = str(int(entry.value) + 4)
    with pytest.raises(UnsupportedModel, match="tensor 'w3' holds 580 bytes of external data where its shape"):
        fuse(loaded, base_dir=str(tmp_path))


def test_a_pad_is_not_folded_into_a_conv_whose_window_the_operator_forbids():
    """Pad -> Conv(pads -1): the fold would write a Conv onnxruntime runs for one it refuses."""
    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array(rng.standard_normal((C, C, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "p")]
    for conv_attrs in (dict(pads=[-1, -1, -1, -1]), dict(strides=[0, 0])):
        nodes = [helper.make_node("Pad", ["x", "p"], ["q"]), helper.make_node("Conv", ["q", "w"], ["y"], **conv_attrs)]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 8, 8])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model)
        fused, report = fuse(model)
        assert fused.graph.SerializeToString() == model.graph.SerializeToString(), conv_attrs
        assert [b.reason_code for b in report.blocks] == ["malformed"], conv_attrs


def test_a_constant_whose_value_is_a_reference_refuses_the_model(tmp_path, capsys):
    """A Constant node's value that refers to a function attribute, read as a weight."""
    model = _model("pool")
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == "w1")
    value = helper.make_attribute("value", model.graph.initializer[index])
    value.ref_attr_name = "p"
    constant = helper.make_node("Constant", [], ["w1"], name="cst")
    constant.attribute.append(value)
    del model.graph.initializer[index]
    model.graph.node.insert(0, constant)
    onnx.checker.check_model(model)
    _assert_refused(model, tmp_path, capsys, "Constant 'cst' has an attribute 'value' that refers to a function's "
                    "attribute 'p'", "refers to a function's attribute 'p'")
