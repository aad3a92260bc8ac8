"""Loading and saving models: external data, atomic writes, one-line errors for bad input."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

MIN_OPSET = 7  # BatchNormalization lost `is_test`/`consumed_inputs` at opset 7
EXTERNAL_THRESHOLD = 2**31 - 2**26  # write external data from ~1.94 GB of tensors on


class BadInput(ValueError):
    """A model file the tool cannot read. The message is one line, for stderr."""


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: str
    size: int               # bytes on disk: the model file plus its external data
    used_external_data: bool
    base_dir: str = ""      # the model's folder, where its external data lives


def _external_tensors(model: onnx.ModelProto):
    return [t for t in external_data_helper._get_all_tensors(model)
            if external_data_helper.uses_external_data(t)]


def _check_external_location(tensor: onnx.TensorProto, base_dir: str) -> str:
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise BadInput(f"tensor '{tensor.name}' uses external data but names no file")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise BadInput(f"tensor '{tensor.name}' external data path '{location}' is absolute; refused")
    base = os.path.realpath(base_dir)
    full = os.path.realpath(os.path.join(base, location))
    if os.path.commonpath([base, full]) != base:
        raise BadInput(f"tensor '{tensor.name}' external data path '{location}' leaves the model's folder; refused")
    if not os.path.isfile(full):
        raise BadInput(f"external data file '{location}' of tensor '{tensor.name}' is missing")
    try:
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if info.get("length") else os.path.getsize(full) - offset
    except ValueError:
        raise BadInput(f"tensor '{tensor.name}' has a malformed external data offset or length") from None
    if offset < 0 or length < 0 or offset + length > os.path.getsize(full):
        raise BadInput(f"external data file '{location}' is shorter than tensor '{tensor.name}' needs")
    needed = _tensor_nbytes(tensor)
    if needed is not None and needed > length:
        raise BadInput(f"tensor '{tensor.name}' declares shape {list(tensor.dims)} ({needed:,} bytes) "
                       f"but its external data holds {length:,} bytes")
    return full


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    count = 1
    for d in tensor.dims:
        if d < 0:
            return None
        count *= d
    return count * itemsize


def load(path: str, load_external_data: bool = True) -> LoadedModel:
    """Load a model (and, unless told not to, its external data), or raise BadInput.

    With load_external_data=False, external tensors stay on disk; `base_dir` says where,
    and GraphView reads only the ones a rule asks for."""
    if not os.path.exists(path):
        raise BadInput(f"no such file: {path}")
    if os.path.isdir(path):
        raise BadInput(f"{path} is a directory, not an ONNX file")
    size = os.path.getsize(path)
    if size == 0:
        raise BadInput(f"{path} is empty")
    try:
        model = onnx.load_model(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as err:
        raise BadInput(f"{path} is not an ONNX model (protobuf parse failed: {_one_line(err)})") from None
    except OSError as err:
        raise BadInput(f"cannot read {path}: {err.strerror or err}") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise BadInput(f"{path} is not an ONNX model (no graph, IR version or opset)")
    _check_opset(model, path)
    base_dir = os.path.dirname(os.path.abspath(path))
    external = _external_tensors(model)
    data_files = {_check_external_location(t, base_dir) for t in external}
    try:
        onnx.checker.check_model(path)
    except onnx.checker.ValidationError as err:
        raise BadInput(f"{path} fails the ONNX checker: {_one_line(err)}") from None
    except Exception as err:  # the checker surfaces C++ errors with assorted types
        raise BadInput(f"{path} fails the ONNX checker: {_one_line(err)}") from None
    if external and load_external_data:
        try:
            external_data_helper.load_external_data_for_model(model, base_dir)
        except (OSError, ValueError) as err:
            raise BadInput(f"cannot read external data of {path}: {_one_line(err)}") from None
    size += sum(os.path.getsize(f) for f in data_files)
    return LoadedModel(model, path, size, bool(external), base_dir)


def _check_opset(model: onnx.ModelProto, path: str) -> None:
    versions = {e.domain: e.version for e in model.opset_import}
    version = versions.get("", versions.get("ai.onnx"))
    if version is None:
        raise BadInput(f"{path} imports no default-domain opset")
    newest = onnx.defs.onnx_opset_version()
    if version < MIN_OPSET or version > newest:
        raise BadInput(f"{path} uses opset {version}; supported opsets are {MIN_OPSET} to {newest}")


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(err).__name__)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all in-memory tensors, from their shapes (reading raw_data would copy it,
    and ByteSize() would encode it)."""
    total = 0
    for t in external_data_helper._get_all_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            total += _tensor_nbytes(t) or 0
    return total


ALIGN = 4096  # page-aligned offsets let runtimes mmap external tensors
SMALL_ALIGN = 64
INLINE_LIMIT = 1024  # tensors below this many bytes stay inside the .onnx file (onnx's default)


class DataSink:
    """Appends tensor bytes to one external data file; hands back (location, offset, length)."""

    threshold = INLINE_LIMIT

    def __init__(self, path: str):
        self.path = path
        self.location = os.path.basename(path)
        self.names: set[str] = set()
        self._file = None
        self._size = 0

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "wb")
        return self._file

    def _pad_to(self, align: int) -> int:
        f = self._open()
        pad = (-self._size) % align
        if pad:
            f.write(b"\0" * pad)
            self._size += pad
        return self._size

    def put(self, array, name: str) -> tuple[str, int, int]:
        self.names.add(name)
        offset = self._pad_to(ALIGN if array.nbytes >= (1 << 20) else SMALL_ALIGN)
        self._open().write(memoryview(array).cast("B") if array.nbytes else b"")
        self._size += array.nbytes
        return self.location, offset, array.nbytes

    def put_file_range(self, source: str, offset: int, length: int) -> int:
        """Copy `length` bytes of `source` from `offset`; return the new offset."""
        new_offset = self._pad_to(ALIGN if length >= (1 << 20) else SMALL_ALIGN)
        f = self._open()
        with open(source, "rb") as src:
            src.seek(offset)
            left = length
            while left:
                chunk = src.read(min(left, 1 << 24))
                if not chunk:
                    raise BadInput(f"external data file {source} ended early")
                f.write(chunk)
                left -= len(chunk)
        self._size += length
        return new_offset

    def put_bytes(self, data: bytes) -> int:
        offset = self._pad_to(ALIGN if len(data) >= (1 << 20) else SMALL_ALIGN)
        self._open().write(data)
        self._size += len(data)
        return offset

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def used(self) -> bool:
        return self._file is not None or self._size > 0


class Staging:
    """A hidden folder beside the output where the model (and its data file) is written,
    validated from, and then moved into place by rename. Nothing else is ever left behind."""

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

    def write(self, model: onnx.ModelProto, external_data: bool, source_dir: str | None = None) -> None:
        """Write the model. With external_data, every tensor of INLINE_LIMIT bytes or more goes to
        <name>.data: tensors already in the sink stay, tensors still in the source model's data
        files are copied over range by range (never loaded), in-memory ones are written out.
        The model's tensors are changed to point there: don't use `model` afterwards."""
        try:
            if external_data:
                self._write_external(model, source_dir)
            else:
                with open(self.model_path, "wb") as f:
                    f.write(model.SerializeToString())
        except OSError as err:
            raise BadInput(f"cannot write {os.path.join(self.out_dir, self.name)}: {err.strerror or err}") from None

    def _write_external(self, model: onnx.ModelProto, source_dir: str | None) -> None:
        sink = self.sink()
        for tensor in external_data_helper._get_all_tensors(model):
            info = {e.key: e.value for e in tensor.external_data}
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                if info.get("location") == sink.location and tensor.name in sink.names:
                    continue
                offset = int(info.get("offset", 0) or 0)
                source = os.path.join(source_dir or "", info["location"])
                length = int(info["length"]) if info.get("length") else os.path.getsize(source) - offset
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

    def commit(self) -> int:
        """Move the staged files into place (data file first); return the bytes written."""
        total = 0
        try:
            if self._sink is not None:
                self._sink.close()
            if os.path.exists(self.data_path):
                total += os.path.getsize(self.data_path)
                os.replace(self.data_path, os.path.join(self.out_dir, self.name + ".data"))
            total += os.path.getsize(self.model_path)
            os.replace(self.model_path, os.path.join(self.out_dir, self.name))
        finally:
            self.discard()
        return total

    def discard(self) -> None:
        if self._sink is not None:
            self._sink.close()
        shutil.rmtree(self.dir, ignore_errors=True)
