"""External-data references: where a tensor's bytes are, and reading them from disk."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


_ITEMSIZE: dict[int, int | None] = {}


def _itemsize(data_type: int) -> int | None:
    if data_type not in _ITEMSIZE:
        try:
            _ITEMSIZE[data_type] = onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
        except (KeyError, ValueError, TypeError):
            _ITEMSIZE[data_type] = None
    return _ITEMSIZE[data_type]


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes a tensor's data takes from its shape and type (None for strings and
    unknown types, or a negative dim)."""
    data_type = tensor.data_type
    if data_type == _STRING:
        return None
    itemsize = _ITEMSIZE[data_type] if data_type in _ITEMSIZE else _itemsize(data_type)
    if itemsize is None:
        return None
    count = _known_count(tensor.dims)
    if count < 0:
        return None
    if data_type in _FOUR_BIT:  # two per byte
        return (count + 1) // 2
    return count * itemsize


def external_range(tensor: onnx.TensorProto, base_dir: str) -> tuple[str, int, int]:
    """Where an external tensor's bytes are: (file, offset, length). An unset length is the
    tensor's size from its shape and type (the spec makes `length` optional), else the rest
    of the file. Raises ValueError for a malformed offset or length."""
    info = external_info(tensor)
    path = os.path.join(base_dir, info["location"])
    offset = int(info.get("offset", 0) or 0)
    if info.get("length"):
        length = int(info["length"])
    else:
        nbytes = tensor_nbytes(tensor)
        length = nbytes if nbytes is not None else os.path.getsize(path) - offset
    return path, offset, length


class UnreadableTensor(ValueError):
    """A tensor onnx.checker passes but no reader takes: one stored as a segment (onnx cannot read
    it), or one with more data than its shape and type need (onnxruntime refuses it)."""


def segment_refusal(tensor: onnx.TensorProto) -> str:
    return (f"tensor '{tensor.name}' is stored as a segment of a larger one (TensorProto.segment), "
            "which onnx does not read")


def size_refusal(tensor: onnx.TensorProto, held: int, needed: int, what: str) -> str:
    return f"tensor '{tensor.name}' holds {held:,} bytes of {what} where its shape {list(tensor.dims)} and type need {needed:,}"


def read_external(tensor: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """Read one tensor's external data from disk, leaving the TensorProto untouched.

    The location was checked (relative, inside the model's folder, long enough) at load.
    """
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    count = 1
    for d in tensor.dims:
        count *= d
    if tensor.HasField("segment"):
        raise UnreadableTensor(segment_refusal(tensor))
    path, offset, length = external_range(tensor, base_dir)
    needed = tensor_nbytes(tensor)
    if needed is not None and length != needed:  # (the loader refuses it; an API caller's model may have it)
        raise UnreadableTensor(size_refusal(tensor, length, needed, "external data"))
    if count * dtype.itemsize > os.path.getsize(path) - offset:
        raise ValueError(f"external data of '{tensor.name}' is shorter than its {count} elements")
    values = np.fromfile(path, dtype=dtype, count=count, offset=offset)
    if values.size != count:
        raise ValueError(f"external data of '{tensor.name}' is shorter than its {count} elements")
    return values.astype(dtype.newbyteorder("="), copy=False).reshape(tuple(tensor.dims))


def _sparse_parts(sparse_tensors) -> Iterator[onnx.TensorProto]:
    for sparse in sparse_tensors:
        yield sparse.values
        yield sparse.indices


def _graph_tensors(graph: onnx.GraphProto, holders: list | None = None) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    yield from _sparse_parts(graph.sparse_initializer)
    yield from tensors_in_nodes(graph.node, holders=holders)


def tensors_in_nodes(nodes, subgraphs: list | None = None, holders: list | None = None) -> Iterator[onnx.TensorProto]:
    """Tensors held by node attributes (Constant values, sparse ones too), and subgraphs'
    initializers and attribute tensors. Subgraphs met are appended to `subgraphs` if given, and
    the nodes that hold them, in subgraphs too, to `holders`."""
    for node in nodes:
        for attr in node.attribute:
            kind = attr.type
            if kind not in _HOLDING:  # most attributes: one test (a graph of 10^5 nodes is walked)
                continue
            if kind == _TENSOR:
                yield attr.t
            elif kind == _TENSORS:
                yield from attr.tensors
            elif kind == _SPARSE_TENSOR:
                yield from _sparse_parts([attr.sparse_tensor])
            elif kind == _SPARSE_TENSORS:
                yield from _sparse_parts(attr.sparse_tensors)
            elif kind == _GRAPH:
                if subgraphs is not None:
                    subgraphs.append(attr.g)
                if holders is not None:
                    holders.append(node)
                yield from _graph_tensors(attr.g, holders)
            else:  # _GRAPHS
                if holders is not None:
                    holders.append(node)
                for sub in attr.graphs:
                    if subgraphs is not None:
                        subgraphs.append(sub)
                    yield from _graph_tensors(sub, holders)


_TENSOR, _TENSORS = onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS
_SPARSE_TENSOR, _SPARSE_TENSORS = onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS
_GRAPH, _GRAPHS = onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS
_HOLDING = frozenset({_TENSOR, _TENSORS, _SPARSE_TENSOR, _SPARSE_TENSORS, _GRAPH, _GRAPHS})


def all_tensors(model: onnx.ModelProto, holders: list | None = None) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers first (the writer relies on that order),
    then sparse initializers' parts, tensors in attributes and subgraphs, and functions'
    (what onnx.external_data_helper walks, without its per-node overhead). The nodes of the main
    graph and its subgraphs that hold subgraphs are appended to `holders` if given."""
    yield from _graph_tensors(model.graph, holders)
    for function in model.functions:
        yield from tensors_in_nodes(function.node)


@dataclass
class TensorSurvey:
    """What the loader, the size check and the writer need to know of a model's tensors,
    from one walk over them (node attributes included: a graph of 10^5 nodes is walked once)."""

    external: list[onnx.TensorProto]  # tensors whose data is in an external-data reference
    nbytes: int                      # bytes of all tensors, from their shapes
    nested: bool                     # tensors outside the main graph's initializers may point outside
                                     # (some do now, or subgraphs a fusion may give new weights exist)
    initializer_inputs: set[str] = field(default_factory=set)  # main-graph initializers that are also graph inputs
    initializer_elements: int | None = None  # elements of the main graph's initializers (None: a negative dim)
    stray_subgraphs: bool = True     # a node of an op neither control flow nor custom holds a subgraph
                                     # (graph.has_stray_subgraphs), in the main graph or a subgraph of it


def survey(model: onnx.ModelProto) -> TensorSurvey:
    external: list[onnx.TensorProto] = []
    nbytes = 0
    graph = model.graph
    inputs = {value.name for value in graph.input}
    initializer_inputs: set[str] = set()
    negative = False
    counts: dict[int, int] = {}  # element type -> elements of that type (-1: the sub-byte types, counted above)
    count_of = counts.get
    for tensor in graph.initializer:  # most tensors of most models: each field read once
        if tensor.name in inputs:
            initializer_inputs.add(tensor.name)
        if tensor.data_location == _EXTERNAL:
            external.append(tensor)
        count = _known_count(tensor.dims)
        if count < 0:
            negative = True
            continue
        data_type = tensor.data_type
        if data_type in _FOUR_BIT:  # two per byte, rounded up per tensor
            nbytes += (count + 1) // 2
            counts[-1] = count_of(-1, 0) + count
            continue
        counts[data_type] = count_of(data_type, 0) + count
    elements: int | None = None if negative else sum(counts.values())
    for data_type, count in counts.items():
        itemsize = None if data_type < 0 else _ITEMSIZE[data_type] if data_type in _ITEMSIZE else _itemsize(data_type)
        if itemsize is not None and data_type != _STRING:
            nbytes += count * itemsize
    main_external = len(external)
    subgraphs: list = []
    holders: list = []  # the main graph's nodes (and its subgraphs') that hold subgraphs
    walk = _chain(_sparse_parts(graph.sparse_initializer), tensors_in_nodes(graph.node, subgraphs, holders),
                  *(tensors_in_nodes(function.node, subgraphs) for function in model.functions))
    for tensor in walk:
        if tensor.data_location == _EXTERNAL:
            external.append(tensor)
        nbytes += tensor_nbytes(tensor) or 0
    return TensorSurvey(external, nbytes, len(external) > main_external or bool(subgraphs), initializer_inputs,
                        elements, stray_holders(holders))


def stray_holders(holders: list) -> bool:
    """Is one of these nodes that hold subgraphs of an op neither control flow nor custom?"""
    return any(ordinary_op(node) for node in holders)


def ordinary_op(node: onnx.NodeProto) -> bool:
    """Is the node of a default-domain op other than control flow (If, Loop, Scan)? Only control
    flow and custom ops hold subgraphs by their definition."""
    return node.domain in ("", "ai.onnx") and node.op_type not in CONTROL_FLOW


def elements(dims) -> int:
    """math.prod(dims) of a TensorProto's dims, read by index (faster than iterating them)."""
    rank = len(dims)
    if rank == 1:
        return dims[0]
    if rank == 2:
        return dims[0] * dims[1]
    if rank == 4:
        return dims[0] * dims[1] * dims[2] * dims[3]
    return math.prod(dims)


def _known_count(dims) -> int:
    """The element count of these dims, or -1 when one is negative."""
    if len(dims) == 1:
        first = dims[0]
        return first if first >= 0 else -1
    values = dims[:]
    return -1 if values and min(values) < 0 else math.prod(values)


CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_EXTERNAL = onnx.TensorProto.EXTERNAL
_STRING = onnx.TensorProto.STRING
_FOUR_BIT = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def _chain(*parts) -> Iterator[onnx.TensorProto]:
    for part in parts:
        yield from part
