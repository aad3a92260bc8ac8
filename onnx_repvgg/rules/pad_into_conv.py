"""A zero Pad in front of Conv nodes folded into their pads (ZeroPad2d / F.pad + Conv).

Canonical form for matching: once the Pad is gone, the convs read X itself, so branches
that padded X their own way can be summed by branch_sum in the next round.

Preconditions: default-domain Pad in constant mode with value 0 (or none); constant,
non-negative pads that leave the batch and channel axes alone; every use of its output is
the data input of a Conv with explicit pads (auto_pad NOTSET or VALID); not a graph output.
Formula: Conv(Pad(x, p), pads=q) = Conv(x, pads=p+q), axis by axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..block import Candidate, Rewrite
from ..graph import GraphView, attribute
from .common import Skip, check_window, data_consumers, is_op

NAME = "pad_into_conv"
NEAR_MISS = False  # a Pad that is not a zero padding is no re-parameterization block


@dataclass
class PadFold:
    anchor: str
    pad: int
    input: str
    consumers: list[tuple[int, list[int]]]  # (conv node index, new pads)
    removed_nodes: list[int]

    def materialize(self, view: GraphView, names) -> Rewrite:
        insertions = []
        for index, pads in self.consumers:
            node = view.nodes[index]
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.input[0] = self.input
            for attr in list(new.attribute):
                if attr.name in ("pads", "auto_pad"):
                    new.attribute.remove(attr)
            new.attribute.append(onnx.helper.make_attribute("pads", pads))
            insertions.append((index, [new]))
        return Rewrite(self.removed_nodes, insertions, [], insertions[0][1][0].name)


def _pad_amounts(view: GraphView, node: onnx.NodeProto, opset: int) -> list[int]:
    mode = attribute(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise Skip("pad_mode", f"Pad '{node.name}' has mode {mode}: not a zero padding")
    if opset < 11:
        pads = list(attribute(node, "pads", []))
        value = float(attribute(node, "value", 0.0))
    else:
        given = view.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if given is None:
            raise Skip("non_constant", f"pads of Pad '{node.name}' are not constant")
        pads = [int(v) for v in given.reshape(-1)]
        value = 0.0
        if len(node.input) > 2 and node.input[2]:
            constant = view.constant(node.input[2])
            if constant is None or constant.size != 1:
                raise Skip("non_constant", f"the pad value of Pad '{node.name}' is not a constant")
            value = float(constant.reshape(-1)[0])
        if len(node.input) > 3 and node.input[3]:
            raise Skip("pad_axes", f"Pad '{node.name}' pads chosen axes; not folded")
    if value != 0.0:
        raise Skip("pad_value", f"Pad '{node.name}' pads with {value}, not 0")
    if any(p < 0 for p in pads) or len(pads) % 2:
        raise Skip("pad_value", f"Pad '{node.name}' crops (negative pads) or is malformed")
    return pads


def find(view: GraphView, opset: int, options: dict | None = None):
    for index in view.of_type("Pad"):
        node = view.nodes[index]
        if not is_op(node, "Pad"):
            continue
        users = data_consumers(view, node, "Conv")
        if users is None:
            continue
        out = node.output[0]
        uses = [(i, 0) for i in users]
        candidate = Candidate(anchor=node.name or out, branch_labels=["pad", "conv"])
        try:
            pads = _pad_amounts(view, node, opset)
            rank = len(pads) // 2
            if rank < 3 or any(pads[a] or pads[a + rank] for a in (0, 1)):
                raise Skip("pad_axes", f"Pad '{node.name}' pads the batch or channel axis")
            spatial_begin, spatial_end = pads[2:rank], pads[rank + 2:]
            folds = []
            for i, _ in uses:
                conv = view.nodes[i]
                auto_pad = attribute(conv, "auto_pad", b"NOTSET")
                auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
                if auto_pad not in ("NOTSET", "VALID"):
                    raise Skip("auto_pad", f"Conv '{conv.name}' after Pad '{node.name}' has auto_pad={auto_pad}")
                own = [0] * (2 * (rank - 2)) if auto_pad == "VALID" else list(attribute(conv, "pads", [0] * (2 * (rank - 2))))
                if len(own) != 2 * (rank - 2):
                    raise Skip("rank_mismatch", f"Pad '{node.name}' is {rank}-D, Conv '{conv.name}' is not")
                check_window(f"Conv '{conv.name}'", tuple(attribute(conv, "strides", [1] * (rank - 2))),
                             tuple(attribute(conv, "dilations", [1] * (rank - 2))), tuple(own))
                begin, end = own[:rank - 2], own[rank - 2:]
                new = [a + b for a, b in zip(begin, spatial_begin)] + [a + b for a, b in zip(end, spatial_end)]
                folds.append((i, new))
        except Skip as skip:
            candidate.reason = skip.reason
        else:
            candidate.block = PadFold(candidate.anchor, index, node.input[0], folds, [index] + [i for i, _ in folds])
        yield candidate


def materialize(match: PadFold, view: GraphView, names) -> Rewrite:
    return match.materialize(view, names)
