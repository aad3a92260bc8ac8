"""What branch_sum leaves after a MatMul or a Gemm: a scale over token features, an addend as C.

    MatMul(x, W) * s [+ t]   -> MatMul(x, W * s) [+ t']      x of rank >= 3 (tokens); s, t per feature
    a * Gemm(A, B) + c * T   -> Gemm(A, B, T, alpha * a, beta = c)   (onnxruntime's GemmSumFusion)
    a * MatMul(A, B) + c * T -> Gemm(A, B, T, alpha = a, beta = c)   A of rank 2

A 2-D MatMul followed by per-feature constants is branch_sum's (one Gemm). Here:

1. A linear tree of Mul/Div/Add/Sub/Neg by constants (no BatchNormalization) over the output of
   one MatMul by a constant matrix whose input has rank >= 3 (or unknown rank, with every
   constant of rank <= 2): the scale goes into W's columns, and a shift stays as one Add. Only
   when that removes a node: MatMul -> Add(bias) alone is already the deploy form.
2. A sum of a Gemm without C (or a MatMul of a 2-D A) and one other tensor T, each scaled by a
   scalar at most: T becomes the Gemm's C input when it broadcasts to the Gemm's output
   ([M, N], proved from static shapes).

Preconditions: the MatMul's or Gemm's output has no other use and is not a graph output;
constants per feature (the last axis); T is not a constant (branch_sum folds constants).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper

from .. import algebra
from ..block import Candidate, Rewrite
from ..cheap_shapes import CheapShapes
from ..graph import GraphView, attribute, attributes
from .common import FLOAT_DTYPES, NotWorthIt, Skip, is_op, rank_ruled_out, tensor_rank
from .linear_tree import Addend, LinearIndex, LinearTree, feature_vector, keeps_shape

NAME = "dense_affine"
NEAR_MISS = False


@dataclass
class ScaledMatMul:
    anchor: str
    root_output: str
    input: str
    weight: np.ndarray          # (in, out) float64
    shift: np.ndarray | None
    dtype: np.dtype
    removed_nodes: list[int]
    name_hint: str

    def materialize(self, view: GraphView, names) -> Rewrite:
        stem = self.name_hint or self.anchor
        w_name = names.fresh(f"{stem}.scaled_weight")
        name = self.name_hint or names.fresh(stem)
        tensors = [(w_name, algebra.cast_like(self.weight, self.dtype))]
        if self.shift is None:
            nodes = [helper.make_node("MatMul", [self.input, w_name], [self.root_output], name=name)]
        else:
            b_name = names.fresh(f"{stem}.scaled_bias")
            product = names.fresh(f"{stem}.product")
            tensors.append((b_name, algebra.cast_like(self.shift, self.dtype)))
            nodes = [helper.make_node("MatMul", [self.input, w_name], [product], name=name),
                     helper.make_node("Add", [product, b_name], [self.root_output], name=names.fresh(f"{stem}.bias"))]
        return Rewrite(self.removed_nodes, [(view.producer[self.root_output], nodes)], tensors, name)


@dataclass
class AddendAsC:
    anchor: str
    root_output: str
    layer: int                  # the Gemm or MatMul node
    addend: str                 # T
    alpha: float
    beta: float
    removed_nodes: list[int]

    def materialize(self, view: GraphView, names) -> Rewrite:
        node = view.nodes[self.layer]
        attrs = attributes(node) if node.op_type == "Gemm" else {}
        attrs.update(alpha=self.alpha, beta=self.beta)
        name = names.fresh(node.name or node.op_type)
        gemm = helper.make_node("Gemm", [node.input[0], node.input[1], self.addend], [self.root_output], name=name,
                                **attrs)
        return Rewrite(self.removed_nodes, [(view.producer[self.root_output], [gemm])], [], name)


def _scalar(addend: Addend) -> float | None:
    """The product of an addend's factors when every one is a scalar of rank <= 2 (one that
    cannot raise the rank of a Gemm's [M, N] output), else None."""
    value = 1.0
    for f in addend.factors:
        array = np.asarray(f.value, dtype=np.float64)
        if f.per_channel or array.size != 1 or array.ndim > 2:
            return None
        value *= float(array.reshape(-1)[0])
    return value


def _scaled_matmul(view: GraphView, tree: LinearTree, root: int) -> ScaledMatMul | None:
    leaf = tree.leaves[0]
    producer = view.producer.get(leaf.name)
    if producer is None or not is_op(view.nodes[producer], "MatMul") or not view.is_private(leaf.name):
        return None
    matmul = view.nodes[producer]
    w = view.constant(matmul.input[1]) if len(matmul.input) > 1 else None
    if w is None or w.dtype not in FLOAT_DTYPES or w.ndim != 2:
        return None
    cheap = CheapShapes.of(view).rank(matmul.input[0])
    if cheap is not None and cheap <= 2:
        return None  # ruled out: of rank 2 or less (branch_sum's), or unknown (then the shapes stop it)
    if any(f.per_channel for f in leaf.factors) or any(f.per_channel for c in tree.constants for f in c.factors):
        return None
    # What needs no shape first: a tree this rule would not rewrite asks none.
    features = w.shape[1]
    skip = None
    try:
        scale = feature_vector(leaf.factors, features, f"scale of '{leaf.name}'")
        shift = np.zeros(features)
        for c in tree.constants:
            shift = shift + feature_vector(c.factors, features, f"constant '{c.name}'")
    except Skip as error:
        skip = error
    if skip is None and len(tree.nodes) <= int(bool(np.any(shift != 0))):
        raise NotWorthIt()  # MatMul -> Add alone: the deploy form already
    rank = tensor_rank(view, matmul.input[0]) if cheap is None else None  # a cheap rank >= 3 rules out <= 2
    if rank is not None and rank <= 2:
        return None  # branch_sum makes one Gemm of it
    if not keeps_shape(tree, view.shape(leaf.name)):
        return None  # a constant that would broadcast the product into another shape
    if skip is not None:
        raise skip
    shifted = bool(np.any(shift != 0))
    root_node = view.nodes[root]
    return ScaledMatMul(root_node.name or root_node.output[0], root_node.output[0], matmul.input[0],
                        w.astype(np.float64) * scale[None, :], shift if shifted else None, w.dtype,
                        list(tree.nodes) + [producer], matmul.name)


def _broadcasts_to(shape: tuple[int, ...] | None, target: tuple[int, int]) -> bool:
    """Unidirectional broadcast of `shape` to [M, N], every dim known where it must be."""
    if shape is None or len(shape) > 2:
        return False
    padded = (1,) * (2 - len(shape)) + tuple(shape)
    return all(d == 1 or (d >= 0 and d == t) for d, t in zip(padded, target))


def _addend_as_c(view: GraphView, tree: LinearTree, root: int) -> AddendAsC | None:
    if len(tree.leaves) != 2 or tree.constants:
        return None
    for layer_leaf, other in (tree.leaves, tree.leaves[::-1]):
        producer = view.producer.get(layer_leaf.name)
        if producer is None or not is_op(view.nodes[producer], "Gemm", "MatMul"):
            continue
        node = view.nodes[producer]
        a, c = _scalar(layer_leaf), _scalar(other)
        if a is None or c is None or not view.is_private(layer_leaf.name) or view.constant(other.name) is not None:
            continue
        if node.op_type == "Gemm" and (len(node.input) > 2 and node.input[2]):
            continue  # it has a C already
        if node.op_type == "MatMul" and (rank_ruled_out(view, node.input[0], 2) or tensor_rank(view, node.input[0]) != 2):
            continue
        a_shape, b_shape = view.shape(node.input[0]), view.shape(node.input[1])
        if a_shape is None or b_shape is None or len(a_shape) != 2 or len(b_shape) != 2:
            continue
        trans_a = node.op_type == "Gemm" and int(attribute(node, "transA", 0)) == 1
        trans_b = node.op_type == "Gemm" and int(attribute(node, "transB", 0)) == 1
        target = (a_shape[1] if trans_a else a_shape[0], b_shape[0] if trans_b else b_shape[1])
        if not _broadcasts_to(view.shape(other.name), target):
            continue
        alpha = float(attribute(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        root_node = view.nodes[root]
        return AddendAsC(root_node.name or root_node.output[0], root_node.output[0], producer, other.name,
                         alpha * a, c, list(tree.nodes) + [producer])
    return None


def find(view: GraphView, opset: int, options: dict | None = None):
    index = LinearIndex(view, opset)
    for root in index.roots():
        tree = index.tree(root)
        if tree.passthrough_only or any(view.foldable_op(i) == "BatchNormalization" for i in tree.nodes):
            continue
        if not tree.leaves or any(not leaf.name for leaf in tree.leaves):
            continue
        node = view.nodes[root]
        if len(tree.leaves) == 1:
            candidate = Candidate(anchor=node.name or node.output[0], branch_labels=["matmul", "affine"])
            try:
                match = _scaled_matmul(view, tree, root)
            except NotWorthIt:
                continue
            except Skip as skip:
                candidate.reason = skip.reason
                yield candidate
                continue
            if match is not None:
                candidate.block = match
                yield candidate
            continue
        addend = _addend_as_c(view, tree, root)
        if addend is not None:
            yield Candidate(anchor=addend.anchor, branch_labels=["gemm", "addend"], block=addend)


def materialize(match, view: GraphView, names) -> Rewrite:
    return match.materialize(view, names)
