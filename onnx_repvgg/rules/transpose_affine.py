"""An elementwise affine map by constants taken through a Transpose, onto another Transpose of
the same tensor (tf2onnx's NHWC identity branch).

    Transpose(affine(x)), Transpose(x)  ->  affine'(Transpose(x))      one Transpose fewer

tf2onnx writes a Keras BatchNormalization(fused=False) on an NHWC graph input as x * s + t
before the input's Transpose to NCHW, beside the conv branches' own Transpose of x; once the
affine reads that Transpose, the sum of branches is one of the tensor the convs read, and
branch_sum fuses it.

Preconditions: both Transposes are default-domain with the same explicit perm; the affine is a
chain of Mul/Add/Sub/Div nodes, each by a constant of rank <= len(perm) on either side, whose
intermediate values have one use and are not graph outputs (the chain's output is read by the
first Transpose alone).
Formula: elementwise ops commute with a permutation of axes when the constant is permuted too:
Transpose(x op c, perm) = Transpose(x, perm) op Transpose(c', perm), with c' = c with leading
1s to rank len(perm) (numpy broadcasting); the constant keeps its side and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..block import Candidate, Rewrite
from ..graph import GraphView, attribute
from .common import is_op

NAME = "transpose_affine"
NEAR_MISS = False  # an affine before a Transpose is no re-parameterization block
_AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
_MAX_CHAIN = 8


@dataclass
class ChainNode:
    index: int
    op: str
    constant: np.ndarray        # permuted to the Transpose's output layout
    constant_first: bool        # the constant is the op's first input (c - x, c / x)


@dataclass
class TransposeAffine:
    anchor: str
    transpose: int              # the Transpose of the affine's output (removed)
    shared: int                 # the other Transpose of x: the affine reads it from now on
    move_shared: bool           # it comes after the first in the graph: moved up before the affine
    chain: list[ChainNode]      # from x outwards
    removed_nodes: list[int]

    def materialize(self, view: GraphView, names) -> Rewrite:
        shared = view.nodes[self.shared]
        new: list[onnx.NodeProto] = []
        if self.move_shared:
            copy = onnx.NodeProto()
            copy.CopyFrom(shared)
            new.append(copy)
        current = shared.output[0]
        out = view.nodes[self.transpose].output[0]
        tensors = []
        for position, link in enumerate(self.chain):
            node = view.nodes[link.index]
            stem = node.name or node.output[0]
            c_name = names.fresh(f"{stem}.transposed_constant")
            tensors.append((c_name, link.constant))
            target = out if position == len(self.chain) - 1 else names.fresh(f"{stem}.transposed")
            inputs = [c_name, current] if link.constant_first else [current, c_name]
            new.append(helper.make_node(link.op, inputs, [target], name=names.fresh(node.name or link.op)))
            current = target
        return Rewrite(self.removed_nodes, [(self.transpose, new)], tensors, new[-1].name)


def _perm(node: onnx.NodeProto) -> tuple[int, ...] | None:
    perm = attribute(node, "perm")
    return tuple(int(p) for p in perm) if perm is not None else None


def _chain(view: GraphView, start: str) -> tuple[str, list[tuple[int, int]]] | None:
    """Walk up from `start` through private Mul/Add/Sub/Div nodes with one input that may be a
    constant: (x, [(node, position of its constant input)] from x outwards), or None. Asks no
    question (may_be_constant): constants are read only for a chain that meets a shared Transpose."""
    links: list[tuple[int, int]] = []
    name = start
    while len(links) < _MAX_CHAIN:
        index = view.producer.get(name)
        if index is None:
            break
        node = view.nodes[index]
        if node.op_type not in _AFFINE_OPS or not is_op(node, node.op_type) or len(node.input) != 2:
            break
        if name != start and not view.is_private(name):
            break
        maybe = [view.may_be_constant(i) for i in node.input]
        if maybe[0] == maybe[1]:
            break  # both may be constant (a constant, not an affine of x) or neither
        side = 0 if maybe[0] else 1
        links.append((index, side))
        name = node.input[1 - side]
    if not links:
        return None
    links.reverse()
    return name, links


def _constants(view: GraphView, links: list[tuple[int, int]], perm: tuple[int, ...]) -> list[ChainNode] | None:
    """Each link's constant, with leading 1s to rank len(perm) and permuted; None when one is not
    a constant after all, or has a higher rank."""
    rank = len(perm)
    chain = []
    for index, side in links:
        node = view.nodes[index]
        constant = view.constant(node.input[side])
        if constant is None or constant.ndim > rank:
            return None
        full = constant.reshape((1,) * (rank - constant.ndim) + constant.shape)
        chain.append(ChainNode(index, node.op_type, np.ascontiguousarray(np.transpose(full, perm)), side == 0))
    return chain


def find(view: GraphView, opset: int, options: dict | None = None):
    transposes = view.of_type("Transpose")
    if len(transposes) < 2:
        return
    readers: dict[str, list[int]] = {}  # tensor -> the Transposes that read it
    for index in transposes:
        readers.setdefault(view.inputs_of[index][0], []).append(index)
    for index in transposes:
        node = view.nodes[index]
        producer = view.producer.get(node.input[0])
        if producer is None or view.ops[producer] not in _AFFINE_OPS or not is_op(node, "Transpose"):
            continue  # the common case, decided without reading an attribute
        if not view.is_private(node.input[0]):
            continue
        found = _chain(view, node.input[0])
        if found is None:
            continue
        x, links = found
        perm = _perm(node)
        others = [i for i in readers.get(x, []) if i != index and is_op(view.nodes[i], "Transpose")
                  and _perm(view.nodes[i]) == perm] if perm is not None else []
        chain = _constants(view, links, perm) if others and perm is not None else None
        if chain is None:
            continue
        shared = others[0]
        removed = [link.index for link in chain] + [index] + ([shared] if shared > index else [])
        yield Candidate(anchor=node.name or node.output[0], branch_labels=["affine", "transpose"],
                        block=TransposeAffine(node.name or node.output[0], index, shared, shared > index, chain,
                                              removed))


def materialize(match: TransposeAffine, view: GraphView, names) -> Rewrite:
    return match.materialize(view, names)
