"""Property: value-preserving nodes drawn between the nodes of a block (and near misses of them)
never make the pass wrong. Every graph is fused and equal to the original under onnxruntime, or
left as it is with a reason (tests/test_soundness.py: check_sound); graph outputs keep their
names, and the fused graph computes nothing it does not use.

A graph is one of tests/soundness_graphs.py's random blocks and near-blocks, with 1 to 4 nodes
put on random edges (an Identity or a Mul by 1 inside a branch or after a sum, ...):

    value-preserving   Identity, Mul by 1, Add of 0, Cast to the model's type, Reshape to the
                       tensor's own shape (literal or with 0s), Dropout (inference), Pad of 0s,
                       one-input Concat
    near misses        Reshape to (N, -1) and back, Cast to another float type and back,
                       Unsqueeze then Squeeze, Dropout with training_mode on (ratio 0), a Mul by 1
                       or an Identity whose output is also a graph output
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_repvgg import fuse
from tests.graphs import op_counts
from tests.soundness_graphs import build, graph_spec
from tests.test_soundness import check_sound

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)  # the block's tensors, not shape math
KINDS = ["identity", "mul1", "add0", "cast_same", "reshape_same", "reshape_zeros", "dropout", "pad0", "concat1",
         "reshape_change", "cast_other", "unsqueeze", "dropout_training", "mul1_output", "identity_output"]


@st.composite
def value_preserving_spec(draw):
    return dict(
        base=draw(graph_spec()),
        insertions=draw(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 2**16)), min_size=1, max_size=4)),
        declare_shapes=draw(st.booleans()),
    )


def _shapes_and_types(model: onnx.ModelProto) -> dict[str, tuple[int, list[int]]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            known[v.name] = (t.elem_type, [d.dim_value for d in t.shape.dim])
    return known


def insert(model: onnx.ModelProto, kind: str, seed: int) -> bool:
    """Put one node of `kind` on a random data edge of the model (in place); False if none fits."""
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if kind == "dropout_training" and opset < 12:
        return False  # Dropout has no training_mode input before opset 12
    known = _shapes_and_types(model)
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    edges = [(i, slot) for i, node in enumerate(graph.node) for slot, name in enumerate(node.input)
             if name and name not in constants and name in known and known[name][0] in FLOATS
             and (slot == 0 or node.op_type in ("Add", "Sub", "Sum"))]
    if not edges:
        return False
    index, slot = edges[seed % len(edges)]
    consumer = graph.node[index]
    source = consumer.input[slot]
    elem, shape = known[source]
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    tag = f"vp{len(graph.node)}_{kind}"
    nodes: list[onnx.NodeProto] = []
    extra_output = False

    def const(name, value):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), f"{tag}_{name}"))
        return f"{tag}_{name}"

    def node(op, inputs, **attrs):
        out = f"{tag}_{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    if kind in ("identity", "identity_output"):
        out = node("Identity", [source])
        extra_output = kind == "identity_output"
    elif kind in ("mul1", "mul1_output"):
        out = node("Mul", [source, const("one", np.array(1.0, dtype))])
        extra_output = kind == "mul1_output"
    elif kind == "add0":
        out = node("Add", [const("zero", np.zeros((1,) * len(shape), dtype)), source])
    elif kind == "cast_same":
        out = node("Cast", [source], to=elem)
    elif kind in ("reshape_same", "reshape_zeros"):
        target = shape if kind == "reshape_same" else [0] * len(shape)
        out = node("Reshape", [source, const("shape", np.array(target, np.int64))])
    elif kind == "dropout" and opset < 12:
        out = node("Dropout", [source], ratio=0.5)
    elif kind == "dropout":
        out = node("Dropout", [source, const("ratio", np.array(0.5, np.float32))])
    elif kind == "pad0" and opset < 11:
        out = node("Pad", [source], pads=[0] * (2 * len(shape)))
    elif kind == "pad0":
        out = node("Pad", [source, const("pads", np.zeros(2 * len(shape), np.int64))])
    elif kind == "concat1":
        out = node("Concat", [source], axis=1)
    elif kind == "reshape_change":
        flat = node("Reshape", [source, const("flat", np.array([shape[0], -1], np.int64))])
        out = node("Reshape", [flat, const("back", np.array(shape, np.int64))])
    elif kind == "cast_other":
        other = TensorProto.FLOAT16 if elem != TensorProto.FLOAT16 else TensorProto.FLOAT
        out = node("Cast", [node("Cast", [source], to=other)], to=elem)
    elif kind == "unsqueeze" and opset < 13:
        out = node("Squeeze", [node("Unsqueeze", [source], axes=[0])], axes=[0])
    elif kind == "unsqueeze":
        axes = const("axes", np.array([0], np.int64))
        out = node("Squeeze", [node("Unsqueeze", [source, axes]), axes])
    elif kind == "dropout_training":
        out = node("Dropout", [source, const("ratio", np.array(0.0, np.float32)), const("training", np.array(True))])
    else:
        raise AssertionError(kind)
    consumer.input[slot] = out
    for offset, new in enumerate(nodes):
        graph.node.insert(index + offset, new)
    if extra_output:
        graph.output.append(helper.make_tensor_value_info(out, elem, shape))
    return True


def build_with_insertions(spec) -> onnx.ModelProto | None:
    model = build(spec["base"])
    if model is None:
        return None
    inserted = [insert(model, kind, seed) for kind, seed in spec["insertions"]]
    if not any(inserted):
        return None
    del model.graph.value_info[:]
    if spec["declare_shapes"]:  # as paddle2onnx and the dynamo exporter do
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(value_preserving_spec())
def test_value_preserving_nodes_keep_the_pass_sound(spec):
    model = build_with_insertions(spec)
    if model is None:
        return
    check_sound(model)
    fused, _ = fuse(model)
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    used = {name for node in fused.graph.node for name in node.input} | {o.name for o in fused.graph.output}
    dead = [node.name for node in fused.graph.node if not any(out in used for out in node.output if out)]
    assert not dead, dead


def test_the_property_draws_fusions_and_near_misses():
    """The drawn graphs reach both sides: value-preserving nodes absorbed into fused blocks, and
    near misses kept (checked on fixed specs, so that a change of the generator shows here)."""
    base = dict(ndim=2, channels=4, spatial=(5, 5), dtype="float32", constant_addend=None, trailing_bn=False,
                tree_seed=0, subtract=False, shared_weight=False, seed=3,
                branches=[dict(kind="conv_bn", k=(3, 3), dil=(1, 1), pads=(1, 1, 1, 1), stride=1, group=1, cout=4,
                               bias=True, bn_var="normal", training=False, weight_as_input=False, scale="scalar",
                               extra_consumer=False, output_too=False, negate=False, include_pad=True,
                               pad_mode="constant", pad_value=None),
                          dict(kind="identity", k=(1, 1), dil=(1, 1), pads=(0, 0, 0, 0), stride=1, group=1, cout=4,
                               bias=False, bn_var="normal", training=False, weight_as_input=False, scale="scalar",
                               extra_consumer=False, output_too=False, negate=False, include_pad=True,
                               pad_mode="constant", pad_value=None)])
    absorbed = {}
    for kind in KINDS:
        model = build_with_insertions(dict(base=base, insertions=[(kind, 1)], declare_shapes=True))
        fused, report = fuse(model)
        check_sound(model)
        absorbed[kind] = len(fused.graph.node) < len(model.graph.node) and op_counts(fused).get("Conv") == 1 \
            and not ({"Identity", "Cast", "Reshape", "Dropout", "Pad", "Concat", "Squeeze"} & set(op_counts(fused)))
    assert {k for k, v in absorbed.items() if v} == {"identity", "mul1", "add0", "cast_same", "reshape_same",
                                                     "reshape_zeros", "dropout", "pad0", "concat1"}
