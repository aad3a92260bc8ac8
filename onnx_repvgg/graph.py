"""A read-only index over one onnx GraphProto: producers, consumers, constants.

Built once per matching round in O(nodes + initializers). It never converts a
tensor to numpy until a rule asks for that constant, so a large model's weights
are touched only where a block is matched.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from .evaluate import Memo
from .storage.external import CONTROL_FLOW, UnreadableTensor, ordinary_op, read_external, segment_refusal, size_refusal
from .storage.wire import WireError, read_varint

# Ops never folded even when every input is constant: random, control flow, or stateful.
_NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                 "Bernoulli", "Dropout", "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty",
                 "Optional", "Constant",
                 # Quantized weights stay quantized: folding a DequantizeLinear would silently
                 # turn an int8 (QDQ) model's weights into float ones.
                 "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Folding a node whose inputs hold more elements than this is left to other tools.
_FOLD_LIMIT = 1 << 26
# Constants larger than this are converted again when asked for, not kept: a large model's
# weights are then held in memory once (by the model), not twice.
_CACHE_LIMIT = 1 << 20


def subgraphs_of(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The subgraphs held in a node's attributes (If/Loop/Scan, or any custom-domain op)."""
    if ordinary_op(node):
        return
    yield from held_subgraphs(node)


def held_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The subgraphs held in any node's attributes. Beside control flow and custom ops, onnx.checker
    passes a subgraph on any op in an attribute named "__..." (its internal symbols), which reads
    outer values by name: the pass leaves a model with one alone (has_stray_subgraphs)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def has_stray_subgraphs(graph: onnx.GraphProto) -> bool:
    """Does a node of an op that is neither control flow nor custom hold a subgraph, in this graph
    or in a subgraph of it?"""
    return stray_subgraph_holder(graph) is not None


def stray_subgraph_holder(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The first node of an op that is neither control flow nor custom that holds a subgraph, in
    this graph or in a subgraph of it; None if there is none."""
    for node in graph.node:
        stray = ordinary_op(node)
        for sub in held_subgraphs(node):
            if stray:
                return node
            inner = stray_subgraph_holder(sub)
            if inner is not None:
                return inner
    return None


def names_used_in_subgraph(graph: onnx.GraphProto) -> set[str]:
    """Every value name a subgraph reads, including outer-scope captures."""
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        for sub in subgraphs_of(node):
            used |= names_used_in_subgraph(sub)
    used.update(out.name for out in graph.output)
    return used


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every name in a graph and its subgraphs: values, initializers (sparse ones too), nodes,
    and the graphs' own names."""
    names: set[str] = {graph.name}
    names.update(t.name for t in graph.initializer)
    for sparse in graph.sparse_initializer:
        names.update((sparse.values.name, sparse.indices.name))
    names.update(v.name for v in graph.input)
    names.update(v.name for v in graph.output)
    names.update(v.name for v in graph.value_info)
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for sub in subgraphs_of(node):
            names |= all_names(sub)
    names.discard("")
    return names


def model_names(model: onnx.ModelProto, main: GraphView | None = None) -> set[str] | Names:
    """Every name in a model: its graphs' (all_names) and its functions' (name, inputs,
    outputs, attributes, value_info and nodes). `main`, an index of the main graph as it is,
    lends the names it has read already (node inputs and outputs, initializers, inputs and
    outputs): the same names, as a Names that looks them up in its tables."""
    names: set[str] | Names = all_names(model.graph) if main is None else _indexed_names(main)
    for function in model.functions:
        names.add(function.name)
        names.update(function.input)
        names.update(function.output)
        names.update(function.attribute)
        names.update(v.name for v in function.value_info)
        for node in function.node:
            names.add(node.name)
            names.update(node.input)
            names.update(node.output)
    names.discard("")
    return names


def _indexed_names(view: GraphView) -> Names:
    """all_names(view.graph), from what the view has read (its producers and consumers are
    every node output and input; subgraphs' names are read as all_names reads them): its own
    tables are looked up, not copied."""
    graph = view.graph
    names: set[str] = {graph.name}
    for sparse in graph.sparse_initializer:
        names.update((sparse.values.name, sparse.indices.name))
    names.update(v.name for v in graph.value_info)
    names.update([node.name for node in view.nodes])
    for index in view._opaque:
        for sub in subgraphs_of(view.nodes[index]):
            names |= all_names(sub)
    return Names((view.initializers, view.graph_inputs, view.graph_outputs, view.producer, view.consumers), names)


class Names:
    """A set of names (in, add, update, discard) made of tables that are looked up, not copied
    (a graph index's dicts and sets, which must not change while this is used), and a set of
    the other names and those added. "" is never in it; discard removes only added names."""

    def __init__(self, tables: tuple, names: set[str]):
        self._tables = tables
        self._names = names

    def __contains__(self, name: object) -> bool:
        if name in self._names:
            return name != ""
        for table in self._tables:
            if name in table:
                return name != ""
        return False

    def add(self, name: str) -> None:
        self._names.add(name)

    def update(self, names) -> None:
        self._names.update(names)

    def discard(self, name: str) -> None:
        self._names.discard(name)


class GraphView:
    """Producers, consumers, graph outputs and constant values of one graph.

    `consumers[name]` lists (node_index, input_slot) pairs, one per use. Uses from
    inside a node's subgraphs (If/Loop/Scan bodies capturing an outer value) count
    as uses by that node, with slot -1, so such a value is never treated as private.
    `by_op[op_type]` lists the indices of the nodes of that type, in graph order, so a rule
    visits only its anchor ops.

    Static shapes: given (`static_shapes`, from infer_static_shapes), the view carries them
    through data-movement ops and treats a Shape of a statically shaped tensor as a constant.
    With `shapes_pending=True` the view has none yet and counts every question whose answer
    inferred shapes could change (`shape_questions`): a shape or rank, and the value or
    constness of a *shape-tainted* value (one computed from Shape nodes, which inference could
    make constant). A round that asked none has the result it would have with inferred shapes.
    Rules ask through shape(), constant(), is_constant() and is_constant_node(), never the sets
    constant_names / constant_nodes directly, so that every such question is counted.
    """

    def __init__(self, graph: onnx.GraphProto, opset: int | None = None, base_dir: str | None = None,
                 static_shapes=None, reader=None, *, shapes_pending: bool = False, memo: Memo | None = None,
                 main_graph: bool = False):
        self.graph = graph
        self.main_graph = main_graph  # the model's own graph, whose inputs' declared dims runtimes enforce
        self.opset = opset
        self.base_dir = base_dir  # where external data not yet loaded lives
        # reads an external-data tensor (sinks.TensorReader also finds tensors fused earlier)
        self.read_external = reader or (lambda tensor: read_external(tensor, base_dir or ""))
        self._memo = memo if memo is not None else Memo()
        self.graph_outputs = {v.name for v in graph.output}
        self.graph_inputs = {v.name for v in graph.input}
        tensors = list(graph.initializer)  # one Python object per initializer, made once
        self.initializer_names = [t.name for t in tensors]  # in graph order (rewrite.apply)
        self.initializers = dict(zip(self.initializer_names, tensors))
        self._elem_types: dict[str, int] | None = None
        self._declared_shapes: dict[str, tuple[int, ...]] = {}
        self._index()
        self._start(static_shapes, shapes_pending)
        self._find_constants()

    def with_shapes(self, static_shapes) -> GraphView:
        """A view of the same graph with these inferred shapes, sharing this view's index."""
        view = object.__new__(GraphView)
        for key in _STRUCTURE:
            setattr(view, key, getattr(self, key))
        view._start(static_shapes, False)
        # Values that do not depend on shapes were computed the same way here.
        view._constant_cache = {k: v for k, v in self._constant_cache.items() if k not in self.tainted}
        view._find_constants()
        return view

    def _index(self) -> None:
        """Producers, consumers and node types: a pass over the nodes for each field read, then
        one over the values."""
        self.nodes = nodes = list(self.graph.node)
        self.ops: list[str] = [node.op_type for node in nodes]                # node.op_type of each node, read once
        self.inputs_of: list[list[str]] = [node.input[:] for node in nodes]   # node.input of each node, read once
        self.outputs_of: list[list[str]] = [node.output[:] for node in nodes]
        self.by_op: dict[str, list[int]] = defaultdict(list)
        by_op = self.by_op
        for index, op in enumerate(self.ops):
            by_op[op].append(index)
        producer = {out: index for index, outputs in enumerate(self.outputs_of) for out in outputs}
        producer.pop("", None)
        self.producer: dict[str, int] = producer
        # custom-domain and control-flow nodes: never folded
        self._opaque: set[int] = {index for index, domain in enumerate([node.domain for node in nodes])
                                  if domain and domain != "ai.onnx"}
        for op in CONTROL_FLOW:
            self._opaque.update(by_op.get(op, ()))
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        consumers, opaque = self.consumers, self._opaque
        uses_of = consumers.get
        for index, inputs in enumerate(self.inputs_of):
            for slot, name in enumerate(inputs):
                uses = uses_of(name)
                if uses is None:
                    consumers[name] = [(index, slot)]
                else:
                    uses.append((index, slot))
            if index in opaque:
                for sub in subgraphs_of(nodes[index]):
                    for name in names_used_in_subgraph(sub):
                        consumers[name].append((index, -1))
        consumers.pop("", None)  # an omitted optional input is no use

    def _start(self, static_shapes, shapes_pending: bool) -> None:
        # inferred shapes, -1 where a dim is unknown (a StaticShapes table, or a plain dict)
        self.static_shapes = static_shapes if isinstance(static_shapes, StaticShapes) else StaticShapes(static_shapes)
        self.learned: dict[str, tuple[int, ...]] = {}  # shapes this view carried past inference
        self.shapes_pending = shapes_pending
        self.shape_questions = 0
        self.first_question = ""  # what the first such question was about, for reports and tests
        self._constant_cache: dict[str, np.ndarray | None] = {}
        self._caches: dict[str, object] = {}  # per-view indexes built by rules (linear_tree.linear_index)

    def _find_constants(self) -> None:
        """One pass in topological order: which node outputs are computed from constants only
        (and, with shapes pending, which ones inferred shapes could make constant)."""
        self.constant_nodes: set[int] = set()
        known = {name for name in self.initializers if name not in self.graph_inputs}
        self.constant_names = known  # grows in the pass below; constant() may be asked meanwhile
        self.tainted: set[str] = set()  # shapes pending: values that inferred shapes could make constant
        self.tainted_nodes: set[int] = set()
        tainted, constant_nodes, tainted_nodes = self.tainted, self.constant_nodes, self.tainted_nodes
        pending = self.shapes_pending
        propagate = bool(self.static_shapes)
        opaque = self._opaque
        outputs_of = self.outputs_of
        for index, (op, inputs) in enumerate(zip(self.ops, self.inputs_of)):
            if index in opaque:
                continue  # a custom op or control flow is never folded
            if propagate and op in _PROPAGATED:
                self._propagate_shape(index, known)
            if op == "Shape" and len(inputs) == 1 and inputs[0] not in known:
                if self._is_static(inputs[0]):
                    # A Shape of a statically shaped tensor is a constant (exporters index with it).
                    constant_nodes.add(index)
                    known.update(out for out in outputs_of[index] if out)
                    continue
                if pending:  # inferred shapes may make it one
                    tainted_nodes.add(index)
                    tainted.update(out for out in outputs_of[index] if out)
                    continue
            if op == "CastLike" and len(inputs) == 2 and (inputs[0] in known or inputs[0] in tainted) \
                    and self.elem_type(inputs[1]) is not None:
                # CastLike reads only the dtype of its second input, which is declared.
                if inputs[0] in known:
                    constant_nodes.add(index)
                    known.update(out for out in outputs_of[index] if out)
                else:
                    tainted_nodes.add(index)
                    tainted.update(out for out in outputs_of[index] if out)
                continue
            if op == "Constant":
                constant_nodes.add(index)
                known.update(out for out in outputs_of[index] if out)
            elif op not in _NOT_FOLDABLE and inputs:
                some_tainted = False
                for name in inputs:
                    if name and name not in known:
                        if name not in tainted:
                            break
                        some_tainted = True
                else:
                    if some_tainted:
                        tainted_nodes.add(index)
                        tainted.update(out for out in outputs_of[index] if out)
                    else:
                        constant_nodes.add(index)
                        known.update(out for out in outputs_of[index] if out)

    # -- questions whose answers static shapes could change ----------------------------------
    def _asked(self, what: str) -> None:
        if not self.shape_questions:
            self.first_question = what
        self.shape_questions += 1

    def is_constant(self, name: str) -> bool:
        """Is `name` a constant (see constant())? Cheaper than constant(): nothing is computed."""
        if name in self.tainted:
            self._asked(f"constant {name}")
        return name in self.constant_names

    def is_constant_node(self, index: int) -> bool:
        """Does node `index` compute constants only?"""
        if index in self.tainted_nodes:
            self._asked(f"constant node {index}")
        return index in self.constant_nodes

    def _is_static(self, name: str) -> bool:
        shape = self.static_shapes.get(name)
        return shape is not None and all(d >= 0 for d in shape)

    def _propagate_shape(self, index: int, known: set[str]) -> None:
        """Static output shapes of data-movement ops whose parameters are constant, where shape
        inference could not see through computed parameters (TorchScript's index math)."""
        inputs, outputs = self.inputs_of[index], self.outputs_of[index]
        if not inputs or not outputs or self._is_static(outputs[0]):
            return
        shape = self.static_shapes.get(inputs[0])
        if shape is None:
            return
        node = self.nodes[index]
        op, out = self.ops[index], outputs[0]
        if op in ("Identity", "ScatterND", "Relu", "Neg", "Cast"):  # the output has the data's shape
            self._learn(out, shape)
            return
        params = [name for name in inputs[1:] if name]
        if not all(name in known for name in params):
            return
        constants: dict[str, np.ndarray] = {}
        for name in params:
            value = self.constant(name)
            if value is None:
                return
            constants[name] = value
        inferred = self._memo.output_shape(node, self.opset or 17, shape, self.elem_type(inputs[0]), constants)
        if inferred is not None:
            self._learn(out, inferred)

    def _learn(self, name: str, shape: tuple[int, ...]) -> None:
        if self.static_shapes.get(name) != shape:
            self.learned[name] = shape
        self.static_shapes[name] = shape

    # -- structure -------------------------------------------------------------
    def producer_of(self, name: str) -> onnx.NodeProto | None:
        index = self.producer.get(name)
        return None if index is None else self.nodes[index]

    def use_count(self, name: str) -> int:
        return len(self.consumers.get(name, ())) + (1 if name in self.graph_outputs else 0)

    def is_private(self, name: str) -> bool:
        """Exactly one use, by a node of this graph, and not a graph output."""
        return name not in self.graph_outputs and len(self.consumers.get(name, ())) == 1

    def foldable_op(self, index: int) -> str | None:
        """Node `index`'s op type, or None for a node no rule folds (a custom domain, control
        flow). For any other op, `is_op(view.nodes[i], *ops)` is `view.foldable_op(i) in ops`,
        read from the index."""
        return None if index in self._opaque else self.ops[index]

    def of_type(self, *ops: str) -> list[int]:
        """Indices of the nodes of these types (any domain), in graph order."""
        if len(ops) == 1:
            return self.by_op.get(ops[0], [])
        return sorted(i for op in ops for i in self.by_op.get(op, ()))

    def release(self) -> None:
        """Drop what rules built on this view (a LinearIndex refers back to it, so without this
        the pair would wait for the cyclic garbage collector)."""
        self._caches.clear()

    def cached(self, key: str, build):
        """A per-view index built once by `build()` (the view never changes)."""
        if key not in self._caches:
            self._caches[key] = build()
        return self._caches[key]

    # -- constants -------------------------------------------------------------
    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is a constant, else None.

        A constant is an initializer that is not also a graph input (such an
        initializer is only a default the caller may override), the output of a
        Constant node, or an Identity of a constant (the TorchScript exporter
        shares deduplicated initializers that way).
        """
        cache = self._constant_cache
        cached = cache.get(name, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        if self.tainted and name in self.tainted:
            self._asked(f"constant {name}")
        if name not in self.constant_names:  # what _compute_constant says of it
            cache[name] = None
            return None
        tensor = self.initializers.get(name)
        value: np.ndarray | None
        if tensor is not None and tensor.data_location != _EXTERNAL:  # the common case, inline
            value = tensor_array(tensor)
        else:
            value = self._compute_constant(name)
        if value is None or value.nbytes <= _CACHE_LIMIT:
            cache[name] = value
        return value

    def _scan_declared(self) -> None:
        """One pass over the declared types (inputs, outputs, value_info); initializers are
        looked up by name and override these."""
        types: dict[str, int] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        inputs = {v.name for v in self.graph.input}
        for v in list(self.graph.input) + list(self.graph.output) + list(self.graph.value_info):
            if not v.type.HasField("tensor_type"):
                continue
            t = v.type.tensor_type
            if t.elem_type:
                types[v.name] = t.elem_type
            # Shapes only where runtimes enforce them: declared value_info and output shapes
            # are not checked at run time (a stale one would prove a wrong rewrite).
            if t.HasField("shape") and v.name in inputs:
                shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        self._elem_types, self._declared_shapes = types, shapes

    def elem_type(self, name: str) -> int | None:
        """The declared element type of a value (graph inputs, outputs, value_info, initializers)."""
        tensor = self.initializers.get(name)
        if tensor is not None:
            return tensor.data_type
        if self._elem_types is None:
            self._scan_declared()
        return self._elem_types.get(name) if self._elem_types is not None else None

    def declared_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape the model itself declares for a graph input (the declarations runtimes
        enforce): no shape question, the same with or without inferred shapes."""
        if self._elem_types is None:
            self._scan_declared()
        return self._declared_shapes.get(name)

    def may_be_constant(self, name: str) -> bool:
        """Is `name` a constant, or a value inferred shapes could make one? Not a question: the
        answer is the same with or without inferred shapes (a superset of the constants)."""
        return name in self.constant_names or name in self.tainted

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The known shape of a value (-1 for an unknown dim): inferred, else declared."""
        if self.shapes_pending:
            self._asked(f"shape {name}")
        shape = self.static_shapes.get(name)
        if shape is not None:
            return shape
        tensor = self.initializers.get(name)
        if tensor is not None:
            return tuple(tensor.dims[:])
        if self._elem_types is None:
            self._scan_declared()
        return self._declared_shapes.get(name)

    def fixed_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape a value has whenever the model runs (-1 for a dim not fixed): shape(), which
        follows only from the main graph's declared input dims and its constants
        (infer_static_shapes), in the main graph; None in a subgraph, whose inputs' declared
        dims no runtime enforces."""
        return self.shape(name) if self.main_graph else None

    def raw_vectors(self, names: list[str]) -> tuple[tuple[np.dtype, int], list[bytes]] | None:
        """((dtype, length), raw bytes of each) when every one of these constants is a 1-D
        initializer held inline as the raw data of a plain numeric type (what tensor_array reads
        with np.frombuffer) and all have one dtype and length; else None: for reading many small
        vectors in one numpy call."""
        if not _LITTLE_ENDIAN:
            return None
        initializers, graph_inputs = self.initializers, self.graph_inputs
        out: list[bytes] = []
        kind = None
        data_type = length = size = 0
        for name in names:
            tensor = initializers.get(name)
            if tensor is None or name in graph_inputs or tensor.data_location == _EXTERNAL \
                    or tensor.HasField("segment"):
                return None
            dims = tensor.dims
            if len(dims) != 1:
                return None
            if kind is None:
                data_type = tensor.data_type
                dtype = _RAW_DTYPES.get(data_type)
                if dtype is None:
                    return None
                length = dims[0]
                size = length * dtype.itemsize
                kind = (dtype, length)
            elif tensor.data_type != data_type or dims[0] != length:
                return None
            # No raw_data field reads as b"": right only for a tensor of no elements, which has no data.
            raw = tensor.raw_data
            if len(raw) != size:
                return None
            out.append(raw)
        return (kind, out) if kind is not None else None

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of a constant, without converting an initializer to numpy."""
        value = self._constant_cache.get(name)
        if value is not None:  # read already (constant() answered any question then)
            return value.shape
        if name in self.initializers and name in self.constant_names:
            return tuple(self.initializers[name].dims[:])
        value = self.constant(name)
        return None if value is None else value.shape

    def constant_dtype(self, name: str) -> np.dtype | None:
        """The dtype of a constant, without reading an initializer's data."""
        if name in self.initializers and name in self.constant_names:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.initializers[name].data_type))
        value = self.constant(name)
        return None if value is None else value.dtype

    def _compute_constant(self, name: str) -> np.ndarray | None:
        if not name or name not in self.constant_names:
            return None
        if name in self.initializers:
            tensor = self.initializers[name]
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                return self.read_external(tensor)
            return tensor_array(tensor)
        index = self.producer[name]
        node = self.nodes[index]
        if node.op_type == "Constant":
            return self._constant_node_value(node)
        if node.op_type == "Identity":
            return self.constant(node.input[0])
        if node.op_type == "Shape" and self._is_static(node.input[0]):
            dims = self.static_shapes[node.input[0]]
            start, end = attribute(node, "start", 0), attribute(node, "end", None)
            return np.array(dims[slice(start, end)], dtype=np.int64)
        return self._fold(index, name)

    def _constant_node_value(self, node: onnx.NodeProto) -> np.ndarray | None:
        for attr in node.attribute:
            if attr.ref_attr_name:
                raise ReferenceAttribute(node, attr)
            if attr.name == "value":
                if attr.t.data_location == onnx.TensorProto.EXTERNAL:  # beside the model, as initializers
                    return self.read_external(attr.t)
                return tensor_array(attr.t)
            if attr.name == "value_float":
                return np.array(attr.f, dtype=np.float32)
            if attr.name == "value_floats":
                return np.array(list(attr.floats), dtype=np.float32)
            if attr.name == "value_int":
                return np.array(attr.i, dtype=np.int64)
            if attr.name == "value_ints":
                return np.array(list(attr.ints), dtype=np.int64)
        return None  # sparse_value and string constants are not weights

    def _fold(self, index: int, name: str) -> np.ndarray | None:
        """Evaluate a node of constant inputs (evaluate.fold: onnx's reference evaluator)."""
        node = self.nodes[index]
        inputs = {}
        for slot, inp in enumerate(node.input):
            if node.op_type == "CastLike" and slot == 1:
                like = self.constant(inp)
                if like is None:
                    elem = self.elem_type(inp)
                    if elem is None:
                        return None
                    like = np.zeros((0,), onnx.helper.tensor_dtype_to_np_dtype(elem))
                inputs[inp] = like
                continue
            if inp:
                value = self.constant(inp)
                if value is None or value.size > _FOLD_LIMIT:
                    return None
                inputs[inp] = value
        for attr in node.attribute:  # (the evaluator would fail on it, and the node pass for computed at run time)
            if attr.ref_attr_name:
                raise ReferenceAttribute(node, attr)
        results = self._memo.fold(node, self.opset or 17, inputs)
        if results is None:
            for out in node.output:
                if out:
                    self._constant_cache[out] = None
            return None
        for out, array in results.items():
            if array.nbytes <= _CACHE_LIMIT:
                self._constant_cache[out] = array
        return results.get(name)


# What GraphView.with_shapes shares: everything but shapes and constants.
_STRUCTURE = ("graph", "main_graph", "opset", "base_dir", "read_external", "_memo", "graph_outputs", "graph_inputs",
              "initializers", "initializer_names",
              "_elem_types", "_declared_shapes", "nodes", "ops", "producer", "consumers", "by_op", "inputs_of",
              "outputs_of", "_opaque")

# Ops whose output shape GraphView carries on from their data input (see _propagate_shape).
_PROPAGATED = frozenset({"Identity", "ScatterND", "Relu", "Neg", "Cast", "Transpose", "Slice", "Pad"})

# numpy dtypes of the tensor types whose raw_data numpy reads as it is (little-endian hosts).
_RAW_DTYPES: dict[int, np.dtype] = {onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.DOUBLE: np.dtype(np.float64),
               onnx.TensorProto.FLOAT16: np.dtype(np.float16), onnx.TensorProto.INT64: np.dtype(np.int64),
               onnx.TensorProto.INT32: np.dtype(np.int32), onnx.TensorProto.INT16: np.dtype(np.int16),
               onnx.TensorProto.INT8: np.dtype(np.int8), onnx.TensorProto.UINT8: np.dtype(np.uint8),
               onnx.TensorProto.UINT16: np.dtype(np.uint16), onnx.TensorProto.UINT32: np.dtype(np.uint32),
               onnx.TensorProto.UINT64: np.dtype(np.uint64), onnx.TensorProto.BOOL: np.dtype(np.bool_)}


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array of an in-memory tensor; its raw_data case for plain numeric types
    (read-only, as to_array gives it) without the helper's per-call overhead."""
    dtype = _RAW_DTYPES.get(tensor.data_type) if _LITTLE_ENDIAN else None
    if dtype is not None and tensor.HasField("raw_data") and not tensor.HasField("segment"):
        raw = tensor.raw_data
        dims = tensor.dims
        if len(dims) == 1 and dims[0] * dtype.itemsize == len(raw):
            return np.frombuffer(raw, dtype=dtype)
        shape = dims[:]
        needed = math.prod(shape) * dtype.itemsize
        if needed != len(raw):  # (onnx.checker passes more bytes than the shape needs)
            raise UnreadableTensor(size_refusal(tensor, len(raw), needed, "raw data"))
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if tensor.HasField("segment"):
        raise UnreadableTensor(segment_refusal(tensor))
    try:
        return numpy_helper.to_array(tensor)
    except ValueError as err:  # more values than the shape holds, say (the checker passes it, onnxruntime does not)
        raise UnreadableTensor(f"tensor '{tensor.name}' cannot be read with its shape {list(tensor.dims)}: "
                               f"{' '.join(str(err).split())}") from None


_LITTLE_ENDIAN = sys.byteorder == "little"
_EXTERNAL = onnx.TensorProto.EXTERNAL
_MISSING = object()


class StaticShapes:
    """Inferred tensor shapes by name, read from onnx's ValueInfoProtos only when asked for
    (a graph of 10^5 values is looked up at a few of them), and the shapes a GraphView adds."""

    def __init__(self, shapes: dict[str, tuple[int, ...]] | None = None,
                 protos: dict[str, onnx.ValueInfoProto] | None = None):
        self._shapes: dict[str, tuple[int, ...] | None] = dict(shapes or {})
        self._protos = protos or {}

    def get(self, name: str, default=None):
        shape = self._shapes.get(name, _UNREAD)
        if shape is _UNREAD:
            proto = self._protos.get(name)
            shape = None if proto is None else value_info_shape(proto)
            self._shapes[name] = shape
        return default if shape is None else shape

    def __getitem__(self, name: str) -> tuple[int, ...]:
        shape = self.get(name)
        if shape is None:
            raise KeyError(name)
        return shape

    def __setitem__(self, name: str, shape: tuple[int, ...]) -> None:
        self._shapes[name] = shape

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __bool__(self) -> bool:
        return bool(self._protos) or any(v is not None for v in self._shapes.values())

    def to_dict(self) -> dict[str, tuple[int, ...]]:
        """Every shape, read (for tests and comparisons; the pass itself never needs all)."""
        for name in self._protos:
            self.get(name)
        return {k: v for k, v in self._shapes.items() if v is not None}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StaticShapes):
            return self.to_dict() == other.to_dict()
        if isinstance(other, dict):
            return self.to_dict() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


_UNREAD = object()


def value_info_shape(v: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """A tensor ValueInfo's shape, -1 for a dim without a value; None when it declares none."""
    kind = v.type
    if not kind.HasField("tensor_type"):
        return None
    t = kind.tensor_type
    if not t.HasField("shape"):
        return None
    # dim_value read first: a non-zero one is set; 0 is a value only when the field is set
    return tuple(d.dim_value or (0 if d.HasField("dim_value") else -1) for d in t.shape.dim)


def infer_static_shapes(model: onnx.ModelProto, hints: dict[str, tuple[int, ...]] | None = None,
                        graph: onnx.GraphProto | None = None) -> StaticShapes:
    """Tensor shapes of the main graph (-1 for a dim not known), from onnx shape inference (with
    data propagation) on a copy that holds only small initializers: large weights become typed
    inputs, so nothing big is copied. The pass runs it only when a rule needs a shape."""
    graph = graph if graph is not None else model.graph
    light = onnx.ModelProto(ir_version=max(model.ir_version, 4))
    light.opset_import.extend(model.opset_import)
    g = light.graph
    # Only what binds the model at run time: its inputs' declared dims and its constants. Declared
    # value_info and output shapes are left out (runtimes do not enforce them), and so are the
    # values of initializers that are also graph inputs (they may be fed).
    if graph.ByteSize() < _COPY_LIMIT:  # one C-level copy, then only the fields inference is given
        g.CopyFrom(graph)
        for field in _LIGHT_DROPPED:
            g.ClearField(field)
    else:  # the graph holds large weights: copy its nodes and declarations only
        g.name = graph.name
        g.node.extend(graph.node)
        g.input.extend(graph.input)
        g.output.extend(graph.output)
    for v in g.output:
        if v.type.HasField("tensor_type"):
            v.type.tensor_type.ClearField("shape")
    if hints:
        known = {v.name for v in graph.input} | {v.name for v in graph.output}
        for name, dims in hints.items():  # shapes learned past where inference stopped
            if name not in known:
                g.value_info.append(onnx.helper.make_tensor_value_info(
                    name, onnx.TensorProto.UNDEFINED, [d if d >= 0 else None for d in dims]))
    declared = {v.name for v in graph.input}
    for tensor in graph.initializer:
        if tensor.name in declared:
            continue  # a graph input already, of its declared shape; its value may be fed
        count = 1
        for d in tensor.dims:
            count *= d
        if tensor.data_location != onnx.TensorProto.EXTERNAL and count <= 64:
            g.initializer.append(tensor)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    data = light.SerializeToString()
    del light, g  # only the bytes while onnx holds its own copy
    try:
        inferred = onnx.shape_inference.infer_shapes(data, data_prop=True)
    except Exception:  # shape inference is a help here, never a requirement
        return StaticShapes()
    del data
    found = inferred.graph
    protos = {v.name: v for v in found.value_info}
    shapes: dict[str, tuple[int, ...]] = {}
    if len(protos) != len(found.value_info):  # a name listed twice: the last one with a shape counts
        protos = {}
        for v in found.value_info:
            shape = value_info_shape(v)
            if shape is not None:
                shapes[v.name] = shape
    for v in list(found.output) + list(found.input):
        shape = value_info_shape(v)
        if shape is not None:
            shapes[v.name] = shape
    return StaticShapes(shapes, protos)  # the protos keep the inferred model alive while the shapes are


_COPY_LIMIT = 1 << 26
_LIGHT_DROPPED = ("initializer", "sparse_initializer", "value_info", "doc_string", "quantization_annotation",
                  "metadata_props")


class ReferenceAttribute(ValueError):
    """A node of a graph has an attribute that refers to a function's attribute (ref_attr_name),
    which has a value only inside a function body; onnx.checker passes it in a graph too."""

    def __init__(self, node: onnx.NodeProto, attr: onnx.AttributeProto):
        super().__init__(f"{node.op_type} '{node.name}' has an attribute '{attr.name}' that refers to a function's "
                         f"attribute '{attr.ref_attr_name}' outside a function; its value is undefined")


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute (as onnx.helper.get_attribute_value gives it), else
    `default`; ReferenceAttribute for one that refers to a function's attribute."""
    for attr in node.attribute:
        if attr.name == name:
            kind = attr.type
            if attr.ref_attr_name:
                raise ReferenceAttribute(node, attr)
            if kind == _INT:
                return attr.i
            if kind == _INTS:
                return list(attr.ints)
            if kind == _FLOAT:
                return attr.f
            return onnx.helper.get_attribute_value(attr)
    return default


_INT, _INTS, _FLOAT = onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOAT


def attributes(node: onnx.NodeProto) -> dict:
    """Every attribute of a node by name, read once (values as attribute() gives them); for
    a rule that reads several. A name given twice counts as attribute() counts it: the first.
    The dict is the caller's, but its list values may be shared with other calls: read only.

    Reading a node's attribute messages costs ~10 us cold (protobuf makes a Python object for
    each); serializing the node and slicing out its attribute fields costs less. Nodes whose
    attribute fields are the same bytes have the same attributes (models repeat a few kinds
    of Conv and BatchNormalization), so their values are read once and looked up by those bytes."""
    return dict(shared_attributes(node)[1])


def shared_attributes(node: onnx.NodeProto) -> tuple[bytes | None, dict]:
    """(the wire bytes of the node's attribute fields, or None when they could not be sliced
    out; attributes(node)) with the dict shared by every node of those bytes: read only. The
    bytes say everything the attributes do, so a caller may key its own results on them."""
    key = _attribute_bytes(node.SerializeToString())
    if key is None:
        return None, _read_attributes(node)
    values = _ATTRIBUTES.get(key)
    if values is None:
        values = _read_attributes(node)
        # Remembered only when small and plain: a tensor or graph value is part of its model,
        # which the entry would keep alive.
        if len(_ATTRIBUTES) < _ATTRIBUTES_CAP and len(key) <= _ATTRIBUTE_BYTES_LIMIT and all(
                isinstance(v, _PLAIN) or (isinstance(v, list) and all(isinstance(x, _PLAIN) for x in v))
                for v in values.values()):
            _ATTRIBUTES[key] = values
    return key, values


def _attribute_bytes(data: bytes) -> bytes | None:
    """The wire bytes of a serialized NodeProto's attribute fields (field 5), when they form one
    run; None for anything unexpected (a field that is not length-delimited, a long tag, a
    split run, a truncated message), which the caller reads the ordinary way. Every NodeProto
    field is length-delimited (strings and messages)."""
    pos, end = 0, len(data)
    first = last = -1
    while pos < end:
        start = pos
        tag = data[pos]
        if tag >= 0x80 or tag & 7 != 2:
            return None
        pos += 1
        if pos >= end:
            return None
        length = data[pos]
        if length < 0x80:
            pos += 1
        else:
            try:
                length, pos = read_varint(data, pos, end)
            except WireError:
                return None
        pos += length
        if tag == _ATTRIBUTE_TAG:
            if first < 0:
                first = start
            elif last != start:
                return None
            last = pos
    if pos != end:
        return None
    return data[first:last] if first >= 0 else b""


_ATTRIBUTE_TAG = (5 << 3) | 2  # NodeProto.attribute, length-delimited
_ATTRIBUTES: dict[bytes, dict] = {}  # attribute fields' bytes -> their values (a pure function of the bytes)
_ATTRIBUTES_CAP = 4096
_ATTRIBUTE_BYTES_LIMIT = 1024
_PLAIN = (int, float, bytes, str)


def _read_attributes(node: onnx.NodeProto) -> dict:
    values: dict = {}
    for attr in node.attribute:
        name = attr.name
        if name in values:
            continue
        kind = attr.type
        if attr.ref_attr_name:
            raise ReferenceAttribute(node, attr)
        if kind == _INT:
            values[name] = attr.i
        elif kind == _INTS:
            values[name] = list(attr.ints)
        elif kind == _FLOAT:
            values[name] = attr.f
        else:
            values[name] = onnx.helper.get_attribute_value(attr)
    return values


class AmbiguousOpset(ValueError):
    """A model imports one domain more than once, with different versions."""


def opset_version(model: onnx.ModelProto, domain: str = "") -> int | None:
    """The version of `domain` ("" also spelled "ai.onnx") the model imports; None if it imports
    none. AmbiguousOpset when it imports it more than once with different versions: onnx.checker
    reads the last "" entry, onnxruntime the last of either spelling, so no one version is the
    model's."""
    names = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
    versions = {entry.version for entry in model.opset_import if entry.domain in names}
    if len(versions) > 1:
        what = "default (ai.onnx)" if names[0] == "" else f"'{domain}'"
        raise AmbiguousOpset(f"the model imports the {what} opset more than once, as versions {sorted(versions)}: "
                             "onnx.checker and onnxruntime each read another one")
    return versions.pop() if versions else None
