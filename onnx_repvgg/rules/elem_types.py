"""The element type of a value where onnx declares none: read back through the ops that keep it."""

from __future__ import annotations

import onnx

from ..graph import GraphView, attribute

# ops whose output has the element type of their first input
_SAME_TYPE_OPS = {"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Pad", "Concat",
                  "Sum", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Relu", "LeakyRelu", "PRelu", "Sigmoid",
                  "HardSigmoid", "HardSwish", "Tanh", "Clip", "BatchNormalization", "Conv", "ConvTranspose",
                  "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "Gemm", "MatMul", "Transpose",
                  "Slice", "Softmax", "Elu", "Selu", "Mish", "Gelu", "Resize", "Tile", "Softplus", "Sqrt",
                  "Exp", "Max", "Min", "Pow", "InstanceNormalization", "LRN"}
_TYPE_DEPTH = 256


def elem_type(view: GraphView, name: str) -> int | None:
    """The element type of a value: declared, a constant's, or carried from the input of ops that
    keep it (a Cast's `to`); None when not known."""
    for _ in range(_TYPE_DEPTH):
        declared = view.elem_type(name)
        if declared:
            return declared
        if view.is_constant(name):
            dtype = view.constant_dtype(name)
            return None if dtype is None else onnx.helper.np_dtype_to_tensor_dtype(dtype)
        node = view.producer_of(name)
        if node is None or node.domain not in ("", "ai.onnx") or not node.input or node.output[0] != name:
            return None
        if node.op_type == "Cast":
            return int(attribute(node, "to", 0)) or None
        if node.op_type == "CastLike" and len(node.input) == 2:
            name = node.input[1]
            continue
        if node.op_type not in _SAME_TYPE_OPS:
            return None
        name = node.input[0]
    return None
