"""A corpus of unusual but valid models, each aimed at one claim of the README.

`corpus()` yields Cases: a model (valid under onnx.checker's full check), the way it is saved
(inline, external data in one file, one file per tensor, without `length`, in a subfolder,
Constant-node tensors outside), and what must hold. The recipes cross opsets 7 to the newest
onnxruntime runs, every float dtype, subgraphs and local functions, sequences, shape arithmetic
(Slice with clamped bounds, Shape -> Gather -> Cast scales), float16 overflow and underflow,
training-mode BatchNormalization by each opset's rule, mixed-type BN, and names that collide
with the ones the pass makes. tests/test_adversarial.py runs each case through the CLI with and
without --no-check.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.graphs import GraphBuilder

NEWEST_OPSET = min(onnx.defs.onnx_opset_version(), 25)  # the newest this onnxruntime runs
OPSETS = (7, 9, 11, 13, 14, 15, 17, 19, 21, NEWEST_OPSET)
LAYOUTS = ("inline", "external", "per_tensor", "no_length", "subfolder")


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    layout: str = "inline"
    # "fuse": at least one block must fuse; "keep": nothing may fuse; "any": either, as long as equal
    expect: str = "any"
    reasons: set[str] = field(default_factory=set)  # skip codes that must appear
    runs_in_ort: bool = True  # False: onnxruntime's CPU provider has no kernel (float64, bfloat16 Conv)
    constant_nodes_outside: bool = False  # Constant-node tensors stored as external data too


def _builder(opset=17, dtype=np.float32, channels=4, spatial=(7, 7), seed=0) -> GraphBuilder:
    return GraphBuilder(channels=channels, spatial=spatial, dtype=dtype, opset=opset, seed=seed, batch=1)


def _bn_params(b: GraphBuilder, c: int, dtype=None, small_gamma=False):
    r = b.rng
    dtype = dtype or b.dtype
    # small_gamma: scales of ~1e-8 (float16 holds gamma ~1.2e-7 as a subnormal): every product
    # with a weight of ~0.3 is below float16's smallest subnormal
    gamma = np.full(c, 1.2e-7) if small_gamma else r.uniform(0.5, 1.5, c)
    var = r.uniform(50, 100, c) if small_gamma else r.uniform(0.25, 2, c)
    return [b.constant(v.astype(dtype), s) for v, s in zip(
        [gamma, r.uniform(-1, 1, c), r.uniform(-1, 1, c), var], ["gamma", "beta", "mean", "var"])]


def _bn(b: GraphBuilder, x: str, c: int, training_outputs=False, params=None) -> str:
    """A BatchNormalization in inference mode, or one declaring its training outputs (the way
    each opset spells training mode: extra outputs in 7-13, training_mode=1 from 14)."""
    params = params or _bn_params(b, c)
    out = b.fresh("bn")
    outputs, attrs = [out], {}
    if training_outputs:
        if b.opset < 14:
            outputs += [b.fresh("mean"), b.fresh("var"), b.fresh("saved_mean"), b.fresh("saved_var")]
        else:
            outputs += [b.fresh("mean"), b.fresh("var")]
            attrs["training_mode"] = 1
    b.nodes.append(helper.make_node("BatchNormalization", [x, *params], outputs, name=b.fresh("BN"), **attrs))
    return out


def _repvgg(b: GraphBuilder, x: str, c: int, identity=True, training_outputs=False) -> str:
    branches = [_bn(b, b.conv(x, c, c, 3, bias=False), c, training_outputs),
                _bn(b, b.conv(x, c, c, 1, pads=[0] * 4, bias=False), c)]
    if identity:
        branches.append(_bn(b, x, c))
    out = branches[0]
    for other in branches[1:]:
        out = b.add(out, other)
    return b.op("Relu", [out])


def _runtime_constant(b: GraphBuilder, value: np.ndarray, stem: str) -> str:
    """A constant that whole-graph shape inference cannot see: Neg(Neg(c))."""
    return b.op("Neg", [b.constant(-np.asarray(value), stem)])


def _slice(b: GraphBuilder, x: str, start: int, end: int, step: int, axis=3) -> str:
    if b.opset < 10:
        return b.op("Slice", [x], starts=[start], ends=[end], axes=[axis])
    return b.op("Slice", [x, _runtime_constant(b, np.array([start], np.int64), "st"),
                          _runtime_constant(b, np.array([end], np.int64), "en"),
                          _runtime_constant(b, np.array([axis], np.int64), "ax"),
                          _runtime_constant(b, np.array([step], np.int64), "sp")])


# -- recipes: each returns a model ------------------------------------------------------------

def repvgg_model(opset=17, dtype=np.float32, training_outputs=False) -> onnx.ModelProto:
    b = _builder(opset, dtype)
    return b.model([_repvgg(b, b.x, 4, training_outputs=training_outputs)])


def shape_scale_model(start, end, step, opset=17) -> onnx.ModelProto:
    """conv3(x) * float(dim of a Slice of x) + conv1(x): the scale comes from shape arithmetic."""
    b = _builder(opset)
    x = b.x
    sliced = _slice(b, x, start, end, step)
    dim = b.op("Gather", [b.op("Shape", [sliced]), b.constant(np.array(3, np.int64), "i")], axis=0)
    scale = b.op("Cast", [dim], to=TensorProto.FLOAT)
    return b.model([b.add(b.op("Mul", [b.conv(x, 4, 4, 3), scale]), b.conv(x, 4, 4, 1, pads=[0] * 4))])


def kept_scale_model(factor: float, dtype=np.float16) -> onnx.ModelProto:
    """Sum(conv3(x), conv1(x), y * f * f): the factor stays on y, cast to the model's dtype."""
    b = _builder(17, dtype)
    y = "y"
    b.extra_inputs.append(helper.make_tensor_value_info(y, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                        [1, 4, 7, 7]))
    f = b.constant(np.array(factor, dtype), "f")
    scaled = b.op("Mul", [b.op("Mul", [y, f]), f])
    return b.model([b.op("Sum", [b.conv(b.x, 4, 4, 3), b.conv(b.x, 4, 4, 1, pads=[0] * 4), scaled])])


def underflow_model() -> onnx.ModelProto:
    """float16 conv-BN branches whose every BN scale is ~1e-8: the fused kernel would be all zeros."""
    b = _builder(17, np.float16)
    x = b.x
    branches = [_bn(b, b.conv(x, 4, 4, k, pads=[k // 2] * 4, bias=False), 4,
                    params=_bn_params(b, 4, small_gamma=True)) for k in (3, 1)]
    return b.model([b.op("Relu", [b.add(*branches)])])


def mixed_type_bn_model() -> onnx.ModelProto:
    """Opset 15: float16 data, float32 scale and bias, float16 statistics."""
    b = _builder(15, np.float16)
    x = b.x
    params = [b.constant(v.astype(np.float32), s) for v, s in zip(
        [b.rng.uniform(0.5, 1.5, 4), b.rng.uniform(-1, 1, 4)], ["g", "b"])]
    params += [b.constant(v.astype(np.float16), s) for v, s in zip(
        [b.rng.uniform(-1, 1, 4), b.rng.uniform(0.5, 2, 4)], ["m", "v"])]
    bn = _bn(b, b.conv(x, 4, 4, 3), 4, params=params)
    return b.model([b.op("Relu", [b.add(bn, b.conv(x, 4, 4, 1, pads=[0] * 4))])])


def constant_node_model(opset=17) -> onnx.ModelProto:
    """Weights and BN parameters as Constant nodes (their tensors may be stored outside)."""
    b = _builder(opset)
    x = b.x
    w3 = b.constant((b.rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w3", as_node=True)
    w1 = b.constant((b.rng.standard_normal((4, 4, 1, 1)) * 0.3).astype(np.float32), "w1", as_node=True)
    c3 = b.op("Conv", [x, w3], kernel_shape=[3, 3], pads=[1] * 4)
    c1 = b.op("Conv", [x, w1], kernel_shape=[1, 1])
    params = [b.constant(v.astype(np.float32), s, as_node=True) for v, s in zip(
        [b.rng.uniform(0.5, 1.5, 4), b.rng.uniform(-1, 1, 4), b.rng.uniform(-1, 1, 4), b.rng.uniform(0.5, 2, 4)],
        ["g", "b", "m", "v"])]
    return b.model([b.add(_bn(b, c3, 4, params=params), c1)])


def sequence_weight_model() -> onnx.ModelProto:
    b = _builder(17)
    x = b.x
    w0 = b.constant((b.rng.standard_normal((6, 4, 3, 3)) * 0.3).astype(np.float32), "w0")
    seq = b.op("SplitToSequence", [w0, b.constant(np.array([4, 2], np.int64), "split")], axis=0)
    w = b.op("SequenceAt", [seq, b.constant(np.array(0, np.int64), "at")])
    conv3 = b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1] * 4)
    return b.model([b.add(conv3, b.conv(x, 4, 4, 1, pads=[0] * 4))])


def reshaped_weight_model() -> onnx.ModelProto:
    """A weight reshaped to a shape computed from another tensor's Shape."""
    b = _builder(17)
    x = b.x
    flat = b.constant((b.rng.standard_normal(4 * 4 * 9) * 0.3).astype(np.float32), "flat")
    like = b.constant(np.zeros((4, 4, 3, 3), np.float32), "like")
    w = b.op("Reshape", [flat, b.op("Shape", [like])])
    conv3 = b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1] * 4)
    return b.model([b.add(conv3, b.conv(x, 4, 4, 1, pads=[0] * 4))])


def _subgraph_block(outer_x: str, seed: int) -> tuple[onnx.GraphProto, list[onnx.TensorProto]]:
    """A graph computing a RepVGG block of the outer tensor `outer_x` (captured)."""
    b = _builder(17, seed=seed)
    b.x = outer_x
    out = _repvgg(b, outer_x, 4)
    graph = helper.make_graph(b.nodes, f"body_{seed}", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              initializer=b.initializers)
    return graph, []


def if_model() -> onnx.ModelProto:
    b = _builder(17)
    then_graph, _ = _subgraph_block(b.x, 1)
    else_graph, _ = _subgraph_block(b.x, 2)
    cond = "cond"
    b.extra_inputs.append(helper.make_tensor_value_info(cond, TensorProto.BOOL, []))
    out = b.fresh("if")
    b.nodes.append(helper.make_node("If", [cond], [out], name="If", then_branch=then_graph, else_branch=else_graph))
    model = b.model([out])
    return model


def loop_model() -> onnx.ModelProto:
    """A Loop whose body applies a RepVGG block to the loop-carried tensor, twice."""
    b = _builder(17)
    body = _builder(17, seed=3)
    body.x = "carried_in"
    out = _repvgg(body, "carried_in", 4)
    cond_out = body.op("Identity", ["cond_in"])
    graph = helper.make_graph(
        body.nodes, "loop_body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_in", TensorProto.FLOAT, [1, 4, 7, 7])],
        [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []),
         helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4, 7, 7])],
        initializer=body.initializers)
    trip = b.constant(np.array(2, np.int64), "trip")
    cond = b.constant(np.array(True), "cond")
    final = b.fresh("loop")
    b.nodes.append(helper.make_node("Loop", [trip, cond, b.x], [final], name="Loop", body=graph))
    return b.model([final])


def function_model() -> onnx.ModelProto:
    """A RepVGG block inside a local function (left alone), and one in the main graph."""
    b = _builder(17)
    inner = _builder(17, seed=4)
    inner.x = "fx"
    out = _repvgg(inner, "fx", 4)
    # a function has no initializers: its weights are Constant nodes
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in inner.initializers] + inner.nodes
    function = helper.make_function("local", "RepBlock", ["fx"], [out], nodes,
                                    [helper.make_opsetid("", 17)])
    mid = b.fresh("fn")
    b.nodes.append(helper.make_node("RepBlock", [b.x], [mid], name="call", domain="local"))
    final = _repvgg(b, mid, 4)
    graph = helper.make_graph(b.nodes, "with_function",
                              [helper.make_tensor_value_info(b.x, TensorProto.FLOAT, b.input_shape)],
                              [helper.make_tensor_value_info(final, TensorProto.FLOAT, b.input_shape)],
                              initializer=b.initializers)
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def colliding_names_model() -> onnx.ModelProto:
    """Sparse initializers and value_info named as the pass would name its new tensors."""
    b = _builder(17)
    x = b.x
    model = b.model([b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4))])
    stem = model.graph.node[0].name
    sparse = onnx.SparseTensorProto()
    sparse.dims.extend([3])
    sparse.values.CopyFrom(numpy_helper.from_array(np.array([1.0], np.float32), f"{stem}.fused_weight"))
    sparse.indices.CopyFrom(numpy_helper.from_array(np.array([0], np.int64), f"{stem}.fused_bias"))
    model.graph.sparse_initializer.append(sparse)
    model.graph.value_info.append(helper.make_tensor_value_info(f"{stem}.fused_weight_1", TensorProto.FLOAT, [1]))
    onnx.checker.check_model(model, full_check=True)
    return model


def pad_model(opset: int, mode="constant", value=0.0) -> onnx.ModelProto:
    """Pad -> Conv branches (attribute pads before opset 11, inputs after)."""
    b = _builder(opset)
    x = b.x
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    if opset < 11:
        padded = b.op("Pad", [x], pads=pads, mode=mode, value=value)
    else:
        inputs = [x, b.constant(np.array(pads, np.int64), "pads")]
        if value:
            inputs.append(b.constant(np.array(value, np.float32), "value"))
        padded = b.op("Pad", inputs, mode=mode)
    c3 = b.conv(padded, 4, 4, 3, pads=[0] * 4)
    return b.model([b.op("Relu", [b.add(c3, b.conv(x, 4, 4, 1, pads=[0] * 4))])])


def auto_pad_model(auto_pad: str, k: int) -> onnx.ModelProto:
    b = _builder(17)
    x = b.x
    return b.model([b.add(b.conv(x, 4, 4, k, auto_pad=auto_pad), b.conv(x, 4, 4, 1, pads=[0] * 4))])


def exposed_intermediate_model() -> onnx.ModelProto:
    """An intermediate sum is also a graph output, another has a second reader."""
    b = _builder(17)
    x = b.x
    inner = b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1, pads=[0] * 4))
    outer = b.add(inner, _bn(b, x, 4))
    return b.model([outer, inner, b.op("Sigmoid", [inner])])


def dtype_model(dtype) -> onnx.ModelProto:
    if dtype == "bfloat16":  # Conv takes it from opset 22; onnxruntime's CPU Conv does not
        model = repvgg_model(22, np.float32)
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(helper.make_tensor(tensor.name, TensorProto.BFLOAT16, array.shape, array.reshape(-1)))
        for value in list(model.graph.input) + list(model.graph.output):
            value.type.tensor_type.elem_type = TensorProto.BFLOAT16
        onnx.checker.check_model(model, full_check=True)
        return model
    return repvgg_model(17, dtype)


# -- the corpus --------------------------------------------------------------------------------

def corpus() -> list[Case]:
    cases: list[Case] = []

    def add(name: str, make: Callable[[], onnx.ModelProto], **kwargs) -> None:
        cases.append(Case(name, make(), **kwargs))

    for opset in OPSETS:
        add(f"repvgg-opset{opset}", lambda o=opset: repvgg_model(o), expect="fuse")
        add(f"bn-training-opset{opset}", lambda o=opset: repvgg_model(o, training_outputs=True),
            reasons={"bn_training"})
        add(f"pad-opset{opset}", lambda o=opset: pad_model(o), expect="fuse")
    add("repvgg-float16", lambda: dtype_model(np.float16), expect="fuse")
    add("repvgg-float64", lambda: dtype_model(np.float64), expect="fuse", runs_in_ort=False)
    add("repvgg-bfloat16", lambda: dtype_model("bfloat16"), expect="keep", reasons={"dtype"}, runs_in_ort=False)
    for start, end, step in ((-100, -200, -1), (100, -200, -1), (-100, 100, 1), (2, 1, 1), (-1, -100, -2),
                             (0, 9223372036854775807, 2), (-9223372036854775808, 3, 1)):
        add(f"shape-scale-slice[{start}:{end}:{step}]", lambda s=start, e=end, t=step: shape_scale_model(s, e, t))
    add("shape-scale-slice-opset9", lambda: shape_scale_model(-100, 2, 1, opset=9))
    add("kept-scale-float16-overflow", lambda: kept_scale_model(300.0), expect="keep", reasons={"overflow"})
    add("kept-scale-float16-fits", lambda: kept_scale_model(3.0), expect="fuse")
    add("fused-float16-underflow", underflow_model, expect="keep", reasons={"underflow"})
    add("mixed-type-bn-opset15", mixed_type_bn_model, expect="fuse")
    for opset in (9, 13, 17):
        add(f"constant-nodes-opset{opset}", lambda o=opset: constant_node_model(o), expect="fuse")
        add(f"constant-nodes-outside-opset{opset}", lambda o=opset: constant_node_model(o), expect="fuse",
            layout="external", constant_nodes_outside=True)
    add("sequence-weight", sequence_weight_model)
    add("reshaped-weight", reshaped_weight_model, expect="fuse")
    add("if-bodies", if_model, expect="fuse")
    add("loop-body", loop_model, expect="fuse")
    add("local-function", function_model, expect="fuse")
    add("colliding-names", colliding_names_model, expect="fuse")
    for mode, value in (("reflect", 0.0), ("edge", 0.0), ("constant", 0.5)):
        add(f"pad-{mode}-{value}", lambda m=mode, v=value: pad_model(17, m, v), reasons={"pad_mode", "pad_value"})
    for auto_pad, k in (("SAME_UPPER", 3), ("SAME_LOWER", 3), ("SAME_UPPER", 2), ("SAME_LOWER", 2), ("VALID", 1)):
        add(f"auto-pad-{auto_pad}-k{k}", lambda a=auto_pad, kk=k: auto_pad_model(a, kk))
    add("exposed-intermediates", exposed_intermediate_model)
    for layout in LAYOUTS[1:]:
        add(f"repvgg-{layout}", lambda: repvgg_model(17), layout=layout, expect="fuse")
        add(f"if-bodies-{layout}", if_model, layout=layout, expect="fuse")
        add(f"constant-nodes-{layout}", lambda: constant_node_model(17), layout=layout, expect="fuse",
            constant_nodes_outside=True)
    return cases


def save(case: Case, folder: str) -> str:
    """Write the case's model in its layout under `folder`; return the model's path."""
    path = os.path.join(folder, "model.onnx")
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    if case.layout == "inline":
        onnx.save(model, path)
        return path
    tensors = _tensors(model, case.constant_nodes_outside)
    if case.layout == "subfolder":
        os.makedirs(os.path.join(folder, "data"))
    offsets: dict[str, int] = {}
    for i, tensor in enumerate(tensors):
        data = numpy_helper.to_array(tensor).tobytes() if not tensor.HasField("raw_data") else tensor.raw_data
        if case.layout == "per_tensor":
            location = f"t{i}.bin"
        elif case.layout == "subfolder":
            location = "data/weights.bin"
        else:
            location = "weights.bin"
        target = os.path.join(folder, location)
        offset = offsets.get(location, 0)
        with open(target, "ab") as f:
            f.write(data)
        offsets[location] = offset + len(data)
        for key in ("raw_data", "float_data", "int64_data", "int32_data", "double_data"):
            tensor.ClearField(key)
        tensor.data_location = TensorProto.EXTERNAL
        entries = [("location", location), ("offset", str(offset))]
        if case.layout != "no_length":
            entries.append(("length", str(len(data))))
        for key, value in entries:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    onnx.save(model, path)
    return path


def _tensors(model: onnx.ModelProto, constant_nodes: bool) -> list[onnx.TensorProto]:
    """The tensors to store outside: initializers (subgraphs' too), Constant-node values if asked."""
    out: list[onnx.TensorProto] = []

    def walk(graph: onnx.GraphProto) -> None:
        out.extend(t for t in graph.initializer if t.data_type != TensorProto.STRING)
        for sparse in graph.sparse_initializer:
            out.extend((sparse.values, sparse.indices))
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)
                elif constant_nodes and node.op_type == "Constant" and attr.name == "value":
                    out.append(attr.t)

    walk(model.graph)
    return out
