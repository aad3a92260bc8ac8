"""Value-preserving nodes: ops whose first output equals their data input (value, shape, type).

Exporters put them between the nodes of a block: paddle2onnx writes an Identity after every
elementwise op and starts `out = 0; out += branch` as Mul(., 1) -> Add(., 0); a same-type Cast,
a shape-keeping Reshape or an inference Dropout may sit anywhere. `passthrough_input(view, node, opset)` proves that a node
is one and returns the input it copies, or None. Each proof uses only constants, declared or
inferred element types and static shapes (never names):

    Identity                  always
    Dropout                   inference: opset < 7 with is_test=1; opset 7-11 always; opset 12+
                              with no training_mode input or a constant false one; and its
                              mask output unused
    Cast(to=T)                the input's element type is T
    Reshape(shape)            a constant target of the input's rank that keeps every dim: a 0
                              (copy, without allowzero) or the dim itself, one -1 at most where
                              all other dims are known and nonzero
    Flatten(axis)             a rank-2 input with axis 1, or a known shape that flattens to itself
    Squeeze()                 no axes, and a known shape without a 1 (axes given always drop dims)
    Unsqueeze                 never: it always adds dims
    Expand(shape)             a constant target no longer than the input's rank whose dims are 1
                              or equal to the input's known dims
    Pad(pads)                 every pad a constant 0 (any mode)
    Concat / Sum              one input
    Mul / Div by 1,           a float constant of ones (zeros) that broadcasts into the data's
    Add / Sub of 0            shape without growing it: a scalar, or no longer than the known
                              rank with dims 1 or equal to the data's (Div and Sub: the constant
                              second); inside a tree they are linear anyway, but a copy of X made
                              this way must be seen through too

A node whose extra outputs are used is not one. The tree walk (linear_tree.py) treats these
nodes as linear nodes with factor 1.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..cheap_shapes import CheapShapes
from ..graph import GraphView, attribute
from .elem_types import elem_type

PASSTHROUGH_OPS = ("Identity", "Dropout", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Pad",
                   "Concat", "Sum", "Mul", "Div", "Add", "Sub")
_NEUTRAL = {"Mul": 1.0, "Div": 1.0, "Add": 0.0, "Sub": 0.0}
_PASSTHROUGH = frozenset(PASSTHROUGH_OPS)

def _extra_outputs_unused(view: GraphView, node: onnx.NodeProto) -> bool:
    outputs = node.output
    return len(outputs) < 2 or all(not out or not view.use_count(out) for out in outputs[1:])


def _constant_ints(view: GraphView, name: str) -> list[int] | None:
    value = view.constant(name) if name else None
    if value is None or not np.issubdtype(value.dtype, np.integer):
        return None
    return [int(v) for v in value.reshape(-1)]


def _dropout_in_inference(view: GraphView, node: onnx.NodeProto, opset: int) -> bool:
    if opset < 7:
        return int(attribute(node, "is_test", 0)) != 0
    if opset < 12 or len(node.input) < 3 or not node.input[2]:
        return True
    training = view.constant(node.input[2])
    return training is not None and training.size == 1 and not bool(training.reshape(-1)[0])


def reshape_keeps_shape(shape: tuple[int, ...], target: list[int], allowzero: bool) -> bool:
    """Does Reshape(target) of a tensor of `shape` (-1 for an unknown dim) give the same shape?"""
    if len(target) != len(shape) or sum(1 for t in target if t == -1) > 1:
        return False
    for d, t in zip(shape, target):
        if (t == 0 and not allowzero) or t == -1:
            continue  # copies d; -1 is settled below
        if d < 0 or t != d:
            return False
    if -1 in target:  # the -1 takes the element count the others leave: d itself, when that is determined
        others = [d for d, t in zip(shape, target) if t != -1]
        return all(d > 0 for d in others) and shape[target.index(-1)] != 0
    return True


def flatten_keeps_shape(shape: tuple[int, ...], axis: int) -> bool:
    rank = len(shape)
    if axis < 0:
        axis += rank
    if rank == 2 and axis == 1:
        return True
    if any(d < 0 for d in shape) or not 0 <= axis <= rank:
        return False
    return (int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis:], dtype=np.int64))) == tuple(shape)


def expand_keeps_shape(shape: tuple[int, ...], target: list[int]) -> bool:
    if len(target) > len(shape):
        return False
    return all(t == 1 or (d >= 0 and t == d) for d, t in zip(shape[len(shape) - len(target):], target))


def _neutral_operand(view: GraphView, node: onnx.NodeProto) -> str | None:
    """The data input of x * 1, 1 * x, x / 1, x + 0, 0 + x or x - 0 that leaves x's shape as it is."""
    if len(node.input) != 2 or not all(node.input):
        return None
    if not (view.may_be_constant(node.input[0]) or view.may_be_constant(node.input[1])):
        return None  # no constant operand (the answer without asking constant() of either)
    slots = (0, 1) if node.op_type in ("Mul", "Add") else (1,)
    for slot in slots:
        value = view.constant(node.input[slot])
        data = node.input[1 - slot]
        if value is None or view.constant(data) is not None or not np.issubdtype(value.dtype, np.floating):
            continue
        if not np.all(value == _NEUTRAL[node.op_type]):
            continue
        shape = view.shape(data)
        if value.ndim == 0 or (shape is not None and expand_keeps_shape(shape, list(value.shape))):
            return data
    return None


def neutral_cheaply(view: GraphView, index: int) -> bool:
    """Would _neutral_operand prove node `index` value-preserving, given that onnx's shapes agree
    with the cheap ones (cheap_shapes.py)? For ruling out only (LinearIndex.roots: such a node
    starts no tree); False whenever the answer would need a constant inferred shapes could
    change, or no shape at all (then the proof itself is cheap)."""
    op, inputs = view.ops[index], view.inputs_of[index]
    if op not in _NEUTRAL or len(inputs) != 2 or not (view.may_be_constant(inputs[0]) or view.may_be_constant(inputs[1])):
        return False  # (no constant operand: no neutral one)
    node = view.nodes[index]
    if node.domain not in ("", "ai.onnx") or not all(node.input):
        return False
    if not node.output or not node.output[0] or not _extra_outputs_unused(view, node):
        return False
    for slot in (0, 1) if op in ("Mul", "Add") else (1,):
        operand, data = node.input[slot], node.input[1 - slot]
        if operand in view.tainted or data in view.tainted:
            return False
        value = view.constant(operand)
        if value is None or view.constant(data) is not None or not np.issubdtype(value.dtype, np.floating):
            continue
        if not np.all(value == _NEUTRAL[op]):
            continue
        if value.ndim == 0:
            return False  # proved without a shape
        shape = CheapShapes.of(view).shape(data)
        return shape is not None and expand_keeps_shape(shape, list(value.shape))
    return False


def passthrough_input(view: GraphView, node: onnx.NodeProto, opset: int) -> str | None:
    """The input that `node` copies unchanged to its first output, or None if that is not proven."""
    op = node.op_type
    if op not in _PASSTHROUGH or node.domain not in ("", "ai.onnx"):
        return None
    inputs, outputs = node.input, node.output
    if not inputs or not inputs[0] or not outputs or not outputs[0] or not _extra_outputs_unused(view, node):
        return None
    data = inputs[0]
    if op in _NEUTRAL:
        return _neutral_operand(view, node)
    if op in ("Concat", "Sum"):
        return data if len(node.input) == 1 else None
    if op == "Identity":
        return data if len(node.input) == 1 else None
    if op == "Dropout":
        return data if _dropout_in_inference(view, node, opset) else None
    if op == "Cast":
        source = elem_type(view, data)
        return data if source is not None and source == int(attribute(node, "to", 0)) else None
    if op == "Pad":
        if opset < 11:
            pads = attribute(node, "pads" if opset >= 2 else "paddings")
            pads = None if pads is None else list(pads)
        else:
            pads = _constant_ints(view, node.input[1]) if len(node.input) > 1 else None
        return data if pads is not None and not any(pads) else None
    # The shape is read last: only a node whose other conditions hold asks for it.
    if op == "Reshape":
        target = list(attribute(node, "shape", [])) if opset < 5 else (
            _constant_ints(view, node.input[1]) if len(node.input) > 1 else None)
        if target is None:
            return None
        allowzero = opset >= 14 and int(attribute(node, "allowzero", 0)) != 0
        shape = view.shape(data)
        return data if shape is not None and reshape_keeps_shape(shape, target, allowzero) else None
    if op == "Flatten":
        shape = view.shape(data)
        return data if shape is not None and flatten_keeps_shape(shape, int(attribute(node, "axis", 1))) else None
    if op == "Squeeze":
        axes = attribute(node, "axes") if opset < 13 else (
            _constant_ints(view, node.input[1]) if len(node.input) > 1 and node.input[1] else None)
        if (axes is not None and len(axes)) or (opset >= 13 and len(node.input) > 1 and node.input[1] and axes is None):
            return None  # listed axes are removed (or the axes are computed at run time)
        shape = view.shape(data)
        return data if shape is not None and all(d >= 0 and d != 1 for d in shape) else None
    if op == "Expand":
        target = _constant_ints(view, node.input[1]) if len(node.input) > 1 else None
        if target is None:
            return None
        shape = view.shape(data)
        return data if shape is not None and expand_keeps_shape(shape, target) else None
    return None  # Unsqueeze always adds a dim
