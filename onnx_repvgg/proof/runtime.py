"""onnxruntime for the proof: models read cheaply, sessions with optimizations off, inputs.

A model given by path is read as a skeleton (storage.skeleton: large inline weights stay in
the file as external-data references into it) and onnxruntime is told where its external
data lives, so adding outputs or cutting out a block never loads the whole model in Python.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..storage import skeleton
from ..storage.external import all_tensors

_PROTO_LIMIT = 2**31 - 2**25  # serialize in memory below ~1.97 GB, else go through a file
_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"

ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


class ValidationError(RuntimeError):
    """onnxruntime could not run a model, so nothing could be proven.

    `side` is "original" when the input model itself cannot run (the user may choose
    --no-check), "fused" when only the fused model fails (a failed proof), "input" when the
    inputs asked for do not fit the model (a wrong --input-shape or --input-data), "sets" when
    the input sets asked for would not fit in memory (--check N), "unsupported" when a value's
    type is one the comparison cannot make or read (bfloat16, a string input without data)."""

    def __init__(self, message: str, side: str = "fused"):
        super().__init__(message)
        self.side = side


@dataclass
class ModelSource:
    model: onnx.ModelProto
    base_dir: str | None   # where its external data (and a skeleton's weights) lie
    label: str             # "original" or "fused"


def open_model(model, label: str, base_dir: str | None = None) -> ModelSource:
    """A ModelProto (its external data loaded, or beside `base_dir`), or a path read as a skeleton."""
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        try:
            proto, moved = skeleton.read(path)
            if moved and os.path.islink(path):
                # onnxruntime refuses external data that resolves outside the model's folder,
                # as weights left in a symlinked file do: read them into memory instead
                raise ValueError("symlinked model")
        except Exception:  # not a file the wire walk understands: protobuf says what is wrong
            try:
                proto = onnx.load_model(path, load_external_data=False)
            except Exception as err:
                raise ValidationError(f"cannot read the {label} model {path}: {one_line(err)}", label) from None
        return ModelSource(proto, os.path.dirname(os.path.abspath(path)), label)
    if base_dir is None and any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model)):
        raise ValidationError(f"the {label} model's external data is not loaded: pass its path, its folder "
                              "(base_dir=), or load it with onnx.load(path)", label)
    return ModelSource(model, base_dir, label)


def one_line(err: BaseException, limit: int = 400) -> str:
    """An error message on one line, all of it (onnxruntime puts the detail on later lines)."""
    text = " ".join(str(err).split())
    return (text[:limit] + "...") if len(text) > limit else (text or type(err).__name__)


def session(model: onnx.ModelProto, base_dir: str | None, label: str):
    """An onnxruntime CPU session with every graph optimization disabled."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # fatal only: the one-line error carries onnxruntime's message
    if base_dir:
        options.add_session_config_entry(_EXTERNAL_FOLDER, base_dir)
    try:
        if model.ByteSize() < _PROTO_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        if base_dir:  # a skeleton over 2 GB: its weights are already outside
            raise ValidationError(f"the {label} model's graph alone is over 2 GB", label)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except ValidationError:
        raise
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValidationError(f"onnxruntime cannot load the {label} model: {one_line(err)}", label) from None


def random_value(shape: Sequence[int], dtype, rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(0, 4, shape).astype(dtype)


def feeds_for(session_inputs, shapes: Mapping[str, Sequence[int]], data: Mapping[str, np.ndarray],
              seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for arg in session_inputs:
        dtype = ORT_DTYPES.get(arg.type)
        if dtype is None:
            if arg.name in data:  # given: onnxruntime checks it against the input's type
                feeds[arg.name] = np.asarray(data[arg.name])
                continue
            raise ValidationError(f"input '{arg.name}' has type {arg.type}, which random inputs do not cover "
                                  "(--input-data gives an input's values)", "unsupported")
        if arg.name in data:
            given = np.asarray(data[arg.name])
            if given.dtype.kind != np.dtype(dtype).kind:  # float data for an int input, or the reverse
                raise ValidationError(f"the data for input '{arg.name}' is {given.dtype}, the model takes {arg.type}",
                                      "input")
            feeds[arg.name] = given.astype(dtype, copy=False)
        else:
            feeds[arg.name] = random_value(shapes[arg.name], dtype, rng)
    return feeds


def drop_trailing_empty_outputs(node: onnx.NodeProto) -> int:
    """Drop a node's trailing empty output names (outputs not produced: the same node; a node
    keeps one output); return how many were dropped."""
    outputs = node.output
    count = 0
    while count < len(outputs) - 1 and not outputs[len(outputs) - 1 - count]:
        count += 1
    if count:
        del outputs[len(outputs) - count:]
    return count


@contextlib.contextmanager
def extra_outputs(model: onnx.ModelProto, names: Sequence[str]):
    """`model` with `names` added to its graph outputs for the duration (nothing is copied), and
    its nodes' trailing empty output names dropped: an empty name is an output not produced (the
    same model), and onnxruntime crashes on some (a BatchNormalization-9 with four)."""
    present = {v.name for v in model.graph.output}
    added = 0
    for name in names:
        if name not in present:
            model.graph.output.add().name = name
            present.add(name)
            added += 1
    trimmed = []  # (node, how many empty names it ended with)
    for node in model.graph.node:
        if node.output and not node.output[-1]:
            count = drop_trailing_empty_outputs(node)
            if count:
                trimmed.append((node, count))
    try:
        yield model
    finally:
        for node, count in trimmed:
            node.output.extend([""] * count)
        for _ in range(added):
            del model.graph.output[-1]
