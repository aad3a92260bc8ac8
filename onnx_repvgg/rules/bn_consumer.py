"""A standalone BatchNormalization folded into the Conv/Gemm/MatMul nodes that consume it,
directly or through layout ops (Reshape, Flatten, Squeeze, Unsqueeze, Identity).

    Conv(BN(X)) -> Conv'(X),  Gemm(BN(X)) -> Gemm'(X)      (BN1d -> Linear heads, BN -> 1x1 conv)
    MatMul(layout(BN(X)), W) -> MatMul(layout(X), W') + b'  (a Gemm when its input is 2-D)

A BN right after a Conv is folded by the branch_sum rule (into its producer), one after a
MatMul by bn_into_matmul; this rule takes the BNs that sit before their consumers instead.

Preconditions: BN in inference mode with constant parameters; every use of its output
reaches, through layout ops only, the data input of a Conv with no padding (a padded border
would read zeros, not BN(0) = shift), of a Gemm with transA=0 or of a MatMul by a constant
matrix; each tensor on the way has no other use and is not a graph output; weights and
biases constant. Through layout ops, or into a MatMul, the BN's channel axis must be the
consumer's feature axis (axis 1 of a Conv's input, the last of a Gemm's or MatMul's), proved
from static shapes (rules/layout.py).
Formula, with BN(x) = s*x + h per input channel c:
    Conv: W'[o, i, ...] = W[o, i, ...] * s[c(i)],  b'[o] = b[o] + sum_{i,k} W[o, i, k] * h[c(i)]
    Gemm: B'_eff = diag(s) @ B_eff,  C' = beta*C + alpha * h @ B_eff,  beta' = 1
    MatMul: W' = diag(s) @ W,  b' = h @ W
where c(i) = g*(Cin/groups) + i for the group g of output o.
With one consumer, the layout ops on each side of the BN cancel when the consumer's input
provably has the shape of the tensor the first one reads (the consumer then reads it), or
collapse into the last one when it is a Reshape to a constant shape; otherwise they stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .. import algebra
from ..block import Candidate, Rewrite
from ..graph import GraphView, attribute
from .common import FLOAT_DTYPES, Skip, bn_affine, const, conv_params, gemm_params, rank_ruled_out, tensor_rank
from .consumer_nodes import NewNames, rewritten_consumer
from .layout import LAYOUT_OPS, chain_up, check_bn_axis, order_only_reshape, same_shape

NAME = "bn_into_consumer"
CONSUMER_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class Fold:
    index: int                  # the consumer node
    weight: np.ndarray          # float64
    bias: np.ndarray            # float64
    reads: str                  # the consumer's new data input
    as_gemm: bool = False       # a MatMul with a 2-D input becomes a Gemm


@dataclass
class ConsumerFold:
    anchor: str
    bn: int
    input: str
    consumers: list[Fold]
    removed_nodes: list[int]
    rewired: dict[int, str] = field(default_factory=dict)  # layout node -> its new data input

    def materialize(self, view: GraphView, names) -> Rewrite:
        insertions, tensors = [], []
        for index, source in self.rewired.items():
            node = onnx.NodeProto()
            node.CopyFrom(view.nodes[index])
            node.input[0] = source
            insertions.append((index, [node]))
        fused = ""
        for fold in self.consumers:
            node = view.nodes[fold.index]
            dtype = view.constant_dtype(node.input[1])
            stem = node.name or node.output[0]
            w_name = names.fresh(f"{stem}.bn_folded_weight")
            b_name = names.fresh(f"{stem}.bn_folded_bias")
            name = names.fresh(node.name or node.op_type)
            split = node.op_type == "MatMul" and not fold.as_gemm
            new_names = NewNames(name, w_name, b_name,
                                 product=names.fresh(f"{stem}.product") if split else "",
                                 bias_node=names.fresh(f"{stem}.bn_bias") if split else "")
            new = rewritten_consumer(node, fold.reads, new_names, fold.as_gemm, gemm_attributes={"transB": 0})
            fused = fused or name
            tensors += [(w_name, algebra.cast_like(fold.weight, dtype)), (b_name, algebra.cast_like(fold.bias, dtype))]
            insertions.append((fold.index, new))
        return Rewrite(self.removed_nodes, insertions, tensors, fused)


def _fold_into_conv(view: GraphView, index: int, scale, shift):
    node = view.nodes[index]
    p = conv_params(view, node)
    if any(p.pads_begin) or any(p.pads_end):
        raise Skip("consumer_padding", f"Conv '{node.name}' pads its input: the border would read 0, not the BN's shift")
    cin = p.weight.shape[1] * p.group
    if cin != scale.shape[0]:
        raise Skip("channel_mismatch", f"Conv '{node.name}' reads {cin} channels, the BN has {scale.shape[0]}")
    return algebra.fold_input_affine_conv(p.weight, p.bias, p.group, scale, shift)


def _fold_into_gemm(view: GraphView, index: int, scale, shift):
    """Gemm(BN(X)) = alpha * X @ (diag(s) W) + (beta * C + alpha * h @ W), beta' = 1."""
    node = view.nodes[index]
    p = gemm_params(view, node)
    if p.weight.shape[0] != scale.shape[0]:
        raise Skip("channel_mismatch", f"Gemm '{node.name}' reads {p.weight.shape[0]} features, the BN has {scale.shape[0]}")
    weight, bias = algebra.fold_input_affine_dense(p.weight, p.beta * p.bias, scale, p.alpha * shift)
    return (weight.T if p.trans_b else weight), bias


def _fold_into_matmul(view: GraphView, index: int, scale, shift):
    """MatMul(BN(X), B) = X @ (diag(s) B) + h @ B."""
    node = view.nodes[index]
    b = const(view, node.input[1], "weight", node)
    if b.dtype not in FLOAT_DTYPES:
        raise Skip("dtype", f"MatMul '{node.name}' weight dtype {b.dtype} is not float16/32/64")
    if b.ndim != 2:
        raise Skip("weight_rank", f"MatMul '{node.name}' multiplies by a rank-{b.ndim} tensor; a BN folds only into a matrix")
    if b.shape[0] != scale.shape[0]:
        raise Skip("channel_mismatch", f"MatMul '{node.name}' reads {b.shape[0]} features, the BN has {scale.shape[0]}")
    return algebra.fold_input_affine_dense(b, None, scale, shift)


_FOLDS = {"Conv": _fold_into_conv, "Gemm": _fold_into_gemm, "MatMul": _fold_into_matmul}


def use_paths(view: GraphView, bn: onnx.NodeProto, quiet: bool = False) -> list[tuple[int, list[int]]] | None:
    """Every use of the BN's output as (consumer node, layout nodes on the way), or Skip
    when a use, or a tensor on the way, is anything else (`quiet`: None instead)."""
    paths = []
    stack: list[tuple[str, list[int]]] = [(bn.output[0], [])]
    outputs_of = view.outputs_of
    while stack:
        name, path = stack.pop()
        if name in view.graph_outputs:
            if quiet:
                return None
            raise Skip("intermediate_is_output", f"'{name}' after BatchNormalization '{bn.name}' is a graph output")
        for index, slot in view.consumers.get(name, ()):
            step = _use_step(view, index, slot)
            if step == "layer":
                paths.append((index, path))
            elif step == "layout":
                stack.append((outputs_of[index][0], path + [index]))
            elif quiet:
                return None
            else:
                node = view.nodes[index]
                what = f"{node.op_type} '{node.name}'" if slot >= 0 else f"a subgraph of {node.op_type} '{node.name}'"
                raise Skip("intermediate_shared", f"'{name}' after BatchNormalization '{bn.name}' is also read by {what}")
    return sorted(paths)


def _use_step(view: GraphView, index: int, slot: int) -> str | None:
    """How use_paths goes on through the use of a value by node `index` at input `slot`: "layer"
    (the data input of a Conv, Gemm or MatMul: a path ends there), "layout" (that of a layout op:
    the walk goes on from its output), or None (any other use: the walk fails)."""
    if slot != 0:
        return None
    op = view.foldable_op(index)  # is_op(node, *CONSUMER_OPS), and is_layout(node)
    if op in CONSUMER_OPS:
        return "layer"
    if op in LAYOUT_OPS and view.inputs_of[index] and view.outputs_of[index]:
        return "layout"
    return None


def _first_uses_fold(view: GraphView, name: str) -> bool:
    """The first step of use_paths from `name`, the BN's output: False when it ends the walk
    (a graph output, or a use _use_step fails), where use_paths(quiet=True) is None."""
    return name not in view.graph_outputs and all(
        _use_step(view, index, slot) is not None for index, slot in view.consumers.get(name, ()))


def _features(view: GraphView, node: onnx.NodeProto) -> int | None:
    """How many input features a consumer's weight reads (None when its shape is not known)."""
    shape = view.constant_shape(node.input[1]) if len(node.input) > 1 else None
    if shape is None or len(shape) < 2:
        return None
    if node.op_type == "Conv":
        return shape[1] * int(attribute(node, "group", 1))
    if node.op_type == "Gemm":
        return shape[1] if int(attribute(node, "transB", 0)) else shape[0]
    return shape[-2]


def _collapse(view: GraphView, bn: onnx.NodeProto, path: list[int], consumer: onnx.NodeProto):
    """For a single consumer: what it reads once the layout ops around the BN cancel or collapse,
    and which layout nodes go: (its input, removed layout nodes, a kept Reshape rewired to that
    input, or None), or None when the layout ops stay."""
    source, before = chain_up(view, bn.input[0])
    if not before or not all(view.is_private(view.nodes[i].output[0]) for i in before):
        source, before = bn.input[0], []
    z = consumer.input[0]
    if same_shape(view, source, z):
        return source, before + path, None
    if order_only_reshape(view, view.nodes[path[-1]]) and (before or len(path) > 1):
        return source, before + path[:-1], path[-1]
    return None


def analyze(view: GraphView, index: int, opset: int) -> ConsumerFold:
    """The fold of BN node `index` into its consumers, or Skip."""
    bn = view.nodes[index]
    paths = use_paths(view, bn)
    if not paths:
        raise Skip("intermediate_shared", f"BatchNormalization '{bn.name}' output reaches no Conv, Gemm or MatMul")
    scale, shift = bn_affine(view, bn, opset)
    folds, removed, rewired = [], [index], {}
    for target, path in paths:
        node = view.nodes[target]
        features = _features(view, node)
        reshaped = any(view.nodes[i].op_type != "Identity" for i in path)  # an Identity keeps the shape
        if features is not None and (reshaped or node.op_type == "MatMul"):
            check_bn_axis(view, bn, scale.shape[0], node, node.input[0], 1 if node.op_type == "Conv" else -1,
                          features, path)
        weight, bias = _FOLDS[node.op_type](view, target, scale, shift)
        reads = node.input[0] if path else bn.input[0]
        collapsed = _collapse(view, bn, path, node) if path and len(paths) == 1 else None
        if collapsed is not None:
            reads, gone, kept = collapsed
            removed += gone
            if kept is not None:
                rewired[kept] = reads
                removed.append(kept)
                reads = node.input[0]
        else:
            for i in path:
                if view.nodes[i].input[0] == bn.output[0]:
                    rewired[i] = bn.input[0]
        removed.append(target)
        as_gemm = node.op_type == "MatMul" and not rank_ruled_out(view, node.input[0], 2) \
            and tensor_rank(view, node.input[0]) == 2
        folds.append(Fold(target, weight, bias, reads, as_gemm))
    removed += [i for i in rewired if i not in removed]
    return ConsumerFold(bn.name or bn.output[0], index, bn.input[0], folds, removed, rewired)


def find(view: GraphView, opset: int, options: dict | None = None) -> list[Candidate]:
    candidates: list[Candidate] = []
    if not any(view.of_type(op) for op in CONSUMER_OPS):
        return candidates  # no layer to fold a BN into
    inputs_of, outputs_of = view.inputs_of, view.outputs_of
    for index in view.of_type("BatchNormalization"):
        if view.foldable_op(index) is None or not inputs_of[index] or not outputs_of[index]:
            continue  # not is_op(node, "BatchNormalization"), or no input or output
        if not _first_uses_fold(view, outputs_of[index][0]):
            continue  # use_paths(quiet=True) is None (most BNs of a model: read by an Add, a Relu, ...)
        node = view.nodes[index]
        paths = use_paths(view, node, quiet=True)
        if paths is None:
            continue  # some use is not a linear layer: nothing this rule could do
        if not paths or any(view.nodes[i].op_type == "MatMul" and view.constant_shape(view.nodes[i].input[1]) is None
                            for i, _ in paths):
            continue  # a MatMul of two activations (attention) is no linear layer
        kinds = sorted({view.nodes[i].op_type.lower() for i, _ in paths})
        labels = ["bn"] + [k.replace("gemm", "linear") for k in kinds]
        candidate = Candidate(anchor=node.name or node.output[0], branch_labels=labels)
        try:
            candidate.block = analyze(view, index, opset)
        except Skip as skip:
            candidate.reason = skip.reason
        candidates.append(candidate)
    return candidates


def materialize(match: ConsumerFold, view: GraphView, names) -> Rewrite:
    return match.materialize(view, names)
