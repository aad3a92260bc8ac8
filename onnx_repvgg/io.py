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
    offset = int(info.get("offset", 0) or 0)
    length = info.get("length")
    if length is not None and offset + int(length) > os.path.getsize(full):
        raise BadInput(f"external data file '{location}' is shorter than tensor '{tensor.name}' needs")
    return full


def load(path: str) -> LoadedModel:
    """Load a model and its external data, or raise BadInput with a one-line reason."""
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
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, base_dir)
        except (OSError, ValueError) as err:
            raise BadInput(f"cannot read external data of {path}: {_one_line(err)}") from None
    size += sum(os.path.getsize(f) for f in data_files)
    return LoadedModel(model, path, size, bool(external))


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
    """Serialized size of all tensors (ByteSize: reading raw_data would copy it)."""
    return sum(t.ByteSize() for t in external_data_helper._get_all_tensors(model))


def write_to_staging(model: onnx.ModelProto, path: str, external_data: bool) -> str:
    """Write the model into a fresh hidden folder beside `path`; return that folder.

    The model inside is named like `path`, and its external data file (if any) is
    `<name>.data`, so commit() can move both into place by rename.
    The model's tensors are moved to the data file: don't use `model` afterwards.
    """
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise BadInput(f"output folder {out_dir} does not exist")
    name = os.path.basename(path)
    try:
        staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    except OSError as err:
        raise BadInput(f"cannot write to {out_dir}: {err.strerror or err}") from None
    try:
        staged = os.path.join(staging, name)
        if external_data:
            onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, staged)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise BadInput(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def commit(staging: str, path: str) -> int:
    """Move a staged model (and its data file) to `path` by rename; return bytes written."""
    name = os.path.basename(path)
    out_dir = os.path.dirname(os.path.abspath(path))
    total = 0
    try:
        data = os.path.join(staging, name + ".data")
        if os.path.exists(data):
            total += os.path.getsize(data)
            os.replace(data, os.path.join(out_dir, name + ".data"))
        staged = os.path.join(staging, name)
        total += os.path.getsize(staged)
        os.replace(staged, os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return total


def staged_model_path(staging: str, path: str) -> str:
    return os.path.join(staging, os.path.basename(path))


def discard(staging: str | None) -> None:
    if staging:
        shutil.rmtree(staging, ignore_errors=True)
