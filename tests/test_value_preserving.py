"""Value-preserving nodes between the nodes of a block (rules/passthrough.py): absorbed into the
block's linear tree and removed with it when provably value-preserving, left alone otherwise.

The block is RepVGG's 3x3 + 1x1 + x on x (2, 4, 6, 6), summed, then a Relu. Each case puts one
node somewhere in it: between x and the 3x3 conv ("input"), after the 3x3 conv ("branch"), on
the identity branch ("identity"), after the first Add ("inner") or after the sum ("root").
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_repvgg.graph import GraphView, infer_static_shapes
from onnx_repvgg.rules.passthrough import (
    expand_keeps_shape,
    flatten_keeps_shape,
    passthrough_input,
    reshape_keeps_shape,
)
from tests.graphs import GraphBuilder, fuse_and_compare, op_counts

C, SHAPE = 4, (2, 4, 6, 6)
PLACES = ("input", "branch", "identity", "inner", "root")


def block(insert, place: str, opset: int = 17, declare_shapes: bool = True, dtype=np.float32):
    """The block with `insert(builder, tensor) -> tensor` applied at `place`; returns the model."""
    b = GraphBuilder(channels=C, spatial=SHAPE[2:], opset=opset, batch=SHAPE[0], dtype=dtype)
    x = b.x
    wrap = {p: (lambda name, p=p: insert(b, name) if p == place else name) for p in PLACES}
    a = wrap["branch"](b.conv(wrap["input"](x), C, C, 3))
    s = wrap["inner"](b.add(a, b.conv(x, C, C, 1, pads=[0, 0, 0, 0])))
    s = wrap["root"](b.add(s, wrap["identity"](x)))
    model = b.model([b.op("Relu", [s])])
    if declare_shapes:  # as paddle2onnx and the dynamo exporter write them
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model


def assert_absorbed(model, op: str):
    """Fused into one conv, the node gone, the outputs equal and named as before."""
    assert op in op_counts(model)
    fused, report = fuse_and_compare(model)
    assert op_counts(fused) == {"Conv": 1, "Relu": 1}, op_counts(fused)
    assert [r.branches for r in report.fused] == [["3x3", "1x1", "id"]]
    assert not report.skipped
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    return fused


def assert_kept(model, op: str, count: int = 1, **tolerances):
    """The node stays (with the nodes it separates); whatever fuses is equal."""
    fused, report = fuse_and_compare(model, **tolerances)
    assert op_counts(fused).get(op) == count, op_counts(fused)
    for record in report.skipped:
        assert record.reason_code and record.reason
    return fused, report


def identity(b, name):
    return b.op("Identity", [name])


@pytest.mark.parametrize("place", PLACES)
def test_identity_anywhere_in_the_block(place):
    assert_absorbed(block(identity, place), "Identity")


@pytest.mark.parametrize("place", PLACES)
def test_identity_without_declared_shapes(place):
    assert_absorbed(block(identity, place, declare_shapes=False), "Identity")


def test_chains_of_value_preserving_nodes():
    def chain(b, name):
        name = b.op("Identity", [name])
        name = b.op("Cast", [name], to=TensorProto.FLOAT)
        return b.op("Dropout", [name])
    for place in PLACES:
        assert_absorbed(block(chain, place), "Dropout")


@pytest.mark.parametrize("opset", [7, 10, 12, 13, 17])
def test_dropout_in_inference(opset):
    def dropout(b, name):
        return b.op("Dropout", [name], ratio=0.5) if opset < 12 else b.op("Dropout", [name])
    assert_absorbed(block(dropout, "root", opset=opset), "Dropout")


def test_dropout_with_constant_false_training_mode_and_an_unused_mask():
    def dropout(b, name):
        out, mask = b.fresh("drop"), b.fresh("mask")
        ratio = b.constant(np.array(0.5, np.float32), "ratio")
        training = b.constant(np.array(False), "training")
        b.nodes.append(helper.make_node("Dropout", [name, ratio, training], [out, mask], name=b.fresh("Dropout")))
        return out
    for place in PLACES:
        assert_absorbed(block(dropout, place, opset=13), "Dropout")


def test_dropout_in_training_mode_is_kept():
    def dropout(b, name):  # ratio 0 keeps the run deterministic; training mode is still not proven away
        ratio = b.constant(np.array(0.0, np.float32), "ratio")
        return b.op("Dropout", [name, ratio, b.constant(np.array(True), "training")])
    assert_kept(block(dropout, "inner", opset=13), "Dropout")


def test_dropout_whose_mask_is_used_is_kept():
    b = GraphBuilder(channels=C, spatial=SHAPE[2:], batch=SHAPE[0], opset=13)
    a, one = b.conv(b.x, C, C, 3), b.conv(b.x, C, C, 1, pads=[0, 0, 0, 0])
    out, mask = b.fresh("drop"), b.fresh("mask")
    b.nodes.append(helper.make_node("Dropout", [a], [out, mask], name="Dropout"))
    model = b.model([b.add(out, one)])
    model.graph.output.append(helper.make_tensor_value_info(mask, TensorProto.BOOL, list(SHAPE)))
    assert_kept(model, "Dropout")


def test_dropout_of_old_opsets_needs_is_test():
    """Opset 6 and older: Dropout is in training mode unless is_test=1 (checked on the view:
    onnxruntime does not run those opsets)."""
    for is_test, expected in ((1, "x"), (0, None)):
        node = helper.make_node("Dropout", ["x"], ["y"], is_test=is_test)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        assert passthrough_input(GraphView(graph, 6), node, 6) == expected


@pytest.mark.parametrize("place", PLACES)
def test_cast_to_the_same_type(place):
    def cast(b, name):
        return b.op("Cast", [name], to=TensorProto.FLOAT)
    assert_absorbed(block(cast, place, declare_shapes=False), "Cast")  # the type carried from x


def test_cast_to_another_type_is_kept():
    def round_trip(b, name):
        return b.op("Cast", [b.op("Cast", [name], to=TensorProto.FLOAT16)], to=TensorProto.FLOAT)
    # after the 3x3 conv: the 1x1 and identity fuse beside it; after the first Add: 3x3 + 1x1 fuse
    for place, convs in (("branch", 2), ("inner", 1)):
        fused, _ = assert_kept(block(round_trip, place), "Cast", 2)
        assert op_counts(fused) == {"Conv": convs, "Cast": 2, "Add": 1, "Relu": 1}


def test_float16_model_cast_to_float32_is_kept():
    def cast(b, name):
        return b.op("Cast", [b.op("Cast", [name], to=TensorProto.FLOAT)], to=TensorProto.FLOAT16)
    assert_kept(block(cast, "inner", dtype=np.float16), "Cast", 2, rtol=1e-2, atol=1e-2)


def reshape_to(target):
    def reshape(b, name):
        return b.op("Reshape", [name, b.constant(np.array(target, np.int64), "shape")])
    return reshape


@pytest.mark.parametrize("target", [list(SHAPE), [0, 0, 0, 0], [0, 4, -1, 6], [2, 0, 6, -1]])
@pytest.mark.parametrize("place", PLACES)
def test_reshape_to_the_same_shape(target, place):
    assert_absorbed(block(reshape_to(target), place), "Reshape")


def test_reshape_that_changes_the_shape_is_kept():
    def there_and_back(b, name):
        return reshape_to(list(SHAPE))(b, reshape_to([2, 4, 36])(b, name))
    for place in ("branch", "inner", "identity"):
        fused, report = assert_kept(block(there_and_back, place), "Reshape", 2)
        assert op_counts(fused)["Conv"] >= 1  # what sits on either side still fuses


def test_reshape_proven_by_shapes_inferred_on_demand():
    """A graph without Shape nodes and without declared intermediate shapes: the shapes are
    inferred when the proof asks for one, and the literal target is proven."""
    assert_absorbed(block(reshape_to(list(SHAPE)), "inner", declare_shapes=False), "Reshape")


def test_reshape_of_an_unknown_shape_is_kept():
    """With a dynamic batch the literal target (1, 4, 6, 6) is not proven: the dim is not guessed."""
    model = block(reshape_to([1] + list(SHAPE[1:])), "inner", declare_shapes=False)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "N"  # replaces the dim's value
    assert_kept(model, "Reshape")


@pytest.mark.parametrize("target", [[1], [1, 1, 1, 1], [6], list(SHAPE), [4, 1, 1]])
def test_expand_to_a_shape_it_already_has(target):
    def expand(b, name):
        return b.op("Expand", [name, b.constant(np.array(target, np.int64), "shape")])
    assert_absorbed(block(expand, "root"), "Expand")


def test_expand_that_broadcasts_is_kept():
    def expand(b, name):  # (2, 4, 6, 6) -> (3, 2, 4, 6, 6)
        return b.op("ReduceMax", [b.op("Expand", [name, b.constant(np.array([3, 1, 1, 1, 1], np.int64), "shape")])],
                    axes=[0], keepdims=0)
    assert_kept(block(expand, "inner"), "Expand")


def test_squeeze_without_axes_of_a_shape_without_ones():
    def squeeze(b, name):
        return b.op("Squeeze", [name])
    assert_absorbed(block(squeeze, "inner"), "Squeeze")


def test_squeeze_and_unsqueeze_that_change_the_rank_are_kept():
    def round_trip(b, name):
        axes = b.constant(np.array([0], np.int64), "axes")
        return b.op("Squeeze", [b.op("Unsqueeze", [name, axes]), axes])
    fused, _ = assert_kept(block(round_trip, "inner"), "Squeeze")
    assert op_counts(fused)["Unsqueeze"] == 1


def test_pad_of_zeros_any_mode():
    for mode in ("constant", "reflect", "edge"):
        def pad(b, name, mode=mode):
            return b.op("Pad", [name, b.constant(np.zeros(8, np.int64), "pads")], mode=mode)
        assert_absorbed(block(pad, "root"), "Pad")


def test_pad_attribute_of_opset_10():
    def pad(b, name):
        return b.op("Pad", [name], pads=[0] * 8)
    assert_absorbed(block(pad, "inner", opset=10), "Pad")


def test_nonzero_pad_after_the_sum_is_kept():
    def pad(b, name):
        return b.op("Slice", [b.op("Pad", [name, b.constant(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]),
                              b.constant(np.array([1, 1], np.int64), "starts"),
                              b.constant(np.array([7, 7], np.int64), "ends"),
                              b.constant(np.array([2, 3], np.int64), "axes")])
    assert_kept(block(pad, "inner"), "Pad")


@pytest.mark.parametrize("op", ["Concat", "Sum"])
def test_one_input_concat_and_sum(op):
    def single(b, name):
        return b.op(op, [name], axis=1) if op == "Concat" else b.op(op, [name])
    for place in PLACES:
        assert_absorbed(block(single, place), op)


def test_two_input_concat_is_kept():
    def concat(b, name):  # concat along channels, then a 1x1 conv back to C channels
        return b.conv(b.op("Concat", [name, name], axis=1), 2 * C, C, 1, pads=[0, 0, 0, 0])
    assert_kept(block(concat, "inner"), "Concat")


@pytest.mark.parametrize("how", ["mul1", "div1", "add0", "sub0", "paddle_start"])
def test_multiply_by_one_and_add_zero(how):
    """Already linear: factor 1, constant 0. paddle2onnx starts `out = 0; out += branch` as
    Identity -> Mul(., 1) -> Add(., 0) -> Identity."""
    def neutral(b, name):
        one, zero = b.constant(np.array([1.0], np.float32), "one"), b.constant(np.array(0.0, np.float32), "zero")
        if how == "mul1":
            return b.op("Mul", [one, name])
        if how == "div1":
            return b.op("Div", [name, one])
        if how == "add0":
            return b.op("Add", [zero, name])
        if how == "sub0":
            return b.op("Sub", [name, zero])
        return b.op("Identity", [b.op("Add", [b.op("Mul", [b.op("Identity", [name]), one]), zero])])
    for place in PLACES:
        assert_absorbed(block(neutral, place), "Identity" if how == "paddle_start" else how[:3].title())


def test_value_preserving_node_that_is_a_graph_output_stays():
    """Identity(conv3x3(x)) is also a graph output: the Identity and the 3x3 conv stay (the output
    keeps its name and value); the 1x1 and identity branches fuse beside it."""
    b = GraphBuilder(channels=C, spatial=SHAPE[2:], batch=SHAPE[0])
    a = b.op("Identity", [b.conv(b.x, C, C, 3)])
    s = b.add(b.add(a, b.conv(b.x, C, C, 1, pads=[0, 0, 0, 0])), b.x)
    model = b.model([b.op("Relu", [s]), a])
    fused, report = assert_kept(model, "Identity")
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    assert op_counts(fused) == {"Conv": 2, "Identity": 1, "Add": 1, "Relu": 1}


def test_mul_by_one_that_is_a_graph_output():
    b = GraphBuilder(channels=C, spatial=SHAPE[2:], batch=SHAPE[0])
    a = b.op("Mul", [b.conv(b.x, C, C, 3), b.constant(np.array(1.0, np.float32), "one")])
    s = b.add(b.add(a, b.conv(b.x, C, C, 1, pads=[0, 0, 0, 0])), b.x)
    model = b.model([b.op("Relu", [s]), a])
    fused, report = fuse_and_compare(model)
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    produced = {out for node in fused.graph.node for out in node.output}
    assert all(o.name in produced for o in fused.graph.output)
    for record in report.skipped:
        assert record.reason_code == "intermediate_is_output"


def test_root_identity_that_is_a_graph_output_keeps_the_name():
    b = GraphBuilder(channels=C, spatial=SHAPE[2:], batch=SHAPE[0])
    s = b.add(b.add(b.conv(b.x, C, C, 3), b.conv(b.x, C, C, 1, pads=[0, 0, 0, 0])), b.x)
    out = b.op("Identity", [s])
    model = b.model([out])
    fused, _ = fuse_and_compare(model)
    assert op_counts(fused) == {"Conv": 1}
    assert fused.graph.node[0].output[0] == out == fused.graph.output[0].name


def test_lone_identity_after_a_conv_is_no_block():
    """A tree of value-preserving nodes only is not a block: the model is left as it is."""
    b = GraphBuilder(channels=C, spatial=SHAPE[2:], batch=SHAPE[0])
    model = b.model([b.op("Relu", [b.op("Identity", [b.conv(b.x, C, C, 3)])])])
    fused, report = fuse_and_compare(model)
    assert not report.fused and not report.skipped
    assert fused.SerializeToString() == model.SerializeToString()


def test_copy_of_x_read_by_both_convs_is_removed_with_them():
    """conv3x3(Identity(x)) + conv1x1(Identity(x)) + x: the branches read a copy of x; the
    fused conv reads x (the name most branches read) and the Identity, now unread, goes."""
    b = GraphBuilder(channels=C, spatial=SHAPE[2:], batch=SHAPE[0])
    copy = b.op("Identity", [b.x])
    s = b.add(b.add(b.conv(copy, C, C, 3), b.conv(copy, C, C, 1, pads=[0, 0, 0, 0])), b.x)
    model = b.model([b.op("Relu", [s])])
    fused, report = fuse_and_compare(model)
    assert op_counts(fused) == {"Conv": 1, "Relu": 1}
    assert report.fused[0].branches == ["3x3", "1x1", "id"]


def test_copy_of_x_read_elsewhere_stays():
    b = GraphBuilder(channels=C, spatial=SHAPE[2:], batch=SHAPE[0])
    copy = b.op("Identity", [b.x])
    s = b.add(b.add(b.conv(copy, C, C, 3), b.conv(b.x, C, C, 1, pads=[0, 0, 0, 0])), b.x)
    model = b.model([b.op("Relu", [s]), b.op("Sigmoid", [copy])])
    fused, _ = fuse_and_compare(model)
    assert op_counts(fused) == {"Conv": 1, "Relu": 1, "Identity": 1, "Sigmoid": 1}


def test_bn_over_a_copy_of_x_is_a_bn_branch():
    b = GraphBuilder(channels=C, spatial=SHAPE[2:], batch=SHAPE[0])
    s = b.add(b.add(b.conv(b.x, C, C, 3), b.conv(b.x, C, C, 1, pads=[0, 0, 0, 0])), b.bn(b.op("Identity", [b.x]), C))
    fused, report = fuse_and_compare(b.model([s]))
    assert op_counts(fused) == {"Conv": 1}
    assert report.fused[0].branches == ["3x3", "1x1", "bn"]


def test_dense_branches_through_a_flatten():
    """Gemm(x) + Gemm(x) + x on a 2-D x, Flatten(axis=1) after the sum: one Gemm."""
    b = GraphBuilder(channels=6, spatial=(), batch=3)
    w = [b.constant(b.rng.standard_normal((6, 6)).astype(np.float32), "W") for _ in range(2)]
    s = b.add(b.add(b.op("Gemm", [b.x, w[0]], transB=1), b.op("Gemm", [b.x, w[1]])), b.x)
    model = b.model([b.op("Flatten", [s], axis=1)], input_shape=[3, 6])
    fused, _ = fuse_and_compare(onnx.shape_inference.infer_shapes(model))
    assert op_counts(fused) == {"Gemm": 1}


def test_shape_predicates():
    assert reshape_keeps_shape((2, 4, 6, 6), [0, 0, 0, 0], False)
    assert not reshape_keeps_shape((2, 4, 6, 6), [0, 0, 0, 0, 0], False)
    assert reshape_keeps_shape((-1, 4, 6, 6), [0, 4, 6, 6], False)
    assert reshape_keeps_shape((-1, 4, 6, 6), [-1, 4, 6, 6], False)
    assert not reshape_keeps_shape((-1, 4, 6, 6), [2, 4, 6, 6], False)  # batch not known to be 2
    assert not reshape_keeps_shape((-1, 4, 6, 6), [0, -1, 6, 6], False)  # -1 needs the batch known
    assert not reshape_keeps_shape((2, 4, 6, 6), [2, 0, -1, -1], False)
    assert not reshape_keeps_shape((2, 0, 6), [0, 0, 6], True)  # allowzero: a literal 0 ...
    assert reshape_keeps_shape((2, 0, 6), [2, 0, 6], True)  # ... that is the dim itself
    assert not reshape_keeps_shape((2, 0, 6), [2, 0, -1], False)  # -1 beside a 0: ambiguous
    assert not reshape_keeps_shape((2, 4, 6, 6), [2, 4, 36, 1], False)
    assert flatten_keeps_shape((-1, 7), 1) and flatten_keeps_shape((-1, 7), -1)
    assert flatten_keeps_shape((6, 1), 2) and not flatten_keeps_shape((6, 2), 2)
    assert not flatten_keeps_shape((2, 4, 6, 6), 1)
    assert expand_keeps_shape((-1, 4, 6, 6), [1, 4, 1, 1])
    assert not expand_keeps_shape((-1, 4, 6, 6), [2, 4, 1, 1])
    assert not expand_keeps_shape((4, 6), [1, 4, 6])
    assert not expand_keeps_shape((4, 1), [4, 6])


def test_bn_in_training_mode_over_a_copy_of_a_conv_is_reported():
    """BN(Identity(conv3x3(x))) with training_mode=1 still counts as a branch of x: the block is
    skipped with bn_training, as it is without the Identity, and the model left as it is."""
    b = GraphBuilder(channels=C, spatial=SHAPE[2:], batch=SHAPE[0])
    a = b.bn(b.op("Identity", [b.conv(b.x, C, C, 3)]), C, training_mode=1)
    s = b.add(b.add(a, b.conv(b.x, C, C, 1, pads=[0, 0, 0, 0])), b.x)
    model = b.model([s])
    fused, report = fuse_and_compare(model)
    assert [r.reason_code for r in report.skipped] == ["bn_training"]
    assert not report.fused
    assert fused.SerializeToString() == model.SerializeToString()



def test_shapes_come_only_from_what_binds_the_model_at_run_time():
    """Static shapes (which prove value-preserving reshapes, layouts and fixed sizes) follow from
    the inputs' declared dims and the constants alone: a stale value_info (r declared 8x8 on a
    dynamic input), a declared output shape and the stored value of an initializer that is also
    a graph input (it may be fed) are not used."""
    s_init = onnx.numpy_helper.from_array(np.array([1, 4, 8, 8], np.int64), "s")
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "s"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "h", "w"]),
                     helper.make_tensor_value_info("s", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [s_init],
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    shapes = infer_static_shapes(model)
    assert shapes.get("r") == (1, 4, -1, -1)
    assert shapes.get("y") in (None, (-1, -1, -1, -1))
    view = GraphView(model.graph, 17, static_shapes=shapes, main_graph=True)
    assert view.shape("r") == (1, 4, -1, -1) and view.fixed_shape("r") == (1, 4, -1, -1)
    assert view.declared_shape("r") is None and view.declared_shape("x") == (1, 4, -1, -1)
