"""The re-parameterization family, exported with both exporters, against the deploy forms.

Each case: a small net of one block type (tests/reference/families.py) with randomized BN
statistics. The fused train-time export must have the op counts of the deploy export and
agree with PyTorch to 1e-4 relative.
"""

import os

import numpy as np
import onnx
import pytest
import torch

from onnx_repvgg import fuse, validate
from onnx_repvgg.cli import main
from onnx_repvgg.storage import skeleton
from onnx_repvgg.storage.io import load
from onnx_repvgg.storage.sinks import MemorySink
from tests.graphs import op_counts, run
from tests.reference import families as fam
from tests.reference.export import export
from tests.reference.repvgg import randomize_bn

C = 8
CASES = {
    "mobileone-dw+pw": lambda: [fam.MobileOneBlock(C, C, 3, groups=C, num_branches=4),
                                fam.MobileOneBlock(C, C, 1, num_branches=4),
                                fam.MobileOneBlock(C, 16, 3, stride=2, groups=C, num_branches=2)],
    "repvit-dw": lambda: [fam.RepVggDw(C), fam.RepVggDw(C)],
    "qarepvgg": lambda: [fam.QARepVGGBlock(C)],
    "qarepvgg-v2-avgpool": lambda: [fam.QARepVGGBlockV2(C)],
    "yolov6-plus-zero": lambda: [fam.YoloV6RepVGGBlock(C, 16, stride=2), fam.YoloV6RepVGGBlock(16, 16)],
    "fastvit-repmixer": lambda: [fam.RepMixer(C), fam.RepCPE(C)],
    "yolov10-repvggdw": lambda: [fam.LargeSmallDw(C, 7, 3, act=True)],
    "replknet": lambda: [fam.LargeSmallDw(C, 13, 5)],
    "unireplknet-dilated": lambda: [fam.DilatedReparam(C, 7), fam.DilatedReparam(C, 9)],
    "acnet": lambda: [fam.ACBlock(C, C)],
    "pplcnetv2": lambda: [fam.RepDepthwise(C)],
    "ultralytics-repconv": lambda: [fam.UltralyticsRepConv(C)],
    "repghost": lambda: [fam.RepGhostCheap(C)],
    "ghostnetv3": lambda: [fam.GhostModuleV3(C, C), fam.GhostModuleV3(C, 2 * C)],
}


EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo"),
             pytest.param("unoptimized", id="dynamo-unoptimized")]


NETS = {
    "repvit-distilled-head": fam.DistilledClassifier,
    "mobileone-s0-net": fam.MobileOneS0Like,
    "repvit-net": fam.RepViTLike,
}


def fuse_against_deploy(tmp_path, net, dynamo):
    """Export the train-time net and its deploy form, fuse the first, and check that the fused
    model has the deploy export's op counts and PyTorch's outputs. Returns the Report."""
    deploy = net.deploy()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = net(x).numpy()
        np.testing.assert_allclose(deploy(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    tag = {False: "ts", True: "dynamo", "unoptimized": "dynamo_unopt"}[dynamo]
    train = load(export(net, x, str(tmp_path / f"train_{tag}.onnx"), dynamo)).model
    deployed = load(export(deploy, x, str(tmp_path / f"deploy_{tag}.onnx"), dynamo)).model
    fused, report = fuse(train)
    onnx.checker.check_model(fused, full_check=True)
    assert not report.skipped, [(b.anchor, b.reason) for b in report.skipped]
    assert op_counts(fused) == op_counts(deployed), (op_counts(train), op_counts(fused), op_counts(deployed))
    got = run(fused, {fused.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert validate(train, fused, input_sets=2).passed
    assert_cli_writes(fused, str(tmp_path / f"train_{tag}.onnx"), str(tmp_path / f"cli_{tag}.onnx"))
    return report


def assert_cli_writes(fused: onnx.ModelProto, train_path: str, out_path: str) -> None:
    """The CLI, with every weight of 256 bytes or more left on disk (wire-format reader, kept
    arrays, splicing writer), writes exactly the model fuse() made: the same bytes for a
    one-file model; the same nodes and initializer values with external data."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(skeleton, "MIN_BYTES", 256)
        patch.setattr(MemorySink, "threshold", 256)
        assert main([train_path, out_path, "--no-check", "-q"]) == 0
    if not os.path.exists(out_path + ".data"):
        with open(out_path, "rb") as f:
            assert f.read() == fused.SerializeToString()
        return
    written = onnx.load(out_path)
    assert list(written.graph.node) == list(fused.graph.node)
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("case", list(CASES) + list(NETS))
def test_family_fuses_to_deploy_form(tmp_path, case, dynamo):
    torch.manual_seed(0)
    if case in NETS:
        net = randomize_bn(NETS[case](), seed=11)
    else:
        net = randomize_bn(fam.Net(CASES[case]()), seed=11)
    fuse_against_deploy(tmp_path, net, dynamo)


def dbb_net():
    return fam.Net([fam.DiverseBranchBlock(C, C), fam.DiverseBranchBlock(C, 2 * C, stride=2),
                    fam.DiverseBranchBlock(2 * C, 2 * C, groups=2)])


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_dbb(tmp_path, dynamo):
    """DBB: the 1x1 -> BNAndPad -> kxk and 1x1 -> BNAndPad -> AvgPool branches merge too.

    BNAndPad exports as Pad + ScatterND data movement (dynamo), or as hundreds of index
    nodes over shapes the graph does not declare (TorchScript, unoptimized dynamo); static
    shapes make that index math constant, and the `sequential` rule probes the fill.
    """
    torch.manual_seed(0)
    report = fuse_against_deploy(tmp_path, randomize_bn(dbb_net(), seed=11), dynamo)
    assert sum(1 for r in report.fused if "fill" in r.branches) == 6  # 2 per block
