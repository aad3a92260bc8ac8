"""An affine map of a tensor by constants, folded into the Conv/Gemm/MatMul nodes that read it.

    Conv(x * s [+ t]) -> Conv'(x)        (onnxsim folds a Mul before a Conv; t only without padding)
    Gemm(x * s + t)   -> Gemm'(x)
    MatMul(x * s + t, W) -> MatMul(x, W') [+ b']   (a Gemm for a 2-D x; onnxruntime's FusedMatMul alpha)

The affine map is a linear tree (rules/linear_tree.py) of Mul/Div/Add/Sub/Neg by constants over
one tensor x, without a BatchNormalization (bn_into_consumer folds those); s and t are per
input channel (axis 1) of a Conv's input, per feature (the last axis) of a Gemm's or MatMul's.

Preconditions: every use of the tree's output is the data input of a Conv, of a Gemm with
transA=0, or of a MatMul by a constant matrix; weights and biases constant; a Conv that pads
its input folds only a scale (a padded border reads 0, and 0 * s = 0, but not t); the fold
removes more nodes than it adds (an N-D MatMul keeps the shift as an Add after it).
Formula (algebra.fold_input_affine_conv / fold_input_affine_dense):
    Conv:  W'[o, i] = W[o, i] * s[c(i)],  b'[o] = b[o] + sum_{i, taps} W[o, i] * t[c(i)]
    dense: W' = diag(s) W,  b' = b + t @ W     (W as (in, out); a Gemm's alpha and beta kept)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import algebra
from ..block import Candidate, Rewrite
from ..graph import GraphView
from .common import FLOAT_DTYPES, NotWorthIt, Skip, conv_params, data_consumers, gemm_params, is_op, rank_ruled_out, tensor_rank
from .consumer_nodes import NewNames, rewritten_consumer
from .linear_tree import LinearIndex, LinearTree, channel_vector, feature_vector, keeps_shape

NAME = "affine_into_consumer"
NEAR_MISS = False  # a scale or shift that cannot fold is no re-parameterization block


@dataclass
class ConsumerChange:
    index: int                  # the consumer node
    weight: np.ndarray          # float64, in the consumer's own layout
    bias: np.ndarray | None     # float64; None: the consumer gets no bias
    dtype: np.dtype
    as_gemm: bool = False       # a 2-D MatMul given a bias becomes a Gemm


@dataclass
class AffineFold:
    anchor: str
    input: str                  # x, which the consumers read from now on
    changes: list[ConsumerChange]
    removed_nodes: list[int]

    def materialize(self, view: GraphView, names) -> Rewrite:
        insertions, tensors = [], []
        first = ""
        for change in self.changes:
            node = view.nodes[change.index]
            stem = node.name or node.output[0]
            w_name = names.fresh(f"{stem}.affine_folded_weight")
            b_name = names.fresh(f"{stem}.affine_folded_bias") if change.bias is not None else ""
            name = names.fresh(node.name or node.op_type)
            first = first or name
            tensors.append((w_name, algebra.cast_like(change.weight, change.dtype)))
            if change.bias is not None:
                tensors.append((b_name, algebra.cast_like(change.bias, change.dtype)))
            split = node.op_type == "MatMul" and bool(b_name) and not change.as_gemm
            new_names = NewNames(name, w_name, b_name,
                                 product=names.fresh(f"{name}.product") if split else "",
                                 bias_node=names.fresh(f"{name}.bias") if split else "")
            new = rewritten_consumer(node, self.input, new_names, change.as_gemm)
            insertions.append((change.index, new))
        return Rewrite(self.removed_nodes, insertions, tensors, first)


def _known_shape(view: GraphView, x: str, rank: int | None, axis: int, size: int) -> tuple[int, ...] | None:
    """x's static shape, or what the consumer says of it: its rank, and `size` on `axis`."""
    shape = view.shape(x)
    if shape is not None:
        return shape
    if rank is None:
        return None
    return tuple(size if a == axis % rank else -1 for a in range(rank))


def _conv_change(view: GraphView, index: int, tree: LinearTree, x: str) -> ConsumerChange:
    node = view.nodes[index]
    p = conv_params(view, node)
    cin = p.weight.shape[1] * p.group
    rank = p.weight.ndim
    if not keeps_shape(tree, _known_shape(view, x, rank, 1, cin)):
        raise NotWorthIt()  # the map would broadcast x into another shape than the Conv reads
    scale = channel_vector(tree.leaves[0].factors, rank, cin, f"scale of '{x}'")
    shift = np.zeros(cin)
    for c in tree.constants:
        shift = shift + channel_vector(c.factors, rank, cin, f"constant '{c.name}'")
    shifted = bool(np.any(shift != 0))
    if shifted and (any(p.pads_begin) or any(p.pads_end)):
        raise Skip("consumer_padding", f"Conv '{node.name}' pads its input: the border would read 0, not the shift")
    weight, bias = algebra.fold_input_affine_conv(p.weight, p.bias, p.group, scale, shift)
    keep_bias = p.bias is not None or shifted
    return ConsumerChange(index, weight, bias if keep_bias else None, p.weight.dtype)


def _dense_change(view: GraphView, index: int, tree: LinearTree, x: str) -> ConsumerChange:
    node = view.nodes[index]
    if node.op_type == "Gemm":
        p = gemm_params(view, node)
        w_eff, dtype = p.weight, p.dtype
    else:
        w = view.constant(node.input[1]) if len(node.input) > 1 else None
        if w is None or w.dtype not in FLOAT_DTYPES or w.ndim != 2:
            raise NotWorthIt()  # attention products (two activations) and batched matmuls are not layers
        w_eff, dtype = w.astype(np.float64), w.dtype
    features = w_eff.shape[0]
    if not keeps_shape(tree, _known_shape(view, x, 2 if node.op_type == "Gemm" else None, -1, features)):
        raise NotWorthIt()  # the map would broadcast x into another shape than the layer reads
    scale = feature_vector(tree.leaves[0].factors, features, f"scale of '{x}'")
    shift = np.zeros(features)
    for c in tree.constants:
        shift = shift + feature_vector(c.factors, features, f"constant '{c.name}'")
    shifted = bool(np.any(shift != 0))
    if node.op_type == "MatMul":
        weight, bias = algebra.fold_input_affine_dense(w_eff, None, scale, shift)
        as_gemm = shifted and not rank_ruled_out(view, x, 2) and tensor_rank(view, x) == 2
        return ConsumerChange(index, weight, bias if shifted else None, dtype, as_gemm)
    weight, bias = algebra.fold_input_affine_dense(w_eff, p.beta * p.bias, scale, p.alpha * shift)
    return ConsumerChange(index, weight.T if p.trans_b else weight, bias if p.has_bias or shifted else None, dtype)


def _matched(view: GraphView, index: LinearIndex, root: int) -> tuple[LinearTree, list[int]] | None:
    """The tree at `root` if it is an affine map of one tensor read only by layers."""
    tree = index.tree(root)
    if tree.passthrough_only or len(tree.leaves) != 1 or not tree.leaves[0].name:
        return None
    if any(is_op(view.nodes[i], "BatchNormalization") for i in tree.nodes):
        return None  # bn_into_consumer
    users = data_consumers(view, view.nodes[root], "Conv", "Gemm", "MatMul")
    if not users or view.constant(tree.leaves[0].name) is not None:
        return None
    return tree, users


def find(view: GraphView, opset: int, options: dict | None = None):
    index = LinearIndex(view, opset)
    for root in index.roots():
        matched = _matched(view, index, root)
        if matched is None:
            continue
        tree, users = matched
        x = tree.leaves[0].name
        node = view.nodes[root]
        kinds = sorted({view.nodes[i].op_type.lower() for i in users})
        candidate = Candidate(anchor=node.name or node.output[0], branch_labels=["affine"] + kinds)
        try:
            changes = []
            for i in users:
                change = _conv_change if view.nodes[i].op_type == "Conv" else _dense_change
                changes.append(change(view, i, tree, x))
            added = sum(1 for i, ch in zip(users, changes) if view.nodes[i].op_type == "MatMul"
                        and ch.bias is not None and not ch.as_gemm)
            if len(tree.nodes) <= added:
                raise NotWorthIt()
        except NotWorthIt:
            continue
        except Skip as skip:
            candidate.reason = skip.reason
        else:
            candidate.block = AffineFold(candidate.anchor, x, changes, list(tree.nodes) + users)
        yield candidate


def materialize(match: AffineFold, view: GraphView, names) -> Rewrite:
    return match.materialize(view, names)
