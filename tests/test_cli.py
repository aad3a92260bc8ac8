"""The command line through main([...]): outputs, reports, exit codes and bad input."""

import json
import os
import shutil

import numpy as np
import onnx
import pytest

from onnx_repvgg.cli import main
from tests.graphs import GraphBuilder, op_counts
from tests.test_branch_sum import repvgg_block

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def block_model(path, identity="bn"):
    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity=identity)])
    onnx.save(model, str(path))
    return model


def listing(folder):
    return sorted(os.listdir(folder))


def test_fuses_and_reports(tmp_path, capsys):
    block_model(tmp_path / "in.onnx")
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 0
    out = capsys.readouterr().out
    assert "blocks: 1 fused, 0 skipped" in out
    assert "validation: passed" in out
    assert "BatchNormalization" in out and "params" in out and "file size" in out
    assert op_counts(onnx.load(str(tmp_path / "out.onnx"))) == {"Conv": 1}
    assert listing(tmp_path) == ["in.onnx", "out.onnx"]  # no temp files left


def test_nothing_to_fuse_resaves_model(tmp_path, capsys):
    b = GraphBuilder()
    model = b.model([b.op("Relu", [b.x])])
    onnx.save(model, str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 0
    assert "blocks: 0 fused, 0 skipped" in capsys.readouterr().out
    assert onnx.load(str(tmp_path / "out.onnx")).graph == model.graph


def test_skipped_block_reason_is_printed(tmp_path, capsys):
    b = GraphBuilder()
    x = b.x
    out = b.add(b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4)), b.bn(x, 4, training_mode=1))
    onnx.save(b.model([out]), str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 0
    text = capsys.readouterr().out
    assert "skipped" in text and "training_mode=1" in text


def test_json_report_and_dry_run(tmp_path, capsys):
    block_model(tmp_path / "in.onnx")
    report_path = tmp_path / "r.json"
    assert main([str(tmp_path / "in.onnx"), "--dry-run", "--json", str(report_path)]) == 0
    assert "dry run" in capsys.readouterr().out
    assert listing(tmp_path) == ["in.onnx", "r.json"]
    data = json.loads(report_path.read_text())
    assert data["schema_version"] == 2
    assert data["summary"] == {"fused": 1, "skipped": 0, "not_applicable": 0}
    assert data["blocks"][0]["branches"] == ["3x3", "1x1", "bn"]
    assert data["before"]["op_counts"]["BatchNormalization"] == 1
    assert data["after"]["op_counts"] == {"Conv": 1}


def test_validation_failure_writes_nothing(tmp_path, capsys, monkeypatch):
    block_model(tmp_path / "in.onnx")
    from onnx_repvgg.rules import branch_sum
    real = branch_sum.fused_weights
    monkeypatch.setattr(branch_sum, "fused_weights", lambda block: tuple(v * 1.01 for v in real(block)))
    monkeypatch.delattr(branch_sum, "materialize_many")  # one block at a time, through fused_weights
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "exceed rtol" in captured.out
    assert "nothing written" in captured.err
    assert listing(tmp_path) == ["in.onnx"]


def test_tolerance_and_check_flags(tmp_path, capsys):
    block_model(tmp_path / "in.onnx")
    args = [str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--check", "3", "--rtol", "1e-3",
            "--atol", "1e-4", "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    v = json.loads((tmp_path / "r.json").read_text())["validation"]
    assert v["input_sets"] == 3 and v["passed"]
    assert v["outputs"][0]["rtol"] == 1e-3 and v["outputs"][0]["atol"] == 1e-4


def test_no_check_skips_validation(tmp_path, capsys):
    block_model(tmp_path / "in.onnx")
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "validation: skipped (--no-check)" in out and "validation: passed" not in out


def test_input_shape_for_dynamic_dims(tmp_path, capsys):
    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity="bn")], input_shape=["N", 4, "H", "W"])
    onnx.save(model, str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--input-shape", "x:2,4,9,7",
                 "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["input_shapes"] == {"x": [2, 4, 9, 7]}


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(MODELS) if f.endswith(".onnx")))
def test_sample_models(tmp_path, capsys, name):
    src = os.path.join(MODELS, name)
    assert main([src, str(tmp_path / "out.onnx"), "--check", "2"]) == 0
    text = capsys.readouterr().out
    assert " 0 skipped" in text and "validation: passed" in text
    fused = onnx.load(str(tmp_path / "out.onnx"))
    assert "BatchNormalization" not in op_counts(fused)
    if os.path.exists(src + ".data"):  # external data in, external data out
        assert os.path.exists(tmp_path / "out.onnx.data")


def test_external_data_input_folder_elsewhere(tmp_path, capsys):
    src = os.path.join(MODELS, "repvgg_a0_tiny_dynamo.onnx")
    shutil.copy(src, tmp_path / "m.onnx")
    shutil.copy(src + ".data", tmp_path / "repvgg_a0_tiny_dynamo.onnx.data")
    (tmp_path / "out").mkdir()
    before = (tmp_path / "m.onnx").read_bytes()
    assert main([str(tmp_path / "m.onnx"), str(tmp_path / "out" / "fused.onnx")]) == 0
    assert listing(tmp_path / "out") == ["fused.onnx", "fused.onnx.data"]
    assert (tmp_path / "m.onnx").read_bytes() == before


# --- bad input: one line on stderr, exit 2, no traceback, nothing written --------------------

def _bad(tmp_path, capsys, args, fragment):
    before = listing(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert listing(tmp_path) == before


def test_missing_file(tmp_path, capsys):
    _bad(tmp_path, capsys, [str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx")], "no such file")


def test_directory(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    _bad(tmp_path, capsys, [str(tmp_path / "d"), str(tmp_path / "o.onnx")], "is a directory")


def test_empty_file(tmp_path, capsys):
    (tmp_path / "e.onnx").write_bytes(b"")
    _bad(tmp_path, capsys, [str(tmp_path / "e.onnx"), str(tmp_path / "o.onnx")], "is empty")


def test_random_bytes(tmp_path, capsys):
    (tmp_path / "r.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    _bad(tmp_path, capsys, [str(tmp_path / "r.onnx"), str(tmp_path / "o.onnx")], "not an ONNX model")


def test_truncated_protobuf(tmp_path, capsys):
    data = open(os.path.join(MODELS, "repvgg_tiny_g4_ts.onnx"), "rb").read()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    _bad(tmp_path, capsys, [str(tmp_path / "t.onnx"), str(tmp_path / "o.onnx")], "is truncated")


def test_valid_protobuf_not_a_model(tmp_path, capsys):
    tensor = onnx.numpy_helper.from_array(np.ones(3, np.float32), "t")
    (tmp_path / "t.onnx").write_bytes(tensor.SerializeToString())
    _bad(tmp_path, capsys, [str(tmp_path / "t.onnx"), str(tmp_path / "o.onnx")], "not an ONNX model")


def test_missing_external_data(tmp_path, capsys):
    shutil.copy(os.path.join(MODELS, "repvgg_a0_tiny_dynamo.onnx"), tmp_path / "m.onnx")
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx")], "is missing")


@pytest.mark.parametrize("location,message", [("../../etc/passwd", "leaves the model's folder"),
                                               ("/etc/passwd", "is absolute; refused")])
def test_external_data_paths_outside_the_folder_are_refused(tmp_path, capsys, location, message):
    model = onnx.load(os.path.join(MODELS, "repvgg_a0_tiny_dynamo.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (tmp_path / "sub").mkdir()
    onnx.save(model, str(tmp_path / "sub" / "m.onnx"))
    _bad(tmp_path, capsys, [str(tmp_path / "sub" / "m.onnx"), str(tmp_path / "o.onnx")], message)


def test_unsupported_opset(tmp_path, capsys):
    model = block_model(tmp_path / "m.onnx")
    model.opset_import[0].version = 999
    onnx.save(model, str(tmp_path / "m.onnx"))
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx")], "opset 999")


def test_model_failing_checker(tmp_path, capsys):
    model = block_model(tmp_path / "m.onnx")
    model.graph.node[0].input[1] = "undefined_weight"
    onnx.save(model, str(tmp_path / "m.onnx"))
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx")], "checker")


def test_output_folder_missing(tmp_path, capsys):
    block_model(tmp_path / "m.onnx")
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx"), str(tmp_path / "no" / "o.onnx")], "does not exist")


def test_output_is_input_needs_overwrite(tmp_path, capsys):
    block_model(tmp_path / "m.onnx")
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx")], "--overwrite")
    assert main([str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--overwrite"]) == 0
    assert op_counts(onnx.load(str(tmp_path / "m.onnx"))) == {"Conv": 1}


def test_bad_usage(tmp_path, capsys):
    block_model(tmp_path / "m.onnx")
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx")], "output path is required")
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx"), "o.onnx", "--input-shape", "x:1,a"], "integers")
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx"), "o.onnx", "--bogus"], "unrecognized")


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert "onnx-repvgg" in capsys.readouterr().out


def test_list_patterns(capsys):
    assert main(["--list-patterns"]) == 0
    out = capsys.readouterr().out
    assert "branch_sum:" in out and "bn_into_consumer:" in out and "bn_to_conv (opt-in)" in out
    for family in ("RepVGG", "MobileOne", "RepViT", "QARepVGG", "RepMixer", "RepLKNet", "ACNet", "PP-LCNetV2",
                   "RepGhost", "ultralytics RepConv"):
        assert family in out


def test_only_and_skip_choose_rules(tmp_path, capsys):
    block_model(tmp_path / "in.onnx")
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "a.onnx"), "--skip", "branch_sum"]) == 0
    assert "blocks: 0 fused" in capsys.readouterr().out
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "b.onnx"), "--only", "branch_sum"]) == 0
    assert "blocks: 1 fused" in capsys.readouterr().out
    _bad(tmp_path, capsys, [str(tmp_path / "in.onnx"), str(tmp_path / "c.onnx"), "--only", "nope"], "unknown rule")


def test_bn_to_conv(tmp_path, capsys):
    b = GraphBuilder()
    model = b.model([b.op("Relu", [b.bn(b.op("Relu", [b.x]), 4)])])
    onnx.save(model, str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "plain.onnx")]) == 0
    assert op_counts(onnx.load(str(tmp_path / "plain.onnx")))["BatchNormalization"] == 1
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "conv.onnx"), "--bn-to-conv"]) == 0
    assert "validation: passed" in capsys.readouterr().out
    assert op_counts(onnx.load(str(tmp_path / "conv.onnx"))) == {"Relu": 2, "Conv": 1}


def test_input_data(tmp_path, capsys):
    block_model(tmp_path / "in.onnx")
    np.save(tmp_path / "x.npy", np.ones((2, 4, 6, 6), np.float32))
    args = [str(tmp_path / "in.onnx"), str(tmp_path / "o.onnx"), "--input-data", f"x:{tmp_path / 'x.npy'}",
            "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    assert json.loads((tmp_path / "r.json").read_text())["validation"]["passed"]
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "p.onnx"), "--input-data", f"x:{tmp_path / 'obj.npy'}"]) == 2
    capsys.readouterr()
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "p.onnx"), "--input-data", f"x:{tmp_path / 'obj.npy'}"]) == 2
    assert "allow_pickle" in capsys.readouterr().err
    assert not (tmp_path / "p.onnx").exists()


def test_external_data_is_read_lazily_and_copied_by_range(tmp_path, capsys):
    """External weights stay on disk: only fused blocks are read; untouched tensors are copied."""
    src = os.path.join(MODELS, "repvgg_a0_tiny_dynamo.onnx")
    assert main([src, str(tmp_path / "out.onnx"), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["passed"]
    fused = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    locations = {e.value for t in fused.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    offsets = [int(e.value) for t in fused.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) == len(set(offsets))
    # every byte of the data file belongs to a live tensor (plus alignment padding)
    live = sum(int(e.value) for t in fused.graph.initializer for e in t.external_data if e.key == "length")
    size = os.path.getsize(tmp_path / "out.onnx.data")
    assert live <= size < live + 64 * len(offsets) + 4096 * 8
    full = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(full, full_check=True)
    counts = op_counts(full)
    assert counts["Conv"] == 22 and "BatchNormalization" not in counts and "Add" not in counts


def test_overwrite_external_data_model(tmp_path, capsys):
    src = os.path.join(MODELS, "repvgg_a0_tiny_dynamo.onnx")
    shutil.copy(src, tmp_path / "m.onnx")
    shutil.copy(src + ".data", tmp_path / "repvgg_a0_tiny_dynamo.onnx.data")
    assert main([str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--overwrite"]) == 0
    assert "validation: passed" in capsys.readouterr().out
    fused = onnx.load(str(tmp_path / "m.onnx"))
    assert "BatchNormalization" not in op_counts(fused)
    assert listing(tmp_path) == ["m.onnx", "m.onnx.data", "repvgg_a0_tiny_dynamo.onnx.data"]


def test_dry_run_on_external_data_writes_nothing(tmp_path, capsys):
    src = os.path.join(MODELS, "repvgg_a0_tiny_dynamo.onnx")
    assert main([src, "--dry-run"]) == 0
    assert "22 would be fused" in capsys.readouterr().out


def test_hostile_external_dims_fail_cleanly(tmp_path, capsys):
    model = onnx.load(os.path.join(MODELS, "repvgg_a0_tiny_dynamo.onnx"), load_external_data=False)
    shutil.copy(os.path.join(MODELS, "repvgg_a0_tiny_dynamo.onnx.data"), tmp_path / "repvgg_a0_tiny_dynamo.onnx.data")
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    del tensor.dims[:]
    tensor.dims.extend([100000, 100000, 3, 3])
    onnx.save(model, str(tmp_path / "m.onnx"))
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx")], "declares shape")


@pytest.mark.parametrize("failure,code", [(KeyboardInterrupt, 130), (OSError(28, "No space left on device"), 2)])
def test_failed_write_keeps_previous_output(tmp_path, capsys, monkeypatch, failure, code):
    block_model(tmp_path / "in.onnx")
    (tmp_path / "out.onnx").write_bytes(b"previous")
    from onnx_repvgg.storage import io as rio
    from onnx_repvgg.storage import staging

    def failing_write(self, model, external, source_dir=None, memory=None, nested=True):
        with open(self.model_path, "wb") as f:
            f.write(b"half a model")
        if isinstance(failure, OSError):
            raise rio.BadInput(f"cannot write: {failure.strerror}")
        raise failure

    monkeypatch.setattr(staging.Staging, "write", failing_write)
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == code
    assert (tmp_path / "out.onnx").read_bytes() == b"previous"
    assert listing(tmp_path) == ["in.onnx", "out.onnx"]


def test_custom_op_model_needs_no_check(tmp_path, capsys):
    b = GraphBuilder()
    out = repvgg_block(b, identity="bn")
    b.nodes.append(onnx.helper.make_node("MyOp", [out], ["y"], domain="com.example"))
    graph = onnx.helper.make_graph(b.nodes, "g", [onnx.helper.make_tensor_value_info("x", 1, [2, 4, 6, 6])],
                                   [onnx.helper.make_tensor_value_info("y", 1, [2, 4, 6, 6])], b.initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.example", 1)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "original" in err and "--no-check" in err and err.count("\n") == 1
    assert listing(tmp_path) == ["in.onnx"]
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--no-check"]) == 0
    fused = onnx.load(str(tmp_path / "out.onnx"))
    assert op_counts(fused) == {"Conv": 1, "MyOp": 1}


def test_internal_error_is_one_line(tmp_path, capsys, monkeypatch):
    block_model(tmp_path / "in.onnx")
    import onnx_repvgg.cli as cli

    def broken(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(cli, "fuse", broken)
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 3
    err = capsys.readouterr().err
    assert "internal error" in err and "simulated bug" in err and "Traceback" not in err
    assert listing(tmp_path) == ["in.onnx"]


def test_dynamic_dims_note(tmp_path, capsys):
    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity="bn")], input_shape=["N", 4, "H", "W"])
    onnx.save(model, str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 0
    out = capsys.readouterr().out
    # spatial dims large enough that every 3x3 window meets data, not 1
    assert "dynamic dims chosen: x[0]=1, x[2]=32, x[3]=32 (every kernel meets data)" in out


def test_dynamic_spatial_dims_too_small_to_run_are_retried_larger(tmp_path, capsys):
    """A model whose windows need more than 1x1 (here a 3x3 pooling window without padding)
    is validated at the first of 32, 64, ... where every window meets data, and says so."""
    b = GraphBuilder()
    pooled = b.op("MaxPool", [repvgg_block(b, identity="bn")], kernel_shape=[3, 3])
    model = b.model([pooled], input_shape=["N", 4, "H", "W"])
    onnx.save(model, str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "validation: passed" in out
    assert "dynamic dims chosen: x[0]=1, x[2]=32, x[3]=32" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["input_shapes"] == {"x": [1, 4, 32, 32]}


def test_progress_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    block_model(tmp_path / "in.onnx")
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "a.onnx")]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "b.onnx")]) == 0
    err = capsys.readouterr().err
    assert "fusing..." in err and "validating with onnxruntime..." in err


def test_output_folder_not_writable(tmp_path, capsys, monkeypatch):
    block_model(tmp_path / "m.onnx")
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("ro") else real_access(p, mode))
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx"), str(tmp_path / "ro" / "o.onnx")], "not writable")
    assert os.listdir(tmp_path / "ro") == []


def test_allow_densify_flag(tmp_path, capsys):
    b = GraphBuilder()
    out = b.add(b.conv(b.x, 4, 4, 3, group=4), b.conv(b.x, 4, 4, 1, pads=[0] * 4))
    onnx.save(b.model([out]), str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "a.onnx")]) == 0
    assert "--allow-densify" in capsys.readouterr().out
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "b.onnx"), "--allow-densify"]) == 0
    assert "validation: passed" in capsys.readouterr().out
    assert op_counts(onnx.load(str(tmp_path / "b.onnx"))) == {"Conv": 1}


def test_quiet_and_verbose(tmp_path, capsys):
    src = os.path.join(MODELS, "repvgg_a0_tiny_ts.onnx")
    assert main([src, str(tmp_path / "q.onnx"), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert main([src, "--dry-run"]) == 0
    assert main([src, "--dry-run", "-v"]) == 0
    default, verbose = capsys.readouterr().out.split("(dry run, nothing written)")[1:]
    assert verbose.count("  fused  ") == 22
    assert default.count("  fused  ") == 22  # 22 blocks fit the default table (up to 30)


def test_many_blocks_are_summarized(tmp_path, capsys):
    b = GraphBuilder()
    for _ in range(35):
        b.x = b.op("Relu", [repvgg_block(b, identity="bn")])
    last, b.x = b.x, "x"
    onnx.save(b.model([last]), str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fused: 35x 3x3+1x1+bn (-v lists every block)" in out and out.count("  fused  ") == 0
    assert main([str(tmp_path / "in.onnx"), "--dry-run", "-v"]) == 0
    assert capsys.readouterr().out.count("  fused  ") == 35


def test_help_documents_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for line in ("0  success", "1  the fused model differs", "2  bad usage or bad input", "3  internal error", "130 interrupted"):
        assert line in out


def test_json_schema(tmp_path, capsys):
    b = GraphBuilder()
    x = b.x
    skipped = b.add(b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4)), b.bn(x, 4, training_mode=1))
    fused = repvgg_block(b, identity="bare")
    onnx.save(b.model([skipped, fused]), str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) >= {"schema_version", "tool_version", "input_path", "output_path", "size_before", "size_after",
                         "rounds", "summary", "timings", "before", "after", "blocks", "validation",
                         "frozen_initializer_inputs", "notes"}
    assert data["frozen_initializer_inputs"] == 0 and data["notes"] == []
    assert data["output_path"] == str(tmp_path / "out.onnx") and data["size_after"] > 0
    assert set(data["timings"]) == {"load", "fuse", "save", "validate"}
    for side in ("before", "after"):
        assert set(data[side]) == {"op_counts", "nodes", "params"}
    by_status = {r["status"]: r for r in data["blocks"]}
    assert set(by_status) == {"fused", "skipped"}
    for record in data["blocks"]:
        assert set(record) == {"anchor", "branches", "status", "reason_code", "reason", "group", "strides",
                               "fused_node", "check_max_rel_diff"}
    assert by_status["skipped"]["reason_code"] == "bn_training" and "training_mode=1" in by_status["skipped"]["reason"]
    assert by_status["fused"]["fused_node"] and by_status["fused"]["reason"] is None
    assert 0 <= by_status["fused"]["check_max_rel_diff"] < 1e-5
    v = data["validation"]
    assert set(v) >= {"passed", "input_sets", "outputs", "input_shapes", "error", "defaulted_dims", "tensors",
                      "blocks", "kernels_covered", "notes", "timings"}
    assert {o["name"] for o in v["outputs"]} == {skipped, fused}
    for o in v["outputs"] + v["tensors"]:
        assert set(o) == {"name", "max_abs_diff", "max_rel_diff", "rtol", "atol", "passed", "role", "comparable",
                          "reason"}
    assert {o["role"] for o in v["tensors"]} == {"block input"}  # the block's output is a graph output
    [block] = v["blocks"]
    assert set(block) == {"nodes", "outputs", "checked", "passed", "max_abs_diff", "max_rel_diff", "input_shapes",
                          "note", "reason"}
    assert block["checked"] and block["passed"] and block["nodes"][0] == by_status["fused"]["fused_node"]
    assert block["reason"] is None


def test_large_models_are_written_with_external_data(tmp_path, capsys, monkeypatch):
    """Over the 2 GB protobuf limit (lowered here) the output goes to OUT.onnx.data."""
    from onnx_repvgg.storage import io as rio

    monkeypatch.setattr(rio, "EXTERNAL_THRESHOLD", 100)
    b = GraphBuilder(channels=16)
    onnx.save(b.model([repvgg_block(b, c=16, identity="bn")]), str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 0
    assert "validation: passed" in capsys.readouterr().out
    assert listing(tmp_path) == ["in.onnx", "out.onnx", "out.onnx.data"]
    fused = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in fused.graph.initializer)


def test_hostile_inline_dims_fail_cleanly(tmp_path, capsys):
    model = block_model(tmp_path / "m.onnx")
    del model.graph.initializer[0].dims[:]
    model.graph.initializer[0].dims.extend([1000000, 1000000, 3, 3])
    onnx.save(model, str(tmp_path / "m.onnx"))
    _bad(tmp_path, capsys, [str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx")], "too small for the declared shape")


def test_interrupt_during_fusion(tmp_path, capsys, monkeypatch):
    block_model(tmp_path / "in.onnx")
    import onnx_repvgg.cli as cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "fuse", interrupted)
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert listing(tmp_path) == ["in.onnx"]


def test_colour_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    block_model(tmp_path / "in.onnx")
    assert main([str(tmp_path / "in.onnx"), "--dry-run"]) == 0
    assert "\033[" not in capsys.readouterr().out
    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert main([str(tmp_path / "in.onnx"), "--dry-run"]) == 0
    assert "\033[32mfused\033[0m" in capsys.readouterr().out
    monkeypatch.setenv("NO_COLOR", "1")
    assert main([str(tmp_path / "in.onnx"), "--dry-run"]) == 0
    assert "\033[" not in capsys.readouterr().out


def test_check_sets_beyond_memory_are_refused_before_they_are_made(tmp_path, capsys, monkeypatch):
    """--check N keeps every set's inputs and outputs for the comparison: N sets that would take
    more than half the memory available are refused after the first, with one line and exit 2
    (the kernel would otherwise kill the process unannounced), and nothing is written."""
    import importlib

    validate = importlib.import_module("onnx_repvgg.validate")
    block_model(tmp_path / "in.onnx")
    monkeypatch.setattr(validate, "available_memory", lambda: 64 << 20)
    made = []
    feeds_for = validate.feeds_for

    def counted(*args):
        made.append(1)
        if len(made) > 10:  # (without the check: sets until memory runs out)
            raise KeyboardInterrupt
        return feeds_for(*args)

    monkeypatch.setattr(validate, "feeds_for", counted)
    out = tmp_path / "out.onnx"
    assert main([str(tmp_path / "in.onnx"), str(out), "--check", "1000000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1000000000 input sets would keep" in err
    assert "more than half the memory available (64.00 MB): ask for at most" in err and "(--check)" in err
    assert "Nothing written" in err and len(made) == 1 and listing(tmp_path) == ["in.onnx"]
    fits = int(err.split("ask for at most ")[1].split()[0])  # 64 MB / 2 over the first set's bytes
    assert 1000 < fits < 1000000000
    made.clear()
    assert main([str(tmp_path / "in.onnx"), str(out), "-q", "--check", "3"]) == 0 and len(made) == 3


def test_input_data_names_an_input_whose_name_holds_colons(tmp_path, capsys):
    """tf2onnx names inputs 'input:0': NAME:FILE is split where the rest names a file."""
    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity="bn")])
    old = b.x
    model.graph.input[0].name = "input:0"
    for node in model.graph.node:
        node.input[:] = ["input:0" if name == old else name for name in node.input]
    onnx.save(model, str(tmp_path / "in.onnx"))
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal(b.input_shape).astype(np.float32))
    report = tmp_path / "r.json"
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "-q", "--input-data", f"input:0:{data}",
                 "--json", str(report)]) == 0
    assert json.loads(report.read_text())["validation"]["given_inputs"] == ["input:0"]
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "o2.onnx"), "-q", "--input-data",
                 f"input:0:{tmp_path / 'absent.npy'}"]) == 2
    assert "cannot read a .npy array" in capsys.readouterr().err


def test_types_validation_cannot_make_or_read_are_named_as_such(tmp_path, capsys):
    """A bfloat16 graph output (onnxruntime runs the model; numpy cannot take the value) or a
    string input without data was blamed on the original model not running in onnxruntime."""
    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity="bn")])
    out = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Cast", [out], ["half"], to=onnx.TensorProto.BFLOAT16))
    model.graph.output.append(onnx.helper.make_tensor_value_info("half", onnx.TensorProto.BFLOAT16, b.input_shape))
    onnx.save(model, str(tmp_path / "bf16.onnx"))
    assert main([str(tmp_path / "bf16.onnx"), str(tmp_path / "out.onnx"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime cannot hand a value the comparison reads to numpy" in err and "bfloat16" in err
    assert "--no-check writes the fused model unvalidated" in err and "does not run" not in err
    assert not os.path.exists(tmp_path / "out.onnx")

    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity="bn")])
    model.graph.input.append(onnx.helper.make_tensor_value_info("s", onnx.TensorProto.STRING, [2]))
    model.graph.node.append(onnx.helper.make_node("Identity", ["s"], ["s_out"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("s_out", onnx.TensorProto.STRING, [2]))
    onnx.save(model, str(tmp_path / "text.onnx"))
    assert main([str(tmp_path / "text.onnx"), str(tmp_path / "out.onnx"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "input 's' has type tensor(string), which random inputs do not cover (--input-data" in err
    np.save(tmp_path / "s.npy", np.array(["a", "bc"]))  # given: used as it is
    assert main([str(tmp_path / "text.onnx"), str(tmp_path / "out.onnx"), "-q", "--input-data",
                 f"s:{tmp_path / 's.npy'}"]) == 0
    np.save(tmp_path / "f.npy", np.ones(2, np.float32))  # data of another type: the input's fault, not the model's
    assert main([str(tmp_path / "text.onnx"), str(tmp_path / "o2.onnx"), "-q", "--input-data",
                 f"s:{tmp_path / 'f.npy'}"]) == 2
    err = capsys.readouterr().err
    assert "Check --input-shape/--input-data against the model's inputs" in err and "does not run" not in err


def test_a_negative_declared_dim_is_chosen_like_a_dynamic_one(tmp_path, capsys):
    """dim_value -1 (the checker passes it; runtimes read it as unknown) was passed to numpy as a
    size ("negative dimensions are not allowed")."""
    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity="bn")])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    onnx.save(model, str(tmp_path / "in.onnx"))
    report = tmp_path / "r.json"
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "-q", "--json", str(report)]) == 0
    validation = json.loads(report.read_text())["validation"]
    assert validation["passed"] and validation["defaulted_dims"] == ["x[0]"] and validation["input_shapes"]["x"][0] > 0


def test_an_interrupt_between_the_moves_into_place_waits_for_both(tmp_path, capsys, monkeypatch):
    """A Ctrl-C between moving the data file and the model into place left an old model beside
    new data (with --overwrite: the input corrupted), and one after them said 'nothing written'
    (helper-22's hunt). The moves finish, and the message says the output is complete."""
    import signal as signals

    import onnxruntime as ort

    from onnx_repvgg.storage import staging

    src = os.path.join(MODELS, "repvgg_a0_tiny_dynamo.onnx")
    model = tmp_path / "repvgg_a0_tiny_dynamo.onnx"  # (its data file's name is written in it)
    shutil.copy(src, model)
    shutil.copy(src + ".data", str(model) + ".data")
    replace = os.replace
    moves = []

    def interrupted_after_the_first(a, b):
        replace(a, b)
        moves.append(b)
        if len(moves) == 1:
            os.kill(os.getpid(), signals.SIGINT)  # (delivered at once unless held)

    monkeypatch.setattr(staging.os, "replace", interrupted_after_the_first)
    assert main([str(model), str(model), "--overwrite", "--no-check"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"onnx-repvgg: interrupted after {model} was written (it is complete)"
    assert [os.path.basename(m) for m in moves] == [model.name + ".data", model.name]
    fused = onnx.load(str(model))  # the new model with the new data
    assert "BatchNormalization" not in op_counts(fused) and listing(tmp_path) == [model.name, model.name + ".data"]
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    reference = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)


def test_an_interrupt_while_the_report_is_printed_says_the_output_is_written(tmp_path, capsys, monkeypatch):
    from onnx_repvgg.report import Report

    block_model(tmp_path / "in.onnx")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Report, "to_text", interrupted)
    out = tmp_path / "out.onnx"
    assert main([str(tmp_path / "in.onnx"), str(out)]) == 130
    assert capsys.readouterr().err.strip() == f"onnx-repvgg: interrupted after {out} was written (it is complete)"
    assert listing(tmp_path) == ["in.onnx", "out.onnx"]


def test_an_output_whose_data_file_path_is_a_directory_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    import onnx_repvgg.cli as cli

    block_model(tmp_path / "in.onnx")
    os.mkdir(tmp_path / "out.onnx.data")
    monkeypatch.setattr(cli, "fuse", lambda *a, **k: pytest.fail("ran"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"onnx-repvgg: error: the output's data file {tmp_path / 'out.onnx.data'} is a directory"


def test_empty_paths_are_refused_and_the_report_gets_a_new_files_mode(tmp_path, capsys):
    """(helper-22's hunt: an empty output ran the whole pass before failing, --json "" was
    ignored, and the report was written 0600 where the model gets the umask's mode.)"""
    block_model(tmp_path / "in.onnx")
    for args in ([str(tmp_path / "in.onnx"), ""], [str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--json", ""],
                 ["", str(tmp_path / "out.onnx")]):
        assert main(args) == 2
        assert capsys.readouterr().err.strip().endswith("path is empty")
    assert listing(tmp_path) == ["in.onnx"]
    report = tmp_path / "r.json"
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "-q", "--json", str(report)]) == 0
    assert os.stat(report).st_mode & 0o777 == os.stat(tmp_path / "out.onnx").st_mode & 0o777
