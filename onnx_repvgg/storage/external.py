"""External-data references: where a tensor's bytes are, and reading them from disk."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import onnx


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def external_range(tensor: onnx.TensorProto, base_dir: str) -> tuple[str, int, int]:
    """Where an external tensor's bytes are: (file, offset, length), the length running to the
    file's end when unset. Raises ValueError for a malformed offset or length."""
    info = external_info(tensor)
    path = os.path.join(base_dir, info["location"])
    offset = int(info.get("offset", 0) or 0)
    length = int(info["length"]) if info.get("length") else os.path.getsize(path) - offset
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


def tensors_in_nodes(nodes) -> Iterator[onnx.TensorProto]:
    """Tensors held by node attributes (Constant values, ...), subgraphs' initializers included."""
    for node in nodes:
        for attr in node.attribute:
            kind = attr.type
            if kind == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif kind == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif kind == onnx.AttributeProto.GRAPH:
                yield from attr.g.initializer
                yield from tensors_in_nodes(attr.g.node)
            elif kind == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from sub.initializer
                    yield from tensors_in_nodes(sub.node)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers first, then tensors in attributes and
    functions (what onnx.external_data_helper walks, without its per-node overhead)."""
    yield from model.graph.initializer
    yield from tensors_in_nodes(model.graph.node)
    for function in model.functions:
        yield from tensors_in_nodes(function.node)
