"""PaddlePaddle models exported by paddle2onnx: training form against the library's deploy form.

The exports are checked in (tests/data/paddle/, made by tests/reference/export_paddle.py from
tests/reference/paddle_models.py with paddlepaddle 3.3.1 and paddle2onnx 2.1.0 at opset 13;
.ci/paddle-exports regenerates and compares them): PP-LCNetV3 (LearnableRepLayer with its
learnable affine blocks), PP-YOLOE (CSPRepResNet's RepVggBlock with and without alpha),
PP-LCNetV2 (RepDepthwiseSeparable) and PP-HGNetV2 (HG blocks with use_lab), BN statistics and
affine parameters randomized. paddle2onnx writes an Identity after every elementwise op and
starts PP-LCNetV3's `out = 0; out += branch` as a multiply by 1 and an add of 0: the linear
trees see through both.

Each training export, fused, has at most the deploy export's Conv, BatchNormalization and Add
counts (here exactly the op counts of the fused deploy export), and paddle's outputs. A
learnable affine right after a block (PP-LCNetV3, before the activation) folds into the fused
conv, where the deploy form keeps it: fewer nodes than the deploy export.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_repvgg import fuse, validate
from onnx_repvgg.cli import main
from tests.graphs import op_counts, run

DATA = Path(__file__).parent / "data" / "paddle"
KEY_OPS = ("Conv", "BatchNormalization", "Add", "Mul", "Identity")


def key_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = op_counts(model)
    return {op: counts.get(op, 0) for op in KEY_OPS} | {"nodes": len(model.graph.node)}


# Conv, BatchNormalization, Add, Mul, Identity and node counts of the training export, the fused
# training export and the deploy export; every op of the fused one; the reasons of its skips.
EXPECTED = {
    "pplcnetv3": dict(
        train=dict(Conv=30, BatchNormalization=32, Add=44, Mul=23, Identity=62, nodes=199),
        fused=dict(Conv=9, BatchNormalization=0, Add=4, Mul=10, Identity=9, nodes=40),
        deploy=dict(Conv=9, BatchNormalization=1, Add=19, Mul=17, Identity=31, nodes=85),
        fused_ops={"Add": 4, "Conv": 9, "GlobalAveragePool": 1, "HardSigmoid": 6, "Identity": 9, "Mul": 10,
                   "Relu": 1},
        # the affines before a padded depthwise conv keep their shift (the border would read 0)
        skipped=[], not_applicable=["consumer_padding", "consumer_padding"]),
    "ppyoloe": dict(
        train=dict(Conv=21, BatchNormalization=19, Add=8, Mul=20, Identity=24, nodes=114),
        fused=dict(Conv=18, BatchNormalization=0, Add=3, Mul=18, Identity=17, nodes=78),
        deploy=dict(Conv=18, BatchNormalization=13, Add=8, Mul=18, Identity=22, nodes=101),
        fused_ops={"Add": 3, "Concat": 2, "Conv": 18, "HardSigmoid": 2, "Identity": 17, "Mul": 18,
                   "ReduceMean": 2, "Sigmoid": 16},
        skipped=[]),
    "pplcnetv2": dict(
        train=dict(Conv=14, BatchNormalization=12, Add=7, Mul=1, Identity=8, nodes=53),
        fused=dict(Conv=10, BatchNormalization=0, Add=1, Mul=1, Identity=2, nodes=25),
        deploy=dict(Conv=10, BatchNormalization=5, Add=6, Mul=1, Identity=7, nodes=40),
        fused_ops={"Add": 1, "Conv": 10, "GlobalAveragePool": 1, "HardSigmoid": 1, "Identity": 2, "Mul": 1,
                   "Relu": 9},
        skipped=[]),
    # The HG block's residual x + lab(relu(conv-BN(.))) reads the stride-2 downsample's conv-BN,
    # whose output three nodes use: the affine's bias cannot go into that conv (a single-branch
    # fold that does not apply: reported as not applicable, not as a near miss).
    "pphgnetv2": dict(
        train=dict(Conv=18, BatchNormalization=18, Add=12, Mul=11, Identity=41, nodes=113),
        fused=dict(Conv=18, BatchNormalization=0, Add=10, Mul=9, Identity=37, nodes=87),
        deploy=dict(Conv=18, BatchNormalization=0, Add=30, Mul=11, Identity=59, nodes=131),
        fused_ops={"Add": 10, "Concat": 2, "Conv": 18, "Identity": 37, "Mul": 9, "Relu": 11},
        # two affines after a ReLU fold into the unpadded conv that reads them; one before a
        # padded conv keeps its shift
        skipped=[], not_applicable=["intermediate_shared", "consumer_padding"]),
}


def load(name: str, form: str) -> onnx.ModelProto:
    return onnx.load(str(DATA / f"{name}_{form}.onnx"))


def paddle_io(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / f"{name}_io.npz") as io:
        return io["x"], io["y"]


def assert_matches_paddle(model: onnx.ModelProto, name: str) -> None:
    x, y = paddle_io(name)
    got = run(model, {model.graph.input[0].name: x})[0]
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-5 * float(np.abs(y).max()))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_training_export_fuses_to_deploy_form(name):
    train, deploy = load(name, "train"), load(name, "deploy")
    expected = EXPECTED[name]
    assert key_counts(train) == expected["train"]
    assert key_counts(deploy) == expected["deploy"]
    fused, report = fuse(train)
    onnx.checker.check_model(fused, full_check=True)
    assert key_counts(fused) == expected["fused"]
    assert op_counts(fused) == expected["fused_ops"]
    assert [r.reason_code for r in report.skipped] == expected["skipped"]
    assert [r.reason_code for r in report.not_applicable] == expected.get("not_applicable", [])
    for record in report.skipped + report.not_applicable:
        assert record.reason
    for op in ("Conv", "BatchNormalization", "Add"):
        assert key_counts(fused)[op] <= key_counts(deploy)[op], op
    assert len(fused.graph.node) < len(deploy.graph.node)
    assert [o.name for o in fused.graph.output] == [o.name for o in train.graph.output]
    # The deploy export, fused too (its BN stems, its conv biases as Adds), reaches the same ops.
    fused_deploy, _ = fuse(deploy)
    assert op_counts(fused_deploy) == op_counts(fused)
    for model in (train, fused, deploy):
        assert_matches_paddle(model, name)
    result = validate(train, fused, input_sets=2)
    assert result.passed, result.outputs
    assert max(o.max_rel_diff for o in result.outputs) < 1e-5
    again, second = fuse(fused)  # a fixed point
    assert not second.fused and op_counts(again) == op_counts(fused)


def test_learnable_affine_folds_into_the_fused_conv():
    """PP-LCNetV3: lab(sum of branches) is scale * x + bias with a per-tensor scale and bias, right
    after the block and before hardswish. It folds into the fused conv, so no fused Conv feeds an
    Identity, a BN, or a Mul or Add by a constant (hardswish is HardSigmoid(x) * x): each of the 6
    LearnableRepLayers keeps its conv and loses the affine the deploy form still computes (a Mul,
    an Add and their two Identities)."""
    train, deploy = load("pplcnetv3", "train"), load("pplcnetv3", "deploy")
    fused, _ = fuse(train)
    constants = {t.name for t in fused.graph.initializer}
    readers: dict[str, list[str]] = {}
    for node in fused.graph.node:
        affine = node.op_type in ("Mul", "Add") and any(name in constants for name in node.input)
        for name in node.input:
            readers.setdefault(name, []).append("affine" if affine else node.op_type)
    convs = [n for n in fused.graph.node if n.op_type == "Conv"]
    # the hardswish of the 5 stride-1 layers, the SE's hardsigmoid
    assert sum("HardSigmoid" in readers[c.output[0]] for c in convs) == 6
    for conv in convs:
        assert not set(readers[conv.output[0]]) & {"affine", "Identity", "BatchNormalization"}, conv.name
    deploy_counts, fused_counts = key_counts(deploy), key_counts(fused)
    # the 6 affines after the fused convs, and one more that a pointwise conv after it absorbs
    assert deploy_counts["Mul"] - fused_counts["Mul"] == 7
    # 7 affines (Mul, Add, 2 Identities), 8 conv biases as Add + Identity (6 re-parameterized
    # convs, 2 in the SE), the stem's BN
    assert deploy_counts["nodes"] - fused_counts["nodes"] == 7 * 4 + 8 * 2 + 1


def test_yoloe_alpha_blocks_fuse():
    """alpha * BN(conv1x1(x)) inside the sum (a Mul by a one-element parameter) is a scale of the
    1x1 branch: every RepVggBlock, with alpha or without, becomes one 3x3 conv."""
    fused, report = fuse(load("ppyoloe", "train"))
    labels = sorted("+".join(r.branches) for r in report.fused)
    assert labels.count("3x3+1x1") == 3
    assert not report.skipped


@pytest.mark.parametrize("name", ["pplcnetv3", "ppyoloe"])
def test_cli_on_paddle_export(tmp_path, name):
    """The CLI writes what fuse() makes, validated."""
    out = tmp_path / f"{name}_fused.onnx"
    assert main([str(DATA / f"{name}_train.onnx"), str(out), "-q", "--check", "2"]) == 0
    fused, _ = fuse(load(name, "train"))
    assert out.read_bytes() == fused.SerializeToString()
    assert_matches_paddle(onnx.load(str(out)), name)
