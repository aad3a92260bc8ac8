"""Layout ops between a BatchNormalization and a linear layer, and the proof that the BN's
channel axis is the layer's feature axis across them.

Reshape, Flatten, Squeeze, Unsqueeze and Identity (the *layout ops*) change a tensor's shape
but never the row-major order of its elements: the element at flat index f of their input is
the element at flat index f of their output. So a chain of them maps flat index to flat
index, and which axis an element "is on" is a question of shapes alone:

    in a tensor of shape S, the element at flat index f lies at index (f // inner) % S[a]
    of axis a, where inner = prod(S[a+1:]).

Two (axis, shape) pairs name the same partition of the elements into channels exactly when
their channel counts and inner sizes are equal. A BN acts on axis 1 of its input; a MatMul's
(or Gemm's) features are its input's last axis (inner size 1); a Conv's channels are axis 1.
The counts are fixed by the weights (the graph could not run otherwise); the inner sizes
are read from static shapes (onnx shape inference, graph.infer_static_shapes, carried on by
the GraphView), and a shape that is not known is not guessed.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import GraphView, attribute
from .common import Skip, is_op

LAYOUT_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def is_layout(node: onnx.NodeProto | None) -> bool:
    return node is not None and is_op(node, *LAYOUT_OPS) and bool(node.input) and bool(node.output)


def chain_up(view: GraphView, name: str) -> tuple[str, list[int]]:
    """The layout nodes that compute `name` from the nearest tensor not made by one:
    (that tensor, node indices from it down to `name`). Uses are not checked here."""
    nodes: list[int] = []
    while True:
        index = view.producer.get(name)
        if index is None or not is_layout(view.nodes[index]):
            return name, nodes[::-1]
        nodes.append(index)
        name = view.nodes[index].input[0]


def chain_down(view: GraphView, name: str) -> tuple[str, list[int]]:
    """The layout nodes that follow `name` while each tensor has exactly one use, as their
    data input, and is not a graph output: (the last tensor, node indices in order)."""
    nodes: list[int] = []
    while view.is_private(name):
        index, slot = view.consumers[name][0]
        if slot != 0 or not is_layout(view.nodes[index]):
            break
        nodes.append(index)
        name = view.nodes[index].output[0]
    return name, nodes


def static_shape(view: GraphView, name: str) -> tuple[int, ...] | None:
    """The shape of `name` when every dim of it is known."""
    shape = view.shape(name)
    return None if shape is None or any(d < 0 for d in shape) else tuple(shape)


def inner_size(view: GraphView, name: str, axis: int) -> int | None:
    """prod(shape[axis+1:]) of `name` when those dims are known (1 past the last axis)."""
    shape = view.shape(name)
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    tail = shape[axis % len(shape) + 1:]
    return None if any(d < 0 for d in tail) else int(np.prod(tail, dtype=np.int64))


def same_shape(view: GraphView, a: str, b: str) -> bool:
    """Provably the same shape: both fully known and equal, or `b` is a Reshape of anything
    to Shape(a) (TorchScript's `reshape_as`, which holds with dynamic dims too)."""
    sa, sb = static_shape(view, a), static_shape(view, b)
    if sa is not None and sa == sb:
        return True
    producer = view.producer_of(b)
    if producer is None or not is_op(producer, "Reshape") or len(producer.input) < 2:
        return False
    shape_of = view.producer_of(producer.input[1])
    return (shape_of is not None and is_op(shape_of, "Shape") and shape_of.input[0] == a
            and attribute(shape_of, "start", 0) == 0 and attribute(shape_of, "end") is None)


def order_only_reshape(view: GraphView, node: onnx.NodeProto) -> bool:
    """A Reshape whose output depends only on its input's element order and size: its target
    is a constant that copies no input dim (no 0 entry, or allowzero=1)."""
    if not is_op(node, "Reshape") or len(node.input) < 2:
        return False
    target = view.constant(node.input[1])
    return target is not None and (int(attribute(node, "allowzero", 0)) == 1 or not np.any(target == 0))


def describe_shape(view: GraphView, name: str) -> str:
    shape = view.shape(name)
    return "[?]" if shape is None else "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def via(view: GraphView, nodes: list[int]) -> str:
    """' through the Flatten and Reshape' for the layout nodes in between, '' for none."""
    if not nodes:
        return ""
    ops = list(dict.fromkeys(view.nodes[i].op_type for i in nodes))
    return " through the " + " and ".join(ops)


def check_bn_axis(view: GraphView, bn: onnx.NodeProto, channels: int, layer: onnx.NodeProto, tensor: str,
                  axis: int, features: int, between: list[int]) -> None:
    """Skip unless the BN's channel axis (axis 1 of its input, `channels` wide) partitions the
    elements as the layer's feature axis does (`axis` of `tensor`, `features` wide)."""
    bn_input = bn.input[0]
    bn_inner = inner_size(view, bn_input, 1)
    layer_inner = 1 if axis == -1 else inner_size(view, tensor, axis)
    if bn_inner is None or layer_inner is None:
        unknown = bn_input if bn_inner is None else tensor
        raise Skip("shape_unknown", f"the shape of '{unknown}' ({describe_shape(view, unknown)}) is not known "
                   f"statically, so BatchNormalization '{bn.name}' cannot be matched to the features of "
                   f"{layer.op_type} '{layer.name}'")
    if channels != features and bn_inner == layer_inner and not between:
        raise Skip("channel_mismatch", f"BatchNormalization '{bn.name}' has {channels} channels, "
                   f"{layer.op_type} '{layer.name}' {features} features")
    if channels != features or bn_inner != layer_inner:
        where = "its last axis" if axis == -1 else f"axis {axis} of its input"
        path = f",{via(view, between)}," if between else ""
        raise Skip("bn_axis", f"BatchNormalization '{bn.name}' normalizes axis 1 of {describe_shape(view, bn_input)}, "
                   f"which{path} is not the feature axis of {layer.op_type} '{layer.name}' ({where}, "
                   f"{features} features)")
