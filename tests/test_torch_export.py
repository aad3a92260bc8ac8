"""End to end on real exporter output: our PyTorch RepVGG, exported with both exporters.

For each model: fuse the train-time export, and compare with the export of the
authors'-style deploy conversion (tests/reference/repvgg.py): the same op counts,
and the same outputs (1e-4 relative), against PyTorch and onnxruntime both.
"""

import warnings

import numpy as np
import onnx
import pytest
import torch

from onnx_repvgg import fuse, validate
from onnx_repvgg.cli import main
from onnx_repvgg.storage.io import load
from tests.graphs import op_counts, run
from tests.reference.export import export
from tests.reference.repvgg import RepVGG, RepVGGBlock, deploy_copy, randomize_bn

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


def small_repvgg(**kw):
    return RepVGG(num_blocks=(1, 2, 2, 1), widths=(8, 8, 16, 16, 32), **kw)


NETS = {
    "plain": lambda: small_repvgg(),
    "grouped": lambda: small_repvgg(group_layers=(2, 3, 4, 5), groups=2),
    "depthwise-order": lambda: torch.nn.Sequential(
        RepVGGBlock(8, 8, groups=8, order="i1d"), RepVGGBlock(8, 8, groups=4, order="1id"),
        RepVGGBlock(8, 16, stride=2, order="1d")),
}


def _export_pair(tmp_path, net, dynamo, x, dynamic_batch=False):
    train = randomize_bn(net(), seed=7)
    deploy = deploy_copy(train)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), train(x), rtol=1e-4, atol=1e-4)
    suffix = "dynamo" if dynamo else "ts"
    train_path = export(train, x, str(tmp_path / f"train_{suffix}.onnx"), dynamo, dynamic_batch)
    deploy_path = export(deploy, x, str(tmp_path / f"deploy_{suffix}.onnx"), dynamo, dynamic_batch)
    with torch.no_grad():
        expected = train(x).numpy()
    return load(train_path).model, load(deploy_path).model, expected


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("net", list(NETS))
def test_fused_export_matches_deploy_export(tmp_path, net, dynamo):
    x = torch.randn(1, 3 if net != "depthwise-order" else 8, 32, 32)
    train, deploy, expected = _export_pair(tmp_path, NETS[net], dynamo, x)
    fused, report = fuse(train)
    onnx.checker.check_model(fused, full_check=True)
    assert not report.skipped, [b.reason for b in report.skipped]
    assert op_counts(fused) == op_counts(deploy)
    assert len(fused.graph.node) == len(deploy.graph.node)
    assert "BatchNormalization" not in op_counts(fused)
    feed = {fused.graph.input[0].name: x.numpy()}
    np.testing.assert_allclose(run(fused, feed)[0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run(fused, feed)[0], run(deploy, feed)[0], rtol=1e-4, atol=1e-4)
    result = validate(train, fused, input_sets=2)
    assert result.passed and result.max_rel_diff < 1e-4


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dynamic_batch_export(tmp_path, dynamo):
    x = torch.randn(2, 3, 32, 32)
    train, deploy, _ = _export_pair(tmp_path, NETS["plain"], dynamo, x, dynamic_batch=True)
    fused, report = fuse(train)
    assert op_counts(fused) == op_counts(deploy)
    dim = fused.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param  # still dynamic
    assert validate(train, fused, input_shapes={fused.graph.input[0].name: [3, 3, 32, 32]}).passed


def test_initializers_kept_as_inputs(tmp_path, capfd):
    """keep_initializers_as_inputs=True (the TorchScript exporter's option, and every IR 3
    export): weights are overridable inputs, so nothing is fused unless the user freezes them;
    then the result is the deploy export's graph, validated."""
    net = randomize_bn(small_repvgg(), seed=5)
    x = torch.randn(1, 3, 32, 32)
    path = str(tmp_path / "train.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(net.eval(), (x,), path, dynamo=False, keep_initializers_as_inputs=True, input_names=["x"])
    deploy = load(export(deploy_copy(net), x, str(tmp_path / "deploy.onnx"), False)).model
    model = onnx.load(path)
    assert len(model.graph.input) > 1
    assert main([path, str(tmp_path / "same.onnx")]) == 0
    out = capfd.readouterr()
    assert "blocks: 0 fused" in out.out and "--freeze-initializers" in out.out
    assert out.err == ""  # onnxruntime's warnings about overridable initializers are not printed
    assert main([path, str(tmp_path / "fused.onnx"), "--freeze-initializers"]) == 0
    out = capfd.readouterr().out
    assert "validation: passed" in out and "removed from the graph inputs" in out
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    assert [i.name for i in fused.graph.input] == ["x"]
    assert op_counts(fused) == op_counts(deploy)
    feed = {"x": x.numpy()}
    with torch.no_grad():
        np.testing.assert_allclose(run(fused, feed)[0], net(x).numpy(), rtol=1e-4, atol=1e-4)


def test_unfolded_torchscript_export(tmp_path):
    """do_constant_folding=False keeps every Conv -> BatchNormalization pair in the graph."""
    net = randomize_bn(small_repvgg(), seed=3)
    x = torch.randn(1, 3, 32, 32)
    path = str(tmp_path / "unfolded.onnx")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), path, dynamo=False, do_constant_folding=False)
    train = load(path).model
    assert op_counts(train)["BatchNormalization"] > 6
    fused, report = fuse(train)
    assert "BatchNormalization" not in op_counts(fused)
    assert op_counts(fused)["Conv"] == 7  # stem + 6 blocks
    assert validate(train, fused).passed


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
def test_older_opsets_torchscript(tmp_path, opset):
    x = torch.randn(1, 3, 32, 32)
    net = randomize_bn(small_repvgg(group_layers=(2, 3), groups=2), seed=5)
    train = load(export(net, x, str(tmp_path / "t.onnx"), dynamo=False, opset=opset)).model
    deploy = load(export(deploy_copy(net), x, str(tmp_path / "d.onnx"), dynamo=False, opset=opset)).model
    assert train.opset_import[0].version == opset
    fused, report = fuse(train)
    assert not report.skipped
    assert op_counts(fused) == op_counts(deploy)
    assert validate(train, fused).passed


def test_unoptimized_dynamo_export(tmp_path):
    """dynamo=True, optimize=False: BN unfolded, conv biases built by CastLike/Expand at run time."""
    import warnings

    net = randomize_bn(small_repvgg(), seed=3)
    x = torch.randn(1, 3, 32, 32)
    paths = {}
    for name, module in (("train", net), ("deploy", deploy_copy(net))):
        paths[name] = str(tmp_path / f"{name}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), paths[name], dynamo=True, optimize=False)
    train, deploy = load(paths["train"]).model, load(paths["deploy"]).model
    fused, report = fuse(train)
    assert not report.skipped, [r.reason for r in report.skipped]
    counts, expected = op_counts(fused), op_counts(deploy)
    for op in ("Conv", "BatchNormalization", "Add", "Relu", "Gemm"):
        assert counts.get(op, 0) == expected.get(op, 0), op
    assert len(fused.graph.node) <= len(deploy.graph.node)
    assert validate(train, fused).passed


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_half_precision_export(tmp_path, dynamo):
    import copy

    net = randomize_bn(small_repvgg(), seed=9)
    x = torch.randn(1, 3, 32, 32).half()
    train = load(export(copy.deepcopy(net).half(), x, str(tmp_path / "t.onnx"), dynamo)).model
    deploy = load(export(deploy_copy(net).half(), x, str(tmp_path / "d.onnx"), dynamo)).model
    fused, report = fuse(train)
    assert not report.skipped
    assert op_counts(fused) == op_counts(deploy)
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in fused.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    result = validate(train, fused)
    assert result.passed and result.outputs[0].rtol == 1e-2


class PaddedBranches(torch.nn.Module):
    """Branches that pad explicitly (nn.ZeroPad2d, as 'same' padding for even kernels does)."""

    def __init__(self, c=8):
        super().__init__()
        self.even = torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), torch.nn.Conv2d(c, c, 2, bias=False),
                                        torch.nn.BatchNorm2d(c))
        self.odd = torch.nn.Sequential(torch.nn.ZeroPad2d(1), torch.nn.Conv2d(c, c, 3, bias=False), torch.nn.BatchNorm2d(c))
        self.one = torch.nn.Sequential(torch.nn.Conv2d(c, c, 1, bias=False), torch.nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(self.even(x) + self.odd(x) + self.one(x))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_explicit_zero_padding_is_folded(tmp_path, dynamo):
    net = randomize_bn(PaddedBranches(), seed=4)
    x = torch.randn(1, 8, 12, 12)
    train = load(export(net, x, str(tmp_path / "t.onnx"), dynamo)).model
    assert op_counts(train).get("Pad", 0) == (0 if dynamo else 2)  # the dynamo optimizer folds them itself
    fused, report = fuse(train)
    assert op_counts(fused) == {"Conv": 1, "Relu": 1}
    with torch.no_grad():
        np.testing.assert_allclose(run(fused, {fused.graph.input[0].name: x.numpy()})[0], net(x).numpy(),
                                   rtol=1e-4, atol=1e-5)


class BiaslessHead(torch.nn.Module):
    """Linear(bias=False) -> BN1d, and BN1d -> Linear(bias=False): MatMul in TorchScript exports."""

    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(12, 16, bias=False)
        self.bn1 = torch.nn.BatchNorm1d(16)
        self.bn2 = torch.nn.BatchNorm1d(16)
        self.l2 = torch.nn.Linear(16, 5, bias=False)

    def forward(self, x):
        return self.l2(self.bn2(torch.relu(self.bn1(self.l1(x)))))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_bn1d_around_biasless_linears(tmp_path, dynamo):
    net = randomize_bn(BiaslessHead(), seed=2)
    x = torch.randn(4, 12)
    train = load(export(net, x, str(tmp_path / "t.onnx"), dynamo)).model
    fused, report = fuse(train)
    counts = op_counts(fused)
    assert "BatchNormalization" not in counts and "MatMul" not in counts
    assert counts == {"Gemm": 2, "Relu": 1}
    with torch.no_grad():
        np.testing.assert_allclose(run(fused, {fused.graph.input[0].name: x.numpy()})[0], net(x).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_attention_style_matmuls_are_left_alone(tmp_path):
    """MatMuls of activations (attention) and of 3-D inputs are not linear layers to fold."""

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8)
            self.k = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1) + x.sum(-1, keepdim=True)

    x = torch.randn(2, 5, 8)
    train = load(export(Attention().eval(), x, str(tmp_path / "a.onnx"), False)).model
    fused, report = fuse(train)
    assert report.blocks == []
    assert op_counts(fused) == op_counts(train)
