"""External-data references: where a tensor's bytes are, and reading them from disk."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import onnx


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes a tensor's data takes from its shape and type (None for strings and
    unknown types, or a negative dim)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    count = 1
    for d in tensor.dims:
        if d < 0:
            return None
        count *= d
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):  # two per byte
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


def read_external(tensor: onnx.TensorProto, base_dir: str) -> np.ndarray:
    """Read one tensor's external data from disk, leaving the TensorProto untouched.

    The location was checked (relative, inside the model's folder, long enough) at load.
    """
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    count = 1
    for d in tensor.dims:
        count *= d
    path, offset, _ = external_range(tensor, base_dir)
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


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    yield from _sparse_parts(graph.sparse_initializer)
    yield from tensors_in_nodes(graph.node)


def tensors_in_nodes(nodes) -> Iterator[onnx.TensorProto]:
    """Tensors held by node attributes (Constant values, sparse ones too), and subgraphs'
    initializers and attribute tensors."""
    for node in nodes:
        for attr in node.attribute:
            kind = attr.type
            if kind == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif kind == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif kind == onnx.AttributeProto.SPARSE_TENSOR:
                yield from _sparse_parts([attr.sparse_tensor])
            elif kind == onnx.AttributeProto.SPARSE_TENSORS:
                yield from _sparse_parts(attr.sparse_tensors)
            elif kind == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif kind == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_tensors(sub)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers first (the writer relies on that order),
    then sparse initializers' parts, tensors in attributes and subgraphs, and functions'
    (what onnx.external_data_helper walks, without its per-node overhead)."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from tensors_in_nodes(function.node)
