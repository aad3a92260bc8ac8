"""Static shapes on demand (issue 13): onnx shape inference runs only when a rule asks a question
that inferred shapes could answer differently, and then in any graph.

A round starts on a view without inferred shapes (GraphView(shapes_pending=True)) that counts
such questions: a shape or rank, or the value of a value computed from Shape nodes. If the
round asks none, its result is the one it would have had with shapes. Otherwise the round goes
on with them: the candidates handled before the question stand (they read no shape), the rest
are matched again on the view with shapes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_repvgg import fuse, pipeline
from onnx_repvgg.graph import GraphView, infer_static_shapes
from tests.graphs import GraphBuilder, fuse_and_compare, op_counts


def repvgg_block(b: GraphBuilder, x: str, c: int) -> str:
    """3x3-BN + 1x1-BN + BN(x), summed, Relu: no shape is needed to fuse it."""
    s = b.add(b.add(b.bn(b.conv(x, c, c, 3), c), b.bn(b.conv(x, c, c, 1, pads=[0] * 4), c)), b.bn(x, c))
    return b.op("Relu", [s])


@pytest.fixture
def inference_calls(monkeypatch):
    calls = []

    def counted(model, hints=None, graph=None):
        calls.append(hints)
        return infer_static_shapes(model, hints=hints, graph=graph)
    monkeypatch.setattr(pipeline, "infer_static_shapes", counted)
    return calls


def test_blocks_that_read_no_shape_run_no_inference(inference_calls):
    b = GraphBuilder(channels=4, spatial=(6, 6))
    x = b.x
    for _ in range(3):
        x = repvgg_block(b, x, 4)
    fused, report = fuse_and_compare(b.model([x]))
    assert op_counts(fused) == {"Conv": 3, "Relu": 3}
    assert inference_calls == []


def _blocks_then_bn_through_layout() -> onnx.ModelProto:
    """Two RepVGG blocks, then Reshape -> Relu -> BatchNorm1d -> Unsqueeze -> 1x1 Conv: the BN's
    axis proof needs static shapes, the blocks do not."""
    b = GraphBuilder(channels=4, spatial=(6,))
    b.input_shape = [2, 4, 6, 6]
    x = repvgg_block(b, repvgg_block(b, b.x, 4), 4)
    flat = b.op("Reshape", [x, b.constant(np.array([2, 4, 36], np.int64), "shape")])
    t = b.bn(b.op("Relu", [flat]), 4)
    out = b.conv(b.op("Unsqueeze", [t, b.constant(np.array([3], np.int64), "axes")]), 4, 6, 1, pads=[0] * 4)
    return b.model([out])


def test_a_question_after_fused_blocks_goes_on_with_shapes(inference_calls):
    """Two blocks fused on the view without shapes; then a BatchNorm1d -> Unsqueeze -> 1x1 Conv
    whose axis proof reads static shapes: the round goes on with them. The blocks fused before
    keep their names (nothing is fused twice, no name is taken twice)."""
    model = _blocks_then_bn_through_layout()
    fused, report = fuse_and_compare(model)
    assert len(inference_calls) >= 1
    assert [(r.status, r.branches) for r in report.blocks] == [
        ("fused", ["3x3", "1x1", "bn"]), ("fused", ["3x3", "1x1", "bn"]), ("fused", ["bn", "conv"])]
    conv_names = [n.name for n in model.graph.node if n.op_type == "Conv"]
    fused_names = [n.name for n in fused.graph.node if n.op_type == "Conv"]
    assert fused_names[:2] == [conv_names[0], conv_names[2]]  # each block's fused conv takes its 3x3 conv's name
    weights = [t.name for t in fused.graph.initializer if t.name.endswith(".fused_weight")]
    assert weights == [f"{conv_names[0]}.fused_weight", f"{conv_names[2]}.fused_weight"]  # no name taken twice


def test_pending_view_counts_shape_questions():
    b = GraphBuilder(channels=4, spatial=(6, 6))
    relu = b.op("Relu", [b.x])
    shape = b.op("Shape", [relu])
    model = b.model([b.op("Reshape", [b.op("Neg", [relu]), shape])])
    view = GraphView(model.graph, 17, shapes_pending=True)
    assert view.shape_questions == 0
    assert view.constant(relu) is None and view.shape_questions == 0  # not a constant with or without shapes
    assert view.constant(shape) is None  # Shape(relu): a constant once shapes are inferred
    assert view.shape_questions == 1
    view.shape("x")
    assert view.shape_questions == 2
    with_shapes = view.with_shapes(infer_static_shapes(model))
    assert with_shapes.constant(shape).tolist() == [2, 4, 6, 6] and with_shapes.shape_questions == 0


def test_graph_without_shape_nodes_is_inferred_when_asked(inference_calls):
    """The proof that a Reshape keeps its input's shape needs static shapes: inferred here although
    the graph has no Shape or MatMul node (before issue 13 it was then never inferred)."""
    b = GraphBuilder(channels=4, spatial=(6, 6))
    a = b.conv(b.x, 4, 4, 3)
    s = b.add(b.op("Reshape", [b.add(a, b.conv(b.x, 4, 4, 1, pads=[0] * 4)),
                               b.constant(np.array([2, 4, 6, 6], np.int64), "shape")]), b.x)
    fused, report = fuse_and_compare(b.model([b.op("Relu", [s])]))
    assert op_counts(fused) == {"Conv": 1, "Relu": 1}
    assert len(inference_calls) == 2  # round 1 asked; round 2 (the rewritten graph) has shapes from the start


def test_same_output_as_fuse_with_shapes_from_the_start(monkeypatch):
    """The pass with the round on a view without shapes first gives the model (bytes) that a pass
    with static shapes from the first round gives."""
    model = _blocks_then_bn_through_layout()
    on_demand, report = fuse(model)

    original = pipeline.GraphView.__init__

    def with_shapes_at_once(self, graph, opset=None, base_dir=None, static_shapes=None, reader=None, *,
                            shapes_pending=False, memo=None, main_graph=False):
        original(self, graph, opset, base_dir, static_shapes, reader, shapes_pending=False, memo=memo,
                 main_graph=main_graph)
        if shapes_pending:  # a round's first view: ask every question right away
            self._asked("shape")
    monkeypatch.setattr(pipeline.GraphView, "__init__", with_shapes_at_once)
    at_once, report_at_once = fuse(model)
    assert on_demand.SerializeToString() == at_once.SerializeToString()
    assert report.to_dict() == report_at_once.to_dict()
    onnx.checker.check_model(on_demand, full_check=True)
