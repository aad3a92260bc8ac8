"""Static values the pass derives from a graph: constants folded, shapes carried through ops.

Every value comes from onnx itself (its C++ shape inference, its reference evaluator) or is
checked against it, so the pass never relies on its own reading of an operator:

- fold(node, ...) evaluates one node of constant inputs with onnx's reference evaluator. The
  one place it departs from the ONNX spec, Slice (numpy slicing does not clamp starts and
  ends the way ONNX does), is evaluated here by the spec instead. An output that is not a
  tensor (a sequence, an optional) or any evaluation error gives None: not a constant.
- output_shape(node, ...) asks onnx's shape inference for one node whose parameters are given
  as constants, where inference over the whole graph could not see that they were constant
  (TorchScript computes slice bounds and pads). For Slice the spec's own arithmetic must
  agree with it, or the shape stays unknown.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max


def slice_bounds(dim: int, start: int, end: int, step: int) -> tuple[int, int | None]:
    """Start and end of one axis of an ONNX Slice, clamped as the spec says, as Python slice
    bounds (None for an end before index 0). Raises ValueError for step 0.

    Negative start/end count from the end; then, for step > 0, both are clamped to [0, dim];
    for step < 0, start to [0, dim-1] and end to [-1, dim-1]."""
    if step == 0:
        raise ValueError("Slice step 0")
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    return start, (end if end >= 0 else None)


def onnx_slice(data: np.ndarray, starts, ends, axes=None, steps=None) -> np.ndarray:
    """ONNX Slice on a numpy array, by the spec (see slice_bounds)."""
    starts = [int(v) for v in np.asarray(starts).reshape(-1)]
    ends = [int(v) for v in np.asarray(ends).reshape(-1)]
    rank = data.ndim
    axes = list(range(len(starts))) if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.asarray(steps).reshape(-1)]
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise ValueError("Slice parameters of different lengths")
    index = [slice(None)] * rank
    seen = set()
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if not -rank <= axis < rank:
            raise ValueError(f"Slice axis {axis} out of range for rank {rank}")
        axis %= rank
        if axis in seen:
            raise ValueError("Slice repeats an axis")
        seen.add(axis)
        begin, stop = slice_bounds(data.shape[axis], start, end, step)
        index[axis] = slice(begin, stop, step)
    return data[tuple(index)]


def _slice_inputs(node: onnx.NodeProto, opset: int, values: Mapping[str, np.ndarray]):
    """(starts, ends, axes, steps) of a Slice node, from its inputs (opset >= 10) or attributes."""
    if opset < 10:
        attrs = {a.name: list(a.ints) for a in node.attribute}
        return attrs.get("starts"), attrs.get("ends"), attrs.get("axes"), None
    params = [values.get(name) if name else None for name in list(node.input[1:5]) + [""] * (5 - len(node.input))]
    return tuple(params[:4])


_EVALUATIONS = [0]  # evaluator runs since the last young collection (see below)
EVALUATIONS_PER_COLLECTION = 64


def _collect_evaluator_cycles() -> None:
    """Each ReferenceEvaluator leaves a reference cycle of ~20 objects (~10 KB). The pass runs
    with the cyclic collector off (pipeline.no_collections), so while it is off the young
    generation is collected every EVALUATIONS_PER_COLLECTION evaluations (a model of 10^4
    computed weights would otherwise hold ~200 MB of them until the pass ends)."""
    _EVALUATIONS[0] += 1
    if _EVALUATIONS[0] >= EVALUATIONS_PER_COLLECTION and not gc.isenabled():
        _EVALUATIONS[0] = 0
        gc.collect(0)


def fold(node: onnx.NodeProto, opset: int, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """Evaluate one node whose inputs are all given; {output name: array}, or None when onnx
    cannot evaluate it or an output is not a tensor."""
    try:
        if node.op_type == "Slice" and node.domain in ("", "ai.onnx"):
            starts, ends, axes, steps = _slice_inputs(node, opset, inputs)
            if starts is None or ends is None:
                return None
            return {node.output[0]: np.asarray(onnx_slice(inputs[node.input[0]], starts, ends, axes, steps))}
        from onnx.reference import ReferenceEvaluator

        graph = helper.make_graph(
            [node], "fold",
            [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for k, v in inputs.items()],
            [helper.make_tensor_value_info(out, onnx.TensorProto.UNDEFINED, None) for out in node.output if out])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        results = ReferenceEvaluator(model).run(None, dict(inputs))
    except Exception:  # an op or a case the reference evaluator does not cover: not a usable constant
        return None
    finally:
        _collect_evaluator_cycles()
    values = {}
    for out, result in zip([o for o in node.output if o], results):
        if not isinstance(result, (np.ndarray, np.generic)):
            return None  # a sequence or an optional: not a tensor constant
        values[out] = np.asarray(result)
    return values


def output_shape(node: onnx.NodeProto, opset: int, shape: Sequence[int], elem_type: int | None,
                 constants: Mapping[str, np.ndarray]) -> tuple[int, ...] | None:
    """The shape of a node's first output (-1 for an unknown dim) by onnx's shape inference, given
    its data input's shape and its other inputs as constants; None when inference cannot say."""
    data = node.input[0]
    if elem_type is None:  # a type the inference accepts with the other inputs
        typed = [v for k, v in constants.items() if k != data and np.issubdtype(v.dtype, np.floating)]
        elem_type = helper.np_dtype_to_tensor_dtype(typed[0].dtype) if typed else onnx.TensorProto.FLOAT
    dims = [d if d >= 0 else None for d in shape]
    try:
        graph = helper.make_graph(
            [node], "shape", [helper.make_tensor_value_info(data, elem_type, dims)],
            [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.UNDEFINED, None)],
            initializer=[numpy_helper.from_array(v, k) for k, v in constants.items() if k != data])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception:
        return None
    out = inferred.graph.output[0].type
    if not out.HasField("tensor_type") or not out.tensor_type.HasField("shape"):
        return None
    result = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in out.tensor_type.shape.dim)
    if node.op_type == "Slice" and node.domain in ("", "ai.onnx"):
        try:
            starts, ends, axes, steps = _slice_inputs(node, opset, constants)
            if starts is None or ends is None:
                return None
            # the spec's arithmetic on an array of that shape that holds no data
            spec = onnx_slice(np.lib.stride_tricks.as_strided(np.zeros(1), [max(d, 0) for d in shape],
                                                              [0] * len(shape)), starts, ends, axes, steps).shape
        except ValueError:
            return None
        expected = tuple(s if d >= 0 else -1 for s, d in zip(spec, result))
        if any(r >= 0 and r != e for r, e in zip(result, expected)) or len(result) != len(shape):
            return None  # onnx and the spec disagree: the shape is not known
    return result


class Memo:
    """fold and output_shape answers by content, for one pass over a model.

    Exporters repeat the same small index arithmetic in every layer (a Slice of a shape by
    the same constants, a Transpose of the same shape), and every round indexes the graph
    again. The key is everything either function reads: the node's domain, type and
    attributes (serialized), the opset, which outputs it declares, and per input position
    the value's dtype, shape and bytes (or "the data input", or nothing); for output_shape
    also the data input's shape and element type. Only inputs of a few KB are keyed.
    Arrays handed out from here are shared by every node with that key: they are read-only.
    """

    MAX_INPUT_BYTES = 4096     # keyed only when the node's constant inputs are this small
    MAX_RESULT_BYTES = 1 << 16  # and fold results kept only when this small

    def __init__(self) -> None:
        self._folds: dict[tuple, tuple[np.ndarray, ...] | None] = {}
        self._shapes: dict[tuple, tuple[int, ...] | None] = {}

    def fold(self, node: onnx.NodeProto, opset: int, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        key = _content_key(node, opset, inputs, None, self.MAX_INPUT_BYTES)
        outputs = [o for o in node.output if o]
        if key is not None and key in self._folds:
            cached = self._folds[key]
            return None if cached is None else dict(zip(outputs, cached))
        values = fold(node, opset, inputs)
        if values is not None:
            for array in values.values():
                array.flags.writeable = False  # shared through the constant caches
        if key is not None and (values is None or sum(a.nbytes for a in values.values()) <= self.MAX_RESULT_BYTES):
            self._folds[key] = None if values is None else tuple(values[o] for o in outputs if o in values)
        return values

    def output_shape(self, node: onnx.NodeProto, opset: int, shape: Sequence[int], elem_type: int | None,
                     constants: Mapping[str, np.ndarray]) -> tuple[int, ...] | None:
        key = _content_key(node, opset, constants, node.input[0], self.MAX_INPUT_BYTES)
        if key is None:
            return output_shape(node, opset, shape, elem_type, constants)
        key = key + (tuple(shape), elem_type)
        if key not in self._shapes:
            self._shapes[key] = output_shape(node, opset, shape, elem_type, constants)
        return self._shapes[key]


def _content_key(node: onnx.NodeProto, opset: int, values: Mapping[str, np.ndarray], data: str | None,
                 limit: int) -> tuple | None:
    """What fold/output_shape read of a node and its input values, or None when an input is
    not a plain numeric array or the inputs are larger than `limit` bytes."""
    parts: list = []
    size = 0
    for name in node.input:
        if not name:
            parts.append("")
        elif name == data:
            parts.append("data")
        elif name in values:
            array = values[name]
            if array.dtype.kind not in "biufc":
                return None
            size += array.nbytes
            if size > limit:
                return None
            parts.append((array.dtype.str, array.shape, array.tobytes()))
        else:
            parts.append(None)
    attributes = tuple(a.SerializeToString() for a in node.attribute)
    return (node.domain, node.op_type, opset, attributes, tuple(bool(o) for o in node.output), tuple(parts))
