"""ConvTranspose: BN and per-channel affine folds, parallel transposed branches, near misses.

Real exports first (a segmentation head and a parallel-branch upsampler, tests/reference/
conv_transpose.py, exported with TorchScript, dynamo and unoptimized dynamo, fused to the deploy
export's op counts), then hand-built graphs for every geometry attribute and every reason.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from onnx_repvgg import fuse
from tests.graphs import GraphBuilder, fuse_and_compare, op_counts, random_feed, run
from tests.reference import conv_transpose as ref
from tests.reference.repvgg import randomize_bn
from tests.test_families import EXPORTERS, fuse_against_deploy

# -- real exports ------------------------------------------------------------------------------

# fused transposed blocks per exporter: the optimizing dynamo exporter already folds a lone
# ConvTranspose -> BN (onnxscript's FuseBatchNormIntoConvTranspose), never parallel branches
EXPECTED_TRANSPOSED_FUSIONS = {
    "segmentation-head": {False: 4, True: 0, "unoptimized": 4},
    "parallel-upsampler": {False: 3, True: 3, "unoptimized": 3},
}
NETS = {"segmentation-head": ref.SegmentationHead, "parallel-upsampler": ref.UpsamplerNet}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("case", list(NETS))
def test_reference_fuses_to_deploy_form(tmp_path, case, dynamo):
    torch.manual_seed(0)
    net = randomize_bn(NETS[case](), seed=11)
    report = fuse_against_deploy(tmp_path, net, dynamo)
    transposed = [r for r in report.fused if r.branches and r.branches[0].startswith("convT")]
    assert len(transposed) == EXPECTED_TRANSPOSED_FUSIONS[case][dynamo], [r.branches for r in report.fused]
    if case == "parallel-upsampler":
        assert all(r.branches[:3] == ["convT4x4", "convT2x2", "convT1x1"] for r in transposed)


# -- hand-built graphs -------------------------------------------------------------------------

def conv_transpose(g: GraphBuilder, x, cin, cout, k=2, stride=2, pads=None, group=1, bias=True, dilation=1,
                   output_padding=None, output_shape=None, auto_pad=None, weight_as_input=False):
    """Append a ConvTranspose with a seeded random weight (Cin, Cout/group, k...) and bias."""
    k = (k, k) if isinstance(k, int) else tuple(k)
    n = len(k)
    shape = (cin, cout // group, *k)
    weight = g.rng.standard_normal(shape).astype(g.dtype) * 0.3
    if weight_as_input:
        name = g.fresh("WT_input")
        g.extra_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
    else:
        name = g.constant(weight, "WT")
    inputs = [x, name]
    if bias:
        inputs.append(g.constant(g.rng.standard_normal(cout).astype(g.dtype), "BT"))
    attrs = dict(kernel_shape=list(k), strides=[stride] * n if isinstance(stride, int) else list(stride),
                 dilations=[dilation] * n if isinstance(dilation, int) else list(dilation), group=group)
    if pads is not None:
        attrs["pads"] = list(pads)
    if output_padding is not None:
        attrs["output_padding"] = list(output_padding)
    if output_shape is not None:
        attrs["output_shape"] = list(output_shape)
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    return g.op("ConvTranspose", inputs, **attrs)


def const(g: GraphBuilder, shape, low=-1.5, high=1.5, stem="c"):
    return g.constant(g.rng.uniform(low, high, shape).astype(g.dtype), stem)


def assert_skipped(model, code, status="skipped"):
    """Nothing fused, the model untouched, and a record with `code`: a near miss ("skipped"), or
    a single-branch fold that does not apply ("not_applicable")."""
    fused, report = fuse(model)
    assert not report.fused, [(r.branches, r.reason) for r in report.fused]
    records = report.skipped if status == "skipped" else report.not_applicable
    assert code in [r.reason_code for r in records], [(r.status, r.reason_code, r.reason) for r in report.blocks]
    assert fused.SerializeToString() == model.SerializeToString()
    return report


# One ConvTranspose geometry per case: (channels in, out, kwargs); every attribute of the op.
GEOMETRIES = {
    "k2-s2": (4, 6, dict(k=2)),
    "k4-s2-p1": (4, 6, dict(k=4, pads=[1, 1, 1, 1])),
    "k3-s2-output-padding": (4, 6, dict(k=3, pads=[1, 1, 1, 1], output_padding=[1, 1])),
    "k3-s3-asymmetric-pads": (4, 6, dict(k=3, stride=3, pads=[0, 1, 2, 0], output_padding=[2, 1])),
    "grouped": (4, 6, dict(k=4, pads=[1, 1, 1, 1], group=2)),
    "depthwise": (6, 6, dict(k=3, pads=[1, 1, 1, 1], output_padding=[1, 1], group=6)),
    "depthwise-multiplier": (4, 8, dict(k=2, group=4)),
    "dilated": (4, 6, dict(k=3, dilation=2, pads=[2, 2, 2, 2], output_padding=[1, 1])),
    "stride-1": (4, 6, dict(k=3, stride=1, pads=[1, 1, 1, 1])),
    "mixed-strides": (4, 6, dict(k=(3, 2), stride=(2, 1), pads=[1, 0, 1, 1], output_padding=[1, 0])),
    "output-shape": (4, 6, dict(k=3, output_shape=[10, 11])),
    "auto-pad-same-upper": (4, 6, dict(k=3, auto_pad="SAME_UPPER")),
    "auto-pad-same-lower": (4, 6, dict(k=4, auto_pad="SAME_LOWER", group=2)),
    "auto-pad-valid": (4, 6, dict(k=3, auto_pad="VALID")),
    "no-bias": (4, 6, dict(k=2, bias=False)),
}


@pytest.mark.parametrize("case", list(GEOMETRIES))
def test_bn_after_conv_transpose_folds(case):
    cin, cout, kw = GEOMETRIES[case]
    g = GraphBuilder(channels=cin, spatial=(5, 5), seed=3)
    y = g.bn(conv_transpose(g, "x", cin, cout, **kw), cout)
    model = g.model([y])
    fused, report = fuse_and_compare(model)
    assert op_counts(fused) == {"ConvTranspose": 1}
    assert [r.branches for r in report.fused] == [[f"convT{'x'.join(map(str, _kernel(kw)))}", "bn"]]
    node = fused.graph.node[0]
    original = model.graph.node[0]
    assert {a.name: a for a in node.attribute} == {a.name: a for a in original.attribute}


def _kernel(kw):
    k = kw["k"]
    return (k, k) if isinstance(k, int) else k


@pytest.mark.parametrize("case", ["grouped", "depthwise", "output-shape", "auto-pad-same-upper"])
def test_affine_after_conv_transpose_folds(case):
    """ConvT(x) * g + b, ConvT(x) / g - b and b - ConvT(x), per channel and scalar."""
    cin, cout, kw = GEOMETRIES[case]
    g = GraphBuilder(channels=cin, spatial=(4, 5), seed=5)
    a = g.op("Add", [g.op("Mul", [conv_transpose(g, "x", cin, cout, **kw), const(g, (cout, 1, 1))]),
                     const(g, (1, cout, 1, 1))])
    b = g.op("Sub", [g.op("Div", [conv_transpose(g, "x", cin, cout, **kw), const(g, (1,), 0.5, 2)]),
                     const(g, (cout, 1, 1))])
    c = g.op("Sub", [const(g, (cout, 1, 1)), conv_transpose(g, "x", cin, cout, **kw)])
    model = g.model([a, b, c])
    fused, report = fuse_and_compare(model)
    assert op_counts(fused) == {"ConvTranspose": 3}
    assert len(report.fused) == 3


def test_chain_of_affine_ops_and_bn_folds_once():
    g = GraphBuilder(channels=4, spatial=(5, 5), seed=7)
    y = conv_transpose(g, "x", 4, 6, k=4, pads=[1, 1, 1, 1])
    y = g.op("Mul", [y, const(g, (6, 1, 1))])
    y = g.bn(g.op("Add", [y, const(g, (6, 1, 1))]), 6)
    y = g.op("Neg", [y])
    fused, report = fuse_and_compare(g.model([g.op("Relu", [y])]))
    assert op_counts(fused) == {"ConvTranspose": 1, "Relu": 1}
    assert report.fused[0].branches == ["convT4x4", "bn", "mul", "bias"]


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_bn_fold_keeps_the_model_dtype(dtype):
    g = GraphBuilder(channels=4, spatial=(4, 4), dtype=dtype, seed=2)
    y = g.bn(conv_transpose(g, "x", 4, 4, k=2), 4)
    model = g.model([y])
    try:  # onnxruntime may lack a CPU ConvTranspose kernel for this dtype
        run(model, random_feed(model))
    except Exception as err:  # noqa: BLE001
        assert "NOT_IMPLEMENTED" in str(err)
        fused, report = fuse(model)
        onnx.checker.check_model(fused, full_check=True)
    else:
        fused, report = fuse_and_compare(model, rtol=1e-2 if dtype == np.float16 else 1e-7, atol=1e-2 if
                                         dtype == np.float16 else 1e-9)
    assert op_counts(fused) == {"ConvTranspose": 1}
    weights = {t.name: t for t in fused.graph.initializer}
    assert {weights[name].data_type for name in fused.graph.node[0].input[1:]} == {
        helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}


@pytest.mark.parametrize("ndim", [1, 3])
def test_other_ranks(ndim):
    g = GraphBuilder(channels=4, spatial=(3,) * ndim, seed=4)
    pads = [1] * (2 * ndim)
    a = g.bn(conv_transpose(g, "x", 4, 4, k=(4,) * ndim, pads=pads, group=2), 4)
    b = g.bn(conv_transpose(g, "x", 4, 4, k=(2,) * ndim, group=2), 4)
    fused, _ = fuse_and_compare(g.model([g.add(a, b)]))
    assert op_counts(fused) == {"ConvTranspose": 1}


def test_weights_as_constant_nodes_and_shared_initializers():
    """A weight shared by two ConvTransposes is never modified: each gets its own fused copy."""
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=8)
    w = g.constant(g.rng.standard_normal((4, 6, 2, 2)).astype(np.float32), "shared")
    bias = g.constant(g.rng.standard_normal(6).astype(np.float32), "bias", as_node=True)
    outs = [g.bn(g.op("ConvTranspose", ["x", w, bias], strides=[2, 2]), 6) for _ in range(2)]
    model = g.model(outs)
    fused, report = fuse_and_compare(model)
    assert len(report.fused) == 2 and op_counts(fused) == {"ConvTranspose": 2}
    assert w not in {t.name for t in fused.graph.initializer}
    assert w in {t.name for t in model.graph.initializer}


# -- parallel branches --------------------------------------------------------------------------

PARALLEL = {
    # (kwargs of each branch): all give the same output size for every input size
    "4x4p1+2x2+1x1op1": [dict(k=4, pads=[1, 1, 1, 1]), dict(k=2), dict(k=1, output_padding=[1, 1])],
    "3x3p1op1+1x1op1": [dict(k=3, pads=[1, 1, 1, 1], output_padding=[1, 1]), dict(k=1, output_padding=[1, 1])],
    "dilated-3x3+1x1": [dict(k=3, dilation=2, pads=[2, 2, 2, 2], output_padding=[1, 1]),
                        dict(k=1, output_padding=[1, 1])],
    "stride-3-negative-end-crop": [dict(k=3, stride=3, pads=[1, 1, 0, 0], output_padding=[1, 1]),
                                   dict(k=1, stride=3, output_padding=[2, 2])],
    "asymmetric": [dict(k=(3, 2), pads=[1, 0, 0, 0], output_padding=[0, 0]), dict(k=(2, 2), pads=[0, 0, 0, 0])],
    "grouped": [dict(k=4, pads=[1, 1, 1, 1], group=2), dict(k=2, group=2)],
    "depthwise": [dict(k=4, pads=[1, 1, 1, 1], group=6), dict(k=2, group=6), dict(k=1, group=6, output_padding=[1, 1])],
    "identical-output-shape": [dict(k=3, output_shape=[9, 10]), dict(k=3, output_shape=[9, 10])],
    "identical-same-lower": [dict(k=3, auto_pad="SAME_LOWER"), dict(k=3, auto_pad="SAME_LOWER", bias=False)],
    "valid-and-explicit": [dict(k=2, auto_pad="VALID"), dict(k=4, pads=[1, 1, 1, 1])],
}


@pytest.mark.parametrize("case", list(PARALLEL))
def test_parallel_branches_merge(case):
    channels = 6
    g = GraphBuilder(channels=channels, spatial=(4, 5), seed=9)
    outs = [g.bn(conv_transpose(g, "x", channels, channels, **kw), channels) for kw in PARALLEL[case]]
    total = outs[0]
    for other in outs[1:]:
        total = g.add(total, other)
    model = g.model([g.op("Relu", [total])])
    fused, report = fuse_and_compare(model)
    assert op_counts(fused) == {"ConvTranspose": 1, "Relu": 1}, op_counts(fused)
    assert len(report.fused) == 1 and not report.skipped


def test_merged_geometry_is_the_covering_kernel():
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=10)
    a = conv_transpose(g, "x", 4, 4, k=4, pads=[1, 1, 1, 1])
    b = conv_transpose(g, "x", 4, 4, k=1, output_padding=[1, 1])
    fused, _ = fuse_and_compare(g.model([g.op("Sum", [a, b])]))
    node = fused.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["kernel_shape"] == [4, 4] and attrs["pads"] == [1, 1, 1, 1] and "output_padding" not in attrs


def test_addend_that_is_not_a_branch_stays_in_the_sum():
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=11)
    skip = conv_transpose(g, "x", 4, 4, k=2, bias=False)
    skip = g.op("Relu", [skip])
    a = g.bn(conv_transpose(g, "x", 4, 4, k=4, pads=[1, 1, 1, 1]), 4)
    b = g.bn(conv_transpose(g, "x", 4, 4, k=2), 4)
    fused, _ = fuse_and_compare(g.model([g.add(g.add(a, skip), b)]))
    assert op_counts(fused) == {"ConvTranspose": 2, "Relu": 1, "Add": 1}


def test_conv_and_conv_transpose_in_one_sum():
    """BN(Conv(u)) + BN(ConvT(x)): branch_sum takes the Conv, this rule the ConvT (next round)."""
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=12)
    up = g.op("Relu", [conv_transpose(g, "x", 4, 4, k=2)])
    a = g.bn(g.conv(up, 4, 4, k=3), 4)
    b = g.bn(conv_transpose(g, "x", 4, 4, k=4, pads=[1, 1, 1, 1]), 4)
    fused, report = fuse_and_compare(g.model([g.add(a, b)]))
    assert op_counts(fused) == {"ConvTranspose": 2, "Relu": 1, "Conv": 1, "Add": 1}
    assert len(report.fused) == 2


# -- a scale before a ConvTranspose ---------------------------------------------------------------

@pytest.mark.parametrize("op,shape", [("Mul", (1, 4, 1, 1)), ("Mul", ()), ("Div", (4, 1, 1)), ("Mul", (1,))])
def test_scale_before_conv_transpose_folds(op, shape):
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=13)
    scale = const(g, shape, 0.5, 2)
    scaled = g.op(op, ["x", scale] if op == "Div" or shape else [scale, "x"])
    a = conv_transpose(g, scaled, 4, 6, k=3, pads=[1, 1, 1, 1], output_padding=[1, 1], group=2)
    b = conv_transpose(g, scaled, 4, 4, k=2, group=4)
    fused, report = fuse_and_compare(g.model([a, b]))
    assert op_counts(fused) == {"ConvTranspose": 2}
    assert report.fused[0].branches == [op.lower(), "convT"]


def test_scale_before_conv_transpose_needs_a_known_shape_or_a_scalar():
    """Without X's shape a (1, C, 1, 1) constant might broadcast X from 1 channel to C: left alone."""
    g = GraphBuilder(channels=1, spatial=(4, 4), seed=14)
    scaled = g.op("Mul", ["x", const(g, (1, 4, 1, 1))])
    model = g.model([conv_transpose(g, scaled, 4, 4, k=2)])
    fused, report = fuse(model)
    assert not report.fused and fused.SerializeToString() == model.SerializeToString()


def test_scale_with_another_reader_stays():
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=15)
    scaled = g.op("Mul", ["x", const(g, (1, 4, 1, 1))])
    model = g.model([conv_transpose(g, scaled, 4, 4, k=2), g.op("Relu", [scaled])])
    fused, report = fuse(model)
    assert not report.fused and fused.SerializeToString() == model.SerializeToString()


# -- near misses ---------------------------------------------------------------------------------

def test_bn_before_conv_transpose_is_a_near_miss():
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=16)
    y = conv_transpose(g, g.bn("x", 4), 4, 6, k=3, pads=[1, 1, 1, 1])
    report = assert_skipped(g.model([y]), "bn_before_transpose")
    assert "constant input does not give a constant output" in report.skipped[0].reason


def test_bn_before_conv_transpose_after_a_conv_folds_backwards():
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=17)
    y = conv_transpose(g, g.bn(g.conv("x", 4, 4, k=3), 4), 4, 6, k=2)
    fused, report = fuse_and_compare(g.model([y]))
    assert op_counts(fused) == {"Conv": 1, "ConvTranspose": 1} and not report.skipped


NEAR_MISSES = {
    # strides 2 and 3 whose output sizes happen to agree at this input size (8 and 8)
    "stride_mismatch": [dict(k=4, pads=[1, 1, 1, 1]), dict(k=1, stride=3, pads=[1, 1, 1, 1])],
    "group_mismatch": [dict(k=2, group=2), dict(k=2, group=4)],
    "dilation_mismatch": [dict(k=3, dilation=2, pads=[2, 2, 2, 2], output_padding=[1, 1]),
                          dict(k=3, dilation=1, pads=[1, 1, 1, 1], output_padding=[1, 1])],
    # reach 1 and 0: on a 1x1 input the outputs are 1x1 and 3x3, and Add broadcasts
    "output_shape_mismatch": [dict(k=1), dict(k=3)],
    # same reach (1), but pad_begin 2 and 1 are an odd distance apart at dilation 2
    "kernel_offset": [dict(k=3, dilation=2, pads=[2, 2, 2, 2], output_padding=[1, 1]),
                      dict(k=2, dilation=2, pads=[1, 1, 0, 0])],
    "auto_pad": [dict(k=3, output_shape=[8, 8]), dict(k=2, output_shape=[8, 8])],
    "auto_pad-same": [dict(k=4, auto_pad="SAME_UPPER"), dict(k=2, auto_pad="SAME_UPPER")],
}


@pytest.mark.parametrize("code", list(NEAR_MISSES))
def test_parallel_near_misses(code):
    spatial = (1, 1) if code == "output_shape_mismatch" else (4, 4)
    g = GraphBuilder(channels=4, spatial=spatial, seed=18)
    outs = [g.bn(conv_transpose(g, "x", 4, 4, **kw), 4) for kw in NEAR_MISSES[code]]
    assert_skipped(g.model([g.add(*outs)]), code.split("-")[0])


def test_channel_mismatch():
    """1 and 4 output channels: Add broadcasts the first, the weights do not line up."""
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=19)
    a = conv_transpose(g, "x", 4, 1, k=2)
    b = conv_transpose(g, "x", 4, 4, k=2)
    assert_skipped(g.model([g.add(g.bn(a, 1), g.bn(b, 4))]), "channel_mismatch")


def test_group_mismatch_with_equal_channels():
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=19)
    a = conv_transpose(g, "x", 4, 4, k=2, group=4)
    w = g.constant(g.rng.standard_normal((4, 2, 2, 2)).astype(np.float32), "W2")
    b = g.op("ConvTranspose", ["x", w], kernel_shape=[2, 2], strides=[2, 2], group=2)
    assert_skipped(g.model([g.add(g.bn(a, 4), g.bn(b, 4))]), "group_mismatch")


@pytest.mark.parametrize("where", ["output", "shared"])
def test_intermediate_not_private(where):
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=20)
    y = conv_transpose(g, "x", 4, 4, k=2)
    out = g.bn(y, 4)
    outputs = [out, y] if where == "output" else [out, g.op("Relu", [y])]
    assert_skipped(g.model(outputs), "intermediate_is_output" if where == "output" else "intermediate_shared")


def test_weight_as_graph_input_is_not_constant():
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=21)
    assert_skipped(g.model([g.bn(conv_transpose(g, "x", 4, 4, k=2, weight_as_input=True), 4)]), "non_constant")


@pytest.mark.parametrize("in_sum", [False, True])
def test_training_bn_after_conv_transpose(in_sum):
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=22)
    y = g.bn(conv_transpose(g, "x", 4, 4, k=2), 4, training_mode=1)
    if in_sum:
        y = g.add(y, g.bn(conv_transpose(g, "x", 4, 4, k=4, pads=[1, 1, 1, 1]), 4))
    report = assert_skipped(g.model([y]), "bn_training")
    assert {r.reason_code for r in report.skipped} == {"bn_training"}


def test_spatial_scale_is_not_per_channel():
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=23)
    y = g.op("Mul", [conv_transpose(g, "x", 4, 4, k=2), const(g, (1, 1, 8, 8))])
    assert_skipped(g.model([y]), "not_per_channel", status="not_applicable")


def test_quantized_weight_is_left_alone():
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=24)
    q = g.constant(g.rng.integers(-100, 100, (4, 4, 2, 2)).astype(np.int8), "Wq")
    w = g.op("DequantizeLinear", [q, g.constant(np.array(0.01, np.float32), "s")])
    y = g.bn(g.op("ConvTranspose", ["x", w], kernel_shape=[2, 2], strides=[2, 2]), 4)
    assert_skipped(g.model([y]), "quantized")


@pytest.mark.parametrize("opset", [11, 13, 21])
def test_opsets(opset):
    g = GraphBuilder(channels=4, spatial=(4, 4), opset=opset, seed=25)
    a = g.bn(conv_transpose(g, "x", 4, 4, k=4, pads=[1, 1, 1, 1]), 4)
    b = g.op("Mul", [conv_transpose(g, "x", 4, 4, k=2), const(g, (4, 1, 1))])
    fused, _ = fuse_and_compare(g.model([g.add(a, b)]))
    assert op_counts(fused) == {"ConvTranspose": 1}


def test_value_preserving_copies_inside_the_block():
    """ConvT(Identity(x)) + Identity(BN(ConvT(x))): the copies go with the block."""
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=26)
    a = conv_transpose(g, g.op("Identity", ["x"]), 4, 4, k=4, pads=[1, 1, 1, 1])
    b = g.op("Identity", [g.bn(conv_transpose(g, "x", 4, 4, k=2), 4)])
    fused, report = fuse_and_compare(g.model([g.op("Relu", [g.add(g.bn(a, 4), b)])]))
    assert op_counts(fused) == {"ConvTranspose": 1, "Relu": 1}
    assert fused.graph.node[0].input[0] == "x"


def test_product_of_two_tensors_before_conv_transpose_is_no_candidate():
    g = GraphBuilder(channels=4, spatial=(4, 4), seed=27)
    gate = g.op("Sigmoid", ["x"])
    model = g.model([conv_transpose(g, g.op("Mul", ["x", gate]), 4, 4, k=2, weight_as_input=True)])
    fused, report = fuse(model)
    assert not report.blocks and fused.SerializeToString() == model.SerializeToString()
