"""A standalone BatchNormalization folded into the Conv/Gemm nodes that consume it.

    Conv(BN(X)) -> Conv'(X),  Gemm(BN(X)) -> Gemm'(X)      (BN1d -> Linear heads, BN -> 1x1 conv)

A BN right after a Conv is folded by the branch_sum rule (into its producer); this rule
takes the BNs that sit before their consumers instead.

Preconditions: BN in inference mode with constant parameters; every use of its output
is the data input of a Conv with no padding (a padded border would read zeros, not
BN(0) = shift) or of a Gemm with transA=0; weights and biases constant; the BN output is
not a graph output.
Formula, with BN(x) = s*x + h per input channel c:
    Conv: W'[o, i, ...] = W[o, i, ...] * s[c(i)],  b'[o] = b[o] + sum_{i,k} W[o, i, k] * h[c(i)]
    Gemm: B'_eff = diag(s) @ B_eff,  C' = beta*C + alpha * h @ B_eff,  beta' = 1
where c(i) = g*(Cin/groups) + i for the group g of output o.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .. import algebra
from ..block import Candidate, Rewrite
from ..graph import GraphView, attribute
from .common import Skip, bn_affine, const, conv_params, data_consumers, is_op, tensor_rank

NAME = "bn_into_consumer"


@dataclass
class ConsumerFold:
    anchor: str
    bn: int
    input: str
    consumers: list[tuple[int, np.ndarray, np.ndarray]]  # (node index, new weight, new bias), float64
    removed_nodes: list[int]

    def materialize(self, view: GraphView, names) -> Rewrite:
        insertions, tensors = [], []
        for index, weight, bias in self.consumers:
            node = view.nodes[index]
            dtype = view.constant_dtype(node.input[1])
            w_name = names.fresh(f"{node.name or node.output[0]}.bn_folded_weight")
            b_name = names.fresh(f"{node.name or node.output[0]}.bn_folded_bias")
            if node.op_type == "MatMul":  # with a bias now, it is a Gemm
                new = helper.make_node("Gemm", [self.input, w_name, b_name], list(node.output), transB=0)
            else:
                new = onnx.NodeProto()
                new.CopyFrom(node)
                del new.input[:]
                new.input.extend([self.input, w_name, b_name])
            if node.op_type == "Gemm":
                for attr in list(new.attribute):
                    if attr.name == "beta":
                        new.attribute.remove(attr)
            new.name = names.fresh(node.name or node.op_type)
            tensors += [(w_name, algebra.cast_like(weight, dtype)), (b_name, algebra.cast_like(bias, dtype))]
            insertions.append((index, [new]))
        return Rewrite(self.removed_nodes, insertions, tensors, insertions[0][1][0].name)


def _fold_into_conv(view: GraphView, index: int, scale, shift):
    node = view.nodes[index]
    p = conv_params(view, node)
    if any(p.pads_begin) or any(p.pads_end):
        raise Skip("consumer_padding", f"Conv '{node.name}' pads its input: the border would read 0, not the BN's shift")
    cout, cpg = p.weight.shape[:2]
    if cpg * p.group != scale.shape[0]:
        raise Skip("channel_mismatch", f"Conv '{node.name}' reads {cpg * p.group} channels, the BN has {scale.shape[0]}")
    w = p.weight.astype(np.float64)
    outs_per_group = cout // p.group
    # channel of (o, i) is group(o)*cpg + i
    channel = (np.arange(cout)[:, None] // outs_per_group) * cpg + np.arange(cpg)[None, :]
    shape = (cout, cpg) + (1,) * (w.ndim - 2)
    new_w = w * scale[channel].reshape(shape)
    bias = np.zeros(cout) if p.bias is None else p.bias.astype(np.float64)
    new_b = bias + (w * shift[channel].reshape(shape)).reshape(cout, -1).sum(axis=1)
    return new_w, new_b


def _fold_into_gemm(view: GraphView, index: int, scale, shift):
    node = view.nodes[index]
    if int(attribute(node, "transA", 0)) != 0:
        raise Skip("gemm_transA", f"Gemm '{node.name}' transposes its input (transA=1)")
    b = const(view, node.input[1], "weight", node).astype(np.float64)
    trans_b = int(attribute(node, "transB", 0))
    b_eff = b.T if trans_b else b  # (in, out)
    if b_eff.shape[0] != scale.shape[0]:
        raise Skip("channel_mismatch", f"Gemm '{node.name}' reads {b_eff.shape[0]} features, the BN has {scale.shape[0]}")
    out = b_eff.shape[1]
    alpha = float(attribute(node, "alpha", 1.0))
    beta = float(attribute(node, "beta", 1.0))
    c = np.zeros(out)
    if len(node.input) > 2 and node.input[2]:
        value = const(view, node.input[2], "bias", node).astype(np.float64)
        if value.size == 1:
            c = np.full(out, value.reshape(-1)[0])
        elif value.shape in ((out,), (1, out)):
            c = value.reshape(-1)
        else:
            raise Skip("not_per_channel", f"Gemm '{node.name}' bias of shape {value.shape} is not per-output")
    new_eff = b_eff * scale[:, None]
    new_c = beta * c + alpha * (shift @ b_eff)
    return (new_eff.T if trans_b else new_eff), new_c


def _fold_into_matmul(view: GraphView, index: int, scale, shift):
    """MatMul(BN(X), B) for 2-D X = X @ (diag(s) B) + h @ B: a Gemm with transB=0."""
    node = view.nodes[index]
    b = view.constant(node.input[1]).astype(np.float64)  # (in, out)
    if b.shape[0] != scale.shape[0]:
        raise Skip("channel_mismatch", f"MatMul '{node.name}' reads {b.shape[0]} features, the BN has {scale.shape[0]}")
    return b * scale[:, None], shift @ b


def find(view: GraphView, opset: int, options: dict | None = None) -> list[Candidate]:
    candidates = []
    for index, node in enumerate(view.nodes):
        if not is_op(node, "BatchNormalization"):
            continue
        users = data_consumers(view, node, "Conv", "Gemm", "MatMul")
        if users is None:
            continue
        if any(view.nodes[i].op_type == "MatMul" for i in users) and (
                tensor_rank(view, node.input[0]) != 2
                or any(view.constant(view.nodes[i].input[1]) is None for i in users if view.nodes[i].op_type == "MatMul")):
            continue  # BN1d before a MatMul folds only for a 2-D input and a constant matrix
        out = node.output[0]
        uses = [(i, 0) for i in users]
        consumers = [view.nodes[i] for i in users]
        kinds = sorted({c.op_type.lower() for c in consumers})
        candidate = Candidate(anchor=node.name or out, branch_labels=["bn"] + [k.replace("gemm", "linear") for k in kinds])
        try:
            scale, shift = bn_affine(view, node, opset)
            folds = []
            for (ci, _), c in zip(uses, consumers):
                fold = {"Conv": _fold_into_conv, "Gemm": _fold_into_gemm, "MatMul": _fold_into_matmul}[c.op_type]
                w, b = fold(view, ci, scale, shift)
                folds.append((ci, w, b))
        except Skip as skip:
            candidate.reason = skip.reason
        else:
            candidate.block = ConsumerFold(candidate.anchor, index, node.input[0], folds,
                                           [index] + [ci for ci, _, _ in folds])
        candidates.append(candidate)
    return candidates


def materialize(match: ConsumerFold, view: GraphView, names) -> Rewrite:
    return match.materialize(view, names)
