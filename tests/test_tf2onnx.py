"""Keras models exported by tf2onnx: training form against its deploy form.

The exports are checked in (tests/data/tf2onnx/, made by tests/data/tf2onnx/make_exports.py with
tensorflow-cpu 2.15.1 and tf2onnx 1.16.1 at opset 13; BN statistics randomized; each deploy form
fused in numpy from the training form's weights). tf2onnx folds each conv's BN into the conv and
moves the body to NCHW; what stays is the sum of branches: Conv + Conv (+ BatchNormalization of
the input) -> Add.

Keras' padding='same' at stride 2 on an even size pads a 3x3 by (0, 1) and a 1x1 by (0, 0): the
branches' output sizes agree only at even sizes. With a static input that is the size the model
runs at, so the block is one conv whose 1x1 sits at tap (0, 0); with a dynamic input
(auto_pad=SAME_UPPER) no one conv is right at every size, and the block stays, as a near miss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_repvgg import fuse, validate
from tests.graphs import op_counts, random_feed, run

DATA = Path(__file__).parent / "data" / "tf2onnx"


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(DATA / f"{name}.onnx"))


# name: (blocks fused, near-miss reason codes)
CASES = {
    "repvgg_same_even": (3, []),
    "repvgg_same_odd": (3, []),
    "repvgg_zeropad": (2, []),
    "acnet_same_even": (3, []),
    "mobileone_dw": (2, []),
    # the identity BN on the NHWC input (Mul -> Add -> Transpose) moved onto the convs' Transpose
    # (transpose_affine), then both blocks fused
    "mobileone_dw_unfused_bn": (4, []),
    # the stride-2 blocks: SAME_UPPER's pads depend on the input size (even: the 1x1 at tap 0,
    # odd: at the centre), so no one conv is right at every size
    "repvgg_same_even_dyn": (1, ["auto_pad", "auto_pad"]),
    "acnet_same_even_dyn": (2, ["auto_pad"]),
}


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, seeds=(0, 1)) -> None:
    for seed in seeds:
        feeds = random_feed(a, seed)
        for x, y in zip(run(a, feeds), run(b, feeds)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(x).max()))


@pytest.mark.parametrize("name", list(CASES))
def test_training_export_fuses_to_deploy_form(name):
    train, deploy = load(f"{name}_train"), load(f"{name}_deploy")
    fused, report = fuse(train)
    onnx.checker.check_model(fused, full_check=True)
    blocks, near_misses = CASES[name]
    assert len(report.fused) == blocks
    assert [r.reason_code for r in report.skipped] == near_misses
    if not near_misses:
        assert op_counts(fused) == op_counts(deploy)
    assert_same_outputs(train, fused)
    if not name.endswith("_dyn"):  # a dynamic export's deploy form is right at even sizes only
        assert_same_outputs(deploy, fused)
    result = validate(train, fused, input_sets=2)
    assert result.passed, result.outputs


def test_stride_two_same_padding_at_even_size_puts_the_1x1_at_the_first_tap():
    """The fused stride-2 conv keeps the 3x3's pads (0, 1) and carries the 1x1 branch at kernel
    tap (0, 0): the deploy form Keras itself would compute for this input size."""
    train, deploy = load("repvgg_same_even_train"), load("repvgg_same_even_deploy")
    fused, _ = fuse(train)
    for model in (fused, deploy):
        first = next(n for n in model.graph.node if n.op_type == "Conv")
        pads = next(list(a.ints) for a in first.attribute if a.name == "pads")
        assert pads == [0, 0, 1, 1]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    deploy_weights = {t.name: onnx.numpy_helper.to_array(t) for t in deploy.graph.initializer}
    w = weights[next(n for n in fused.graph.node if n.op_type == "Conv").input[1]]
    w_deploy = deploy_weights[next(n for n in deploy.graph.node if n.op_type == "Conv").input[1]]
    np.testing.assert_allclose(w, w_deploy, rtol=1e-5, atol=1e-6)


def test_size_specific_fusion_needs_a_static_size():
    """The same stride-2 blocks with the input's height and width made dynamic (declared, the
    conv pads as exported) are near misses: their output sizes differ at odd sizes (where the
    training export itself cannot run: its Add would broadcast 8 by 9)."""
    train = load("repvgg_same_even_train")
    dims = train.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_param, dims[2].dim_param = "h", "w"
    fused, report = fuse(train)
    assert [r.reason_code for r in report.skipped] == ["output_shape_mismatch"] * 2
    assert len(report.fused) == 1
    for seed, (h, w) in enumerate([(16, 16), (12, 20)]):
        feeds = {"input": np.random.default_rng(seed).normal(size=(1, h, w, 8)).astype(np.float32)}
        for x, y in zip(run(train, feeds), run(fused, feeds)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(x).max()))


def test_identity_bn_in_nhwc_before_the_transpose_joins_the_block():
    """Keras' BatchNormalization(fused=False) on the graph's NHWC input is written as Mul -> Add
    -> Transpose beside the conv branches' own Transpose of the input: the affine moves onto
    that Transpose (one Transpose fewer), and the identity branch is fused with the convs."""
    train, deploy = load("mobileone_dw_unfused_bn_train"), load("mobileone_dw_unfused_bn_deploy")
    assert op_counts(train)["Transpose"] == 3
    fused, report = fuse(train)
    assert op_counts(fused) == op_counts(deploy) == {"Transpose": 2, "Conv": 2, "Relu": 2}
    assert [r.branches for r in report.fused][0] == ["affine", "transpose"]
