"""Apply Rewrites to a graph: new nodes in, matched nodes out, unused constants dropped.

For a block, the fused Conv is inserted where the block's root sum was, so the node list
stays topologically sorted (X and the constants come before every branch). It writes the
root's output name, so downstream nodes and graph outputs are untouched. Only the
constants that the removed nodes were the last users of are deleted; shared
initializers are never modified.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import helper

from . import algebra
from .block import Block, Rewrite
from .graph import GraphView, Names
from .storage import wire
from .storage.external import tensor_nbytes


class NameRegistry:
    """Hands out names that collide with nothing in the model.

    `taken` is a set of names, or a function that returns it: it is then called on the first
    name asked for (or on ensure(), which the pass calls before it changes the model), so a
    model with nothing to fuse never has its names collected."""

    def __init__(self, taken) -> None:
        self._source = taken if callable(taken) else None
        self._taken: set[str] | Names | None = None if callable(taken) else set(taken)
        self._journal: list[str] = []

    @property
    def taken(self) -> set[str] | Names:
        if self._taken is None:
            source = self._source()  # type: ignore[misc]
            self._taken = source if isinstance(source, (set, Names)) else set(source)
            self._source = None
        return self._taken

    def ensure(self) -> None:
        """Collect the names now (before the model changes)."""
        _ = self.taken

    def fresh(self, base: str) -> str:
        base = base or "repvgg"
        taken = self.taken
        name, n = base, 1
        while name in taken:
            name = f"{base}_{n}"
            n += 1
        taken.add(name)
        self._journal.append(name)
        return name

    def mark(self) -> int:
        """A point to roll back to: names handed out after it can be handed out again."""
        return len(self._journal)

    def rollback(self, mark: int) -> None:
        while len(self._journal) > mark:
            self.taken.discard(self._journal.pop())


def _little_endian(array: np.ndarray) -> np.ndarray:
    if type(array) is np.ndarray and array.flags.c_contiguous and array.dtype.byteorder != ">":
        return array  # what the lines below give it (a fused array is made so)
    array = np.ascontiguousarray(array).reshape(np.shape(array))  # ascontiguousarray makes a 0-d array 1-d
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def _header(name: str, array: np.ndarray) -> onnx.TensorProto:
    return onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                            dims=list(array.shape))


def external_initializer(name: str, array: np.ndarray, sink) -> onnx.TensorProto:
    """A new initializer whose bytes are written to `sink` right away (sinks.DataSink or sinks.MemorySink)."""
    array = _little_endian(array)
    tensor = _header(name, array)
    location, offset, length = sink.put(array, name)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def spill(change: Rewrite, sink) -> None:
    """Write a Rewrite's large new arrays to `sink` now, so that a round holds no fused weights
    (and count every new tensor's bytes in sink.offered_bytes)."""
    if sink is None:
        return
    for _, value in change.initializers:
        size = value.nbytes if isinstance(value, np.ndarray) else tensor_nbytes(value)
        sink.offered_bytes += _UNKNOWN_BYTES if size is None else size
    change.initializers = [
        (name, external_initializer(name, value, sink)
         if isinstance(value, np.ndarray) and value.nbytes >= sink.threshold else value)
        for name, value in change.initializers]


_UNKNOWN_BYTES = 1 << 62  # a tensor whose size its header does not tell: no bound


def add_initializer(graph: onnx.GraphProto, name: str, value, sink=None) -> None:
    """Append a new initializer, given as an array or as a ready (external) TensorProto."""
    _add_initializers(graph, [(name, value)], sink)


def _add_initializers(graph: onnx.GraphProto, entries: list[tuple[str, object]], sink=None) -> None:
    """New initializers, in order, each an array or a ready (external) TensorProto; an array of
    sink.threshold bytes or more goes to the sink. Inline arrays are parsed into place from their
    wire form as graph fields, many per MergeFromString (Python protobuf serializes a tensor
    whose raw_data was assigned from Python several times slower than one it parsed)."""
    parts: list = []
    size = 0
    for name, value in entries:
        if not isinstance(value, np.ndarray) or (sink is not None and value.nbytes >= sink.threshold):
            if parts:
                graph.MergeFromString(b"".join(parts))
                parts, size = [], 0
            ready = external_initializer(name, value, sink) if isinstance(value, np.ndarray) else value
            graph.initializer.add().CopyFrom(ready)
            continue
        array = _little_endian(value)
        key = (array.dtype, array.shape)
        header = _HEADERS.get(key)
        if header is None:  # the dims and data_type fields; the name and raw_data follow
            header = _header("", array).SerializeToString()
            if len(_HEADERS) < 1024:
                _HEADERS[key] = header
        encoded = name.encode()
        head = header + _TAG_NAME + _varint(len(encoded)) + encoded + _TAG_RAW + _varint(array.nbytes)
        parts += (_TAG_INITIALIZER, _varint(len(head) + array.nbytes), head, array)
        size += len(head) + array.nbytes
        if size >= _BATCH_BYTES:
            graph.MergeFromString(b"".join(parts))
            parts, size = [], 0
    if parts:
        graph.MergeFromString(b"".join(parts))


_HEADERS: dict[tuple, bytes] = {}  # (dtype, shape) -> a TensorProto's dims and data_type, serialized
_BATCH_BYTES = 1 << 24
_TAG_INITIALIZER = wire.tag(wire.GRAPH_INITIALIZER, wire.LENGTH_DELIMITED)
_TAG_NAME = wire.tag(8, wire.LENGTH_DELIMITED)  # TensorProto.name
_TAG_RAW = wire.tag(wire.TENSOR_RAW_DATA, wire.LENGTH_DELIMITED)
_SMALL_VARINTS = [bytes((n,)) for n in range(128)]


def _varint(value: int) -> bytes:
    return _SMALL_VARINTS[value] if value < 128 else wire.encode_varint(value)


def fused_output(block, names: NameRegistry) -> str:
    """Where the fused node writes: the root's own output, unless other addends follow."""
    stem = block.name_hint or block.anchor
    return block.root_output if not block.other_leaves else names.fresh(f"{stem}.fused_output")


def rest_of_sum(block, fused: str, names: NameRegistry
                ) -> tuple[list[onnx.NodeProto], list[tuple[str, np.ndarray]]]:
    """The Adds (and Muls, for scaled addends) that add the addends left in the sum to the
    fused output; the last one writes the root's output."""
    nodes, tensors = [], []
    running = fused
    scales = getattr(block, "other_scales", None) or [None] * len(block.other_leaves)
    for i, (leaf, scale) in enumerate(zip(block.other_leaves, scales)):
        if scale is not None:  # the addend was scaled inside the sum: keep that as one Mul
            scale_name = names.fresh(f"{block.anchor}.addend_scale")
            scaled = names.fresh(f"{block.anchor}.scaled_addend")
            tensors.append((scale_name, algebra.cast_like(scale, block.dtype)))
            nodes.append(helper.make_node("Mul", [leaf, scale_name], [scaled], name=names.fresh(f"{block.anchor}.scale")))
            leaf = scaled
        last = i == len(block.other_leaves) - 1
        out = block.root_output if last else names.fresh(f"{block.anchor}.partial_sum")
        nodes.append(helper.make_node("Add", [running, leaf], [out], name=names.fresh(f"{block.anchor}.rest")))
        running = out
    return nodes, tensors


def fused_nodes(block: Block, weight: np.ndarray, bias: np.ndarray, names: NameRegistry
                ) -> tuple[list[onnx.NodeProto], list[tuple[str, np.ndarray]]]:
    """The Conv (and the Adds of addends that stay in the sum) replacing the block."""
    stem = block.name_hint or block.anchor
    weight_name = names.fresh(f"{stem}.fused_weight")
    bias_name = names.fresh(f"{stem}.fused_bias")
    g = block.geometry
    conv_out = fused_output(block, names)
    conv = conv_node([block.input, weight_name, bias_name], conv_out, block.name_hint or names.fresh(stem), g)
    rest, extra = rest_of_sum(block, conv_out, names)
    return [conv] + rest, [(weight_name, weight), (bias_name, bias)] + extra


def conv_node(inputs: list[str], output: str, name: str, g) -> onnx.NodeProto:
    """The Conv of geometry `g` (a block.ConvGeometry), as helper.make_node writes it (attributes
    in sorted order: dilations, group, kernel_shape, pads, strides): a copy of the geometry's
    attributes, made once, with this node's inputs, output and name."""
    given = (g.dilations, g.group, g.kernel_shape, g.pads, g.strides)
    try:  # values equal to the given ones have equal int() values: the same attributes
        template = _CONV_GIVEN.get(given)
        hashable = True
    except TypeError:  # a list in the geometry
        template, hashable = None, False
    if template is not None:
        return _conv_from(template, inputs, output, name)
    key: tuple[tuple[int, ...], int, tuple[int, ...], tuple[int, ...], tuple[int, ...]] = (
        tuple(int(v) for v in g.dilations), int(g.group), tuple(int(v) for v in g.kernel_shape),
        tuple(int(v) for v in g.pads), tuple(int(v) for v in g.strides))
    template = _CONV_ATTRIBUTES.get(key)
    if template is None:
        template = onnx.NodeProto(op_type="Conv")
        dilations, group, kernel_shape, pads, strides = key
        for attr_name, value in (("dilations", dilations), ("group", group), ("kernel_shape", kernel_shape),
                                 ("pads", pads), ("strides", strides)):
            attr = template.attribute.add()
            attr.name = attr_name
            if isinstance(value, int):
                attr.i = value
                attr.type = onnx.AttributeProto.INT
            else:
                attr.ints.extend(value)
                attr.type = onnx.AttributeProto.INTS
        if len(_CONV_ATTRIBUTES) < 256:
            _CONV_ATTRIBUTES[key] = template
    if hashable and len(_CONV_GIVEN) < 256:
        _CONV_GIVEN[given] = template
    return _conv_from(template, inputs, output, name)


def _conv_from(template: onnx.NodeProto, inputs: list[str], output: str, name: str) -> onnx.NodeProto:
    node = onnx.NodeProto()
    node.CopyFrom(template)
    node.input.extend(inputs)
    node.output.append(output)
    if name:
        node.name = name
    return node


_CONV_ATTRIBUTES: dict[tuple, onnx.NodeProto] = {}  # geometry -> a Conv holding its attributes only
_CONV_GIVEN: dict[tuple, onnx.NodeProto] = {}  # the same, by the geometry's values as given


def branch_sum_rewrite(block: Block, weight: np.ndarray, bias: np.ndarray, view: GraphView,
                       names: NameRegistry) -> Rewrite:
    nodes, tensors = fused_nodes(block, weight, bias, names)
    return Rewrite(block.removed_nodes, [(view.producer[block.root_output], nodes)], tensors, nodes[0].name)


def _removable(node: onnx.NodeProto) -> bool:
    """A node with no effect but its outputs: removable once nothing reads them."""
    return node.domain in ("", "ai.onnx") and not any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def apply(graph: onnx.GraphProto, view: GraphView, rewrites: list[Rewrite], sink=None) -> int:
    """Rewrite `graph` (indexed by `view`) in place; return how many nodes were removed.

    New initializers go to `sink` (external data) when one is given."""
    removed: set[int] = set()
    inserted: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    consumers, inputs_of = view.consumers, view.inputs_of
    gained_names: list[str] = []  # one entry per use gained, and lost below
    lost_names: list[str] = []
    pending: list[tuple[str, object]] = []
    for rw in rewrites:
        for index, nodes in rw.insertions:
            inserted[index].extend(nodes)
            for node in nodes:
                gained_names.extend(node.input)
        removed.update(rw.removed_nodes)
        for index in rw.removed_nodes:
            lost_names.extend(inputs_of[index])
        pending.extend(rw.initializers)
    gained: Counter[str] = Counter(gained_names)  # uses gained and lost, by value name
    lost: Counter[str] = Counter(lost_names)
    lost.pop("", None)
    uses_of = consumers.get
    gained_of = gained.get

    def uses(name: str) -> int:
        return len(uses_of(name, ())) + gained_of(name, 0) - lost[name]

    # Values that lost their last use: the nodes that computed them (constants, and default-domain
    # nodes without subgraphs, e.g. a Slice read only for its shape), then initializers. Only a
    # value whose uses went down can have none left (every other one has a consumer).
    dead_initializers: set[str] = set()
    graph_outputs, producer_of = view.graph_outputs, view.producer.get
    initializers, graph_inputs = view.initializers, view.graph_inputs
    frontier = []
    for name, count in lost.items():
        producer = producer_of(name)
        if producer is None:  # what the loop below decides of it (its uses can only go down)
            if len(uses_of(name, ())) + gained_of(name, 0) <= count and name not in graph_outputs \
                    and name in initializers and name not in graph_inputs:
                dead_initializers.add(name)
        elif producer not in removed and len(uses_of(name, ())) + gained_of(name, 0) <= count:
            frontier.append(name)
        # (a value computed by a removed node goes with it, as in the loop below)
    while frontier:
        name = frontier.pop()
        producer = producer_of(name)
        if producer is not None and producer in removed:
            continue  # computed by a removed node: it goes with it
        if name in graph_outputs or uses(name) > 0:
            continue
        if producer is not None:
            node = view.nodes[producer]
            if not _removable(node):
                continue
            if any(uses(out) > 0 or out in graph_outputs for out in view.outputs_of[producer] if out):
                continue
            removed.add(producer)
            for inp in inputs_of[producer]:
                if inp:
                    lost[inp] += 1
                    if uses(inp) <= 0:
                        frontier.append(inp)
        elif name in initializers and name not in graph_inputs:
            dead_initializers.add(name)

    # New initializers, once dead code is gone: a constant that stood in for a removed node's
    # output (see the sequential rule) is kept only if something still reads it.
    _add_initializers(graph, [(name, value) for name, value in pending if uses(name) > 0], sink)

    new_nodes: list[onnx.NodeProto] = []
    inserted_at = inserted.get
    for index, node in enumerate(view.nodes):
        before = inserted_at(index)
        if before is not None:
            new_nodes.extend(before)
        if index not in removed:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)

    if dead_initializers:  # deleted run by run (of consecutive indices), from the end
        dead = np.flatnonzero([name in dead_initializers for name in view.initializer_names])  # (one at least)
        for run in reversed(np.split(dead, np.flatnonzero(np.diff(dead) != 1) + 1)):
            del graph.initializer[int(run[0]):int(run[-1]) + 1]
    return len(removed)


def stale_value_info(graph: onnx.GraphProto) -> list[int]:
    """Indices of the value_info entries of tensors that no node produces any more."""
    if not len(graph.value_info):
        return []
    produced = {out for node in graph.node for out in node.output}
    return [i for i, v in enumerate(graph.value_info) if v.name not in produced]


def drop_stale_value_info(graph: onnx.GraphProto, stale: list[int] | None = None) -> None:
    """Remove value_info entries of tensors that no node produces any more (`stale`: their
    indices, stale_value_info(graph), when the caller has them). Each deletion moves the kept
    entries after it, so when that adds up (a dynamo export declares nearly every intermediate
    tensor; a fused model keeps few) the kept entries are put back into a cleared list instead,
    in one pass (the same entries, in the same order)."""
    if stale is None:
        stale = stale_value_info(graph)
    entries = graph.value_info
    if len(stale) * (len(entries) - len(stale)) < _MOVES_AT_MOST:  # (a bound on the entries moved)
        for index in reversed(stale):
            del entries[index]
        return
    gone = set(stale)
    kept = [entries[i] for i in range(len(entries)) if i not in gone]  # (each keeps its data when cleared)
    del entries[:]
    entries.extend(kept)


_MOVES_AT_MOST = 200_000_000  # ~1/8 s of moves: about where putting back the kept ones costs less
