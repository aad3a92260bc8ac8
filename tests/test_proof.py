"""The proof (issue 10): blocks checked alone, end-to-end comparison of what is comparable,
dynamic sizes that exercise whole kernels, and the errors of bad validation input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from onnx_repvgg import fuse, validate
from onnx_repvgg.cli import main
from onnx_repvgg.proof.changes import find_regions
from onnx_repvgg.proof.continuity import not_comparable
from onnx_repvgg.storage.io import load
from tests.graphs import GraphBuilder
from tests.reference.export import export
from tests.reference.repvgg import randomize_bn
from tests.reference.topk_heads import OneToOneHead, QuerySelectionDetector
from tests.test_branch_sum import repvgg_block

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


def corrupt_tap(model: onnx.ModelProto, where=(0, 0, 0, 0), fraction=0.05) -> onnx.ModelProto:
    """A copy of a fused model with one tap of its first fused kxk kernel (k >= 3) moved by
    `fraction` of the kernel's largest magnitude."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for tensor in bad.graph.initializer:
        if tensor.name.endswith("fused_weight") and len(tensor.dims) == 4 and min(tensor.dims[2:]) >= 3:
            array = onnx.numpy_helper.to_array(tensor).copy()
            array[where] += fraction * np.abs(array).max()
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
            return bad
    raise AssertionError("no fused kxk kernel")


def dynamic_repvgg() -> onnx.ModelProto:
    """Two RepVGG blocks (3x3 + 1x1 + BN(x)) with a ReLU between, H and W dynamic."""
    b = GraphBuilder(channels=4)
    first = b.op("Relu", [repvgg_block(b, identity="bn")])
    b.x = first
    second = repvgg_block(b, identity="bn")
    b.x = "x"
    return b.model([second], input_shape=["N", 4, "H", "W"])


@pytest.mark.parametrize("where", [(0, 0, 0, 0), (1, 2, 2, 2), (3, 1, 0, 2)])
def test_off_centre_tap_error_is_caught_on_dynamic_sizes(where):
    """H and W are dynamic: validation chooses sizes at which every tap meets data (a 1x1 map
    would multiply every off-centre tap by padding zeros), and each block is checked alone."""
    model = dynamic_repvgg()
    fused, report = fuse(model)
    assert len(report.fused) == 2
    good = validate(model, fused)
    assert good.passed and good.kernels_covered is True
    assert good.input_shapes["x"][2] >= 3 and good.input_shapes["x"][3] >= 3
    assert [b.checked for b in good.blocks] == [True, True]
    bad = validate(model, corrupt_tap(fused, where))
    assert not bad.passed
    failing = [b for b in bad.blocks if b.checked and not b.passed]
    assert len(failing) == 1 and failing[0].max_rel_diff > 1e-3


def test_cli_catches_an_off_centre_tap_error(tmp_path, capsys, monkeypatch):
    onnx.save(dynamic_repvgg(), str(tmp_path / "in.onnx"))
    from onnx_repvgg.rules import branch_sum

    real = branch_sum.fused_weights

    def corner_moved(block):
        weight, bias = real(block)
        weight = weight.copy()
        weight[0, 0, 0, 0] += 0.05 * np.abs(weight).max()
        return weight, bias

    monkeypatch.setattr(branch_sum, "fused_weights", corner_moved)
    monkeypatch.delattr(branch_sum, "materialize_many")  # one block at a time, through fused_weights
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "checked alone" in out and "exceed the tolerance" in out
    assert not (tmp_path / "out.onnx").exists()
    data = json.loads((tmp_path / "r.json").read_text())
    assert [b["passed"] for b in data["validation"]["blocks"]] == [False, False]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("net_class", [QuerySelectionDetector, OneToOneHead])
def test_topk_models_validate_and_still_catch_a_wrong_weight(tmp_path, net_class, dynamo):
    torch.manual_seed(0)
    net = randomize_bn(net_class(), seed=3)
    x = torch.randn(1, 3, 32, 32)
    original = load(export(net, x, str(tmp_path / "train.onnx"), dynamo)).model
    fused, report = fuse(original)
    assert len(report.fused) >= 2 and not report.skipped
    for seed in range(3):
        result = validate(original, fused, seed=seed)
        assert result.passed, (seed, result.outputs, result.blocks)
        assert all(b.checked and b.passed for b in result.blocks)
        after = [o for o in result.outputs if not o.comparable]
        assert after and all(o.reason.startswith("after TopK") for o in after)
    bad = validate(original, corrupt_tap(fused, (0, 0, 2, 2)))
    assert not bad.passed
    assert any(b.checked and not b.passed for b in bad.blocks)


def test_cli_on_a_topk_model_reports_what_is_not_comparable(tmp_path, capsys):
    torch.manual_seed(0)
    net = randomize_bn(OneToOneHead(), seed=3)
    path = export(net, torch.randn(1, 3, 32, 32), str(tmp_path / "train.onnx"), False)
    for seed in ("0", "1", "2"):
        assert main([path, str(tmp_path / "out.onnx"), "--seed", seed, "--check", "2"]) == 0
        out = capsys.readouterr().out
        assert "validation: passed" in out
        assert "not comparable: output" in out and "after TopK '/TopK'" in out
        assert "blocks: 2 of 2 checked alone" in out  # two RepVGGDW blocks (the stem's BN is folded at export)


def test_regions_and_their_originals():
    model = dynamic_repvgg()
    fused, _ = fuse(model)
    regions = find_regions(model.graph, fused.graph)
    assert len(regions) == 2
    for region in regions:
        assert region.problem is None
        assert [fused.graph.node[i].op_type for i in region.fused_nodes] == ["Conv"]
        ops = sorted(model.graph.node[i].op_type for i in region.original_nodes)
        assert ops == ["Add", "Add", "BatchNormalization", "Conv", "Conv"]  # 3x3 + 1x1 + BN(x)
    assert regions[0].inputs == ["x"] and regions[1].inputs == [fused.graph.node[1].output[0]]


def test_continuity_follows_changed_values_only():
    b = GraphBuilder(channels=4)
    conv = b.conv(b.x, 4, 4, 3)
    flat = b.op("Flatten", [conv])
    values, indices = b.fresh("values"), b.fresh("indices")
    b.nodes.append(onnx.helper.make_node("TopK", [flat, b.constant(np.array([3], np.int64), "k")],
                                         [values, indices], name="TopK"))
    picked = b.op("Gather", [flat, indices], axis=1)
    shape_math = b.op("Floor", [b.constant(np.array([2.5], np.float32), "c")])
    jumped = not_comparable(onnx.helper.make_graph(b.nodes, "g", [], []), {conv})
    assert jumped == {indices: "after TopK 'TopK'", picked: "after TopK 'TopK'"}
    assert values not in jumped and shape_math not in jumped


def test_unknown_input_names_are_refused_with_the_real_ones(tmp_path, capsys):
    b = GraphBuilder()
    onnx.save(b.model([repvgg_block(b, identity="bn")]), str(tmp_path / "in.onnx"))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--input-shape", "images:1,3,224,224"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "'images'" in err and "its inputs: x" in err
    np.save(tmp_path / "a.npy", np.zeros((2, 4, 6, 6), np.float32))
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--input-data", f"image:{tmp_path / 'a.npy'}"]) == 2
    assert "its inputs: x" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "in.onnx"]
    with pytest.raises(Exception, match="its inputs: x"):
        validate(onnx.load(str(tmp_path / "in.onnx")), onnx.load(str(tmp_path / "in.onnx")),
                 input_shapes={"images": [1, 3, 8, 8]})


def test_a_shape_the_model_refuses_keeps_the_detail_and_points_at_input_shape(tmp_path, capsys):
    b = GraphBuilder()
    onnx.save(b.model([repvgg_block(b, identity="bn")]), str(tmp_path / "in.onnx"))  # x: 2x4x6x6
    assert main([str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--input-shape", "x:2,4,8,8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "Got: 8 Expected: 6" in err
    assert "--input-shape" in err and "--no-check" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_validate_takes_paths_with_external_data(tmp_path):
    torch.manual_seed(0)
    net = randomize_bn(OneToOneHead(), seed=3)
    path = export(net, torch.randn(1, 3, 32, 32), str(tmp_path / "train.onnx"), True)
    assert main([path, str(tmp_path / "fused.onnx"), "--no-check", "-q"]) == 0
    result = validate(path, str(tmp_path / "fused.onnx"))
    assert result.passed and len(result.blocks) == 2 and all(b.checked for b in result.blocks)


def test_a_choice_made_inside_a_loop_or_if_body_makes_the_outputs_not_comparable():
    """A greedy pick written as a Loop of ArgMax (torch.jit.script exports one) chooses inside
    the body: near-tied scores can swap there as after a TopK. The continuity walk did not look
    into bodies, and a correct fusion was refused (helper-23's hunt)."""
    b = GraphBuilder(channels=4)
    conv = b.conv(b.x, 4, 4, 3)
    flat = b.op("Flatten", [conv])
    pick = onnx.helper.make_graph([onnx.helper.make_node("ArgMax", [flat], ["best"], axis=1, name="Pick")], "then",
                                  [], [onnx.helper.make_tensor_value_info("best", onnx.TensorProto.INT64, None)])
    keep = onnx.helper.make_graph([onnx.helper.make_node("Shape", [flat], ["size"])], "else", [],
                                  [onnx.helper.make_tensor_value_info("size", onnx.TensorProto.INT64, None)])
    chosen, after = b.fresh("chosen"), b.fresh("after")
    b.nodes.append(onnx.helper.make_node("If", ["cond"], [chosen], then_branch=pick, else_branch=keep, name="Choose"))
    b.nodes.append(onnx.helper.make_node("Cast", [chosen], [after], to=onnx.TensorProto.FLOAT))
    plain = b.op("Relu", [flat])
    jumped = not_comparable(onnx.helper.make_graph(b.nodes, "g", [], []), {conv})
    assert jumped == {chosen: "after If 'Choose' (ArgMax 'Pick' inside)", after: "after If 'Choose' (ArgMax 'Pick' inside)"}
    assert plain not in jumped
