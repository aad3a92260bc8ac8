"""What changed between an original graph and its fused form, as regions checkable alone.

Every node of the fused graph that does not appear, byte for byte, in the original is new.
New nodes that feed each other form a *region*: the fused block (its Conv, and the Adds of
addends left in the sum). A region reads activation tensors both graphs have (the block's
input X, other addends) and constants, and writes tensors both graphs have (the fusion takes
over the root's output name). Its *original* is the set of original nodes computing those
outputs from those inputs: a walk back from the outputs that stops at the inputs and at
constants. A region whose original reaches any other non-constant tensor (or whose outputs
are new names) cannot be checked alone, and says why.

Nothing here reads a weight: regions hold names; the proof builds the two small models.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import onnx

from ..graph import subgraphs_of

_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
MAX_ORIGINAL_NODES = 5000  # a walk back that grows past this is not a block


@dataclass
class Region:
    fused_nodes: list[int]                 # node indices in the fused graph, in graph order
    inputs: list[str] = field(default_factory=list)    # activation tensors read (both graphs have them)
    outputs: list[str] = field(default_factory=list)   # tensors written that the rest reads
    original_nodes: list[int] = field(default_factory=list)  # node indices in the original graph
    problem: str | None = None             # why it cannot be checked alone

    def names(self, graph: onnx.GraphProto) -> list[str]:
        return [graph.node[i].name or graph.node[i].output[0] for i in self.fused_nodes]


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the enclosing scopes (not defined inside it)."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name and name not in defined)
        for sub in subgraphs_of(node):
            used |= outer_names(sub) - defined
        defined.update(out for out in node.output if out)
    used.update(v.name for v in graph.output if v.name not in defined)
    return used


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """What a node reads: its inputs and its subgraphs' captures from the enclosing graph."""
    names = [name for name in node.input if name]
    for sub in subgraphs_of(node):
        names.extend(sorted(outer_names(sub)))
    return names


class GraphIndex:
    """Producers, readers and constant tensors of one graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer: dict[str, int] = {}
        self.readers: dict[str, list[int]] = defaultdict(list)
        self.inputs_of: list[list[str]] = []
        for index, node in enumerate(graph.node):
            reads = node_inputs(node)
            self.inputs_of.append(reads)
            for name in reads:
                self.readers[name].append(index)
            for out in node.output:
                if out:
                    self.producer[out] = index
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.initializers = {t.name for t in graph.initializer} - self.graph_inputs
        self.constant = set(self.initializers)
        for index, node in enumerate(graph.node):  # outputs computed from constants only
            if node.op_type in _RANDOM_OPS or any(True for _ in subgraphs_of(node)):
                continue
            if all(name in self.constant for name in self.inputs_of[index]):
                self.constant.update(out for out in node.output if out)

    def constant_nodes_for(self, names) -> set[int]:
        """The nodes computing these constant tensors (back to initializers)."""
        found: set[int] = set()
        stack = [n for n in names if n in self.constant]
        while stack:
            index = self.producer.get(stack.pop())
            if index is None or index in found:
                continue
            found.add(index)
            stack.extend(n for n in self.inputs_of[index] if n in self.constant)
        return found


def _node_keys(graph: onnx.GraphProto) -> dict[bytes, int]:
    keys: dict[bytes, int] = defaultdict(int)
    for node in graph.node:
        keys[node.SerializeToString(deterministic=True)] += 1
    return keys


def find_regions(original: onnx.GraphProto, fused: onnx.GraphProto) -> list[Region]:
    """The regions of new nodes in `fused`, each with its original in `original`."""
    unmatched: dict[bytes, list[int]] = defaultdict(list)  # original nodes by content
    for index, node in enumerate(original.node):
        unmatched[node.SerializeToString(deterministic=True)].append(index)
    new: list[int] = []
    kept: dict[int, int] = {}  # fused index -> the same node's index in the original
    for index, node in enumerate(fused.node):
        twins = unmatched.get(node.SerializeToString(deterministic=True))
        if twins:
            kept[index] = twins.pop(0)
        else:
            new.append(index)
    if not new:
        return []
    fused_index, original_index = GraphIndex(fused), GraphIndex(original)
    new_set = set(new)
    # New nodes joined by the tensors one writes and another reads (union-find).
    parent = {i: i for i in new}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in new:
        for name in fused_index.inputs_of[i]:
            j = fused_index.producer.get(name)
            if j in new_set:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in new:
        groups[root(i)].append(i)
    pairs = Kept(kept, set(kept.values()))
    regions = [_describe(sorted(members), fused_index, original_index, pairs) for members in groups.values()]
    regions.sort(key=lambda r: r.fused_nodes[0])
    return regions


@dataclass
class Kept:
    """Nodes both graphs have, unchanged: fused index -> original index, and the original ones."""

    fused_to_original: dict[int, int]
    original: set[int]


MAX_BOUNDARY_NODES = 200  # kept nodes a region may take in to reach its original's inputs


def _describe(members: list[int], fused: GraphIndex, original: GraphIndex, kept: Kept) -> Region:
    region = Region(members)
    inside = set(members)
    written = {out for i in members for out in fused.graph.node[i].output if out}
    reads: list[str] = []
    for i in members:
        reads.extend(name for name in fused.inputs_of[i] if name not in written)
    region.inputs = [name for name in dict.fromkeys(reads) if name not in fused.constant]
    region.outputs = [name for name in sorted(written)
                      if name in fused.graph_outputs or any(r not in inside for r in fused.readers.get(name, ()))]
    for name in region.outputs:
        if name not in original.producer and name not in original.graph_inputs:
            region.problem = f"it writes '{name}', which the original does not have"
            return region
    for name in region.inputs:
        if name not in original.producer and name not in original.graph_inputs:
            region.problem = f"it reads '{name}', which the original does not have"
            return region
    found, boundary, problem = _walk_back(original, region.outputs, set(region.inputs), kept.original)
    if problem:
        region.problem = problem
        return region
    if boundary:
        # The original reads tensors the fused block does not (e.g. a second Identity copy of
        # X that the fusion made dead): both sides start from the same tensors, the fused one
        # taking in the unchanged nodes that compute its inputs from them.
        extra, problem = _reach(fused, kept, [n for n in region.inputs if n not in boundary], boundary)
        if problem:
            region.problem = (f"the original computes {', '.join(repr(o) for o in region.outputs)} from "
                              f"'{sorted(boundary)[0]}', which the fused block does not read ({problem})")
            return region
        region.fused_nodes = sorted(set(region.fused_nodes) | extra)
        found |= {kept.fused_to_original[i] for i in extra}
        region.inputs = sorted(_external_reads(fused, region.fused_nodes) | boundary)
    region.original_nodes = sorted(found)
    return region


def _walk_back(graph: GraphIndex, outputs: list[str], stops: set[str], kept: set[int]):
    """The nodes computing `outputs` back to `stops` and constants; a tensor an unchanged node
    (`kept`) computes, or a graph input, that is not a stop ends the walk as a boundary.
    Returns (nodes, boundary, problem)."""
    found: set[int] = set()
    boundary: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in stops or name in graph.constant or name in boundary:
            continue  # constants: the block models take in the nodes that compute them
        index = graph.producer.get(name)
        if index is None or index in kept:
            boundary.add(name)
            continue
        if index in found:
            continue
        found.add(index)
        if len(found) > MAX_ORIGINAL_NODES:
            return found, boundary, f"its original spans more than {MAX_ORIGINAL_NODES} nodes"
        stack.extend(graph.inputs_of[index])
    return found, boundary, None


def _reach(fused: GraphIndex, kept: Kept, names: list[str], boundary: set[str]) -> tuple[set[int], str | None]:
    """The unchanged nodes computing `names` from `boundary` (and constants) in the fused graph."""
    found: set[int] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name in boundary or name in fused.constant:
            continue
        index = fused.producer.get(name)
        if index is None or index not in kept.fused_to_original:
            return found, f"'{name}' is not computed from it by unchanged nodes"
        if index in found:
            continue
        found.add(index)
        if len(found) > MAX_BOUNDARY_NODES:
            return found, f"more than {MAX_BOUNDARY_NODES} nodes apart"
        stack.extend(fused.inputs_of[index])
    return found, None


def _external_reads(graph: GraphIndex, nodes: list[int]) -> set[str]:
    """Non-constant tensors the nodes read that none of them writes."""
    written = {out for i in nodes for out in graph.graph.node[i].output if out}
    return {name for i in nodes for name in graph.inputs_of[i] if name not in written and name not in graph.constant}
