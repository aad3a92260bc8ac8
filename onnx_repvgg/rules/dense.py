"""Branches that are Gemm (nn.Linear) of one 2-D tensor X, summed -> one Gemm.

Covers a Linear followed by BatchNorm1d, and distillation heads averaged at inference,
(head(x) + head_dist(x)) / 2, as RepViT/LeViT-style classifiers deploy them.

Preconditions: every Gemm has transA=0, a constant B and a constant C that is a scalar or
a per-output vector; all Gemms map the same in -> out features; an identity branch needs
in == out; every scale and constant is per-output-feature.
Formula: Gemm(X) = X @ W^T + b with W = alpha * B'^T (out, in), b = beta * C. Then
W_fused = sum_i s_i * W_i (+ diag(t) for identities), b_fused = sum_i s_i * b_i + constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import helper

from .. import algebra, rewrite
from ..block import Rewrite
from ..graph import GraphView
from .common import FLOAT_DTYPES, NotWorthIt, Skip, gemm_params, rank_ruled_out, tensor_rank
from .linear_tree import LinearTree, channel_vector, constant_bias


@dataclass
class DenseBlock:
    anchor: str
    root_output: str
    input: str
    weight: np.ndarray              # (out, in) float64
    bias: np.ndarray                # (out,) float64
    dtype: np.dtype
    removed_nodes: list[int]
    other_leaves: list[str] = field(default_factory=list)
    name_hint: str = ""

    def materialize(self, view: GraphView, names) -> Rewrite:
        stem = self.name_hint or self.anchor
        w_name, b_name = names.fresh(f"{stem}.fused_weight"), names.fresh(f"{stem}.fused_bias")
        out = rewrite.fused_output(self, names)
        node = helper.make_node("Gemm", [self.input, w_name, b_name], [out], name=self.name_hint or names.fresh(stem), transB=1)
        rest, _ = rewrite.rest_of_sum(self, out, names)
        nodes = [node] + rest
        tensors = [(w_name, algebra.cast_like(self.weight, self.dtype)),
                   (b_name, algebra.cast_like(self.bias, self.dtype))]
        return Rewrite(self.removed_nodes, [(view.producer[self.root_output], nodes)], tensors, node.name)


def gemm_weight_bias(view: GraphView, index: int) -> tuple[np.ndarray, np.ndarray]:
    """A Gemm (or a MatMul of a 2-D X by a constant) as X @ W^T + b with W (out, in) and
    b (out,) in float64, or Skip. A MatMul that is not that is simply not a candidate."""
    node = view.nodes[index]
    if node.op_type == "MatMul":
        b = view.constant(node.input[1]) if len(node.input) > 1 else None
        if b is None or b.ndim != 2 or b.dtype not in FLOAT_DTYPES or rank_ruled_out(view, node.input[0], 2) \
                or tensor_rank(view, node.input[0]) != 2:
            raise NotWorthIt()  # attention products, batched matmuls: not a linear layer here
        return b.T.astype(np.float64), np.zeros(b.shape[1])
    p = gemm_params(view, node)
    return p.weight.T * p.alpha, p.bias * p.beta


def build_dense_block(view: GraphView, tree: LinearTree, x: str, branches, others) -> DenseBlock:
    for other in others:
        if other.factors:
            raise Skip("scaled_addend", f"addend '{other.name}' is scaled inside the sum but is not a branch of '{x}'")
    dtype = None
    weights = []
    for b in branches:
        if b.kind == "conv":
            w, bias = gemm_weight_bias(view, b.node)
            weights.append((b, w, bias))
            dt = view.constant_dtype(view.nodes[b.node].input[1])
            if dtype is not None and dt != dtype:
                raise Skip("dtype", f"Gemm branches mix {dtype} and {dt}")
            dtype = dt
    out, inp = weights[0][1].shape
    for b, w, _ in weights:
        if w.shape != (out, inp):
            raise Skip("channel_mismatch", f"Gemm '{view.nodes[b.node].name}' maps {w.shape[1]} -> {w.shape[0]}, "
                       f"the first branch {inp} -> {out}")
    total_w = np.zeros((out, inp))
    total_b = np.zeros(out)
    for b, w, bias in weights:
        s = channel_vector(b.addend.factors, 2, out, f"branch '{b.addend.name}'")
        total_w += w * s[:, None]
        total_b += bias * s
    for b in branches:
        if b.kind == "identity":
            if inp != out:
                raise Skip("identity_channels", f"identity branch '{x}' needs in == out features, the Gemms map {inp} -> {out}")
            s = channel_vector(b.addend.factors, 2, out, f"identity branch '{x}'")
            total_w += np.diag(s)
    bias, kept = constant_bias(tree.constants, 2, out)
    total_b += bias
    other_names = [o.name for o in others] + kept
    root = view.nodes[tree.root]
    if dtype is None:
        raise NotWorthIt()  # no Gemm branch
    removed = list(tree.nodes) + [b.node for b, _, _ in weights]
    if len(removed) <= 1 + len(other_names):
        raise NotWorthIt()
    return DenseBlock(root.name or root.output[0], root.output[0], x, total_w, total_b, dtype, removed,
                      other_names, view.nodes[weights[0][0].node].name)
