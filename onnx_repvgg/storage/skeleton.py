"""Open an ONNX file with its weights left on disk, even when they are stored inline.

`read(path)` returns the ModelProto with every large top-level initializer rewritten to
external-data form pointing back into the file itself (location = the file's own name,
offset = where its raw_data bytes begin). Nothing else changes: nodes, attributes, small
tensors and typed-field tensors are parsed by protobuf as usual. The pass then reads only the
weights of matched blocks, and the writer copies the others byte range by byte range, so a
weight is never parsed into a message nor serialized out of one.

The walk is over the protobuf wire format (onnx_repvgg.wire); a file it does not understand
raises WireError, and the caller loads it the ordinary way instead.
"""

from __future__ import annotations

import mmap
import os

import onnx

from . import wire
from .wire import LENGTH_DELIMITED, VARINT, WireError

# Smaller tensors stay parsed. Leaving a tensor in the file costs ~70 us (its header rewritten
# here and in the writer, a read per use); parsing and serializing its bytes costs ~2.5 us per
# KB, so the walk pays from ~30 KB on, and a model of thousands of tiny blocks stays parsed.
MIN_BYTES = 1 << 16
TENSOR_DATA_TYPE = 2

# Element types whose raw_data is whole bytes per element (sub-byte types stay parsed).
_BYTE_ALIGNED = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL,
    onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BFLOAT16,
}


def read(path: str, min_bytes: int | None = None) -> tuple[onnx.ModelProto, int]:
    """The model at `path` with its inline initializers of `min_bytes` or more left in the
    file (default MIN_BYTES); and how many initializers were left there. Raises WireError
    (or OSError) when the file is not a protobuf this walk understands."""
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    location = os.path.basename(path).encode("utf-8")  # UnicodeEncodeError is a ValueError
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        size = len(buf)
        graph = None
        for field in wire.fields(buf, 0, size):
            if field.number == wire.MODEL_GRAPH:
                if field.wire_type != LENGTH_DELIMITED or graph is not None:
                    raise WireError("graph field missing its payload, or repeated")
                graph = field
        if graph is None:
            raise WireError("no graph")
        pieces = []
        cursor = graph.value_start
        moved = 0
        for _, _, start, value_start, end in wire.spans(buf, graph.value_start, graph.end, wire.GRAPH_INITIALIZER,
                                                        min_bytes):
            header = _external_header(buf, value_start, end, location, min_bytes)
            if header is None:
                continue
            pieces.append(buf[cursor:start])
            pieces.append(wire.length_delimited(wire.GRAPH_INITIALIZER, len(header)))
            pieces.append(header)
            cursor = end
            moved += 1
        if not moved:
            return onnx.ModelProto.FromString(buf[:size]), 0
        pieces.append(buf[cursor:graph.end])
        graph_bytes = b"".join(pieces)
        model_bytes = b"".join((buf[:graph.start], wire.length_delimited(wire.MODEL_GRAPH, len(graph_bytes)),
                                graph_bytes, buf[graph.end:size]))
    return onnx.ModelProto.FromString(model_bytes), moved


def _external_header(buf, start: int, end: int, location: bytes, min_bytes: int) -> bytes | None:
    """The TensorProto in buf[start:end] without its raw_data and with external_data entries
    pointing at that raw_data in this file; None to leave the tensor as it is."""
    raw = None
    data_type = None
    for field in wire.fields(buf, start, end):
        if field.number == wire.TENSOR_RAW_DATA:
            if field.wire_type != LENGTH_DELIMITED or raw is not None:
                return None  # a repeated raw_data (the last one wins): leave it to protobuf
            raw = field
        elif field.number == TENSOR_DATA_TYPE and field.wire_type == VARINT:
            data_type, _ = wire.read_varint(buf, field.value_start, field.end)
        elif field.number in (wire.TENSOR_EXTERNAL_DATA, wire.TENSOR_DATA_LOCATION):
            return None
    if raw is None or data_type not in _BYTE_ALIGNED or raw.end - raw.value_start < min_bytes:
        return None
    entries = []
    for key, value in ((b"location", location), (b"offset", str(raw.value_start).encode()),
                       (b"length", str(raw.end - raw.value_start).encode())):
        entry = (wire.length_delimited(wire.ENTRY_KEY, len(key)) + key
                 + wire.length_delimited(wire.ENTRY_VALUE, len(value)) + value)
        entries.append(wire.length_delimited(wire.TENSOR_EXTERNAL_DATA, len(entry)) + entry)
    return b"".join([buf[start:raw.start], buf[raw.end:end], *entries,
                     wire.tag(wire.TENSOR_DATA_LOCATION, VARINT), wire.encode_varint(onnx.TensorProto.EXTERNAL)])
