"""Which tensors may differ by more than rounding when an upstream value moves by rounding.

A fusion changes float results in their last bits. Downstream of a *discontinuous* op (TopK's
indices, ArgMax, NonMaxSuppression, comparisons, Round/Floor/Ceil, casts to integers,
quantization) such a change can flip a choice: near-tied scores swap order, a box crosses a
threshold, and the tensors that the choice selects or gates differ by whole rows. Those
tensors are not comparable under a float tolerance; the proof rests on the block checks and on
the continuous tensors before them.

`not_comparable(graph, changed)` follows the tensors the fusion changed forward through the
graph and returns, for each tensor past a discontinuous op that one of them reaches, the op
that made it so ("after TopK '/head/TopK'"). An op whose inputs the fusion does not reach
(shape arithmetic on constants, say) computes the same thing in both models.
"""

from __future__ import annotations

import onnx

from ..graph import subgraphs_of
from .changes import node_inputs

# op type -> which outputs jump when the inputs move a little (None: all of them)
_DISCONTINUOUS: dict[str, tuple[int, ...] | None] = {
    "TopK": (1,), "MaxPool": (1,), "ArgMax": None, "ArgMin": None, "NonMaxSuppression": None, "NonZero": None,
    "Greater": None, "Less": None, "Equal": None, "GreaterOrEqual": None, "LessOrEqual": None,
    "Round": None, "Floor": None, "Ceil": None, "Sign": None, "Hardmax": None, "Unique": None, "Mod": None,
    "IsNaN": None, "IsInf": None, "QuantizeLinear": None, "DynamicQuantizeLinear": None, "BitShift": None,
    "RoiAlign": None, "GridSample": None, "Resize": None,
}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _jumping_outputs(node: onnx.NodeProto) -> list[str]:
    """The outputs of `node` that can jump when a float input moves by rounding."""
    if node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type == "Cast" or node.op_type == "CastLike":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return list(node.output) if node.op_type == "Cast" and to not in _FLOAT_TYPES else []
    if node.op_type in ("Resize", "GridSample", "RoiAlign"):
        # sampling positions computed from data (not from constants) make the output jump
        return list(node.output) if len(node.input) > 1 else []
    if node.op_type not in _DISCONTINUOUS:
        return []
    slots = _DISCONTINUOUS[node.op_type]
    return [out for i, out in enumerate(node.output) if out and (slots is None or i in slots)]


def _jump_inside(node: onnx.NodeProto) -> str | None:
    """The first op in the subgraphs a node holds (If, Loop, Scan bodies, at any depth) whose
    outputs can jump, as "<Op> '<node>'"; None when there is none."""
    for sub in subgraphs_of(node):
        for inner in sub.node:
            if _jumping_outputs(inner):
                return f"{inner.op_type} '{inner.name or inner.output[0]}'"
            deeper = _jump_inside(inner)
            if deeper is not None:
                return deeper
    return None


def not_comparable(graph: onnx.GraphProto, changed: set[str]) -> dict[str, str]:
    """{tensor: "after <Op> '<node>'"} for every tensor downstream of a discontinuous op that a
    changed tensor reaches. The graph's nodes are in topological order (ONNX requires it)."""
    moved = set(changed)
    jumped: dict[str, str] = {}
    for node in graph.node:
        reads = node_inputs(node)
        origin = next((jumped[name] for name in reads if name in jumped), None)
        if origin is not None:
            for out in node.output:
                if out:
                    jumped[out] = origin
            continue
        if not any(name in moved for name in reads):
            continue
        if node.op_type in ("Resize", "GridSample", "RoiAlign"):
            # only the data input may move: sizes, scales and positions come from elsewhere
            if not any(name in moved for name in node.input[1:] if name):
                moved.update(out for out in node.output if out)
                continue
        jumping = _jumping_outputs(node)
        label = f"after {node.op_type} '{node.name or node.output[0]}'"
        inner = None if jumping else _jump_inside(node)
        if inner is not None:  # a choice made in a body (a Loop of ArgMax picks): every output may jump
            jumping = [out for out in node.output if out]
            label += f" ({inner} inside)"
        for out in jumping:
            jumped[out] = label
        moved.update(out for out in node.output if out and out not in jumped)
    return jumped
