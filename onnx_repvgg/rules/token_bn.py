"""A BatchNormalization after a MatMul, on the MatMul's feature axis through layout ops,
folded into its weight and a bias (LeViT's Linear -> BatchNorm1d over flattened tokens).

    M = MatMul(X, W) -> [Reshape | Flatten | Squeeze | Unsqueeze | Identity]* -> BN -> [layout]*
      ->  MatMul(X, W * s) + h                    (TorchScript: MatMul -> Flatten -> BN -> Reshape,
                                                   dynamo: MatMul -> Reshape [-1, D] -> BN -> Reshape)

Preconditions: W a constant float tensor of rank >= 2 (D = its last dim); the BN in inference
mode with constant parameters; the BN's channel axis is the MatMul's feature axis, proved
from static shapes (rules/layout.py): the BN has D channels and its input has size 1 on every
axis after axis 1. Every tensor from M to the BN has no other use and is not a graph output;
M itself may also be read by Shape nodes (its shape does not change).
Formula: with BN(x) = s*x + h per feature, BN(X @ W) = X @ (W diag(s)) + h.
The result: MatMul(X, W*s) writes M, then Add(h)
  * writes the end of the chain after the BN when that end provably has M's shape (the
    reshapes cancel: fully known and equal, or a Reshape to Shape(M));
  * else, when the chain ends in a Reshape to a constant shape (which depends only on the
    element order), feeds that Reshape alone;
  * else takes the BN's place (h broadcast over the BN input's trailing axes of size 1), and
    every layout op stays.
A 2-D MatMul right before a BN is the branch_sum rule's (it becomes a Gemm there).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .. import algebra
from ..block import Candidate, Rewrite
from ..graph import GraphView
from .common import FLOAT_DTYPES, Skip, bn_affine, const, is_op, rank_ruled_out, tensor_rank
from .layout import chain_down, chain_up, check_bn_axis, order_only_reshape, same_shape

NAME = "bn_into_matmul"


@dataclass
class MatMulBNFold:
    anchor: str
    matmul: int                 # node index of the MatMul; the new one takes its name and output
    weight: np.ndarray          # W * s, float64
    bias: np.ndarray            # h, float64, broadcastable to where the Add goes
    add_input: str              # what the Add reads: M, or the BN's input (case 3)
    output: str                 # what the Add (or the kept Reshape) writes
    reshape: int | None         # a Reshape to a constant shape kept after the Add (case 2)
    add_at: int                 # node index the Add is placed before
    removed_nodes: list[int]

    def materialize(self, view: GraphView, names) -> Rewrite:
        node = view.nodes[self.matmul]
        stem = node.name or node.output[0]
        dtype = view.constant_dtype(node.input[1])
        w_name, b_name = names.fresh(f"{stem}.bn_folded_weight"), names.fresh(f"{stem}.bn_folded_bias")
        # X @ (W * s) holds other values than M: it gets a name of its own, and so does every
        # tensor computed from it before the Add (a name keeps its value across a rewrite)
        scaled = names.fresh(f"{node.output[0]}.bn_scaled")
        matmul = helper.make_node("MatMul", [node.input[0], w_name], [scaled], name=node.name or names.fresh(stem))
        insertions, rewired, rename = _renamed_readers(view, node.output[0], scaled, set(self.removed_nodes), names)
        after = []
        add_out = self.output if self.reshape is None else names.fresh(f"{stem}.biased")
        after.append(helper.make_node("Add", [rename.get(self.add_input, self.add_input), b_name], [add_out],
                                      name=names.fresh(f"{stem}.bn_bias")))
        if self.reshape is not None:
            kept = onnx.NodeProto()
            kept.CopyFrom(view.nodes[self.reshape])
            kept.input[0] = add_out
            after.append(kept)
        tensors = [(w_name, algebra.cast_like(self.weight, dtype)), (b_name, algebra.cast_like(self.bias, dtype))]
        return Rewrite(self.removed_nodes + rewired, [(self.matmul, [matmul])] + insertions + [(self.add_at, after)],
                       tensors, matmul.name)


_SHAPE_ONLY = ("Shape", "Size")  # their outputs depend on a tensor's shape, which the fold keeps


def _renamed_readers(view: GraphView, old: str, new: str, removed: set[int], names):
    """The nodes that read `old` (and, through layout ops, what they compute) and are not
    removed, copied to read `new`: (insertions, their indices, old name -> new name). A Shape
    or Size reader keeps its output names, their values unchanged; any other reader writes
    fresh names, as its values change with the input's."""
    rename = {old: new}
    insertions: list[tuple[int, list[onnx.NodeProto]]] = []
    rewired: list[int] = []
    stack = [old]
    while stack:
        name = stack.pop()
        for index, _ in view.consumers.get(name, ()):
            if index in removed or index in rewired:
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(view.nodes[index])
            copy.input[:] = [rename.get(n, n) for n in copy.input]
            if copy.op_type not in _SHAPE_ONLY:
                for k, out in enumerate(copy.output):
                    if out:
                        rename[out] = names.fresh(f"{out}.bn_scaled")
                        copy.output[k] = rename[out]
                        stack.append(out)
            rewired.append(index)
            insertions.append((index, [copy]))
    return insertions, rewired, rename


def producing_matmul(view: GraphView, bn: onnx.NodeProto) -> tuple[int, list[int]] | None:
    """The MatMul by a constant that computes the BN's input through layout ops, and those ops."""
    source, between = chain_up(view, bn.input[0])
    index = view.producer.get(source)
    if index is None:
        return None
    node = view.nodes[index]
    if not is_op(node, "MatMul") or len(node.input) != 2 or view.constant_shape(node.input[1]) is None:
        return None
    return index, between


def _check_private_chain(view: GraphView, matmul: onnx.NodeProto, between: list[int], bn: onnx.NodeProto) -> None:
    out = matmul.output[0]
    if out in view.graph_outputs:
        raise Skip("intermediate_is_output", f"MatMul output '{out}' is a graph output")
    others = [view.nodes[i] for i, _ in view.consumers.get(out, ()) if not is_op(view.nodes[i], "Shape")]
    if len(others) != 1:
        names = ", ".join(f"{n.op_type} '{n.name}'" for n in others)
        raise Skip("intermediate_shared", f"MatMul output '{out}' is read by {names}; folding the BN needs it private")
    for index in between:
        name = view.nodes[index].output[0]
        if name in view.graph_outputs:
            raise Skip("intermediate_is_output", f"'{name}' between MatMul '{matmul.name}' and BatchNormalization "
                       f"'{bn.name}' is a graph output")
        if not view.is_private(name):
            raise Skip("intermediate_shared", f"'{name}' between MatMul '{matmul.name}' and BatchNormalization "
                       f"'{bn.name}' has {len(view.consumers.get(name, ()))} uses; folding the BN needs it private")


def _dead_shapes(view: GraphView, matmul: onnx.NodeProto, gone: set[int]) -> list[int]:
    """The Shape nodes of the MatMul's output that only nodes in `gone` read (TorchScript's
    reshape_as): they would otherwise stay behind, unused, when the shape is dynamic."""
    return [i for i, _ in view.consumers.get(matmul.output[0], ()) if is_op(view.nodes[i], "Shape")
            and view.nodes[i].output[0] not in view.graph_outputs
            and all(user in gone for user, _ in view.consumers.get(view.nodes[i].output[0], ()))]


def analyze(view: GraphView, index: int, opset: int) -> MatMulBNFold | None:
    """The fold of BN node `index` into the MatMul before it; None when no MatMul by a constant
    computes its input; Skip when one does but the fold is not proved safe."""
    bn = view.nodes[index]
    found = producing_matmul(view, bn)
    if found is None:
        return None
    mm_index, between = found
    matmul = view.nodes[mm_index]
    scale, shift = bn_affine(view, bn, opset)
    weight = const(view, matmul.input[1], "weight", matmul)
    if weight.dtype not in FLOAT_DTYPES:
        raise Skip("dtype", f"MatMul '{matmul.name}' weight dtype {weight.dtype} is not float16/32/64")
    if weight.ndim < 2:
        raise Skip("bn_axis", f"MatMul '{matmul.name}' multiplies by a vector: its output has no feature axis "
                   f"for BatchNormalization '{bn.name}'")
    _check_private_chain(view, matmul, between, bn)
    features = weight.shape[-1]
    check_bn_axis(view, bn, scale.shape[0], matmul, matmul.output[0], -1, features, between)
    anchor = bn.name or bn.output[0]
    folded = weight.astype(np.float64) * scale
    source = matmul.output[0]
    end, after = chain_down(view, bn.output[0])
    through = [mm_index] + between + [index]

    def add_then(output: str, kept: int | None, removed: list[int]) -> MatMulBNFold:
        """Add(M, h) writes `output`, or feeds the Reshape `kept` (re-made) that writes it."""
        dead = _dead_shapes(view, matmul, set(removed) - {kept})
        return MatMulBNFold(anchor, mm_index, folded, shift, source, output, kept, max(removed), removed + dead)

    if between or after:
        if same_shape(view, source, end):                    # the reshapes cancel
            return add_then(end, None, through + after)
        if after and order_only_reshape(view, view.nodes[after[-1]]):  # one Reshape to a fixed shape does it all
            return add_then(end, after[-1], through + after)
        for k in range(len(after) - 1, -1, -1):              # they cancel part of the way
            out = view.nodes[after[k - 1]].output[0] if k else bn.output[0]
            if same_shape(view, source, out):
                return add_then(out, None, through + after[:k])
    rank = len(view.shape(bn.input[0]) or ())               # known: check_bn_axis read its trailing dims
    bias = shift.reshape((features,) + (1,) * (rank - 2))
    return MatMulBNFold(anchor, mm_index, folded, bias, bn.input[0], bn.output[0], None, index, [mm_index, index])


def find(view: GraphView, opset: int, options: dict | None = None) -> list[Candidate]:
    candidates: list[Candidate] = []
    if not view.of_type("MatMul"):
        return candidates  # no MatMul for a BN to fold into
    for index in view.of_type("BatchNormalization"):
        node = view.nodes[index]
        if not is_op(node, "BatchNormalization") or not node.input or not node.output:
            continue
        found = producing_matmul(view, node)
        if found is None:
            continue
        mm_index, between = found
        data = view.nodes[mm_index].input[0]
        if not between and not rank_ruled_out(view, data, 2) and tensor_rank(view, data) == 2:
            continue  # Linear -> BN1d on 2-D features: branch_sum makes it one Gemm
        candidate = Candidate(anchor=node.name or node.output[0], branch_labels=["matmul", "bn"])
        try:
            candidate.block = analyze(view, index, opset)
        except Skip as skip:
            candidate.reason = skip.reason
        candidates.append(candidate)
    return candidates


def materialize(match: MatMulBNFold, view: GraphView, names) -> Rewrite:
    return match.materialize(view, names)
