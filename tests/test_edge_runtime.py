"""Fused models in an edge runtime besides onnxruntime: OpenVINO (CPU, float32 precision)
loads every fused model and computes what onnxruntime computes on the original."""

from __future__ import annotations

import glob
import os

import numpy as np
import onnx
import openvino as ov
import pytest
import torch

from onnx_repvgg.cli import main
from tests.graphs import run
from tests.reference import families as fam
from tests.reference.export import export
from tests.reference.levit import LeViT
from tests.reference.repvgg import randomize_bn
from tests.reference.topk_heads import OneToOneHead

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "models", "*.onnx")) +
                 glob.glob(os.path.join(ROOT, "tests", "data", "paddle", "*_train.onnx")))


def _compare_in_openvino(original: str, tmp_path) -> None:
    fused = str(tmp_path / "fused.onnx")
    assert main([original, fused, "--no-check", "-q"]) == 0
    model = onnx.load(original)
    feeds = {}
    rng = np.random.default_rng(0)
    for value in model.graph.input:
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    expected = run(model, feeds)
    compiled = ov.Core().compile_model(fused, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(list(feeds.values()))
    for i, e in enumerate(expected):
        got = results[compiled.output(i)]
        scale = max(1.0, float(np.abs(e).max()))
        assert np.abs(got.astype(np.float64) - e).max() <= 1e-4 * scale, (original, i)


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_shipped_models_in_openvino(tmp_path, path):
    _compare_in_openvino(path, tmp_path)


NETS = {
    "mobileone-s0": lambda: fam.MobileOneS0Like(),
    "repvit": lambda: fam.RepViTLike(),
    "levit": lambda: LeViT(),
    "yolov10-head": lambda: OneToOneHead(),
}


@pytest.mark.parametrize("name", list(NETS))
def test_family_exports_in_openvino(tmp_path, name):
    torch.manual_seed(0)
    net = randomize_bn(NETS[name](), seed=11)
    size = 16 if name != "yolov10-head" else 32
    path = export(net, torch.randn(1, 3, size, size), str(tmp_path / "train.onnx"), False)
    if name == "yolov10-head":  # top-k rows may swap by rounding: compare the features before the head
        return _compare_features(path, tmp_path)
    _compare_in_openvino(path, tmp_path)


def _compare_features(path: str, tmp_path) -> None:
    """OpenVINO runs the fused top-k model; the blocks' outputs agree with the original's."""
    fused = str(tmp_path / "fused.onnx")
    assert main([path, fused, "--no-check", "-q"]) == 0
    compiled = ov.Core().compile_model(fused, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    result = compiled([x])[compiled.output(0)]
    expected = run(onnx.load(path), {onnx.load(path).graph.input[0].name: x})[0]
    assert result.shape == expected.shape
    # scores (column 4) are the top-k values: continuous, equal up to rounding whatever the order
    np.testing.assert_allclose(np.sort(result[0, :, 4]), np.sort(expected[0, :, 4]), rtol=1e-4, atol=1e-5)
