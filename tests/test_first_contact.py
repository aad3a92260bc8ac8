"""What a new user meets first (issue 12): the CI gate, the messages for files that are not
ONNX models, the 'nothing to fuse' line, and a pattern list that speaks of patterns."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

from onnx_repvgg.cli import main
from tests.graphs import GraphBuilder
from tests.test_branch_sum import repvgg_block


def _block_model(path):
    b = GraphBuilder()
    onnx.save(b.model([repvgg_block(b, identity="bn")]), str(path))


def _deploy_model(path):
    b = GraphBuilder()
    onnx.save(b.model([b.op("Relu", [b.conv(b.x, 4, 4, 3)])]), str(path))


def test_exit_code_gate(tmp_path, capsys):
    """--dry-run --exit-code: 1 when a block would be fused (a forgotten switch_to_deploy), 0 when
    the export is already in deploy form; nothing is written either way."""
    _block_model(tmp_path / "train.onnx")
    _deploy_model(tmp_path / "deploy.onnx")
    assert main([str(tmp_path / "train.onnx"), "--dry-run", "--exit-code"]) == 1
    assert "blocks: 1 would be fused" in capsys.readouterr().out
    assert main([str(tmp_path / "deploy.onnx"), "--dry-run", "--exit-code", "-q"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["deploy.onnx", "train.onnx"]
    assert main([str(tmp_path / "train.onnx"), "--dry-run"]) == 0  # without the flag: success
    capsys.readouterr()
    assert main([str(tmp_path / "train.onnx"), str(tmp_path / "out.onnx"), "--exit-code"]) == 2
    assert "--exit-code goes with --dry-run" in capsys.readouterr().err


def test_exit_code_gate_fails_a_model_whose_blocks_cannot_be_fused(tmp_path, capsys):
    """An export left in training mode (BN with training_mode=1) has blocks that cannot be fused:
    it is not in deploy form either, and the gate says so."""
    b = GraphBuilder()
    x = b.x
    skipped = b.add(b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4)), b.bn(x, 4, training_mode=1))
    onnx.save(b.model([skipped]), str(tmp_path / "train_mode.onnx"))
    assert main([str(tmp_path / "train_mode.onnx"), "--dry-run", "--exit-code", "-q"]) == 1


def test_the_gate_keeps_its_exit_code_when_stdout_goes_away(tmp_path):
    """`... --dry-run --exit-code | head -1` (pipefail): the reader leaves early, the code stays."""
    import subprocess
    import sys

    _block_model(tmp_path / "train.onnx")
    proc = subprocess.Popen([sys.executable, "-m", "onnx_repvgg", str(tmp_path / "train.onnx"), "--dry-run",
                             "--exit-code", "-v"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the report is printed
    assert proc.wait(timeout=120) == 1
    assert b"internal error" not in proc.stderr.read()


def test_help_documents_the_gate(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--exit-code" in out and "not in deploy form" in out and "near miss" in out


def test_nothing_to_fuse_says_what_that_means(tmp_path, capsys):
    _deploy_model(tmp_path / "deploy.onnx")
    assert main([str(tmp_path / "deploy.onnx"), str(tmp_path / "out.onnx")]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("nothing to fuse:"))
    assert "already in deploy form" in line and "--list-patterns" in line


class _Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("kind", ["state_dict", "module", "legacy_pickle", "torchscript", "garbage.pt"])
def test_pytorch_files_are_named_as_such(tmp_path, capsys, kind):
    path = tmp_path / ("model.pt" if kind != "torchscript" else "model.ts")
    net = _Small()
    if kind == "state_dict":
        torch.save(net.state_dict(), path)
    elif kind == "module":
        torch.save(net, path)
    elif kind == "legacy_pickle":
        torch.save(net.state_dict(), path, _use_new_zipfile_serialization=False)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(net), str(path))
    else:
        path.write_bytes(b"\x01\x02 not a checkpoint either")
    assert main([str(path), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "export it with torch.onnx.export first" in err or "export the module with torch.onnx.export" in err
    assert ("TorchScript archive" in err) == (kind == "torchscript")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("head, words", [
    (b"\x89HDF\r\n\x1a\n" + bytes(56), "HDF5"),
    (bytes(4) + b"TFL3" + bytes(56), "TFLite"),
    ((20).to_bytes(8, "little") + b'{"w": {"dtype": "F32"}}', "safetensors"),
])
def test_other_formats_are_named(tmp_path, capsys, head, words):
    path = tmp_path / "model.onnx"
    path.write_bytes(head)
    assert main([str(path), str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert words in err and "not an ONNX model" in err


def test_pattern_list_speaks_of_patterns_and_rules(capsys):
    assert main(["--list-patterns"]) == 0
    out = capsys.readouterr().out
    assert "rules:" in out and "patterns:" in out and "RepVGG" in out
    assert ".py" not in out


def _gelu_on_conv_model():
    """ConvNeXt/EfficientFormer style: GELU written out as x * 0.5 * (1 + erf(x / sqrt 2)) on a
    conv output, whose Div cannot fold into the conv (the Mul reads the conv output too)."""
    b = GraphBuilder()
    conv = b.conv(b.x, 4, 4, 3)
    divided = b.op("Div", [conv, b.constant(np.array(1.4142135, np.float32), "sqrt2")])
    erf = b.op("Erf", [divided])
    one_plus = b.op("Add", [erf, b.constant(np.array(1.0, np.float32), "one")])
    gelu = b.op("Mul", [b.op("Mul", [conv, one_plus]), b.constant(np.array(0.5, np.float32), "half")])
    return b.model([gelu])


def test_single_branch_folds_that_do_not_apply_are_not_near_misses(tmp_path, capsys):
    onnx.save(_gelu_on_conv_model(), str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), "--dry-run", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "blocks: 0 would be fused, 0 skipped" in out
    assert "1 single-branch fold not applicable (-v lists it)" in out
    assert "intermediate_shared" not in out and "has 2 uses" not in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"] == {"fused": 0, "skipped": 0, "not_applicable": 1}
    [record] = data["blocks"]
    assert record["status"] == "not_applicable" and record["reason_code"] == "intermediate_shared"
    assert main([str(tmp_path / "in.onnx"), "--dry-run", "-v"]) == 0
    assert "not applicable" in capsys.readouterr().out


def test_a_bn_that_cannot_fold_is_a_near_miss(tmp_path, capsys):
    """Conv -> BN whose conv output is read elsewhere: one branch, but a BN stays: a near miss."""
    b = GraphBuilder()
    conv = b.conv(b.x, 4, 4, 3)
    model = b.model([b.bn(conv, 4), b.op("Relu", [conv])])
    onnx.save(model, str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "blocks: 0 would be fused, 1 skipped" in out and "not applicable" not in out
    assert "nothing fused: 1 block found" in out and "not in deploy form" in out
