"""LeViT: BatchNorm over token layouts (Linear -> BN1d on flattened tokens), folded into the
MatMul on either side of it, and every BN left beside a layer reported with its reason.

End to end: the PyTorch reference (tests/reference/levit.py), exported with the TorchScript
exporter, the dynamo exporter and dynamo with optimize=False, fuses to the op counts of the
export of its deploy conversion, with every BN folded, and equals it numerically.
Hand-built graphs: each exporter's form of a LinearNorm over rank-3 and rank-4 tokens, BN
before a token MatMul, and each near miss with its reason.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from onnx_repvgg import fuse, validate
from onnx_repvgg.graph import GraphView, opset_version
from onnx_repvgg.storage.io import load
from tests.graphs import GraphBuilder, fuse_and_compare, op_counts, run
from tests.reference.export import export
from tests.reference.levit import LeViT
from tests.reference.repvgg import randomize_bn
from tests.test_families import EXPORTERS, assert_cli_writes


def data_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op counts of the nodes that read data: those computed from constants alone (a weight's
    Transpose in an unoptimized dynamo export, Constant nodes) are left out."""
    view = GraphView(model.graph, opset_version(model))
    counts: dict[str, int] = {}
    for index, node in enumerate(model.graph.node):
        if index not in view.constant_nodes:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def levit_against_deploy(tmp_path, use_conv: bool, dynamo, dynamic_batch: bool = False):
    torch.manual_seed(0)
    net = randomize_bn(LeViT(use_conv=use_conv), seed=11)
    deploy = net.deploy()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = net(x).numpy()
        np.testing.assert_allclose(deploy(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    tag = {False: "ts", True: "dynamo", "unoptimized": "dynamo_unopt"}[dynamo]
    train_path = str(tmp_path / f"train_{tag}.onnx")
    train = load(export(net, x, train_path, dynamo, dynamic_batch)).model
    deployed = load(export(deploy, x, str(tmp_path / f"deploy_{tag}.onnx"), dynamo, dynamic_batch)).model
    fused, report = fuse(train)
    onnx.checker.check_model(fused, full_check=True)
    assert not report.skipped, [(b.anchor, b.reason) for b in report.skipped]
    assert op_counts(train)["BatchNormalization"] > 0
    assert "BatchNormalization" not in op_counts(fused)
    got = run(fused, {fused.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    result = validate(train, fused, input_sets=2)
    assert result.passed, result.outputs
    assert result.max_rel_diff < 1e-5
    assert_cli_writes(fused, train_path, str(tmp_path / f"cli_{tag}.onnx"))
    return train, fused, deployed, report


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("use_conv", [False, True], ids=["levit", "levit_conv"])
def test_levit_fuses_to_deploy_form(tmp_path, use_conv, dynamo):
    train, fused, deployed, report = levit_against_deploy(tmp_path, use_conv, dynamo)
    if dynamo == "unoptimized" and not use_conv:
        # That export transposes each Linear weight in the graph (a Transpose of an initializer);
        # the fused model holds the 17 folded LinearNorm weights already transposed.
        assert data_op_counts(fused) == data_op_counts(deployed)
        counts, expected = op_counts(fused), op_counts(deployed)
        assert counts.pop("Transpose") == expected.pop("Transpose") - 17
        assert counts == expected
    else:
        assert op_counts(fused) == op_counts(deployed), (op_counts(train), op_counts(fused), op_counts(deployed))
    if not use_conv:  # 17 LinearNorms (qkv, proj, MLP x2, subsample kv/q/proj): MatMul + BN -> MatMul + Add
        assert sum(1 for r in report.fused if r.branches == ["matmul", "bn"]) == 17


def test_levit_dynamic_batch_torchscript(tmp_path):
    """With a dynamic batch, TorchScript's reshape_as (Reshape to Shape(MatMul output)) still
    proves that the reshapes around the BN cancel."""
    train, fused, deployed, _ = levit_against_deploy(tmp_path, False, False, dynamic_batch=True)
    assert op_counts(fused) == op_counts(deployed)


# -- hand-built token graphs ---------------------------------------------------------------

def tokens(shape=(2, 5, 6), seed=0) -> GraphBuilder:
    b = GraphBuilder(seed=seed)
    b.input_shape = list(shape)
    return b


def matmul(b: GraphBuilder, x: str, fin: int, fout: int, weight_shape=None) -> str:
    w = b.constant((b.rng.standard_normal(weight_shape or (fin, fout)) * 0.3).astype(np.float32), "W")
    return b.op("MatMul", [x, w])


def reshape(b: GraphBuilder, x: str, shape) -> str:
    return b.op("Reshape", [x, b.constant(np.array(shape, np.int64), "shape")])


def reshape_as(b: GraphBuilder, x: str, like: str) -> str:
    return b.op("Reshape", [x, b.op("Shape", [like])])


def linear_norm(form: str, b: GraphBuilder, x: str, fin: int, fout: int) -> str:
    """A LinearNorm as each exporter writes it, over tokens of any rank."""
    m = matmul(b, x, fin, fout)
    rank = len(b.input_shape)
    if form == "torchscript":
        return reshape_as(b, b.bn(b.op("Flatten", [m], axis=rank - 1), fout), m)
    if form == "dynamo":
        return reshape(b, b.bn(reshape(b, m, [-1, fout]), fout), b.input_shape[:-1] + [fout])
    if form == "unsqueezed":  # BN on [B*N, D, 1]: still the feature axis
        flat = b.op("Unsqueeze", [reshape(b, m, [-1, fout]), b.constant(np.array([2], np.int64), "axes")])
        squeezed = b.op("Squeeze", [b.bn(flat, fout), b.constant(np.array([2], np.int64), "axes")])
        return reshape(b, b.op("Identity", [squeezed]), b.input_shape[:-1] + [fout])
    raise ValueError(form)


@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 3, 4, 6)], ids=["rank3", "rank4"])
@pytest.mark.parametrize("form", ["torchscript", "dynamo", "unsqueezed"])
def test_linear_norm_folds_into_matmul(form, shape):
    b = tokens(shape)
    out = b.op("Relu", [linear_norm(form, b, b.x, shape[-1], 8)])
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"MatMul": 1, "Add": 1, "Relu": 1}
    assert [(r.status, r.branches) for r in report.blocks] == [("fused", ["matmul", "bn"])]


def test_linear_norm_with_dynamic_tokens():
    """reshape_as proves the reshapes cancel when the batch and token counts are dynamic."""
    b = tokens()
    out = linear_norm("torchscript", b, b.x, 6, 8)
    fused, _ = fuse_and_compare(b.model([out], input_shape=["batch", "tokens", 6]))
    assert op_counts(fused) == {"MatMul": 1, "Add": 1}


def test_reshape_to_heads_is_kept():
    """dynamo merges reshape_as with the view to heads: MatMul -> Reshape [B*N, D] -> BN ->
    Reshape [B, N, heads, D/heads] becomes MatMul -> Add -> that one Reshape."""
    b = tokens()
    out = reshape(b, b.bn(reshape(b, matmul(b, b.x, 6, 8), [-1, 8]), 8), [2, 5, 2, 4])
    fused, _ = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"MatMul": 1, "Add": 1, "Reshape": 1}


def test_kept_reshape_keeps_its_shape_source():
    """A Reshape to Shape(M)[1:] after the BN stays, and so does the Shape node it reads."""
    b = tokens((1, 5, 6))
    m = matmul(b, b.x, 6, 8)
    out = b.op("Reshape", [b.bn(b.op("Flatten", [m], axis=2), 8), b.op("Shape", [m], start=1)])
    fused, _ = fuse_and_compare(b.model([b.op("Relu", [out])]))
    assert op_counts(fused) == {"MatMul": 1, "Shape": 1, "Add": 1, "Reshape": 1, "Relu": 1}


def test_bn_on_flattened_tokens_without_reshape_back():
    """Nothing cancels: the Add takes the BN's place, the Reshape stays."""
    b = tokens()
    out = b.op("Relu", [b.bn(reshape(b, matmul(b, b.x, 6, 8), [-1, 8]), 8)])
    fused, _ = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"MatMul": 1, "Reshape": 1, "Add": 1, "Relu": 1}


@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 3, 4, 6)], ids=["rank3", "rank4"])
def test_bn_before_token_matmul(shape):
    """BN1d over flattened tokens, then a Linear: MatMul(X, diag(s) W) + h @ W."""
    b = tokens(shape)
    rank = len(shape)
    normed = reshape_as(b, b.bn(b.op("Flatten", [b.x], axis=rank - 1), shape[-1]), b.x)
    fused, report = fuse_and_compare(b.model([matmul(b, normed, shape[-1], 8)]))
    assert op_counts(fused) == {"MatMul": 1, "Add": 1}
    assert [(r.status, r.branches) for r in report.blocks] == [("fused", ["bn", "matmul"])]


def test_bn_before_2d_matmul_through_reshape_becomes_gemm():
    b = tokens()
    out = matmul(b, b.bn(reshape(b, b.x, [-1, 6]), 6), 6, 8)
    fused, _ = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Reshape": 1, "Gemm": 1}


def test_bn_before_two_token_matmuls():
    """Two consumers: each folds, the layout ops stay (rewired to the BN's input)."""
    b = tokens()
    normed = reshape(b, b.bn(reshape(b, b.x, [-1, 6]), 6), [2, 5, 6])
    fused, _ = fuse_and_compare(b.model([matmul(b, normed, 6, 8), matmul(b, normed, 6, 3)]))
    assert op_counts(fused) == {"Reshape": 2, "MatMul": 2, "Add": 2}


@pytest.mark.parametrize("shape", [(2, 4, 5, 5), ("N", 4, "H", "W")], ids=["static", "dynamic"])
def test_bn_through_identity_into_conv_needs_no_shapes(shape):
    """An Identity (paddle2onnx writes them) keeps the shape: no static shape is needed for the
    fold. Where shapes are known (inferred when a rule asks) the Identity goes too: the conv
    then reads the tensor it copies."""
    b = tokens(shape)
    out = b.conv(b.op("Identity", [b.bn(b.op("Relu", [b.x]), 4)]), 4, 6, 1, pads=[0] * 4)
    fused, _ = fuse_and_compare(b.model([out]))
    kept = {"Identity": 1} if shape[0] == "N" else {}
    assert op_counts(fused) == {"Relu": 1, **kept, "Conv": 1}


@pytest.mark.parametrize("with_matmul", [True, False])
def test_bn1d_unsqueezed_into_conv(with_matmul):
    """BatchNorm1d over [B, C, L], unsqueezed to [B, C, L, 1] for a 1x1 Conv2d: axis 1 both.
    The proof needs static shapes, which the pass infers when a rule asks for one (in any
    graph: with a MatMul node or not)."""
    b = tokens((2, 4, 5))
    t = b.bn(b.op("Relu", [b.x]), 4)
    out = b.conv(b.op("Unsqueeze", [t, b.constant(np.array([3], np.int64), "axes")]), 4, 6, 1, pads=[0] * 4)
    outputs = [out, matmul(b, b.x, 5, 3)] if with_matmul else [out]
    fused, report = fuse_and_compare(b.model(outputs))
    assert op_counts(fused) == {"Relu": 1, "Unsqueeze": 1, "Conv": 1, **({"MatMul": 1} if with_matmul else {})}
    assert [r.status for r in report.blocks] == ["fused"]


def test_bn1d_unsqueezed_into_conv_of_unknown_length():
    """The same with a dynamic length L: the BN's channel axis cannot be matched to the conv's
    without L, so the BN stays, with its reason."""
    b = tokens((2, 4, "L"))
    t = b.bn(b.op("Relu", [b.x]), 4)
    out = b.conv(b.op("Unsqueeze", [t, b.constant(np.array([3], np.int64), "axes")]), 4, 6, 1, pads=[0] * 4)
    _, report = fuse_and_compare(b.model([out]))
    assert [r.reason_code for r in report.blocks] == ["shape_unknown"]


# -- near misses ---------------------------------------------------------------------------

def _bn_after_direct(b):
    return b.bn(matmul(b, b.x, 6, 8), 5)  # BN on [2, 5, 8] normalizes the 5 tokens


def _bn_after_split(b):
    return reshape(b, b.bn(reshape(b, matmul(b, b.x, 6, 8), [10, 4, 2]), 4), [2, 5, 8])


def _bn_after_merged(b):
    return reshape(b, b.bn(reshape(b, matmul(b, b.x, 6, 8), [2, 40]), 40), [2, 5, 8])


def _bn1d_before_linear(b):
    return matmul(b, b.bn(b.x, 5), 6, 8)  # BatchNorm1d on [B, C, L] normalizes C, the Linear reads L


def _shape_unknown(b):
    b.extra_inputs.append(helper.make_tensor_value_info("target", onnx.TensorProto.INT64, [3]))
    m = matmul(b, b.x, 6, 8)
    return reshape_as(b, b.bn(b.op("Reshape", [m, "target"]), 8), m)


def _shared(b):
    flat = b.op("Flatten", [matmul(b, b.x, 6, 8)], axis=2)
    b.extra_outputs = [b.op("Relu", [flat])]
    return reshape(b, b.bn(flat, 8), [2, 5, 8])


def _flat_is_output(b):
    flat = b.op("Flatten", [matmul(b, b.x, 6, 8)], axis=2)
    b.extra_outputs = [flat]
    return reshape(b, b.bn(flat, 8), [2, 5, 8])


def _weight_is_input(b):
    b.extra_inputs.append(helper.make_tensor_value_info("w_in", onnx.TensorProto.FLOAT, [6, 8]))
    m = b.op("MatMul", [b.x, "w_in"])
    return reshape_as(b, b.bn(b.op("Flatten", [m], axis=2), 8), m)


def _training_bn(b):
    m = matmul(b, b.x, 6, 8)
    return reshape_as(b, b.bn(b.op("Flatten", [m], axis=2), 8, training_mode=1), m)


def _conv_then_reshape(b):
    b.input_shape = [2, 3, 4, 4]
    y = b.conv(b.x, 3, 4, 3)
    return b.op("Relu", [b.bn(reshape(b, y, [2, 4, 16]), 4)])


def _batched_weight(b):
    normed = reshape(b, b.bn(reshape(b, b.x, [-1, 6]), 6), [2, 5, 6])
    return matmul(b, normed, 6, 8, weight_shape=(2, 6, 8))


def _bn_before_conv_and_relu(b):
    b.input_shape = [2, 4, 5, 5]
    t = b.bn(b.op("Relu", [b.x]), 4)
    b.extra_outputs = [b.op("Relu", [t])]
    return b.conv(t, 4, 4, 1, pads=[0] * 4)


def _bn_before_padded_conv(b):
    b.input_shape = [2, 4, 5, 5]
    return b.conv(b.bn(b.op("Relu", [b.x]), 4), 4, 4, 3)


NEAR_MISSES = {
    "rank3_bn_on_tokens": (_bn_after_direct, "bn_axis", "normalizes axis 1 of [2, 5, 8], which is not the feature "
                           "axis of MatMul"),
    "split_feature_axis": (_bn_after_split, "bn_axis", "normalizes axis 1 of [10, 4, 2], which, through the "
                           "Reshape, is not the feature axis of MatMul"),
    "merged_tokens_and_features": (_bn_after_merged, "bn_axis",
                                   "of [2, 40], which, through the Reshape, is not the feature axis"),
    "bn1d_before_linear": (_bn1d_before_linear, "bn_axis", "normalizes axis 1 of [2, 5, 6]"),
    "shape_unknown": (_shape_unknown, "shape_unknown", "is not known statically"),
    "intermediate_shared": (_shared, "intermediate_shared", "needs it private"),
    "intermediate_is_output": (_flat_is_output, "intermediate_is_output", "is a graph output"),
    "weight_is_graph_input": (_weight_is_input, "non_constant", "('w_in' is a graph input)"),
    "training_bn": (_training_bn, "bn_training", "training_mode=1"),
    "conv_through_reshape": (_conv_then_reshape, "bn_layout", "through layout ops only into a MatMul"),
    "batched_weight": (_batched_weight, "weight_rank", "rank-3"),
    "bn_before_conv_and_relu": (_bn_before_conv_and_relu, "intermediate_shared", "is also read by Relu"),
    "bn_before_padded_conv": (_bn_before_padded_conv, "consumer_padding", "pads its input"),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_miss_is_reported(case):
    """The graph stays byte-identical, and its one BN is one skipped record with the reason
    (an audit record where no rule claims the BN; never two records for one BN)."""
    build, code, message = NEAR_MISSES[case]
    b = tokens()
    b.extra_outputs = []
    out = build(b)
    model = b.model([out] + b.extra_outputs)
    fused, report = fuse(model)
    assert fused.SerializeToString() == model.SerializeToString()
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    assert [(r.anchor, r.reason_code) for r in report.blocks] == [(bn.name, code)], report.to_text()
    assert message in report.blocks[0].reason, report.blocks[0].reason


def test_bn_beside_nothing_linear_is_not_reported():
    b = tokens()
    out = b.op("Relu", [b.bn(b.op("Relu", [b.x]), 5)])
    fused, report = fuse(b.model([out]))
    assert report.blocks == []
