"""Sums of per-channel affine maps of tensors: the form the block rule matches.

A *linear node* is an affine function of its tensor inputs, the same on every
spatial position, given by constants:

    Add / Sum(a, b, ...)     a + b + ...
    Sub(a, b)                a - b
    Neg(a)                   -a
    Mul(a, c) / Mul(c, a)    a * c         (c constant)
    Div(a, c)                a / c         (c constant, no zero)
    BatchNormalization(a)    a * s + h     (inference mode: s = g/sqrt(v+eps), h = beta - m*s)

and the *value-preserving* nodes, a with factor 1 (rules/passthrough.py proves each one from
constants, element types and static shapes): Identity, inference Dropout, Cast to the same
type, Reshape/Flatten/Squeeze/Expand that keep the shape, Pad of zeros, one-input Concat/Sum,
and a * 1, a / 1, a + 0, a - 0 that keep a's shape. Exporters put them between the nodes of a
block (paddle2onnx writes an Identity after every elementwise op), so a tree absorbs them and
the block removes them with it. A tree of value-preserving nodes only is no block (removing a
lone Identity is a simplifier's job).

A *linear tree* is a root linear node and, recursively, every linear node whose only
use is as a tensor input of a node in the tree. It computes

    sum_i  (prod of factors_i) * leaf_i  +  sum_j (prod of factors_j) * constant_j

Factors are constants in ONNX broadcast form (checked to be per-channel later, when the
rank and channel count are known) or per-channel vectors from BN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx

from ..block import Reason
from ..graph import GraphView
from .common import Skip, bn_affine, bn_affines
from .passthrough import PASSTHROUGH_OPS, neutral_cheaply, passthrough_input

LINEAR_OPS = ("Add", "Sum", "Sub", "Neg", "Mul", "Div", "BatchNormalization")
_LINEAR = frozenset(LINEAR_OPS)
NEG_ONE = np.array(-1.0)


class Factor(NamedTuple):
    value: np.ndarray      # float64
    per_channel: bool      # True: a (C,) vector on axis 1; False: an ONNX-broadcast constant


@dataclass
class Expansion:
    """How one linear node combines its inputs: (input, local factors) and its own constants."""

    children: list[tuple[str, tuple[Factor, ...]]] = field(default_factory=list)
    offsets: list[Factor] = field(default_factory=list)
    problem: Reason | None = None  # looks linear (a BN) but is not usable: why
    passthrough: bool = False      # a value-preserving node: its one child, factor 1

    @property
    def usable(self) -> bool:
        return self.problem is None and bool(self.children)


@dataclass
class Addend:
    name: str                        # tensor name; "" for a constant produced by a node (BN shift)
    factors: tuple[Factor, ...]
    parent: int                      # index of the tree node that uses it (past value-preserving ones)
    constant: bool = False


@dataclass
class LinearTree:
    root: int
    nodes: list[int]
    leaves: list[Addend]             # tensor addends
    constants: list[Addend]          # constant addends (their value is the first factor)
    passthrough_only: bool = False   # every node is value-preserving: nothing to fuse


def expand(view: GraphView, node: onnx.NodeProto, opset: int, affine=None) -> Expansion | None:
    """The node as a linear combination, or None if it is not a linear node. `affine`: for a
    BatchNormalization, its bn_affine already computed (common.bn_affines: the pair, or the Skip)."""
    op = node.op_type
    source = passthrough_input(view, node, opset) if op in PASSTHROUGH_OPS else None
    if source is not None:
        return Expansion([(source, ())], passthrough=True)
    if op not in _LINEAR or node.domain not in ("", "ai.onnx") or len(node.output) < 1:
        return None
    inputs = list(node.input)
    if op in ("Add", "Sum"):
        return Expansion([(name, ()) for name in inputs if name]) if all(inputs) else None
    if op == "Sub" and len(inputs) == 2:
        return Expansion([(inputs[0], ()), (inputs[1], (Factor(NEG_ONE, False),))])
    if op == "Neg" and len(inputs) == 1:
        return Expansion([(inputs[0], (Factor(NEG_ONE, False),))])
    if op == "Mul" and len(inputs) == 2:
        first, second = (view.constant(name) for name in inputs)
        if first is not None and second is None:
            tensor, value = inputs[1], first
        elif second is not None and first is None:
            tensor, value = inputs[0], second
        else:
            return None
        if not np.issubdtype(value.dtype, np.floating):
            return None
        return Expansion([(tensor, (Factor(value.astype(np.float64), False),))])
    if op == "Div" and len(inputs) == 2:
        divisor = view.constant(inputs[1])
        if divisor is None or view.constant(inputs[0]) is not None or not np.issubdtype(divisor.dtype, np.floating):
            return None
        if np.any(divisor == 0):
            return None
        return Expansion([(inputs[0], (Factor(1.0 / divisor.astype(np.float64), False),))])
    if op == "BatchNormalization" and inputs:
        if affine is None:
            try:
                affine = bn_affine(view, node, opset)
            except Skip as skip:
                affine = skip
        return _bn_expansion(inputs[0], affine)
    return None


def _bn_expansion(x: str, affine) -> Expansion:
    """A BN of x as scale * x + shift, from its bn_affine (the pair, or the Skip it raised)."""
    if isinstance(affine, Skip):
        return Expansion(problem=affine.reason)
    scale, shift = affine
    return Expansion([(x, (Factor(scale, True),))], offsets=[Factor(shift, True)])


class LinearIndex:
    """Expansions of the linear nodes of a graph, and which of them are tree roots.

    One per view and opset: LinearIndex(view, opset) (or linear_index(view, opset)) builds
    it on first use and hands every later caller, every rule of the round, the same index.
    A node is expanded when first asked for: the linear ops when the roots are listed,
    a value-preserving node only when a tree or a root reaches it (its proof may read a
    static shape, which the pass then has to infer). Trees are kept once built; neither
    the index nor its trees may be changed by their readers."""

    def __new__(cls, view: GraphView, opset: int):
        return view.cached(f"linear_index/{opset}", lambda: super(LinearIndex, cls).__new__(cls)._build(view, opset))

    def _build(self, view: GraphView, opset: int) -> LinearIndex:
        self.view = view
        self.opset = opset
        self._cache: dict[int, Expansion | None] = {}
        self._trees: dict[int, LinearTree] = {}
        self._roots: list[int] | None = None
        self._relevant: dict[int, bool] = {}  # node -> relevant() of its component
        self._absorbed_names: dict[str, bool] = {}  # name -> _absorbed(name), once asked
        self._bns_done = False
        return self

    @property
    def expansions(self) -> Expansions:
        """The expansions as a mapping (made on each access: no reference cycle keeps the index,
        and through it its view, alive once the view has released it)."""
        return Expansions(self)

    def expansion(self, index: int) -> Expansion | None:
        """The node's expansion, or None if it is not a usable-looking linear node."""
        cache = self._cache
        if index in cache:
            return cache[index]
        view = self.view
        exp = None
        op = view.ops[index]
        if not self._bns_done and op == "BatchNormalization":
            self._expand_bns()
            return cache[index]
        if view.foldable_op(index) == "Add":
            # expand() of an Add of two tensors neither of which may be a constant: no neutral
            # operand (passthrough_input needs one), so the plain sum of its inputs
            inputs = view.inputs_of[index]
            if len(inputs) == 2 and inputs[0] and inputs[1] and view.outputs_of[index] and \
                    not view.may_be_constant(inputs[0]) and not view.may_be_constant(inputs[1]):
                exp = Expansion([(inputs[0], ()), (inputs[1], ())])
                cache[index] = exp
                return exp
        if op in _EXPANDABLE:
            exp = expand(view, view.nodes[index], self.opset)
            if exp is not None and exp.passthrough and view.is_constant_node(index):
                exp = None
        cache[index] = exp
        return exp

    def _expand_bns(self) -> None:
        """Every BatchNormalization's expansion at once: their arithmetic is one numpy call
        per channel count (common.bn_affines) instead of one per node."""
        self._bns_done = True
        view = self.view
        cache, inputs_of, outputs_of = self._cache, view.inputs_of, view.outputs_of
        indices = [i for i in view.of_type("BatchNormalization") if i not in cache]
        affines = bn_affines(view, indices, self.opset)
        for index, affine in zip(indices, affines):
            inputs = inputs_of[index]
            if view.foldable_op(index) is None or not outputs_of[index] or not inputs:
                cache[index] = expand(view, view.nodes[index], self.opset, affine)
            else:  # expand() of a BN, its affine given
                cache[index] = _bn_expansion(inputs[0], affine)

    def is_passthrough(self, index: int | None) -> bool:
        exp = self.expansion(index) if index is not None else None
        return exp is not None and exp.passthrough

    def origin(self, name: str) -> str:
        """The value `name` copies through value-preserving nodes (itself if none)."""
        producer = self.view.producer.get(name)
        if producer is None or not self.is_passthrough(producer):
            return name  # the common case, without the loop's bookkeeping
        seen = set()
        while name not in seen:
            seen.add(name)
            producer = self.view.producer.get(name)
            if producer is None or not self.is_passthrough(producer):
                break
            name = self.expansion(producer).children[0][0]  # type: ignore[union-attr]
        return name

    def dead_chain(self, name: str, stop: str, removed: set[int]) -> list[int]:
        """The value-preserving nodes from `stop` to `name` that only `removed` nodes read
        (through `name`): once those go, these compute nothing used. Stops at a graph output."""
        chain: list[int] = []
        while name != stop:
            producer = self.view.producer.get(name)
            if producer is None or not self.is_passthrough(producer) or producer in removed \
                    or name in self.view.graph_outputs:
                break
            uses = self.view.consumers.get(name, ())
            if not uses or any(i not in removed and i not in chain for i, _ in uses):
                break
            chain.append(producer)
            name = self.expansion(producer).children[0][0]  # type: ignore[union-attr]
        return chain

    def usable(self, index: int | None) -> bool:
        exp = self.expansion(index) if index is not None else None
        return exp is not None and exp.usable

    def _absorbed(self, name: str) -> bool:
        """Is tensor `name` an inner edge of some tree (privately used as a tensor input of a linear node)?"""
        known = self._absorbed_names.get(name)
        if known is None:
            known = self._absorbed_names[name] = self._find_absorbed(name)
        return known

    def _find_absorbed(self, name: str) -> bool:
        view = self.view
        uses = view.consumers.get(name)
        if not uses or len(uses) != 1 or name in view.graph_outputs:  # not view.is_private(name)
            return False
        exp = self.expansion(uses[0][0])
        if exp is None or exp.problem is not None or not exp.children:  # not usable
            return False
        for child, _ in exp.children:
            if child == name:
                return True
        return False

    def roots(self) -> list[int]:
        """The roots of the trees that hold a linear node other than a value-preserving one, in
        graph order: from each such node, up through the nodes that absorb it (a tree of
        value-preserving nodes only is nothing to fuse, and is not listed).

        Only trees that some rule could match are listed (see relevant()): the linear nodes of
        shape arithmetic or of an attention score are not even expanded, so their constants,
        which only inferred shapes could give, are never asked for. A neutral op (x + 0, x * 1)
        that the cheap shapes (cheap_shapes.py) say keeps x's shape is no root either: with
        onnx's shapes it is value-preserving, and if onnx could not tell, only the trees it
        would start are lost (ruled out, not proved: any tree that reaches it asks onnx)."""
        if self._roots is None:
            view = self.view
            top: dict[int, int] = {}  # node -> the root above it (each path is climbed once)
            for index in view.of_type(*LINEAR_OPS):
                if view.shape_questions:
                    break  # a view without shapes read one: its round is redone with shapes, this ends it
                if index in top or not self.relevant(index) or neutral_cheaply(view, index):
                    continue
                exp = self.expansion(index)
                if exp is None or not exp.usable or exp.passthrough:
                    continue
                path = [index]
                while path[-1] not in top and self._absorbed(view.outputs_of[path[-1]][0]):
                    path.append(view.consumers[view.outputs_of[path[-1]][0]][0][0])
                root = top.get(path[-1], path[-1])
                for node in path:
                    top[node] = root
            self._roots = sorted(set(top.values()))
        return self._roots

    def relevant(self, index: int) -> bool:
        """Could a tree holding node `index` be matched by some rule? Read from the structure
        alone (no constant or shape is asked for): the nodes a tree can hold form a component,
        linked by values with one use that the consumer may read as a tree child (its data
        input; any input of Add, Sum, Sub, Mul) between ops that may be linear or
        value-preserving, and every rule needs one of them to be a BatchNormalization, to read a
        value made by a layer (Conv, ConvTranspose, Gemm, MatMul, AveragePool,
        BatchNormalization: a branch), or to feed the data input of a Conv, ConvTranspose, Gemm,
        or MatMul whose weight may be constant (a layer the affine folds into). A component with
        none of these is skipped."""
        known = self._relevant.get(index)
        if known is None:
            known = self._explore(index)
        return known

    def _explore(self, start: int) -> bool:
        """Walk start's component until something makes it relevant; record what was met."""
        view = self.view
        ops, inputs_of, outputs_of, producer, consumers = (view.ops, view.inputs_of, view.outputs_of,
                                                           view.producer, view.consumers)
        met = [start]
        seen = {start}
        relevant = False
        position = 0
        while position < len(met) and not relevant:
            node = met[position]
            position += 1
            if ops[node] == "BatchNormalization":
                relevant = True
                break
            any_slot = ops[node] in _ANY_SLOT
            for slot, name in enumerate(inputs_of[node]):
                source = producer.get(name) if name else None
                if source is None:
                    continue
                op = ops[source]
                if op in _BRANCH_OPS:
                    relevant = True
                    break
                if (slot == 0 or any_slot) and op in _TREE_OPS and source not in seen and view.is_private(name):
                    seen.add(source)
                    met.append(source)
            if relevant:
                break
            outputs = outputs_of[node]
            out = outputs[0] if outputs else ""
            uses = consumers.get(out, ()) if out else ()
            for user, slot in uses:
                op = ops[user]
                if slot == 0 and (op in _FOLDS_INTO or (op == "MatMul" and len(inputs_of[user]) > 1
                                                       and view.may_be_constant(inputs_of[user][1]))):
                    relevant = True
                    break
            if relevant:
                break
            if len(uses) == 1 and out not in view.graph_outputs:
                user, slot = uses[0]
                if (slot == 0 or (slot > 0 and ops[user] in _ANY_SLOT)) and ops[user] in _TREE_OPS and user not in seen:
                    seen.add(user)
                    met.append(user)
        # Every node met is in start's component: relevant if it is; otherwise the walk met all of it.
        for node in met:
            self._relevant[node] = relevant
        return relevant

    def tree(self, root: int) -> LinearTree:
        if root not in self._trees:
            self._trees[root] = self._tree(root)
        return self._trees[root]

    def _tree(self, root: int) -> LinearTree:
        view = self.view
        may_be_constant, producer_of, expansion, absorbed = (view.may_be_constant, view.producer.get, self.expansion,
                                                             self._absorbed)
        nodes, leaves, constants = [root], [], []
        passthrough_only = True
        # (name, factors, parent): a leaf's parent is the nearest node above it that is not
        # value-preserving (the root if all are), so BN(Identity(x)) is a BN branch. A node is
        # expanded where it is reached (its constants, then its children on the stack, the first
        # on top), which is the order a stack of nodes and names would visit them in.
        stack: list[tuple] = []
        index, outer, above = root, (), root
        while True:
            if index >= 0:
                exp = expansion(index)
                assert exp is not None
                if exp.passthrough:
                    parent = above
                else:
                    parent = index
                    passthrough_only = False
                for offset in exp.offsets:
                    constants.append(Addend("", (offset,) + outer, index, True))
                for name, local in reversed(exp.children):
                    stack.append((name, local + outer, parent))
                index = -1
            if not stack:
                break
            name, factors, parent = stack.pop()
            value = view.constant(name) if may_be_constant(name) else None  # (constant() is None otherwise)
            if value is not None:
                if np.issubdtype(value.dtype, np.floating):
                    constants.append(Addend(name, (Factor(value.astype(np.float64), False),) + factors, parent, True))
                else:
                    leaves.append(Addend(name, factors, parent))
                continue
            child = producer_of(name)
            if child is not None:
                exp = expansion(child)
                if exp is not None and exp.problem is None and exp.children and absorbed(name):  # usable(child)
                    nodes.append(child)
                    index, outer, above = child, factors, parent
                    continue
            leaves.append(Addend(name, factors, parent))
        return LinearTree(root, nodes, leaves, constants, passthrough_only)


class Expansions:
    """LinearIndex.expansions, read as a mapping {node index: Expansion} and filled on demand.
    Iterating it lists the linear ops' expansions (LINEAR_OPS); a value-preserving node of
    another type is expanded when asked for by index."""

    def __init__(self, index: LinearIndex):
        self._index = index

    def get(self, index: int | None, default=None):
        exp = self._index.expansion(index) if index is not None else None
        return default if exp is None else exp

    def __getitem__(self, index: int) -> Expansion:
        exp = self._index.expansion(index)
        if exp is None:
            raise KeyError(index)
        return exp

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self._index.expansion(index) is not None

    def items(self):
        for i in self._index.view.of_type(*LINEAR_OPS):
            exp = self._index.expansion(i)
            if exp is not None:
                yield i, exp


_EXPANDABLE = frozenset(LINEAR_OPS) | frozenset(PASSTHROUGH_OPS)
# Ops whose output a rule may read as a branch (a tree leaf), and ops a tree may fold into.
_BRANCH_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool", "BatchNormalization"})
_FOLDS_INTO = frozenset({"Conv", "ConvTranspose", "Gemm"})
# Ops a tree can hold (Unsqueeze is never value-preserving), and those whose tree child may be
# any input (the others' is their data input, input 0).
_TREE_OPS = _EXPANDABLE - {"Unsqueeze"}
_ANY_SLOT = frozenset({"Add", "Sum", "Sub", "Mul"})


def linear_index(view: GraphView, opset: int) -> LinearIndex:
    """The view's LinearIndex, built on first use and shared by every rule of the round."""
    return LinearIndex(view, opset)


def feature_vector(factors: tuple[Factor, ...], features: int, what: str) -> np.ndarray:
    """The product of constant factors as one (features,) vector on the LAST axis, or Skip."""
    vec = np.ones(features)
    for f in factors:
        value = np.asarray(f.value, dtype=np.float64)
        if f.per_channel:
            raise Skip("not_per_channel", f"{what}: a BatchNormalization works on axis 1, not on the features")
        if value.ndim > 2 or any(d != 1 for d in value.shape[:-1]) or (value.ndim and value.shape[-1] not in (1, features)):
            raise Skip("not_per_channel", f"{what}: constant of shape {value.shape} is not per feature (.., {features})")
        vec = vec * value.reshape(-1)
    return vec


def keeps_shape(tree: LinearTree, shape: tuple[int, ...] | None, unknown_rank_limit: int = 1) -> bool:
    """Whether the tree's factors and constants broadcast into `shape` (-1: an unknown dim)
    without growing it: right-aligned, each of their dims is 1 or the (known) dim of `shape`.
    With `shape` None only constants of rank <= unknown_rank_limit pass (a tensor of unknown
    rank has at least that many axes)."""
    values = [f.value for f in tree.leaves[0].factors] + [f.value for c in tree.constants for f in c.factors]
    if shape is None:
        return all(np.ndim(v) <= unknown_rank_limit for v in values)
    for value in values:
        dims = np.shape(value)
        if len(dims) > len(shape):
            return False
        if any(c != 1 and (d < 0 or d != c) for d, c in zip(shape[len(shape) - len(dims):], dims)):
            return False
    return True


def channel_vector(factors: tuple[Factor, ...], rank: int, channels: int, what: str, copy: bool = True) -> np.ndarray:
    """Multiply factors into one (channels,) vector for a tensor of `rank`, or Skip. A new array,
    unless `copy` is False (a caller that only reads it: one per-channel factor is then returned
    as it is)."""
    vector = per_channel_vector(factors, channels)
    if vector is not None:  # = ones * value, elementwise exact
        return vector.astype(np.float64, copy=copy)
    vec = np.ones(channels)
    for f in factors:
        value = np.asarray(f.value, dtype=np.float64)
        if f.per_channel:
            if value.shape not in ((channels,), (1,)):
                raise Skip("channel_mismatch", f"{what}: a BatchNormalization of {value.shape[0]} channels "
                           f"on {channels} channels")
            vec = vec * value
            continue
        if value.ndim > rank:
            raise Skip("not_per_channel", f"{what}: constant of shape {value.shape} broadcasts beyond rank {rank}")
        shape = (1,) * (rank - value.ndim) + value.shape
        if shape[0] != 1 or any(s != 1 for s in shape[2:]) or shape[1] not in (1, channels):
            raise Skip("not_per_channel", f"{what}: constant of shape {value.shape} is not per-channel "
                       f"(1, {channels}, 1, ...)")
        vec = vec * value.reshape(-1)
    return vec


def per_channel_vector(factors: tuple[Factor, ...], channels: int) -> np.ndarray | None:
    """The one factor when it is a per-channel vector of `channels` (a BN's: what channel_vector
    returns, as a float64 array, without checks); else None."""
    if len(factors) == 1:
        factor = factors[0]
        if factor.per_channel and factor.value.shape == (channels,):
            return factor.value
    return None


def constant_bias(constants: list[Addend], rank: int, channels: int) -> tuple[np.ndarray, list[str]]:
    """Sum the per-channel constant addends into one bias vector.

    A plain constant addend that is not per-channel (a positional embedding, say) cannot go
    into a bias: its name is returned, to stay an addend of the sum. Scaled ones Skip.
    """
    bias = np.zeros(channels)
    kept: list[str] = []
    for c in constants:
        vector = per_channel_vector(c.factors, channels)
        if vector is not None:  # (channel_vector's first case, without building its message)
            bias = bias + vector.astype(np.float64, copy=False)
            continue
        try:
            bias = bias + channel_vector(c.factors, rank, channels, f"constant '{c.name or 'BN shift'}'", copy=False)
        except Skip:
            if not c.name or len(c.factors) != 1:
                raise
            kept.append(c.name)
    return bias, kept


def addend_scale(factors: tuple[Factor, ...], rank: int) -> np.ndarray:
    """The product of an addend's factors as one constant in ONNX broadcast form, for an
    addend that stays in the sum as Mul(addend, scale). Per-channel factors (from BN) act on
    axis 1 of a tensor of `rank`."""
    scale = np.ones(())
    for f in factors:
        value = np.asarray(f.value, dtype=np.float64)
        if f.per_channel:
            value = value.reshape((-1,) + (1,) * (rank - 2))
        scale = scale * value
    return scale
