"""Every BatchNormalization left beside a Conv, Gemm or MatMul, with the reason it stays.

Run once per graph after the rules reach their fixed point, so that a report of "0 skipped"
never hides a BN that sits next to a linear layer and was not folded. A BN neighbours a
layer when the layer computes its input, or reads its output, directly or through layout
ops (Reshape, Flatten, Squeeze, Unsqueeze, Identity). BNs a rule already reported (by the
BN's own anchor, or by the anchor of the sum it is part of) are not reported again.

The reason is the first failing precondition of the fold that would have removed the BN:
into the layer before it (branch_sum for a Conv or Gemm, bn_into_matmul for a MatMul), then
into the layers after it (bn_into_consumer); `constant` when it computes a constant (the rules
leave constant subgraphs to constant folding); `not_folded` when none fails (e.g. a rule that
would fold it was not run).
"""

from __future__ import annotations

import onnx

from ..block import Candidate, Reason
from ..graph import GraphView
from . import bn_consumer, token_bn
from .common import Skip, bn_affine, const, conv_params, is_op
from .layout import chain_up, is_layout, via
from .linear_tree import LINEAR_OPS

LAYERS = ("Conv", "Gemm", "MatMul")


def _producer(view: GraphView, bn: onnx.NodeProto) -> tuple[int, list[int]] | None:
    source, between = chain_up(view, bn.input[0])
    index = view.producer.get(source)
    return (index, between) if index is not None and is_op(view.nodes[index], *LAYERS) else None


def _consumers(view: GraphView, bn: onnx.NodeProto) -> list[int]:
    """Layers that read the BN's output, directly or through layout ops (any input slot)."""
    found, stack, seen = [], [bn.output[0]], set()
    while stack:
        name = stack.pop()
        for index, _ in view.consumers.get(name, ()):
            node = view.nodes[index]
            if is_op(node, *LAYERS):
                found.append(index)
            elif is_layout(node) and node.output[0] not in seen:
                seen.add(node.output[0])
                stack.append(node.output[0])
    return sorted(set(found))


def _tree_root(view: GraphView, index: int) -> onnx.NodeProto:
    """The outermost linear node (Add, Mul, BN, ...) the BN's output flows into privately:
    the anchor under which branch_sum reports the sum the BN belongs to."""
    node = view.nodes[index]
    for _ in range(len(view.nodes)):
        out = node.output[0]
        if not view.is_private(out):
            break
        user, slot = view.consumers[out][0]
        if slot < 0 or not is_op(view.nodes[user], *LINEAR_OPS):
            break
        node = view.nodes[user]
    return node


def _producer_reason(view: GraphView, index: int, opset: int, producer: tuple[int, list[int]]) -> Reason | None:
    bn = view.nodes[index]
    layer, between = view.nodes[producer[0]], producer[1]
    if layer.op_type == "MatMul":
        try:
            fold = token_bn.analyze(view, index, opset)
        except Skip as skip:
            return skip.reason
        if fold is None:
            weight = layer.input[1] if len(layer.input) > 1 else ""
            where = "a graph input" if weight in view.graph_inputs else "computed at run time"
            return Reason("non_constant", f"MatMul '{layer.name}' before BatchNormalization '{bn.name}' has no "
                          f"constant weight to fold the BN into ('{weight}' is {where})")
        return None
    if between:
        return Reason("bn_layout", f"{layer.op_type} '{layer.name}' reaches BatchNormalization '{bn.name}'"
                      f"{via(view, between)}; a BN folds through layout ops only into a MatMul before it")
    out = layer.output[0]
    if out in view.graph_outputs:
        return Reason("intermediate_is_output", f"{layer.op_type} output '{out}' is a graph output")
    if not view.is_private(out):
        return Reason("intermediate_shared", f"{layer.op_type} output '{out}' has {len(view.consumers.get(out, ()))} "
                      f"uses; folding BatchNormalization '{bn.name}' into it needs it private")
    try:
        if layer.op_type == "Conv":
            conv_params(view, layer)
        elif len(layer.input) > 1:
            const(view, layer.input[1], "weight", layer)
    except Skip as skip:
        return skip.reason
    return None


def _consumer_reason(view: GraphView, index: int, opset: int) -> Reason | None:
    try:
        bn_consumer.analyze(view, index, opset)
    except Skip as skip:
        return skip.reason
    return None


def unrecorded(view: GraphView, opset: int, recorded: set[str]) -> list[Candidate]:
    """A skipped Candidate, with its reason, for each BN beside a layer that no record names."""
    candidates = []
    for index in view.of_type("BatchNormalization"):
        node = view.nodes[index]
        if not is_op(node, "BatchNormalization") or not node.input or not node.output:
            continue
        anchor = node.name or node.output[0]
        root = _tree_root(view, index)
        if anchor in recorded or (root.name or root.output[0]) in recorded:
            continue
        producer, consumers = _producer(view, node), _consumers(view, node)
        if producer is None and not consumers:
            continue
        labels = ([view.nodes[producer[0]].op_type.lower()] if producer else []) + ["bn"] + sorted(
            {view.nodes[i].op_type.lower() for i in consumers})
        reason = None
        try:
            bn_affine(view, node, opset)
        except Skip as skip:
            reason = skip.reason
        if reason is None and producer is not None:
            reason = _producer_reason(view, index, opset, producer)
        if reason is None and consumers:
            reason = _consumer_reason(view, index, opset)
        if reason is None and view.is_constant_node(index):
            reason = Reason("constant", f"BatchNormalization '{node.name}' computes a constant (its input is computed "
                            "from constants only): constant folding (onnxsim, onnxruntime's optimizer) removes it, "
                            "with the layers beside it")
        if reason is None:
            neighbours = [view.nodes[producer[0]]] if producer else []
            neighbours += [view.nodes[i] for i in consumers]
            names = ", ".join(f"{n.op_type} '{n.name}'" for n in neighbours)
            reason = Reason("not_folded", f"BatchNormalization '{node.name}' beside {names} was not folded by the "
                            "rules run")
        candidates.append(Candidate(anchor=anchor, branch_labels=labels, reason=reason))
    return candidates
