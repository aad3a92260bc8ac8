"""The branch_sum rule on hand-built graphs: what fuses, what is skipped, and why."""

import itertools

import numpy as np
import onnx
import pytest
from onnx import helper

from onnx_repvgg import fuse
from tests.graphs import GraphBuilder, fuse_and_compare, op_counts


def repvgg_block(b: GraphBuilder, c=4, identity="bn", order=(0, 1, 2), assoc="left", **conv_kw):
    x = b.x
    branches = [b.conv(x, c, c, 3, **conv_kw), b.conv(x, c, c, 1, pads=[0, 0, 0, 0],
                                                       **{k: v for k, v in conv_kw.items() if k != "pads"})]
    if identity == "bn":
        branches.append(b.bn(x, c))
    elif identity == "bare":
        branches.append(x)
    terms = [branches[i] for i in order if i < len(branches)]
    if assoc == "left":
        out = terms[0]
        for t in terms[1:]:
            out = b.add(out, t)
    else:
        out = terms[-1]
        for t in reversed(terms[:-1]):
            out = b.add(t, out)
    return out


def assert_single_conv(fused, report, fused_blocks=1):
    counts = op_counts(fused)
    assert counts.get("Conv") == fused_blocks
    assert "BatchNormalization" not in counts
    assert "Add" not in counts
    assert len(report.fused) == fused_blocks
    assert not report.skipped


@pytest.mark.parametrize("identity", ["bn", "bare", None])
def test_repvgg_block_fuses_to_one_conv(identity):
    b = GraphBuilder()
    out = repvgg_block(b, identity=identity)
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)
    assert fused.graph.node[0].output[0] == out  # takes over the root's name
    conv = fused.graph.node[0]
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "kernel_shape")) == [3, 3]
    assert len(fused.graph.initializer) == 2
    expected = {"bn": ["3x3", "1x1", "bn"], "bare": ["3x3", "1x1", "id"], None: ["3x3", "1x1"]}[identity]
    assert report.fused[0].branches == expected


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("assoc", ["left", "right"])
def test_any_add_order_and_association(order, assoc):
    b = GraphBuilder()
    out = repvgg_block(b, identity="bn", order=order, assoc=assoc)
    assert_single_conv(*fuse_and_compare(b.model([out])))


def test_unfolded_conv_bn_branches():
    b = GraphBuilder(channels=6)
    x = b.x
    t3 = b.bn(b.conv(x, 6, 6, 3, bias=False), 6)
    t1 = b.bn(b.conv(x, 6, 6, 1, pads=[0] * 4, bias=True), 6)
    out = b.add(b.add(t3, t1), b.bn(x, 6))
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)


def test_nary_sum_node():
    b = GraphBuilder()
    x = b.x
    out = b.op("Sum", [b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4), b.bn(x, 4)])
    assert_single_conv(*fuse_and_compare(b.model([out])))


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_and_depthwise_with_identity(groups):
    b = GraphBuilder(channels=4)
    out = repvgg_block(b, identity="bn", group=groups)
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)
    assert report.fused[0].group == groups


def test_stride_2_without_identity_changes_channels():
    b = GraphBuilder(channels=4, spatial=(7, 7))
    x = b.x
    out = b.add(b.conv(x, 4, 8, 3, stride=2), b.conv(x, 4, 8, 1, stride=2, pads=[0] * 4))
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)
    assert report.fused[0].strides == [2, 2]


@pytest.mark.parametrize("as_node,via_identity", [(True, False), (False, True)])
def test_constant_nodes_and_identity_shared_constants(as_node, via_identity):
    b = GraphBuilder()
    x = b.x
    t3 = b.conv(x, 4, 4, 3, as_node=as_node, via_identity=via_identity)
    t1 = b.conv(x, 4, 4, 1, pads=[0] * 4, as_node=as_node, via_identity=via_identity)
    out = b.add(b.add(t3, t1), b.bn(x, 4, as_node=as_node))
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)
    assert op_counts(fused) == {"Conv": 1}  # the now-dead Constant/Identity nodes are gone
    assert len(fused.graph.initializer) == 2


@pytest.mark.parametrize("spatial,k", [((9,), (3,)), ((5, 5, 5), (3, 3, 3))])
def test_1d_and_3d(spatial, k):
    b = GraphBuilder(spatial=spatial)
    x = b.x
    n = len(spatial)
    out = b.add(b.add(b.conv(x, 4, 4, k), b.conv(x, 4, 4, (1,) * n, pads=[0] * 2 * n)), b.bn(x, 4))
    assert_single_conv(*fuse_and_compare(b.model([out])))


def test_auto_pad_same_upper_and_valid():
    b = GraphBuilder()
    x = b.x
    out = b.add(b.add(b.conv(x, 4, 4, 3, auto_pad="SAME_UPPER"), b.conv(x, 4, 4, 1, auto_pad="VALID")), x)
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}
    assert "auto_pad" not in attrs and attrs["pads"] == [1, 1, 1, 1]


def test_wider_pads_that_still_embed():
    b = GraphBuilder(spatial=(5, 5))
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3, pads=[2, 2, 2, 2], stride=2), b.conv(x, 4, 4, 1, pads=[1, 1, 1, 1], stride=2))
    assert_single_conv(*fuse_and_compare(b.model([out])))


def test_off_centre_pads_that_embed():
    b = GraphBuilder(spatial=(6, 7))
    x = b.x
    t3 = b.conv(x, 4, 4, 3, pads=[2, 2, 0, 0])  # a causal-style 3x3
    t1 = b.conv(x, 4, 4, 1, pads=[0, 0, 0, 0])  # its bottom-right tap
    t2 = b.conv(x, 4, 4, 2, pads=[1, 1, 0, 0])
    out = b.add(b.add(t3, t1), t2)
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}
    assert attrs["pads"] == [2, 2, 0, 0] and attrs["kernel_shape"] == [3, 3]


def test_acnet_asymmetric_kernels_and_dilation():
    b = GraphBuilder(spatial=(9, 9))
    x = b.x
    t33 = b.conv(x, 4, 4, 3, dilation=2)
    t13 = b.conv(x, 4, 4, (1, 3), dilation=2, pads=[0, 2, 0, 2])
    t31 = b.conv(x, 4, 4, (3, 1), dilation=2, pads=[2, 0, 2, 0])
    out = b.add(b.add(b.add(t33, t13), t31), b.bn(x, 4))
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)
    assert report.fused[0].branches == ["3x3", "1x3", "3x1", "bn"]


def test_other_addends_stay_in_the_sum():
    b = GraphBuilder()
    x = b.x
    y = b.op("Relu", [x])
    out = b.add(b.add(b.conv(x, 4, 4, 3), y), b.conv(x, 4, 4, 1, pads=[0] * 4))
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Relu": 1, "Conv": 1, "Add": 1}
    assert len(report.fused) == 1


def test_plain_residual_is_not_a_block():
    b = GraphBuilder()
    x = b.x
    out = b.add(b.op("Relu", [b.conv(b.op("Relu", [x]), 4, 4, 3)]), x)
    model = b.model([out])
    fused, report = fuse_and_compare(model)
    assert report.blocks == []
    assert op_counts(fused) == op_counts(model)


def test_two_blocks_on_one_input_get_unique_names():
    b = GraphBuilder()
    first = repvgg_block(b, identity="bn")
    second = repvgg_block(b, identity="bare")
    fused, report = fuse_and_compare(b.model([first, second]))
    assert_single_conv(fused, report, fused_blocks=2)
    names = [t.name for t in fused.graph.initializer]
    assert len(names) == len(set(names)) == 4


def test_chained_blocks_and_graph_output_name_kept():
    b = GraphBuilder()
    first = repvgg_block(b, identity="bn")
    b.x = b.op("Relu", [first])
    second = repvgg_block(b, identity="bn")
    b.x = "x"
    fused, report = fuse_and_compare(b.model([second]))
    assert op_counts(fused) == {"Conv": 2, "Relu": 1}
    assert fused.graph.output[0].name == second
    assert fused.graph.node[-1].output[0] == second


def test_shared_initializer_is_never_modified():
    """Two blocks share a 1x1 weight; one is skipped, so the shared tensor must survive intact."""
    b = GraphBuilder(spatial=(1, 1))
    x = b.x
    shared = b.constant(b.rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "shared")
    ok = b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4, weight_name=shared))
    bad = b.add(b.conv(x, 4, 4, 3, stride=2), b.conv(x, 4, 4, 1, pads=[0] * 4, weight_name=shared, stride=1))
    model = b.model([ok])
    # the second block is only valid as a separate output of mismatched shape; keep it as an output
    model.graph.output.append(helper.make_tensor_value_info(bad, onnx.TensorProto.FLOAT, None))
    before = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == shared)).copy()
    fused, report = fuse(model)
    assert [r.status for r in report.blocks] == ["fused", "skipped"]
    after = onnx.numpy_helper.to_array(next(t for t in fused.graph.initializer if t.name == shared))
    np.testing.assert_array_equal(before, after)


def test_float16_model():
    b = GraphBuilder(dtype=np.float16)
    out = repvgg_block(b, identity="bn")
    fused, report = fuse_and_compare(b.model([out]), rtol=1e-2, atol=1e-2)
    assert_single_conv(fused, report)
    assert fused.graph.initializer[0].data_type == onnx.TensorProto.FLOAT16


def test_input_model_is_not_modified():
    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity="bn")])
    before = model.SerializeToString()
    fuse(model)
    assert model.SerializeToString() == before


def test_block_inside_if_subgraph():
    inner = GraphBuilder()
    out = repvgg_block(inner, identity="bn")
    then_graph = helper.make_graph(inner.nodes, "then", [], [helper.make_tensor_value_info(out, 1, [2, 4, 6, 6])],
                                   initializer=inner.initializers)
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                                   [helper.make_tensor_value_info("y_else", 1, [2, 4, 6, 6])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [2, 4, 6, 6]),
                                            helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", 1, [2, 4, 6, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    fused, report = fuse(model)
    onnx.checker.check_model(fused, full_check=True)
    assert len(report.fused) == 1
    then_nodes = [n.op_type for a in fused.graph.node[0].attribute if a.name == "then_branch" for n in a.g.node]
    assert then_nodes == ["Conv"]
    from tests.graphs import run
    xv = np.random.default_rng(0).standard_normal((2, 4, 6, 6)).astype(np.float32)
    for c in (True, False):
        feeds = {"x": xv, "cond": np.array(c)}
        np.testing.assert_allclose(run(fused, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


# --- near misses: skipped with a reason, and the model is left exactly as it was ---------------

def _skip(model, code, status="skipped"):
    fused, report = fuse(model)
    assert [r.status for r in report.blocks] == [status], report.blocks
    assert report.blocks[0].reason_code == code, report.blocks[0].reason
    assert fused.SerializeToString() == model.SerializeToString()
    return report.blocks[0].reason


def test_skip_weight_that_is_a_graph_input():
    b = GraphBuilder()
    b.extra_inputs.append(helper.make_tensor_value_info("w_in", 1, [4, 4, 3, 3]))
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3, weight_name="w_in"), b.conv(x, 4, 4, 1, pads=[0] * 4))
    assert "w_in" in _skip(b.model([out]), "non_constant")


def test_skip_initializer_listed_as_graph_input():
    b = GraphBuilder()
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4))
    model = b.model([out])
    w = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))
    assert "graph input" in _skip(model, "non_constant")


def test_skip_bn_in_training_mode():
    b = GraphBuilder()
    x = b.x
    out = b.add(b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4)), b.bn(x, 4, training_mode=1))
    assert "training_mode=1" in _skip(b.model([out]), "bn_training")


def test_skip_bn_spatial_0_in_old_opset():
    b = GraphBuilder(opset=8)
    x = b.x
    t = b.bn(x, 4)
    b.nodes[-1].attribute.append(helper.make_attribute("spatial", 0))
    out = b.add(b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4)), t)
    model = b.model([out])
    _skip(model, "bn_spatial")


def test_skip_stride_mismatch():
    b = GraphBuilder(spatial=(1, 1))
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3, stride=2), b.conv(x, 4, 4, 1, pads=[0] * 4))
    assert "stride" in _skip(b.model([out]), "stride_mismatch")


def test_skip_identity_with_stride_2():
    b = GraphBuilder(spatial=(1, 1))
    x = b.x
    out = b.add(b.add(b.conv(x, 4, 4, 3, stride=2), b.conv(x, 4, 4, 1, stride=2, pads=[0] * 4)), x)
    _skip(b.model([out]), "identity_stride")


def test_skip_identity_that_broadcasts_channels():
    b = GraphBuilder(channels=1)
    x = b.x
    out = b.add(b.add(b.conv(x, 1, 4, 3), b.conv(x, 1, 4, 1, pads=[0] * 4)), x)
    _skip(b.model([out]), "identity_channels")


def test_skip_channel_broadcast_between_convs():
    b = GraphBuilder()
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 1, 1, pads=[0] * 4))
    _skip(b.model([out]), "channel_mismatch")


def test_skip_group_mismatch():
    b = GraphBuilder()
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3, group=2), b.conv(x, 4, 4, 1, pads=[0] * 4))
    _skip(b.model([out]), "group_mismatch")


def test_skip_dilation_mismatch_that_would_grow_the_kernel():
    """3x3 + 3x3 dilated 2 would need one 5x5 kernel: 25 taps against 18. Opt-in only."""
    b = GraphBuilder(spatial=(9, 9))
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3, dilation=2), b.conv(x, 4, 4, 3, dilation=1))
    reason = _skip(b.model([out]), "dilation_mismatch")
    assert "5x5" in reason and "25 taps against 18" in reason and "--allow-densify" in reason
    fused, report = fuse_and_compare(b.model([out]), allow_densify=True)
    (conv,) = fused.graph.node
    assert [a.ints for a in conv.attribute if a.name == "kernel_shape"] == [[5, 5]]
    assert [a.ints for a in conv.attribute if a.name == "dilations"] == [[1, 1]]


@pytest.mark.parametrize("kernel,branches", [
    (7, [(5, 1), (3, 2), (3, 3)]),            # UniRepLKNet's DilatedReparamBlock, kernel 7
    (13, [(5, 1), (7, 2), (3, 3), (3, 4), (3, 5)]),
])
def test_dilated_branches_merge_into_the_large_kernel(kernel, branches):
    """Depthwise large kernel + BN beside smaller dilated depthwise kernels + BN (UniRepLKNet):
    each dilated kernel, with zeros between its taps, fits the large one; one conv remains."""
    c = 6
    b = GraphBuilder(channels=c, spatial=(15, 15))
    x = b.x
    out = b.bn(b.conv(x, c, c, kernel, group=c, bias=False), c)
    for k, r in branches:
        out = b.add(out, b.bn(b.conv(x, c, c, k, group=c, dilation=r, bias=False, pads=[r * (k - 1) // 2] * 4), c))
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)
    conv = fused.graph.node[0]
    assert [a.ints for a in conv.attribute if a.name == "kernel_shape"] == [[kernel, kernel]]
    assert [a.ints for a in conv.attribute if a.name == "dilations"] == [[1, 1]]


def test_dilations_with_a_common_divisor_keep_it():
    """Dilations 2 and 4: the fused conv keeps dilation 2, the dilation-4 kernel gets one zero
    between its taps."""
    b = GraphBuilder(spatial=(13, 13))
    x = b.x
    out = b.add(b.conv(x, 4, 4, 5, dilation=2), b.conv(x, 4, 4, 3, dilation=4))
    fused, report = fuse_and_compare(b.model([out]))
    conv = fused.graph.node[0]
    assert [a.ints for a in conv.attribute if a.name == "kernel_shape"] == [[5, 5]]
    assert [a.ints for a in conv.attribute if a.name == "dilations"] == [[2, 2]]


def _pads_that_align_at_some_sizes(spatial):
    b = GraphBuilder(spatial=spatial)
    x = b.x
    # The 1x1's begin pad puts it at tap (0, 0) of the 3x3; its end pad differs, so the two give
    # the same number of outputs at some input sizes only (both 2 at size 3, 2 and 3 at size 4).
    return b, b.add(b.conv(x, 4, 4, 3, pads=[1, 1, 1, 1], stride=2), b.conv(x, 4, 4, 1, pads=[1, 1, 0, 0], stride=2))


def test_skip_pads_that_align_at_some_sizes_when_the_size_is_not_fixed():
    b, out = _pads_that_align_at_some_sizes((3, 3))
    model = b.model([out])
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("h", "w")):
        dim.dim_param = name
    assert "not fixed" in _skip(model, "output_shape_mismatch")


def test_pads_that_align_at_the_fixed_size_fuse_for_it():
    """At the model's fixed input size (3x3) both branches give 2x2: one 3x3 conv with the 1x1 at
    tap (0, 0) and pads (1, 1), equal there."""
    b, out = _pads_that_align_at_some_sizes((3, 3))
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)
    conv = next(n for n in fused.graph.node if n.op_type == "Conv")
    assert next(list(a.ints) for a in conv.attribute if a.name == "pads") == [1, 1, 1, 1]


def test_skip_pads_whose_output_sizes_differ_at_the_fixed_size():
    b = GraphBuilder(spatial=(3, 3))
    x = b.x
    # On 3x3, the unpadded 3x3 s2 gives one output per axis and the 1x1 s2 two: the Add broadcasts
    # the 3x3's, which no one conv does.
    out = b.add(b.conv(x, 4, 4, 3, pads=[0, 0, 0, 0], stride=2), b.conv(x, 4, 4, 1, pads=[0, 0, 0, 0], stride=2))
    assert "at the input's size 3, [1, 2] outputs" in _skip(b.model([out]), "output_shape_mismatch")


def test_skip_offset_off_the_dilation_grid():
    b = GraphBuilder(spatial=(9, 9))
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3, dilation=2, pads=[2, 2, 2, 2]), b.conv(x, 4, 4, 2, dilation=2, pads=[1, 1, 1, 1]))
    _skip(b.model([out]), "kernel_offset")


def test_skip_auto_pad_same_with_stride_2():
    b = GraphBuilder(spatial=(8, 8))
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3, stride=2, auto_pad="SAME_UPPER"), b.conv(x, 4, 4, 1, stride=2, auto_pad="SAME_UPPER"))
    _skip(b.model([out]), "auto_pad")


def test_skip_intermediate_with_another_consumer():
    b = GraphBuilder()
    x = b.x
    t3 = b.conv(x, 4, 4, 3)
    side = b.op("Relu", [t3])
    out = b.add(t3, b.conv(x, 4, 4, 1, pads=[0] * 4))
    assert "2 uses" in _skip(b.model([out, side]), "intermediate_shared")


def test_skip_intermediate_that_is_a_graph_output():
    b = GraphBuilder()
    x = b.x
    t3 = b.conv(x, 4, 4, 3)
    out = b.add(t3, b.conv(x, 4, 4, 1, pads=[0] * 4))
    _skip(b.model([out, t3]), "intermediate_is_output")


def test_skip_conv_output_feeding_bn_used_elsewhere():
    b = GraphBuilder()
    x = b.x
    c3 = b.conv(x, 4, 4, 3)
    side = b.op("Relu", [c3])
    out = b.add(b.bn(c3, 4), b.conv(x, 4, 4, 1, pads=[0] * 4))
    _skip(b.model([out, side]), "intermediate_shared")


def test_skip_fp16_overflow():
    b = GraphBuilder(dtype=np.float16)
    x = b.x
    out = b.add(b.bn(b.conv(x, 4, 4, 3), 4, eps=1e-7, params=[
        b.constant(np.full(4, 60000, np.float16), "g"), b.constant(np.zeros(4, np.float16), "b"),
        b.constant(np.zeros(4, np.float16), "m"), b.constant(np.full(4, 1e-4, np.float16), "v")]),
        b.conv(x, 4, 4, 1, pads=[0] * 4))
    _skip(b.model([out]), "overflow")


# --- linear trees: BN after the sum, scales, Sub, constants -----------------------------------

def test_bn_after_the_sum_repvit_style():
    """RepViT's RepVggDw: BN(dw3x3_bn(x) + dw1x1(x) + x)."""
    b = GraphBuilder(channels=6)
    x = b.x
    t = b.add(b.add(b.bn(b.conv(x, 6, 6, 3, group=6, bias=False), 6), b.conv(x, 6, 6, 1, group=6, pads=[0] * 4)), x)
    out = b.bn(t, 6)
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)
    assert fused.graph.node[0].output[0] == out


def test_qarepvgg_bn_after_sum_without_branch_bn():
    b = GraphBuilder()
    x = b.x
    out = b.bn(b.add(b.add(b.bn(b.conv(x, 4, 4, 3, bias=False), 4), b.conv(x, 4, 4, 1, pads=[0] * 4, bias=False)), x), 4)
    assert_single_conv(*fuse_and_compare(b.model([out])))


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (), (1,)])
def test_layer_scale_on_a_branch(shape):
    b = GraphBuilder()
    x = b.x
    gamma = b.constant(b.rng.uniform(0.5, 2, shape).astype(np.float32), "gamma")
    out = b.add(x, b.op("Mul", [gamma, b.conv(x, 4, 4, 3, group=4)]))
    assert_single_conv(*fuse_and_compare(b.model([out])))


def test_repmixer_sub_and_scale():
    """FastViT RepMixer: x + gamma * (mixer(x) - BN(x)), mixer = dw 3x3 + dw 1x1 branches."""
    b = GraphBuilder(channels=4)
    x = b.x
    mixer = b.add(b.conv(x, 4, 4, 3, group=4), b.conv(x, 4, 4, 1, group=4, pads=[0] * 4))
    gamma = b.constant(b.rng.uniform(0.5, 2, (4, 1, 1)).astype(np.float32), "layer_scale")
    out = b.add(x, b.op("Mul", [b.op("Sub", [mixer, b.bn(x, 4)]), gamma]))
    fused, report = fuse_and_compare(b.model([out]))
    assert_single_conv(fused, report)


@pytest.mark.parametrize("value", [np.float32(0.0), np.full((4, 1, 1), 0.25, np.float32),
                                   np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1)])
def test_constant_addends_go_into_the_bias(value):
    b = GraphBuilder()
    x = b.x
    out = b.add(b.add(b.conv(x, 4, 4, 3), b.constant(value, "c", as_node=True)), b.conv(x, 4, 4, 1, pads=[0] * 4))
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Conv": 1}


@pytest.mark.parametrize("tail", ["bn", "mul", "div", "add_bias", "neg"])
def test_lone_conv_followed_by_an_affine(tail):
    b = GraphBuilder()
    x = b.x
    c = b.conv(x, 4, 4, 3, bias=False)
    if tail == "bn":
        out = b.bn(c, 4)
    elif tail == "mul":
        out = b.op("Mul", [c, b.constant(np.float32(1.5), "s")])
    elif tail == "div":
        out = b.op("Div", [c, b.constant(np.full((4, 1, 1), 3, np.float32), "d")])
    elif tail == "neg":
        out = b.op("Neg", [c])
    else:
        out = b.add(c, b.constant(b.rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "bias"))
    fused, report = fuse_and_compare(b.model([b.op("Relu", [out])]))
    assert op_counts(fused) == {"Conv": 1, "Relu": 1}


def test_bn_folds_beside_an_unrelated_residual():
    """ResNet: Add(BN(conv(y)), x) -> Add(conv'(y), x); the residual stays."""
    b = GraphBuilder()
    x = b.x
    y = b.op("Relu", [x])
    out = b.add(b.bn(b.conv(y, 4, 4, 3), 4), x)
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Relu": 1, "Conv": 1, "Add": 1}


def test_skip_spatial_scale():
    b = GraphBuilder()
    x = b.x
    s = b.constant(b.rng.standard_normal((1, 1, 6, 6)).astype(np.float32), "s")
    out = b.add(b.op("Mul", [b.conv(x, 4, 4, 3), s]), b.conv(x, 4, 4, 1, pads=[0] * 4))
    assert "not per-channel" in _skip(b.model([out]), "not_per_channel")


def test_scaled_addend_of_another_tensor_keeps_its_scale():
    """x + g*(conv(x) - relu(x)): the conv and identity fuse; relu(x) stays, times -g."""
    b = GraphBuilder()
    x = b.x
    g = b.constant(np.full((4, 1, 1), 0.5, np.float32), "g")
    out = b.add(x, b.op("Mul", [b.op("Sub", [b.conv(x, 4, 4, 3), b.op("Relu", [x])]), g]))
    fused, report = fuse_and_compare(b.model([b.bn(out, 4)]))
    assert op_counts(fused) == {"Conv": 1, "Relu": 1, "Mul": 1, "Add": 1}


def test_scaled_residual_of_another_tensor_is_not_a_candidate():
    """YOLOv6 BottleRep: conv2(conv1(x)) + alpha * x has nothing to fuse."""
    b = GraphBuilder()
    x = b.x
    alpha = b.constant(np.float32(0.7), "alpha")
    out = b.add(b.conv(b.op("Relu", [b.conv(x, 4, 4, 3)]), 4, 4, 3), b.op("Mul", [alpha, x]))
    model = b.model([out])
    fused, report = fuse(model)
    assert report.blocks == [] and fused.SerializeToString() == model.SerializeToString()


def test_nonconstant_scale_is_not_linear():
    b = GraphBuilder()
    b.extra_inputs.append(helper.make_tensor_value_info("s", 1, [1, 4, 1, 1]))
    x = b.x
    out = b.add(b.op("Mul", [b.conv(x, 4, 4, 3), "s"]), b.conv(x, 4, 4, 1, pads=[0] * 4))
    model = b.model([out])
    fused, report = fuse(model)
    # Only the unscaled 1x1 branch is a branch of x; alone it is not worth a rewrite.
    assert report.blocks == []
    assert fused.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("how", ["add", "einsum", "reshape"])
def test_weights_computed_by_a_constant_subgraph(how):
    """OREPA/DBB compute weights from parameters (W + I, einsum); they are folded first."""
    b = GraphBuilder()
    x = b.x
    r = b.rng
    if how == "add":
        w = b.op("Add", [b.constant(r.standard_normal((4, 4, 3, 3)).astype(np.float32)),
                         b.constant(r.standard_normal((4, 4, 3, 3)).astype(np.float32))])
    elif how == "einsum":
        w = b.op("Einsum", [b.constant(r.standard_normal((4, 4)).astype(np.float32)),
                            b.constant(r.standard_normal((4, 4, 3, 3)).astype(np.float32))], equation="ij,jkhw->ikhw")
    else:
        w = b.op("Reshape", [b.constant(r.standard_normal((4, 36)).astype(np.float32)),
                             b.constant(np.array([4, 4, 3, 3], np.int64))])
    out = b.add(b.add(b.conv(x, 4, 4, 3, weight_name=w), b.conv(x, 4, 4, 1, pads=[0] * 4)), b.bn(x, 4))
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Conv": 1}
    assert len(fused.graph.initializer) == 2  # the weight subgraph and its inputs are gone


def test_spatial_constant_addend_stays_in_the_sum():
    """conv3(x) + conv1(x) + pos_embed(1, C, H, W): the embedding stays as an addend."""
    b = GraphBuilder()
    x = b.x
    pos = b.constant(b.rng.standard_normal((1, 4, 6, 6)).astype(np.float32), "pos")
    out = b.add(b.add(b.conv(x, 4, 4, 3), pos), b.conv(x, 4, 4, 1, pads=[0] * 4))
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Conv": 1, "Add": 1}


def test_conv_plus_positional_embedding_is_not_a_candidate():
    b = GraphBuilder()
    pos = b.constant(b.rng.standard_normal((1, 4, 6, 6)).astype(np.float32), "pos")
    model = b.model([b.add(b.conv(b.x, 4, 4, 3), pos)])
    fused, report = fuse(model)
    assert report.blocks == []
    assert fused.SerializeToString() == model.SerializeToString()


def avgpool(b, x, k=3, stride=1, pad=1, include_pad=1):
    return b.op("AveragePool", [x], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                count_include_pad=include_pad)


@pytest.mark.parametrize("stride,identity", [(1, True), (2, False)])
def test_average_pool_branch(stride, identity):
    """QARepVGGBlockV2 / DBB: an AveragePool (count_include_pad=1) is a depthwise conv branch."""
    b = GraphBuilder(channels=4, spatial=(7, 7))
    x = b.x
    out = b.add(b.add(b.conv(x, 4, 4, 3, stride=stride), b.conv(x, 4, 4, 1, stride=stride, pads=[0] * 4)),
                avgpool(b, x, stride=stride))
    if identity:
        out = b.add(out, x)
    fused, report = fuse_and_compare(b.model([b.bn(out, 4)]))
    assert op_counts(fused) == {"Conv": 1}
    assert "avgpool" in report.fused[0].branches


def test_skip_average_pool_excluding_pad():
    b = GraphBuilder(channels=4)
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3), avgpool(b, x, include_pad=0))
    assert "count_include_pad=0" in _skip(b.model([out]), "pool_exclude_pad")


def test_pool_and_identity_alone_are_not_rewritten():
    b = GraphBuilder(channels=4)
    model = b.model([b.add(b.x, avgpool(b, b.x))])
    fused, report = fuse(model)
    assert report.blocks == [] and fused.SerializeToString() == model.SerializeToString()


def _qdq_weight(b, shape):
    q = b.constant(b.rng.integers(-100, 100, shape).astype(np.int8), "Wq")
    scale = b.constant(np.float32(0.01), "s")
    zero = b.constant(np.int8(0), "z")
    return b.op("DequantizeLinear", [q, scale, zero])


def test_skip_quantized_weights():
    """A QDQ model keeps its quantized weights: the block is left alone with a reason."""
    b = GraphBuilder()
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3, weight_name=_qdq_weight(b, (4, 4, 3, 3))),
                b.conv(x, 4, 4, 1, pads=[0] * 4, weight_name=_qdq_weight(b, (4, 4, 1, 1))))
    assert "DequantizeLinear" in _skip(b.model([out]), "quantized")


def test_qdq_on_the_activation_is_not_a_block():
    b = GraphBuilder()
    x = b.x
    scale, zero = b.constant(np.float32(0.05), "s"), b.constant(np.int8(0), "z")
    xq = b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, scale, zero]), scale, zero])
    out = b.add(b.conv(xq, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4))
    model = b.model([out])
    fused, report = fuse(model)
    assert report.blocks == [] and fused.SerializeToString() == model.SerializeToString()


def test_skip_nonlinearity_inside_a_branch():
    b = GraphBuilder()
    x = b.x
    out = b.add(b.add(b.op("Relu", [b.conv(x, 4, 4, 3)]), b.conv(x, 4, 4, 1, pads=[0] * 4)), x)
    fused, report = fuse_and_compare(b.model([out]))
    # the ReLU branch stays an addend; the linear 1x1 + identity merge into one conv
    assert op_counts(fused) == {"Conv": 2, "Relu": 1, "Add": 1}


def test_skip_depthwise_into_dense():
    b = GraphBuilder(channels=4)
    x = b.x
    out = b.add(b.conv(x, 4, 4, 3, group=4), b.conv(x, 4, 4, 1, pads=[0] * 4))
    reason = _skip(b.model([out]), "group_mismatch")
    assert "group 1 != 4" in reason or "group 4 != 1" in reason


def test_allow_densify_merges_depthwise_into_dense():
    b = GraphBuilder(channels=4)
    x = b.x
    out = b.add(b.add(b.conv(x, 4, 4, 3, group=4), b.conv(x, 4, 4, 1, pads=[0] * 4)), b.bn(x, 4))
    model = b.model([out])
    fused, report = fuse(model, allow_densify=True)
    onnx.checker.check_model(fused, full_check=True)
    assert op_counts(fused) == {"Conv": 1} and report.fused[0].group == 1
    from tests.graphs import random_feed, run
    feeds = random_feed(model)
    np.testing.assert_allclose(run(fused, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


# --- zero padding in front of convs ---------------------------------------------------------

def zero_pad(b, x, pads, opset_attr=False, mode=None, value=None):
    if opset_attr:
        attrs = {"pads": pads}
        if value is not None:
            attrs["value"] = value
        return b.op("Pad", [x], **attrs)
    inputs = [x, b.constant(np.array(pads, np.int64), "pads")]
    if value is not None:
        inputs.append(b.constant(np.array(value, np.float32), "value"))
    return b.op("Pad", inputs, **({"mode": mode} if mode else {}))


def test_pad_branch_fuses_after_folding():
    """timm-style 'same' padding for an even kernel: ZeroPad(0,1) + conv2x2 beside a 1x1."""
    b = GraphBuilder(spatial=(6, 6))
    x = b.x
    t2 = b.conv(zero_pad(b, x, [0, 0, 0, 0, 0, 0, 1, 1]), 4, 4, 2, pads=[0] * 4)
    t3 = b.conv(zero_pad(b, x, [0, 0, 1, 1, 0, 0, 1, 1]), 4, 4, 3, pads=[0] * 4)
    out = b.add(b.add(t2, t3), b.conv(x, 4, 4, 1, pads=[0] * 4))
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Conv": 1}


def test_pad_in_old_opset_attribute_form():
    b = GraphBuilder(opset=10)
    out = b.conv(zero_pad(b, b.x, [0, 0, 1, 1, 0, 0, 1, 1], opset_attr=True), 4, 4, 3, pads=[0] * 4)
    fused, report = fuse_and_compare(b.model([out]))
    assert op_counts(fused) == {"Conv": 1}


@pytest.mark.parametrize("mode,value,code", [("reflect", None, "pad_mode"), (None, 1.5, "pad_value")])
def test_skip_pads_that_are_not_zero(mode, value, code):
    b = GraphBuilder()
    out = b.conv(zero_pad(b, b.x, [0, 0, 1, 1, 0, 0, 1, 1], mode=mode, value=value), 4, 4, 3, pads=[0] * 4)
    _skip(b.model([out]), code, status="not_applicable")  # a Pad is no re-parameterization block


# --- sequential 1x1 -> fill -> kxk (DBB) ------------------------------------------------------

def _seq_graph(bias_value, pad_value, cin=4, cm=4):
    b = GraphBuilder(channels=cin, spatial=(6, 6))
    x = b.x
    bias = b.constant(np.full(cm, bias_value, np.float32), "b1")
    t = b.op("Conv", [x, b.constant((b.rng.standard_normal((cm, cin, 1, 1)) * 0.3).astype(np.float32), "W1"), bias],
             kernel_shape=[1, 1], pads=[0] * 4)
    filled = b.op("Identity", [zero_pad(b, t, [0, 0, 1, 1, 0, 0, 1, 1], value=pad_value)])
    out = b.conv(filled, cm, 4, 3, pads=[0] * 4)
    return b.model([out])


def test_sequential_fill_equal_to_the_bias_fuses():
    fused, report = fuse_and_compare(_seq_graph(0.5, 0.5))
    assert op_counts(fused) == {"Conv": 1}
    attrs = {a.name: helper.get_attribute_value(a) for a in fused.graph.node[0].attribute}
    assert attrs["pads"] == [1, 1, 1, 1] and attrs["kernel_shape"] == [3, 3]


def test_sequential_fill_not_equal_to_the_bias_is_skipped():
    assert "not one conv" in _skip(_seq_graph(0.5, 0.25), "pad_condition")


def test_sequential_narrowing_1x1_is_not_merged():
    assert "cost more" in _skip(_seq_graph(0.5, 0.5, cin=8, cm=4), "sequential_cost")


def _keras_stride_two_sum(source_nodes, inputs, initializers, value_info=()):
    """The tf2onnx form of Keras' padding='same' at stride 2 (3x3 pads (0, 1) beside a 1x1),
    reading `r`, which `source_nodes` compute."""
    rng = np.random.default_rng(0)
    w3 = onnx.numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w3")
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w1")
    nodes = list(source_nodes) + [
        helper.make_node("Conv", ["r", "w3"], ["a"], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Conv", ["r", "w1"], ["b"], strides=[2, 2]),
        helper.make_node("Add", ["a", "b"], ["y"])]
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, None, None])
    graph = helper.make_graph(nodes, "g", inputs, [y], [w3, w1] + list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_size_declared_on_an_intermediate_value_does_not_fix_it():
    """value_info (say, left from shape inference at one size before the input was made dynamic)
    is not enforced at run time: the input's own dims are what fix a size."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, "h", "w"])
    stale = helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    model = _keras_stride_two_sum([helper.make_node("Relu", ["x"], ["r"])], [x], [], [stale])
    assert "not fixed" in _skip(model, "output_shape_mismatch")
    static = _keras_stride_two_sum([helper.make_node("Relu", ["x"], ["r"])],
                                   [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], [])
    fused, report = fuse_and_compare(static)
    assert len(report.fused) == 1 and op_counts(fused) == {"Relu": 1, "Conv": 1}


def test_a_size_from_an_initializer_that_may_be_fed_does_not_fix_it():
    """Reshape(x, s) with s an initializer that is also a graph input: s may be fed another
    shape, so the 8x8 its stored value gives is not the size the block runs at."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, "h", "w"])
    s = helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [4])
    target = onnx.numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "s")
    model = _keras_stride_two_sum([helper.make_node("Reshape", ["x", "s"], ["r"])], [x, s], [target])
    assert "not fixed" in _skip(model, "output_shape_mismatch")
