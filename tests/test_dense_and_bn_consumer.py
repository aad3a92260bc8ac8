"""Gemm branches (Linear + BN1d, distillation heads) and BN folded into its consumers."""

import numpy as np
import pytest

from onnx_repvgg import fuse
from tests.graphs import GraphBuilder, fuse_and_compare, op_counts


def gemm(b, x, fin, fout, trans_b=1, alpha=1.0, beta=1.0, bias_shape="vec"):
    w = b.rng.standard_normal((fout, fin) if trans_b else (fin, fout)).astype(np.float32) * 0.3
    inputs = [x, b.constant(w, "W")]
    if bias_shape == "vec":
        inputs.append(b.constant(b.rng.standard_normal(fout).astype(np.float32), "C"))
    elif bias_shape == "row":
        inputs.append(b.constant(b.rng.standard_normal((1, fout)).astype(np.float32), "C"))
    return b.op("Gemm", inputs, transB=trans_b, alpha=alpha, beta=beta)


def dense_builder():
    b = GraphBuilder(channels=6, spatial=())
    b.input_shape = [3, 6]
    return b


@pytest.mark.parametrize("trans_b,alpha,beta,bias", [(1, 1.0, 1.0, "vec"), (0, 0.5, 2.0, "row"), (1, 1.0, 1.0, None)])
def test_linear_then_bn1d(trans_b, alpha, beta, bias):
    b = dense_builder()
    out = b.bn(gemm(b, b.x, 6, 5, trans_b, alpha, beta, bias), 5)
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Gemm": 1}


def test_distillation_heads_averaged():
    """RepViT/LeViT classifiers: (head(x) + head_dist(x)) / 2, each head BN1d -> Linear."""
    b = dense_builder()
    x = b.x
    head = gemm(b, b.bn(x, 6), 6, 10)
    dist = gemm(b, b.bn(x, 6), 6, 10)
    out = b.op("Div", [b.add(head, dist), b.constant(np.float32(2.0), "two")])
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Gemm": 1}
    assert report.rounds >= 2  # BN folds first, then the heads merge


def test_linear_residual_identity():
    b = dense_builder()
    out = b.add(b.x, gemm(b, b.x, 6, 6))
    assert op_counts(fuse_and_compare(b.model([out]))[0]) == {"Gemm": 1}


@pytest.mark.parametrize("group", [1, 2])
def test_bn_into_following_pointwise_conv(group):
    b = GraphBuilder(channels=4)
    y = b.op("Relu", [b.x])
    out = b.conv(b.bn(y, 4), 4, 6, 1, pads=[0] * 4, group=group, stride=2)
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Relu": 1, "Conv": 1}
    assert [r.status for r in report.blocks] == ["fused"]


def test_bn_into_two_consumers():
    b = GraphBuilder(channels=4)
    t = b.bn(b.op("Relu", [b.x]), 4)
    o1 = b.conv(t, 4, 4, 1, pads=[0] * 4)
    o2 = b.conv(t, 4, 2, (1, 1), pads=[0] * 4, bias=False)
    fused, report = fuse_and_compare(b.model([o1, o2]))
    assert op_counts(fused) == {"Relu": 1, "Conv": 2}


def test_bn_before_padded_conv_is_skipped():
    b = GraphBuilder(channels=4)
    out = b.conv(b.bn(b.op("Relu", [b.x]), 4), 4, 4, 3)
    model = b.model([out])
    fused, report = fuse(model)
    assert [r.reason_code for r in report.skipped] == ["consumer_padding"]
    assert fused.SerializeToString() == model.SerializeToString()


def test_bn_before_nonlinearity_is_left_alone():
    b = GraphBuilder(channels=4)
    out = b.op("Relu", [b.bn(b.op("Relu", [b.x]), 4)])
    model = b.model([out])
    fused, report = fuse(model)
    assert report.blocks == []
    assert op_counts(fused) == op_counts(model)


def test_api_with_unloaded_external_data(tmp_path):
    import os

    import onnx

    from onnx_repvgg.pipeline import UnsupportedModel
    models = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    path = os.path.join(models, "repvgg_a0_tiny_dynamo.onnx")
    lazy = onnx.load(path, load_external_data=False)
    with pytest.raises(UnsupportedModel, match="base_dir"):
        fuse(lazy)
    fused, report = fuse(lazy, base_dir=models)
    assert len(report.fused) == 22


def test_a_block_that_computes_a_constant_is_named_so():
    """A block whose input is an initializer computes a constant, which the rules leave to
    constant folding: the audit said it 'was not folded by the rules run'."""
    import onnx
    from onnx import numpy_helper

    b = GraphBuilder()
    x = b.x
    out = b.add(b.bn(b.conv(x, 4, 4, 3), 4), b.bn(b.conv(x, 4, 4, 1, pads=[0, 0, 0, 0]), 4))
    model = b.model([out])
    data = np.random.default_rng(0).standard_normal(b.input_shape).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(data, x))
    del model.graph.input[:]
    onnx.checker.check_model(model)
    fused, report = fuse(model)
    assert not report.fused and report.skipped
    assert {r.reason_code for r in report.skipped} == {"constant"}
    assert all("computes a constant" in r.reason and "constant folding" in r.reason for r in report.skipped)
    assert op_counts(fused) == op_counts(model)
