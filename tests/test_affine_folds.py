"""Affine maps folded into the layers around them (affine_into_consumer, dense_affine): the
folds peers make on Conv/Gemm/MatMul with Mul and Add that no re-parameterization rule covers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_repvgg import fuse
from tests.graphs import GraphBuilder, fuse_and_compare, op_counts
from tests.test_soundness import check_sound


def _image(**kw) -> GraphBuilder:
    return GraphBuilder(channels=4, spatial=(6, 6), batch=1, **kw)


def _tokens(b: GraphBuilder, rank=3) -> str:
    shape = [2, 5, 4] if rank == 3 else ([3, 4] if rank == 2 else [2, 2, 3, 4])
    b.x = "t"
    b.extra_inputs.append(helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, shape))
    return "t"


def _model(b: GraphBuilder, outputs) -> onnx.ModelProto:
    """b.model, with the token input in place of x when a test declared one."""
    if b.x == "x":
        return b.model(outputs)
    elem = onnx.TensorProto.FLOAT
    graph = helper.make_graph(b.nodes, "test", b.extra_inputs,
                              [helper.make_tensor_value_info(o, elem, None) for o in outputs], initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    model.ir_version = 10
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    typed = [known[o.name] if known.get(o.name) is not None and known[o.name].type.tensor_type.HasField("shape")
             else o for o in model.graph.output]
    del model.graph.output[:]
    model.graph.output.extend(typed)
    onnx.checker.check_model(model, full_check=True)
    return model


def _matmul(b: GraphBuilder, x: str, fin=4, fout=6) -> str:
    return b.op("MatMul", [x, b.constant((b.rng.standard_normal((fin, fout)) * 0.3).astype(np.float32), "W")])


def _const(b: GraphBuilder, shape, low=0.5, high=1.5) -> str:
    return b.constant(b.rng.uniform(low, high, shape).astype(np.float32), "c")


@pytest.mark.parametrize("scale_shape", [(), (1,), (4, 1, 1), (1, 4, 1, 1)])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_scale_before_a_padded_conv_folds(scale_shape, group):
    b = _image()
    out = b.conv(b.op("Mul", [b.x, _const(b, scale_shape)]), 4, 4, 3, group=group)
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Conv": 1} and len(report.fused) == 1


def test_scale_and_shift_before_an_unpadded_conv_fold():
    b = _image()
    affine = b.op("Sub", [b.op("Add", [b.op("Mul", [b.x, _const(b, (4, 1, 1))]), _const(b, (1, 4, 1, 1))]),
                          _const(b, ())])
    out = b.conv(affine, 4, 6, 1, pads=[0] * 4, bias=False)
    fused, _ = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Conv": 1}
    assert len(fused.graph.node[0].input) == 3  # the shift became a bias


def test_a_shift_before_a_padded_conv_is_not_applicable():
    b = _image()
    model = b.model([b.conv(b.op("Add", [b.x, _const(b, (4, 1, 1))]), 4, 4, 3)])
    fused, report = fuse(model)
    assert [r.reason_code for r in report.not_applicable] == ["consumer_padding"] and not report.skipped
    assert fused.SerializeToString() == model.SerializeToString()


def test_every_reader_of_the_scaled_tensor_is_folded():
    b = _image()
    scaled = b.op("Mul", [b.x, _const(b, (4, 1, 1))])
    model = b.model([b.conv(scaled, 4, 4, 3), b.conv(scaled, 4, 2, 1, pads=[0] * 4)])
    fused, _ = fuse_and_compare(model)
    assert op_counts(fused) == {"Conv": 2}


def test_a_scaled_tensor_read_by_anything_else_stays():
    b = _image()
    scaled = b.op("Mul", [b.x, _const(b, (4, 1, 1))])
    model = b.model([b.conv(scaled, 4, 4, 3), b.op("Relu", [scaled])])
    fused, report = fuse(model)
    assert not report.fused and fused.SerializeToString() == model.SerializeToString()


def test_a_spatial_scale_is_not_per_channel():
    b = _image()
    model = b.model([b.conv(b.op("Mul", [b.x, _const(b, (1, 1, 6, 6))]), 4, 4, 3)])
    fused, report = fuse(model)
    assert [r.reason_code for r in report.not_applicable] == ["not_per_channel"]
    assert fused.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("trans_b", [0, 1])
def test_affine_before_a_gemm_keeps_alpha_and_beta(trans_b):
    b = GraphBuilder(channels=4, spatial=(), batch=3)
    affine = b.op("Add", [b.op("Mul", [b.x, _const(b, (4,))]), _const(b, (4,), -1, 1)])
    w = (b.rng.standard_normal((6, 4) if trans_b else (4, 6)) * 0.3).astype(np.float32)
    out = b.op("Gemm", [affine, b.constant(w, "W"), _const(b, (6,))], transB=trans_b, alpha=0.7, beta=1.3)
    fused, _ = fuse_and_compare(b.model([out], input_shape=[3, 4]))
    assert op_counts(fused) == {"Gemm": 1}


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_affine_before_a_matmul(rank):
    b = GraphBuilder()
    t = _tokens(b, rank)
    scaled = b.op("Add", [b.op("Mul", [t, _const(b, (4,))]), _const(b, (4,), -1, 1)])
    fused, _ = fuse_and_compare(_model(b, [_matmul(b, scaled)]))
    # the shift becomes a bias: a Gemm for a 2-D input, an Add after the MatMul otherwise
    assert op_counts(fused) == ({"Gemm": 1} if rank == 2 else {"MatMul": 1, "Add": 1})


@pytest.mark.parametrize("rank", [3, 4])
def test_scale_after_a_token_matmul_folds_and_a_bias_stays(rank):
    b = GraphBuilder()
    t = _tokens(b, rank)
    biased = b.op("Add", [_matmul(b, t), _const(b, (6,), -1, 1)])
    out = b.op("Div", [b.op("Mul", [biased, _const(b, (6,))]), _const(b, (1, 6))])
    fused, _ = fuse_and_compare(_model(b, [out]))
    assert op_counts(fused) == {"MatMul": 1, "Add": 1}


def test_token_matmul_with_its_bias_alone_is_left_as_it_is():
    b = GraphBuilder()
    model = _model(b, [b.op("Add", [_matmul(b, _tokens(b)), _const(b, (6,))])])
    fused, report = fuse(model)
    assert not report.blocks and fused.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("t_shape", [(3, 6), (6,), (1, 6), (3, 1), ()])
@pytest.mark.parametrize("layer", ["gemm", "matmul"])
def test_an_addend_becomes_the_gemm_c(t_shape, layer):
    b = GraphBuilder(channels=4, spatial=(), batch=3)
    b.extra_inputs.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(t_shape)))
    w = b.constant((b.rng.standard_normal((4, 6)) * 0.3).astype(np.float32), "W")
    product = b.op("Gemm", [b.x, w], alpha=0.5) if layer == "gemm" else b.op("MatMul", [b.x, w])
    out = b.op("Sub", [b.op("Mul", [b.constant(np.array(2.0, np.float32), "two"), "y"]), product])
    fused, report = fuse_and_compare(b.model([out], input_shape=[3, 4]))
    assert op_counts(fused) == {"Gemm": 1} and len(report.fused) == 1
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}
    assert attrs["alpha"] == pytest.approx(-0.5 if layer == "gemm" else -1.0) and attrs["beta"] == 2.0


def test_an_addend_that_would_broadcast_the_output_stays():
    b = GraphBuilder(channels=4, spatial=(), batch=3)
    b.extra_inputs.append(helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 6]))
    w = b.constant((b.rng.standard_normal((4, 6)) * 0.3).astype(np.float32), "W")
    model = b.model([b.op("Add", [b.op("Gemm", [b.x, w]), "y"])], input_shape=[3, 4])
    fused, report = fuse(model)
    assert not report.fused and fused.SerializeToString() == model.SerializeToString()


@st.composite
def affine_specs(draw):
    return dict(
        layer=draw(st.sampled_from(["conv", "conv", "gemm", "matmul2", "matmul3"])),
        scale=draw(st.sampled_from([None, (), (1,), "channel", "feature", "spatial"])),
        shift=draw(st.sampled_from([None, None, (), "channel", "feature"])),
        negate=draw(st.booleans()),
        padded=draw(st.booleans()),
        group=draw(st.sampled_from([1, 2])),
        after=draw(st.sampled_from([None, "scale", "shift+scale", "addend"])),
        shared=draw(st.integers(0, 6)) == 0,
        seed=draw(st.integers(0, 1000)),
    )


def _affine_model(spec) -> onnx.ModelProto | None:
    conv = spec["layer"] == "conv"
    b = GraphBuilder(channels=4, spatial=(5, 5) if conv else (), batch=2, seed=spec["seed"])
    rank = 4 if conv else (3 if spec["layer"] == "matmul3" else 2)
    if not conv:
        x = _tokens(b, rank) if rank == 3 else b.x
    else:
        x = b.x
    if conv:
        shapes = {"channel": (4, 1, 1), "feature": (1, 4, 1, 1), "spatial": (1, 5, 5)}
    else:  # "spatial": one value per row (the batch or the tokens): not per feature
        shapes = {"channel": (1, 4), "feature": (4,), "spatial": (5, 1) if rank == 3 else (2, 1)}
    t = x
    if spec["scale"] is not None:
        t = b.op("Mul", [t, _const(b, shapes.get(spec["scale"], spec["scale"]))])
    if spec["shift"] is not None:
        t = b.op("Add", [t, _const(b, shapes.get(spec["shift"], spec["shift"]), -1, 1)])
    if spec["negate"]:
        t = b.op("Neg", [t])
    outputs = []
    if spec["shared"]:
        outputs.append(b.op("Relu", [t]))
    if conv:
        y = b.conv(t, 4, 4, 3, pads=[1] * 4 if spec["padded"] else [0] * 4, group=spec["group"])
    elif spec["layer"] == "gemm":
        y = b.op("Gemm", [t, b.constant((b.rng.standard_normal((4, 6)) * 0.3).astype(np.float32), "W"),
                          _const(b, (6,))], alpha=0.8)
    else:
        y = _matmul(b, t)
    if spec["after"] in ("scale", "shift+scale"):
        if spec["after"] == "shift+scale":
            y = b.op("Add", [y, _const(b, (6,) if not conv else (4, 1, 1), -1, 1)])
        y = b.op("Mul", [y, _const(b, (6,) if not conv else (4, 1, 1))])
    elif spec["after"] == "addend" and not conv:
        other = b.op("Relu", [_matmul(b, x)]) if rank != 3 else None
        if other is not None:
            y = b.op("Add", [y, other])
    outputs.insert(0, y)
    try:
        return _model(b, outputs) if not conv and rank == 3 else b.model(outputs, input_shape=None if conv else [2, 4])
    except Exception:
        return None


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(affine_specs())
def test_affine_folds_are_sound(spec):
    model = _affine_model(spec)
    if model is not None:
        check_sound(model)
