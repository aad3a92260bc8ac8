"""Loading and saving models: external data, atomic writes, one-line errors for bad input."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from ..graph import AmbiguousOpset, opset_version
from . import skeleton, wire
from .external import all_tensors, external_info, external_range, segment_refusal, size_refusal, survey, tensor_nbytes
from .wire import WireError

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
    data_files: frozenset[str] = frozenset()  # the external data files it reads (real paths)
    tensor_bytes: int = 0   # bytes of all its tensors, from their shapes (tensor_bytes(model) at load)
    nested_tensors: bool = True  # tensors outside the main graph's initializers may use external data
    initializer_inputs: frozenset[str] = frozenset()  # main-graph initializers that are also graph inputs
    initializer_elements: int | None = None  # elements of the main graph's initializers (ModelStats.params)
    stray_subgraphs: bool = True  # a node of an op neither control flow nor custom holds a subgraph


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
        _, offset, length = external_range(tensor, base)
    except ValueError:
        raise BadInput(f"tensor '{tensor.name}' has a malformed external data offset or length") from None
    needed = tensor_nbytes(tensor)
    if needed is not None and needed != length:
        raise BadInput(f"tensor '{tensor.name}' declares shape {list(tensor.dims)} ({needed:,} bytes) "
                       f"but its external data length is {length:,} bytes")
    if offset < 0 or length < 0 or offset + length > os.path.getsize(full):
        raise BadInput(f"external data file '{location}' is shorter than tensor '{tensor.name}' needs")
    return full


def load(path: str, load_external_data: bool = True) -> LoadedModel:
    """Load a model (and, unless told not to, its external data), or raise BadInput.

    With load_external_data=False, weights stay on disk: external data where it is, and the
    large inline initializers of a protobuf file too (see onnx_repvgg.skeleton), turned into
    external-data references into the file itself. `base_dir` says where they all are, and
    GraphView reads only the ones a rule asks for."""
    if not os.path.exists(path):
        raise BadInput(f"no such file: {path}")
    if os.path.isdir(path):
        raise BadInput(f"{path} is a directory, not an ONNX file")
    size = os.path.getsize(path)
    if size == 0:
        raise BadInput(f"{path} is empty")
    extension = os.path.splitext(path)[1]
    other = not_onnx_kind(path)
    if other:
        raise BadInput(f"{path} {other}")
    binary = onnx.serialization.registry.get_format_from_file_extension(extension) in (None, "protobuf")
    model, left_in_file = _parse(path, binary, weights_on_disk=not load_external_data)
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise BadInput(f"{path} is not an ONNX model (no graph, IR version or opset)")
    _check_opset(model, path)
    base_dir = os.path.dirname(os.path.abspath(path))
    own_name = os.path.basename(path) if left_in_file else None
    tensors = survey(model)  # one walk over every tensor, node attributes included
    external = tensors.external
    data_files = set()
    for tensor in external:
        if tensor.HasField("segment"):  # the checker passes it; onnx cannot read it (graph.tensor_array)
            raise BadInput(segment_refusal(tensor))
        if external_info(tensor).get("location") == own_name:
            _check_raw_data_size(tensor, path)
        else:
            data_files.add(_check_external_location(tensor, base_dir))
    external_dir = base_dir if data_files else None  # where the checker must find data files
    if own_name is not None:
        _run_checker(_with_weights_as_inputs(model, own_name), path, external_dir)
    else:
        _run_checker(None if binary else model, path, external_dir)
    if external and load_external_data:
        try:
            external_data_helper.load_external_data_for_model(model, base_dir)
        except (OSError, ValueError) as err:
            raise BadInput(f"cannot read external data of {path}: {_one_line(err)}") from None
    size += sum(os.path.getsize(f) for f in data_files)
    return LoadedModel(model, path, size, bool(data_files), base_dir, frozenset(data_files), tensors.nbytes,
                       tensors.nested, frozenset(tensors.initializer_inputs), tensors.initializer_elements,
                       tensors.stray_subgraphs)


_TORCH_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin", ".tar")
_TORCH_CHECKPOINT = ("looks like a PyTorch checkpoint, not an ONNX model: export it with torch.onnx.export "
                     "first (the training-time model as it is; this tool then fuses it)")


def _truncation(path: str) -> str | None:
    """How an ONNX file that starts well (ir_version first) runs past its end, or None."""
    with open(path, "rb") as f:
        buf = f.read()
    try:
        first = True
        for number, wire_type, *_ in wire.spans(buf):
            if first and (number, wire_type) != (1, wire.VARINT):
                return None  # not the start of a ModelProto
            first = False
    except WireError as err:
        if "past the end" not in str(err) or first:
            return None
        return f"its last field runs past the end of the file ({len(buf):,} bytes)"
    return None


def not_onnx_kind(path: str) -> str | None:
    """What a file is when its first bytes say it is a known non-ONNX format, as the rest of
    a one-line error; None when it may be ONNX."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            f.seek(0)
            names = b""
            if head.startswith(b"PK\x03\x04"):  # a zip: torch.save's format and TorchScript archives
                names = f.read(1 << 16)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        if b"code/" in names or b"constants.pkl" in names:
            return ("looks like a TorchScript archive (torch.jit.save), not an ONNX model: export the module with "
                    "torch.onnx.export first")
        if b"data.pkl" in names:
            return _TORCH_CHECKPOINT
        return "is a zip archive, not an ONNX model"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle: torch.save before 1.6
        return _TORCH_CHECKPOINT
    if head.startswith(b"\x89HDF"):
        return "looks like an HDF5 file (a Keras .h5 model?), not an ONNX model: convert it with tf2onnx first"
    if head[4:8] == b"TFL3":
        return "looks like a TFLite model, not an ONNX model: convert it with tf2onnx first"
    if head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < (1 << 32):
        return "looks like a safetensors weights file, not an ONNX model: export the model with torch.onnx.export"
    return None


def _parse(path: str, binary: bool, weights_on_disk: bool) -> tuple[onnx.ModelProto, int]:
    """The ModelProto, and how many initializers were left in the file (weights_on_disk;
    binary protobuf files only: a text-format file is parsed by onnx as its extension says)."""
    if weights_on_disk and binary:
        try:
            return skeleton.read(path)
        except (WireError, DecodeError, ValueError, OSError, RuntimeError):
            pass  # not a file the wire walk understands: protobuf says what is wrong with it
    try:
        return onnx.load_model(path, load_external_data=False), 0
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as err:
        if os.path.splitext(path)[1].lower() in _TORCH_EXTENSIONS:
            raise BadInput(f"{path} {_TORCH_CHECKPOINT}") from None
        short = _truncation(path)
        if short:
            raise BadInput(f"{path} is truncated: {short}") from None
        raise BadInput(f"{path} is not an ONNX model (protobuf parse failed: {_one_line(err)})") from None
    except OSError as err:
        raise BadInput(f"cannot read {path}: {err.strerror or err}") from None


def _check_raw_data_size(tensor: onnx.TensorProto, path: str) -> None:
    """The checker's raw_data test, for initializers left in the model file: as many bytes as the
    shape and type need (the checker passes more, onnxruntime does not). (The wire walk found
    them inside the file.)"""
    length = int(external_info(tensor)["length"])
    needed = tensor_nbytes(tensor)
    if needed is not None and needed > length:
        raise BadInput(f"{path} fails the ONNX checker: TensorProto (tensor name: {tensor.name}) "
                       f"raw_data size ({length} bytes) is too small for the declared shape and type "
                       f"({needed} bytes required)")
    if needed is not None and needed < length:  # the checker passes it; onnxruntime refuses it (graph.tensor_array)
        raise BadInput(size_refusal(tensor, length, needed, "raw data"))


def _with_weights_as_inputs(model: onnx.ModelProto, own_name: str) -> onnx.ModelProto:
    """What the checker sees of a model whose weights were left in its file: those initializers
    become graph inputs of their type and shape. The checker's only test of a weight's data
    is its size, done by _check_raw_data_size; its tests of external files (no symlink, one
    hard link, ...) are for data files beside a model, not for the model file itself."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    del graph.initializer[:]
    declared = {value.name for value in graph.input}
    for tensor in model.graph.initializer:  # copied from the original, whose messages stay valid
        if (tensor.data_location == onnx.TensorProto.EXTERNAL
                and external_info(tensor).get("location") == own_name):
            if tensor.name not in declared:
                graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            graph.initializer.append(tensor)
    return copy


def _run_checker(in_memory: onnx.ModelProto | None, path: str, external_dir: str | None) -> None:
    """onnx.checker on the model: on the binary file, or on the parsed model (a text-format
    file, or weights left in the file). A parsed model with external data files is checked
    from their folder, as the checker resolves their locations from the working directory."""
    try:
        if in_memory is None:
            onnx.checker.check_model(path)
        elif external_dir is None:
            onnx.checker.check_model(in_memory)
        else:
            with _working_directory(external_dir):
                onnx.checker.check_model(in_memory)
    except onnx.checker.ValidationError as err:
        raise BadInput(f"{path} fails the ONNX checker: {_one_line(err)}") from None
    except Exception as err:  # the checker surfaces C++ errors with assorted types
        raise BadInput(f"{path} fails the ONNX checker: {_one_line(err)}") from None


@contextlib.contextmanager
def _working_directory(path: str):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _check_opset(model: onnx.ModelProto, path: str) -> None:
    try:
        version = opset_version(model, "")
    except AmbiguousOpset as err:
        raise BadInput(f"{path}: {err}") from None
    if version is None:
        raise BadInput(f"{path} imports no default-domain opset")
    newest = onnx.defs.onnx_opset_version()
    if version < MIN_OPSET or version > newest:
        raise BadInput(f"{path} uses opset {version}; supported opsets are {MIN_OPSET} to {newest}")


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(err).__name__)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all tensors, in memory or not, from their shapes (reading raw_data would copy
    it, and ByteSize() would encode it)."""
    return sum(tensor_nbytes(t) or 0 for t in all_tensors(model))
