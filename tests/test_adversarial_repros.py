"""The ten defects of issue 15, each rebuilt from its repro: unusual but valid models.

Each case runs the CLI with and without --no-check. A --no-check output is compared with the
original in onnxruntime at sizes where every kernel tap meets data; the input files must be
byte-identical afterwards, and nothing may be left behind on failure.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_repvgg import fuse
from onnx_repvgg.cli import main
from tests.graphs import GraphBuilder, op_counts, random_feed, run


def digest(folder) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


def assert_equal_outputs(original: onnx.ModelProto, fused: onnx.ModelProto, rtol=1e-4, atol=1e-5):
    for seed in (0, 1):
        feeds = random_feed(original, seed)
        for e, a in zip(run(original, feeds), run(fused, feeds)):
            np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol)


def constant_via(b: GraphBuilder, value, stem):
    """A constant computed at run time from constants (Neg of Neg): shape inference cannot see it."""
    return b.op("Neg", [b.constant(-np.asarray(value), stem)])


# 1. Slice with ONNX's clamping rules, read through Shape -> Gather -> Cast as a scale.
@pytest.mark.parametrize("starts, ends, step, size", [
    (-100, -200, -1, 1),   # both clamp: start to 0, end to -1 -> one element
    (100, -200, -1, 5),    # start clamps to dim-1, end to -1 -> the whole axis reversed
    (-100, 100, 1, 5),     # positive step: clamp to [0, dim]
    (2, 1, 1, 0),          # empty
    (-1, -100, -2, 3),     # 4, 2, 0
])
def test_slice_shape_follows_onnx_clamping(starts, ends, step, size):
    b = GraphBuilder(channels=4, spatial=(5, 5), batch=1)
    x = b.x
    c3, c1 = b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4)
    sliced = b.op("Slice", [x, constant_via(b, np.array([starts], np.int64), "st"),
                            constant_via(b, np.array([ends], np.int64), "en"),
                            constant_via(b, np.array([3], np.int64), "ax"),
                            constant_via(b, np.array([step], np.int64), "sp")])
    dim = b.op("Gather", [b.op("Shape", [sliced]), b.constant(np.array(3, np.int64), "i")], axis=0)
    scale = b.op("Cast", [dim], to=TensorProto.FLOAT)
    model = b.model([b.add(b.op("Mul", [c3, scale]), c1)])
    fused, report = fuse(model)
    assert_equal_outputs(model, fused)
    if report.fused:  # folded: with the dim ONNX defines
        assert op_counts(fused) == {"Conv": 1}


# 2. float16: a factor kept on an addend that is not a branch must not overflow.
def test_float16_kept_factor_overflow_is_a_skip():
    b = GraphBuilder(channels=4, spatial=(6, 6), dtype=np.float16, batch=1)
    x = b.x
    y = "y"
    b.extra_inputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT16, [1, 4, 6, 6]))
    c300 = b.constant(np.array(300, np.float16), "k")
    scaled = b.op("Mul", [b.op("Mul", [y, c300]), c300])
    out = b.op("Sum", [b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4), scaled])
    model = b.model([out])
    fused, report = fuse(model)
    assert [r.reason_code for r in report.skipped] == ["overflow"]
    assert "float16" in report.skipped[0].reason
    assert fused.SerializeToString() == model.SerializeToString()


# 3. opsets 7..13: a BN that declares its training outputs is in training mode.
@pytest.mark.parametrize("opset", [7, 9, 11, 13])
def test_bn_with_declared_training_outputs_is_not_folded(opset):
    b = GraphBuilder(channels=4, spatial=(5, 5), batch=2, opset=opset)
    x = b.x
    bn_params = [b.constant(v.astype(np.float32), s) for v, s in zip(
        [b.rng.uniform(0.5, 1.5, 4), b.rng.uniform(-1, 1, 4), b.rng.uniform(-1, 1, 4), b.rng.uniform(0.5, 2, 4)],
        ["g", "b", "m", "v"])]
    conv = b.conv(x, 4, 4, 3)
    extra = ["bn_mean", "bn_var", "bn_saved_mean", "bn_saved_var"]  # declared, never read
    b.nodes.append(helper.make_node("BatchNormalization", [conv, *bn_params], ["bn_out", *extra], name="BN"))
    model = b.model([b.add("bn_out", b.conv(x, 4, 4, 1, pads=[0] * 4))])
    fused, report = fuse(model)
    assert "bn_training" in {r.reason_code for r in report.skipped}
    assert_equal_outputs(model, fused)


# 4. The output's data file must never be a file the input reads.
def test_output_data_file_that_the_input_reads_is_refused(tmp_path, capsys):
    b = GraphBuilder(channels=8, spatial=(6, 6), batch=1)
    model = b.model([b.add(b.conv(b.x, 8, 8, 3), b.conv(b.x, 8, 8, 1, pads=[0] * 4))])
    onnx.save(model, str(tmp_path / "in.onnx"), save_as_external_data=True, location="out.onnx.data",
              size_threshold=0)
    before = digest(tmp_path)
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "out.onnx.data" in err and "input" in err and len(err.strip().splitlines()) == 1
    assert digest(tmp_path) == before
    onnx.checker.check_model(str(tmp_path / "in.onnx"), full_check=True)


@pytest.mark.parametrize("target", ["data", "model"])
def test_json_report_onto_an_input_file_is_refused(tmp_path, capsys, target):
    b = GraphBuilder(channels=8, spatial=(6, 6), batch=1)
    model = b.model([b.add(b.conv(b.x, 8, 8, 3), b.conv(b.x, 8, 8, 1, pads=[0] * 4))])
    onnx.save(model, str(tmp_path / "in.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    before = digest(tmp_path)
    report = tmp_path / ("w.bin" if target == "data" else "in.onnx")
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--json", str(report)]) == 2
    assert "input" in capsys.readouterr().err
    assert digest(tmp_path) == before


def test_output_model_onto_the_inputs_data_file_is_refused(tmp_path, capsys):
    b = GraphBuilder(channels=8, spatial=(6, 6), batch=1)
    model = b.model([b.add(b.conv(b.x, 8, 8, 3), b.conv(b.x, 8, 8, 1, pads=[0] * 4))])
    onnx.save(model, str(tmp_path / "in.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    before = digest(tmp_path)
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "w.bin"), "--overwrite"]) == 2
    assert "w.bin" in capsys.readouterr().err
    assert digest(tmp_path) == before


# 5. A Constant node's tensor in external data is read from the model's folder, not the cwd.
def _constant_node_weight_model(folder):
    b = GraphBuilder(channels=4, spatial=(6, 6), batch=1)
    x = b.x
    w = (b.rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32)
    tensor = numpy_helper.from_array(w, "w3_value")
    b.nodes.append(helper.make_node("Constant", [], ["w3"], name="W3", value=tensor))
    conv3 = b.op("Conv", [x, "w3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = b.model([b.add(conv3, b.conv(x, 4, 4, 1, pads=[0] * 4))])
    const = model.graph.node[0].attribute[0].t
    with open(os.path.join(folder, "w3.bin"), "wb") as f:
        f.write(w.tobytes())
    const.ClearField("raw_data")
    const.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w3.bin"), ("offset", "0"), ("length", str(w.nbytes))):
        entry = const.external_data.add()
        entry.key, entry.value = key, value
    return model, w


@pytest.mark.parametrize("decoy", [False, True])
def test_constant_node_external_data_is_read_beside_the_model(tmp_path, capsys, monkeypatch, decoy):
    folder = tmp_path / "m"
    folder.mkdir()
    model, w = _constant_node_weight_model(str(folder))
    onnx.save(model, str(folder / "in.onnx"))
    work = tmp_path / "cwd"
    work.mkdir()
    if decoy:
        (work / "w3.bin").write_bytes((w * 7).tobytes())
    monkeypatch.chdir(work)
    assert main([str(folder / "in.onnx"), str(tmp_path / "out.onnx"), "--no-check"]) == 0
    fused = onnx.load(str(tmp_path / "out.onnx"))
    assert op_counts(fused) == {"Conv": 1}
    original = onnx.load(str(folder / "in.onnx"), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(original, str(folder))
    assert_equal_outputs(original, fused)


def test_fuse_api_refuses_constant_node_external_data_without_base_dir(tmp_path):
    model, _ = _constant_node_weight_model(str(tmp_path))
    with pytest.raises(ValueError, match="base_dir"):
        fuse(model)
    fused, report = fuse(model, base_dir=str(tmp_path))
    assert len(report.fused) == 1


# 6. Weights computed through sequences: a skip or a fold, never an exception.
def test_weight_through_a_sequence_is_not_an_error(tmp_path, capsys):
    b = GraphBuilder(channels=4, spatial=(6, 6), batch=1)
    x = b.x
    w0 = b.constant((b.rng.standard_normal((6, 4, 3, 3)) * 0.3).astype(np.float32), "w0")
    seq = b.op("SplitToSequence", [w0, b.constant(np.array([4, 2], np.int64), "split")], axis=0)
    w = b.op("SequenceAt", [seq, b.constant(np.array(0, np.int64), "at")])
    conv3 = b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = b.model([b.add(conv3, b.conv(x, 4, 4, 1, pads=[0] * 4))])
    onnx.save(model, str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--no-check"]) == 0
    assert_equal_outputs(model, onnx.load(str(tmp_path / "out.onnx")))


# 7. External data without `length`: computed from shape and dtype; a wrong one refused.
def _external_model_without_length(folder, length=None):
    b = GraphBuilder(channels=8, spatial=(6, 6), batch=1)
    model = b.model([b.op("Relu", [b.add(b.conv(b.x, 8, 8, 3), b.conv(b.x, 8, 8, 1, pads=[0] * 4))])])
    onnx.save(onnx.ModelProto.FromString(model.SerializeToString()), os.path.join(folder, "in.onnx"),
              save_as_external_data=True, location="w.bin", size_threshold=0)
    saved = onnx.load(os.path.join(folder, "in.onnx"), load_external_data=False)
    for t in saved.graph.initializer[:1] if length is not None else saved.graph.initializer:
        entries = [(e.key, e.value) for e in t.external_data if e.key != "length"]
        if length is not None:
            entries.append(("length", str(length(t))))
        del t.external_data[:]
        for key, value in entries:
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    onnx.save(saved, os.path.join(folder, "in.onnx"))
    return model


@pytest.mark.parametrize("check", [[], ["--no-check"]])
def test_external_data_without_length(tmp_path, capsys, check):
    model = _external_model_without_length(str(tmp_path))
    before = digest(tmp_path)
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), *check]) == 0
    fused = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(fused, full_check=True)
    assert op_counts(fused) == {"Conv": 1, "Relu": 1}
    assert_equal_outputs(model, fused)
    after = digest(tmp_path)
    assert {k: after[k] for k in before} == before


def test_external_data_with_a_longer_length_is_refused(tmp_path, capsys):
    _external_model_without_length(str(tmp_path), length=lambda t: 4 * int(np.prod(t.dims)) + 4)
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "length" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()


# 8. --bn-to-conv on a BN with float16 data and float32 parameters (opset 15).
def test_bn_to_conv_mixed_type_bn_gets_the_data_type():
    b = GraphBuilder(channels=4, spatial=(5, 5), dtype=np.float16, batch=1, opset=15)
    params = [b.constant(v.astype(np.float32), s) for v, s in zip(
        [b.rng.uniform(0.5, 1.5, 4), b.rng.uniform(-1, 1, 4)], ["g", "b"])]
    stats = [b.constant(v.astype(np.float16), s) for v, s in zip(
        [b.rng.uniform(-1, 1, 4), b.rng.uniform(0.5, 2, 4)], ["m", "v"])]
    relu = b.op("Relu", [b.x])
    b.nodes.append(helper.make_node("BatchNormalization", [relu, *params, *stats], ["y"], name="BN"))
    model = b.model(["y"])
    fused, report = fuse(model, rules=["bn_to_conv"])
    onnx.checker.check_model(fused, full_check=True)
    assert op_counts(fused) == {"Relu": 1, "Conv": 1}
    assert_equal_outputs(model, fused, rtol=1e-2, atol=1e-2)


# 9. Every name in the model is taken: sparse initializers, functions, subgraphs.
def test_new_names_avoid_sparse_initializers():
    b = GraphBuilder(channels=4, spatial=(5, 5), batch=1)
    x = b.x
    conv3 = b.conv(x, 4, 4, 3)
    model = b.model([b.add(conv3, b.conv(x, 4, 4, 1, pads=[0] * 4))])
    stem = model.graph.node[0].name  # the main conv: the fused weight is named after it
    sparse = onnx.SparseTensorProto()
    sparse.dims.extend([2])
    sparse.values.CopyFrom(numpy_helper.from_array(np.array([1.0], np.float32), f"{stem}.fused_weight"))
    sparse.indices.CopyFrom(numpy_helper.from_array(np.array([0], np.int64), f"{stem}.fused_bias"))
    model.graph.sparse_initializer.append(sparse)
    onnx.checker.check_model(model, full_check=True)
    fused, report = fuse(model)
    assert len(report.fused) == 1
    onnx.checker.check_model(fused, full_check=True)
    names = [t.name for t in fused.graph.initializer] + [s.values.name for s in fused.graph.sparse_initializer]
    assert len(names) == len(set(names))


# 10. Exit codes follow the table in every order of failure.
def test_unwritable_json_path_is_refused_before_any_work(tmp_path, capsys):
    b = GraphBuilder(channels=4, spatial=(5, 5), batch=1)
    onnx.save(b.model([b.add(b.conv(b.x, 4, 4, 3), b.conv(b.x, 4, 4, 1, pads=[0] * 4))]), str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--json",
                 str(tmp_path / "missing" / "r.json")]) == 2
    assert "r.json" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def test_validation_failure_keeps_exit_1_with_a_json_report(tmp_path, capsys, monkeypatch):
    b = GraphBuilder(channels=4, spatial=(5, 5), batch=1)
    onnx.save(b.model([b.add(b.conv(b.x, 4, 4, 3), b.conv(b.x, 4, 4, 1, pads=[0] * 4))]), str(tmp_path / "in.onnx"))
    from onnx_repvgg.rules import branch_sum
    real = branch_sum.fused_weights
    monkeypatch.setattr(branch_sum, "fused_weights", lambda block: tuple(v * 1.1 for v in real(block)))
    monkeypatch.delattr(branch_sum, "materialize_many")  # one block at a time, through fused_weights
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--json", str(tmp_path / "r.json")]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["passed"] is False
    assert not (tmp_path / "out.onnx").exists()
