"""The cheap shapes (onnx_repvgg/cheap_shapes.py) and the lazy matching built on them (issue 13).

1. The cheap reading agrees with onnx shape inference wherever both give a rank or a dim, on
   every model of the suite reachable at small cost: the adversarial corpus, the sample models,
   the Paddle exports, a TorchScript TransformerEncoder export, family, LeViT and TopK-head
   exports with each exporter. (It is used only to rule candidates out; this is what makes a
   wrong answer unlikely, and the next test what makes one harmless.)
2. The laziness only saves work: with the structural filter (LinearIndex.relevant), the cheap
   rule-outs (ranks, neutral ops) and the shape-free first round all switched off, so that every
   question goes to onnx's inferred shapes, every model above fuses to the same bytes and the
   same report.
3. On the transformer export the pass asks onnx for no shape at all.
"""

from __future__ import annotations

import glob
import os
import sys

import onnx
import pytest
import torch

from onnx_repvgg import fuse, pipeline
from onnx_repvgg.cheap_shapes import CheapShapes
from onnx_repvgg.graph import GraphView, infer_static_shapes, opset_version
from onnx_repvgg.rules import common, dense_affine, linear_tree, passthrough
from tests.adversarial import corpus
from tests.reference import families as fam
from tests.reference.export import export
from tests.reference.levit import LeViT
from tests.reference.repvgg import randomize_bn
from tests.reference.topk_heads import OneToOneHead, QuerySelectionDetector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_transformer_graph  # noqa: E402

EXPORTERS = {"ts": False, "dynamo": True, "dynamo_unopt": "unoptimized"}


def _exports(folder: str) -> dict[str, onnx.ModelProto]:
    found: dict[str, onnx.ModelProto] = {}
    path = os.path.join(folder, "transformer.onnx")
    make_transformer_graph.export(2, path)
    found["transformer_2_layers"] = onnx.load(path)
    nets = {
        "family": (lambda: fam.Net([fam.MobileOneBlock(8, 8, 3, num_branches=2), fam.RepVggDw(8)]), (1, 3, 16, 16)),
        "levit": (lambda: LeViT(use_conv=False), (1, 3, 16, 16)),
        "levit_conv": (lambda: LeViT(use_conv=True), (1, 3, 16, 16)),
        "rtdetr_head": (lambda: QuerySelectionDetector(), (1, 3, 32, 32)),
        "yolov10_head": (lambda: OneToOneHead(), (1, 3, 32, 32)),
    }
    for name, (make, shape) in nets.items():
        for tag, dynamo in EXPORTERS.items():
            if name in ("levit_conv", "rtdetr_head", "yolov10_head") and tag == "dynamo_unopt":
                continue
            torch.manual_seed(0)
            net = randomize_bn(make(), seed=3).eval()
            target = os.path.join(folder, f"{name}_{tag}.onnx")
            export(net, torch.randn(*shape), target, dynamo, dynamic_batch=name == "levit" and tag == "ts")
            found[f"{name}_{tag}"] = onnx.load(target)
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "data", "paddle", "*.onnx"))
                       + glob.glob(os.path.join(ROOT, "models", "*.onnx"))):
        found[os.path.basename(path)] = onnx.load(path)
    for case in corpus():
        if case.layout == "inline":
            found[f"adversarial_{case.name}"] = case.model
    return found


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    return _exports(str(tmp_path_factory.mktemp("cheap_shapes")))


def _agreement(model: onnx.ModelProto) -> tuple[int, list[str]]:
    """(values compared, disagreements) of the cheap reading against onnx shape inference
    (the pass's own call: data propagation on), at both reading levels."""
    view = GraphView(model.graph, opset_version(model), shapes_pending=True)
    cheap = CheapShapes(view)
    inferred = infer_static_shapes(model).to_dict()
    compared, wrong = 0, []
    names = [out for outputs in view.outputs_of for out in outputs if out] + sorted(view.graph_inputs)
    for name in names:
        known = inferred.get(name)
        for level, shape in (("rank", cheap._get(name, 0)), ("dims", cheap.shape(name))):
            if shape is None or known is None:
                continue
            compared += 1
            if len(shape) != len(known) or any(c >= 0 and k >= 0 and c != k for c, k in zip(shape, known)):
                wrong.append(f"{name} ({level}): cheap {shape}, inferred {known}")
    return compared, wrong


def test_cheap_shapes_agree_with_onnx_inference(models):
    total = 0
    for name, model in models.items():
        compared, wrong = _agreement(model)
        assert not wrong, (name, wrong[:5])
        total += compared
    assert total > 1000  # the comparison is not empty


def test_cheap_shapes_read_through_computed_reshapes(tmp_path):
    """The transformer's ranks come through Reshapes whose targets are computed from Shape
    nodes: the reading gives their rank (the target's length) and a MatMul's features (its
    weight's), without asking the view a shape question."""
    target = str(tmp_path / "t.onnx")
    make_transformer_graph.export(1, target)
    model = onnx.load(target)
    view = GraphView(model.graph, opset_version(model), shapes_pending=True)
    cheap = CheapShapes(view)
    layers = [i for i in view.of_type("MatMul") if view.inputs_of[i][1] in view.initializers]
    assert layers
    for index in layers:
        data, weight = view.inputs_of[index]
        assert cheap.rank(data) == 3
        out = cheap.shape(view.outputs_of[index][0])
        assert out is not None and len(out) == 3 and out[-1] == view.initializers[weight].dims[-1]
    assert view.shape_questions == 0


@pytest.fixture
def eager(monkeypatch):
    """The pass without its laziness: every linear node's tree is built, no cheap rule-out, and
    every graph starts with onnx's inferred shapes."""
    monkeypatch.setattr(linear_tree.LinearIndex, "relevant", lambda self, index: True)
    monkeypatch.setattr(linear_tree, "neutral_cheaply", lambda view, index: False)
    monkeypatch.setattr(passthrough, "neutral_cheaply", lambda view, index: False)
    monkeypatch.setattr(common, "rank_ruled_out", lambda view, name, rank: False)
    for module in ("dense", "affine_consumer", "bn_consumer", "token_bn"):
        monkeypatch.setattr(f"onnx_repvgg.rules.{module}.rank_ruled_out", lambda view, name, rank: False)
    monkeypatch.setattr(dense_affine, "rank_ruled_out", lambda view, name, rank: False)
    monkeypatch.setattr(dense_affine.CheapShapes, "rank", lambda self, name: None)
    original = pipeline.GraphView

    def with_shapes_first(graph, opset=None, base_dir=None, static_shapes=None, reader=None, *,
                          shapes_pending=False, memo=None, main_graph=False):
        view = original(graph, opset, base_dir, static_shapes, reader, shapes_pending=shapes_pending, memo=memo,
                        main_graph=main_graph)
        view.shape_questions = 1 if shapes_pending else 0  # as if it had asked: the round runs with shapes
        return view
    monkeypatch.setattr(pipeline, "GraphView", with_shapes_first)


def _fused(model: onnx.ModelProto):
    fused, report = fuse(model)
    return fused.SerializeToString(), report.to_dict()


@pytest.fixture(scope="module")
def lazy_results(models):
    return {name: _fused(model) for name, model in models.items()}


def test_laziness_changes_no_output(models, lazy_results, eager):
    for name, model in models.items():
        assert _fused(model) == lazy_results[name], name


def test_transformer_export_asks_no_shape(models, monkeypatch):
    calls = []
    real = pipeline.infer_static_shapes

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(pipeline, "infer_static_shapes", counted)
    fuse(models["transformer_2_layers"])
    assert not calls
