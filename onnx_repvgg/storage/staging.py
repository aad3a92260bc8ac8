"""Writing the output: a hidden staging folder, the two file layouts, and the atomic move.

The model is written in the staging folder beside the output, validated from there, and then
moved into place by rename; nothing else is ever left behind.

Tensors whose bytes are not in the ModelProto (external-data references into the input's
files, or arrays kept by a MemorySink) are written without passing through protobuf:

- inline output: each such tensor is serialized as its header with the raw_data bytes
  spliced in (copied range by range from the input file, or straight from the array),
  giving the bytes `model.SerializeToString()` would give had they been inline;
- external-data output: the bytes go to <name>.data, ranges copied in the kernel.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import onnx
from google.protobuf.message import EncodeError

from . import wire
from .external import all_tensors, external_range
from .io import BadInput
from .sinks import INLINE_LIMIT, DataSink, MemorySink, byte_view, copy_range, write_all


class Staging:
    def __init__(self, path: str):
        out_dir = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(out_dir):
            raise BadInput(f"output folder {out_dir} does not exist")
        self.name = os.path.basename(path)
        self.out_dir = out_dir
        try:
            self.dir = tempfile.mkdtemp(prefix=f".{self.name}.", suffix=".tmp", dir=out_dir)
        except OSError as err:
            raise BadInput(f"cannot write to {out_dir}: {err.strerror or err}") from None
        self.model_path = os.path.join(self.dir, self.name)
        self.data_path = self.model_path + ".data"
        self._sink: DataSink | None = None

    def sink(self) -> DataSink:
        if self._sink is None:
            self._sink = DataSink(self.data_path)
        return self._sink

    def write(self, model: onnx.ModelProto, external_data: bool, source_dir: str | None = None,
              memory: MemorySink | None = None, nested: bool = True) -> None:
        """Write the model. With external_data, every tensor of INLINE_LIMIT bytes or more goes
        to <name>.data; otherwise everything goes into the one .onnx file. Tensors still in the
        source model's files (under `source_dir`) are copied range by range, never loaded;
        `memory` holds the arrays of tensors that point into it. `nested=False` says no tensor
        outside the main graph's initializers can point outside (io.LoadedModel.nested_tensors),
        so they are not walked. The model's tensors are changed on the way: don't use `model`
        afterwards."""
        payloads = Payloads(source_dir or "", memory)
        try:
            if external_data:
                self._write_external(model, payloads)
            else:
                write_inline(model, self.model_path, payloads, nested)
        except OSError as err:
            target = os.path.join(self.out_dir, self.name)
            raise BadInput(f"cannot write {target}: {err.strerror or err}") from None

    def _write_external(self, model: onnx.ModelProto, payloads: Payloads) -> None:
        sink = self.sink()
        for tensor in all_tensors(model):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                if sink.holds(tensor):
                    continue
                array = payloads.array(tensor)
                if array is not None:
                    length, new_offset = array.nbytes, sink.put_bytes(byte_view(array))
                else:
                    source, offset, length = payloads.file_range(tensor)
                    new_offset = sink.put_file_range(source, offset, length)
            elif tensor.ByteSize() >= INLINE_LIMIT and tensor.HasField("raw_data"):
                data = tensor.raw_data
                length = len(data)
                new_offset = sink.put_bytes(data)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
            else:
                continue
            del tensor.external_data[:]
            for key, value in (("location", sink.location), ("offset", str(new_offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        sink.close()
        with open(self.model_path, "wb") as f:
            f.write(model.SerializeToString())

    def size(self) -> int:
        """Bytes staged: the model file and its data file."""
        if self._sink is not None:
            self._sink.close()
        return sum(os.path.getsize(p) for p in (self.model_path, self.data_path) if os.path.exists(p))

    def commit(self) -> int:
        """Move the staged files into place (data file first); return the bytes written."""
        total = self.size()
        try:
            if os.path.exists(self.data_path):
                os.replace(self.data_path, os.path.join(self.out_dir, self.name + ".data"))
            os.replace(self.model_path, os.path.join(self.out_dir, self.name))
        finally:
            self.discard()
        return total

    def discard(self) -> None:
        if self._sink is not None:
            self._sink.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Payloads:
    """Where the bytes of an external-data tensor are: an array in memory, or a file range."""

    def __init__(self, source_dir: str, memory: MemorySink | None):
        self.source_dir = source_dir
        self.memory = memory

    def array(self, tensor: onnx.TensorProto) -> np.ndarray | None:
        if self.memory is not None and self.memory.holds(tensor):
            return self.memory.array(tensor)
        return None

    def file_range(self, tensor: onnx.TensorProto) -> tuple[str, int, int]:
        return external_range(tensor, self.source_dir)


def write_inline(model: onnx.ModelProto, path: str, payloads: Payloads, nested: bool = True) -> None:
    """Write `model` as one .onnx file, splicing in the bytes of its external-data tensors.

    The main graph's initializers are written field by field after the graph's other fields
    are serialized; tensors elsewhere (subgraphs, Constant nodes) that still point outside are
    loaded into their messages first (there are few, and small)."""
    if nested:
        _load_nested_external(model, payloads)
    graph = model.graph
    if not any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in graph.initializer):
        # Nothing to splice in: the model's own bytes are the file the splicing below writes
        # (protobuf writes known fields in number order and unknown ones after them; the splice
        # goes where it would), in one call instead of a header per tensor (a model of many small
        # tensors).
        try:
            data = model.SerializeToString()
        except EncodeError:  # over protobuf's 2 GB: written piece by piece below
            data = None
        if data is not None:
            with open(path, "wb", buffering=0) as f:
                write_all(f.fileno(), data)
            return
    # per initializer: (bytes before the payload, the payload (an array or a file range) or None, bytes after)
    entries: list[tuple[bytes, np.ndarray | tuple[str, int, int] | None, bytes]] = []
    initializer_bytes = 0  # all of them, as serialized fields of the graph
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            serialized = tensor.SerializeToString()
            field = wire.length_delimited(wire.GRAPH_INITIALIZER, len(serialized)) + serialized
            entries.append((field, None, b""))
            initializer_bytes += len(field)
            continue
        array = payloads.array(tensor)
        payload: np.ndarray | tuple[str, int, int] = payloads.file_range(tensor) if array is None else array
        length = payload.nbytes if isinstance(payload, np.ndarray) else payload[2]
        header = onnx.TensorProto()
        header.CopyFrom(tensor)
        header.ClearField("external_data")
        header.ClearField("data_location")
        serialized = header.SerializeToString()
        cut = wire.split_before(serialized, wire.TENSOR_RAW_DATA, _TENSOR_FIELDS)
        before = serialized[:cut] + wire.length_delimited(wire.TENSOR_RAW_DATA, length)
        after = serialized[cut:]
        size = len(before) + length + len(after)
        before = wire.length_delimited(wire.GRAPH_INITIALIZER, size) + before
        entries.append((before, payload, after))
        initializer_bytes += len(before) + length + len(after)
    graph.ClearField("initializer")
    graph_bytes = graph.SerializeToString()
    graph_cut = wire.split_before(graph_bytes, wire.GRAPH_INITIALIZER, _GRAPH_FIELDS)
    graph_size = len(graph_bytes) + initializer_bytes
    model.ClearField("graph")
    model_bytes = model.SerializeToString()
    model_cut = wire.split_before(model_bytes, wire.MODEL_GRAPH, _MODEL_FIELDS)
    with open(path, "wb", buffering=0) as f:
        out = _Output(f.fileno())
        out.write(model_bytes[:model_cut])
        out.write(wire.length_delimited(wire.MODEL_GRAPH, graph_size))
        out.write(graph_bytes[:graph_cut])
        for before, content, after in entries:
            out.write(before)
            if isinstance(content, np.ndarray):
                out.write(byte_view(content))
            elif content is not None:
                out.copy(*content)
            out.write(after)
        out.write(graph_bytes[graph_cut:])
        out.write(model_bytes[model_cut:])
        out.flush()


# The field numbers each message type knows (a field not among them is an unknown one, which
# protobuf writes after the known ones).
_TENSOR_FIELDS = frozenset(onnx.TensorProto.DESCRIPTOR.fields_by_number)
_GRAPH_FIELDS = frozenset(onnx.GraphProto.DESCRIPTOR.fields_by_number)
_MODEL_FIELDS = frozenset(onnx.ModelProto.DESCRIPTOR.fields_by_number)


def _load_nested_external(model: onnx.ModelProto, payloads: Payloads) -> None:
    nested = list(all_tensors(model))[len(model.graph.initializer):]  # all but the main graph's initializers
    for tensor in nested:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        array = payloads.array(tensor)
        if array is not None:
            data = array.tobytes()
        else:
            source, offset, length = payloads.file_range(tensor)
            with open(source, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            if len(data) != length:
                raise OSError(f"{source} ended early")
        tensor.ClearField("external_data")
        tensor.ClearField("data_location")
        tensor.raw_data = data


class _Output:
    """Small writes gathered into one buffer; large ones and file ranges go straight through."""

    LIMIT = 1 << 20

    def __init__(self, fd: int):
        self.fd = fd
        self.buffer = bytearray()

    def write(self, data) -> None:
        if len(data) >= self.LIMIT:
            self.flush()
            write_all(self.fd, data)
        else:
            self.buffer += data
            if len(self.buffer) >= self.LIMIT:
                self.flush()

    def copy(self, source: str, offset: int, length: int) -> None:
        self.flush()
        copy_range(source, offset, length, self.fd)

    def flush(self) -> None:
        if self.buffer:
            write_all(self.fd, self.buffer)
            self.buffer = bytearray()
