"""A read-only index over one onnx GraphProto: producers, consumers, constants.

Built once per matching round in O(nodes + initializers). It never converts a
tensor to numpy until a rule asks for that constant, so a large model's weights
are touched only where a block is matched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from .evaluate import fold, output_shape
from .storage.external import read_external

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


_CONTROL_FLOW = {"If", "Loop", "Scan"}


def subgraphs_of(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The subgraphs held in a node's attributes (If/Loop/Scan, or any custom-domain op)."""
    if node.domain in ("", "ai.onnx") and node.op_type not in _CONTROL_FLOW:
        return
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


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


def model_names(model: onnx.ModelProto) -> set[str]:
    """Every name in a model: its graphs' (all_names) and its functions' (name, inputs,
    outputs, attributes, value_info and nodes)."""
    names = all_names(model.graph)
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


class GraphView:
    """Producers, consumers, graph outputs and constant values of one graph.

    `consumers[name]` lists (node_index, input_slot) pairs, one per use. Uses from
    inside a node's subgraphs (If/Loop/Scan bodies capturing an outer value) count
    as uses by that node, with slot -1, so such a value is never treated as private.
    """

    def __init__(self, graph: onnx.GraphProto, opset: int | None = None, base_dir: str | None = None,
                 static_shapes: dict[str, tuple[int, ...]] | None = None, reader=None):
        self.graph = graph
        self.opset = opset
        self.base_dir = base_dir  # where external data not yet loaded lives
        # reads an external-data tensor (sinks.TensorReader also finds tensors fused earlier)
        self.read_external = reader or (lambda tensor: read_external(tensor, base_dir or ""))
        self.static_shapes = dict(static_shapes or {})  # inferred shapes, -1 where a dim is unknown
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for index, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = index
            for slot, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((index, slot))
            for sub in subgraphs_of(node):
                for name in names_used_in_subgraph(sub):
                    self.consumers[name].append((index, -1))
        self.graph_outputs = {v.name for v in graph.output}
        self.graph_inputs = {v.name for v in graph.input}
        self.initializers = {t.name: t for t in graph.initializer}
        self._constant_cache: dict[str, np.ndarray | None] = {}
        self._elem_types: dict[str, int] | None = None
        self._declared_shapes: dict[str, tuple[int, ...]] = {}
        # One pass in topological order: which node outputs are computed from constants only.
        self.constant_nodes: set[int] = set()
        known = {name for name in self.initializers if name not in self.graph_inputs}
        self.constant_names = known  # grows in the pass below; constant() may be asked meanwhile
        for index, node in enumerate(self.nodes):
            if node.domain not in ("", "ai.onnx") or any(True for _ in subgraphs_of(node)):
                continue
            if self.static_shapes:
                self._propagate_shape(node, known)
            if node.op_type == "Shape" and len(node.input) == 1 and self._is_static(node.input[0]):
                # A Shape of a statically shaped tensor is a constant (exporters index with it).
                self.constant_nodes.add(index)
                known.update(out for out in node.output if out)
                continue
            if node.op_type == "CastLike" and len(node.input) == 2 and node.input[0] in known \
                    and self.elem_type(node.input[1]) is not None:
                # CastLike reads only the dtype of its second input, which is declared.
                self.constant_nodes.add(index)
                known.update(out for out in node.output if out)
                continue
            if node.op_type == "Constant" or (
                    node.op_type not in _NOT_FOLDABLE and node.input
                    and all(name in known for name in node.input if name)):
                self.constant_nodes.add(index)
                known.update(out for out in node.output if out)

    def _is_static(self, name: str) -> bool:
        return name in self.static_shapes and all(d >= 0 for d in self.static_shapes[name])

    def _propagate_shape(self, node: onnx.NodeProto, known: set[str]) -> None:
        """Static output shapes of data-movement ops whose parameters are constant, where shape
        inference could not see through computed parameters (TorchScript's index math)."""
        if not node.input or not node.output or self._is_static(node.output[0]):
            return
        shape = self.static_shapes.get(node.input[0])
        if shape is None:
            return
        op, out = node.op_type, node.output[0]
        if op in ("Identity", "ScatterND", "Relu", "Neg", "Cast"):  # the output has the data's shape
            self.static_shapes[out] = shape
            return
        if op not in ("Transpose", "Slice", "Pad"):
            return
        params = [name for name in node.input[1:] if name]
        if not all(name in known for name in params):
            return
        constants: dict[str, np.ndarray] = {}
        for name in params:
            value = self.constant(name)
            if value is None:
                return
            constants[name] = value
        inferred = output_shape(node, self.opset or 17, shape, self.elem_type(node.input[0]), constants)
        if inferred is not None:
            self.static_shapes[out] = inferred

    # -- structure -------------------------------------------------------------
    def producer_of(self, name: str) -> onnx.NodeProto | None:
        index = self.producer.get(name)
        return None if index is None else self.nodes[index]

    def use_count(self, name: str) -> int:
        return len(self.consumers.get(name, ())) + (1 if name in self.graph_outputs else 0)

    def is_private(self, name: str) -> bool:
        """Exactly one use, by a node of this graph, and not a graph output."""
        return name not in self.graph_outputs and len(self.consumers.get(name, ())) == 1

    # -- constants -------------------------------------------------------------
    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is a constant, else None.

        A constant is an initializer that is not also a graph input (such an
        initializer is only a default the caller may override), the output of a
        Constant node, or an Identity of a constant (the TorchScript exporter
        shares deduplicated initializers that way).
        """
        if name in self._constant_cache:
            return self._constant_cache[name]
        value = self._compute_constant(name)
        if value is None or value.nbytes <= _CACHE_LIMIT:
            self._constant_cache[name] = value
        return value

    def _scan_declared(self) -> None:
        """One pass over the declared types (inputs, outputs, value_info, initializers)."""
        types: dict[str, int] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for v in list(self.graph.input) + list(self.graph.output) + list(self.graph.value_info):
            if not v.type.HasField("tensor_type"):
                continue
            t = v.type.tensor_type
            if t.elem_type:
                types[v.name] = t.elem_type
            if t.HasField("shape"):
                shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        for t in self.graph.initializer:
            types[t.name] = t.data_type
            shapes[t.name] = tuple(t.dims)
        self._elem_types, self._declared_shapes = types, shapes

    def elem_type(self, name: str) -> int | None:
        """The declared element type of a value (graph inputs, outputs, value_info, initializers)."""
        if self._elem_types is None:
            self._scan_declared()
        return self._elem_types.get(name) if self._elem_types is not None else None

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The known shape of a value (-1 for an unknown dim): inferred, else declared."""
        if name in self.static_shapes:
            return self.static_shapes[name]
        if self._elem_types is None:
            self._scan_declared()
        return self._declared_shapes.get(name)

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of a constant, without converting an initializer to numpy."""
        if name in self.initializers and name in self.constant_names:
            return tuple(self.initializers[name].dims)
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
            return numpy_helper.to_array(tensor)
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
            if attr.name == "value":
                if attr.t.data_location == onnx.TensorProto.EXTERNAL:  # beside the model, as initializers
                    return self.read_external(attr.t)
                return numpy_helper.to_array(attr.t)
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
        results = fold(node, self.opset or 17, inputs)
        if results is None:
            for out in node.output:
                if out:
                    self._constant_cache[out] = None
            return None
        for out, array in results.items():
            if array.nbytes <= _CACHE_LIMIT:
                self._constant_cache[out] = array
        return results.get(name)


def infer_static_shapes(model: onnx.ModelProto, hints: dict[str, tuple[int, ...]] | None = None,
                        graph: onnx.GraphProto | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the main graph (-1 for a dim not known), from onnx shape inference (with
    data propagation) on a copy that holds only small initializers: large weights become typed
    inputs, so nothing big is copied. Run only where shapes matter (Shape or MatMul nodes)."""
    graph = graph if graph is not None else model.graph
    if not any(node.op_type in ("Shape", "MatMul", "Gemm") for node in graph.node):
        return {}
    light = onnx.ModelProto(ir_version=max(model.ir_version, 4))
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    known = {v.name for v in graph.value_info} | {v.name for v in graph.input} | {v.name for v in graph.output}
    for name, dims in (hints or {}).items():  # shapes learned past where inference stopped
        if name not in known:
            g.value_info.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.UNDEFINED, [d if d >= 0 else None for d in dims]))
    declared = {v.name for v in graph.input}
    for tensor in graph.initializer:
        small = tensor.data_location != onnx.TensorProto.EXTERNAL and np.prod(tensor.dims, dtype=np.int64) <= 64
        if small:
            g.initializer.append(tensor)
        elif tensor.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # shape inference is a help here, never a requirement
        return {}
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = v.type.tensor_type
        if v.type.HasField("tensor_type") and t.HasField("shape"):
            shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
    return shapes


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def opset_version(model: onnx.ModelProto, domain: str = "") -> int | None:
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return entry.version
    return None
