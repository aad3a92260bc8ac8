"""A BatchNormalization that nothing could absorb becomes a depthwise 1x1 Conv, for edge
compilers that reject a bare BN (--bn-to-conv).

Runs only after the other rules have reached their fixed point, so it never takes a BN
that could have been folded away.
Formula: BN(x) = s*x + h per channel = Conv(x, W, h, group=C) with W[c, 0, 1, ..., 1] = s[c].
Preconditions: inference mode, constant parameters, input rank 3 to 5 known from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper

from .. import algebra
from ..block import Candidate, Rewrite
from ..graph import GraphView
from .common import Skip, bn_affine, is_op, tensor_rank
from .elem_types import elem_type

NAME = "bn_to_conv"
LATE = True  # run after the default rules converge
DEFAULT = False  # opt-in

_SAME_RANK_OPS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Gelu", "Elu", "Selu",
                  "Clip", "BatchNormalization", "Identity", "Dropout", "Softplus", "Mish", "PRelu",
                  "InstanceNormalization", "LRN", "MaxPool", "AveragePool", "GlobalAveragePool",
                  "GlobalMaxPool", "Conv", "ConvTranspose", "Neg", "Abs", "Sqrt", "Exp"}
_BROADCAST_OPS = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow", "Where"}


def inferred_rank(view: GraphView, name: str, depth: int = 0) -> int | None:
    """The rank of a tensor, from known shapes or by following simple producers."""
    rank = tensor_rank(view, name)
    if rank is not None:
        return rank
    node = view.producer_of(name)
    if node is None or depth > 64:
        return None
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        shape = view.constant_shape(node.input[1])
        if shape is not None:
            return len(shape)
    if node.op_type in _SAME_RANK_OPS and node.input:
        return inferred_rank(view, node.input[0], depth + 1)
    if node.op_type in _BROADCAST_OPS:
        ranks = [inferred_rank(view, i, depth + 1) for i in node.input if i]
        known = [r for r in ranks if r is not None]
        return max(known) if len(known) == len(ranks) and known else None
    return None


def _data_dtype(view: GraphView, node, opset: int) -> np.dtype:
    """The dtype of the BN's data input X, which the Conv's weights must have. From opset 15
    on, the BN's scale and bias may have another type than X (e.g. float32 for float16 data)."""
    declared = elem_type(view, node.input[0])
    if declared:
        return np.dtype(helper.tensor_dtype_to_np_dtype(declared))
    scale_dtype = view.constant_dtype(node.input[1])
    if opset < 15 and scale_dtype is not None:
        return scale_dtype
    raise Skip("dtype", f"BatchNormalization '{node.name}': the type of its input is not known, and from opset 15 "
               "it may differ from the parameters'")


@dataclass
class BnAsConv:
    anchor: str
    bn: int
    scale: np.ndarray
    shift: np.ndarray
    rank: int
    dtype: np.dtype
    removed_nodes: list[int]

    def materialize(self, view: GraphView, names) -> Rewrite:
        node = view.nodes[self.bn]
        c = self.scale.shape[0]
        spatial = self.rank - 2
        w_name = names.fresh(f"{self.anchor}.as_conv_weight")
        b_name = names.fresh(f"{self.anchor}.as_conv_bias")
        conv = helper.make_node("Conv", [node.input[0], w_name, b_name], [node.output[0]],
                                name=names.fresh(f"{self.anchor}.as_conv"), group=c,
                                kernel_shape=[1] * spatial, pads=[0] * (2 * spatial))
        weight = algebra.cast_like(self.scale.reshape((c, 1) + (1,) * spatial), self.dtype)
        bias = algebra.cast_like(self.shift, self.dtype)
        return Rewrite(self.removed_nodes, [(self.bn, [conv])], [(w_name, weight), (b_name, bias)], conv.name)


def find(view: GraphView, opset: int, options: dict | None = None):
    for index in view.of_type("BatchNormalization"):
        node = view.nodes[index]
        if not is_op(node, "BatchNormalization") or not node.input:
            continue
        candidate = Candidate(anchor=node.name or node.output[0], branch_labels=["bn", "->conv1x1"])
        try:
            scale, shift = bn_affine(view, node, opset)
            rank = inferred_rank(view, node.input[0])
            if rank is None or not 3 <= rank <= 5:
                raise Skip("rank_unknown", f"BatchNormalization '{node.name}': input rank "
                           f"{'unknown' if rank is None else rank}; a 1x1 conv needs rank 3 to 5")
            dtype = _data_dtype(view, node, opset)
        except Skip as skip:
            candidate.reason = skip.reason
        else:
            candidate.block = BnAsConv(candidate.anchor, index, scale, shift, rank, dtype, [index])
        yield candidate


def materialize(match: BnAsConv, view: GraphView, names) -> Rewrite:
    return match.materialize(view, names)
