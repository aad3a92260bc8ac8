"""Reading Conv and BatchNormalization nodes into checked numbers, or a Skip with the reason."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx

from .. import algebra
from ..block import Reason
from ..cheap_shapes import CheapShapes
from ..graph import GraphView, attribute, attributes, shared_attributes

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class NotWorthIt(Exception):
    """The structure matched, but rewriting it would not remove a node: not a candidate."""


class Skip(Exception):
    """Raised inside the checks; carries the Reason the block is left alone."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.reason = Reason(code, message)


def is_op(node: onnx.NodeProto | None, *ops: str) -> bool:
    return node is not None and node.op_type in ops and node.domain in ("", "ai.onnx")


def tensor_rank(view: GraphView, name: str) -> int | None:
    """The rank of a tensor when its shape is known (static shapes or declared types)."""
    shape = view.shape(name)
    return None if shape is None else len(shape)


def rank_ruled_out(view: GraphView, name: str, rank: int) -> bool:
    """Do the cheap shapes (cheap_shapes.py) give `name` a rank other than `rank`? Then a
    candidate that needs that rank is ruled out without asking onnx; False says nothing."""
    cheap = CheapShapes.of(view).rank(name)
    return cheap is not None and cheap != rank


def data_consumers(view: GraphView, node: onnx.NodeProto, *ops: str) -> list[int] | None:
    """Indices of the nodes that read `node`'s first output, if every use is the data input
    (slot 0) of one of `ops` and the output is not a graph output; otherwise None."""
    if not node.input or not node.output:
        return None
    out = node.output[0]
    uses = view.consumers.get(out, [])
    if not uses or out in view.graph_outputs:
        return None
    if not all(is_op(view.nodes[i], *ops) and slot == 0 for i, slot in uses):
        return None
    return [i for i, _ in uses]


def const(view: GraphView, name: str, what: str, node: onnx.NodeProto) -> np.ndarray:
    value = view.constant(name)
    if value is None:
        producer = view.producer_of(name)
        if producer is not None and producer.op_type in ("DequantizeLinear", "QuantizeLinear"):
            raise Skip("quantized", f"{what} '{name}' of {node.op_type} '{node.name}' is quantized "
                       f"({producer.op_type}); QDQ models are left as they are")
        if name in view.graph_inputs:
            where = "a graph input"
        elif any(sparse.values.name == name for sparse in view.graph.sparse_initializer):
            where = "a sparse initializer: the rules read dense ones"
        elif not view.main_graph and name not in view.producer and name not in view.initializers:  # from outside
            where = ("read from the enclosing graph: blocks inside an If, Loop or Scan body are fused only when "
                     "their weights are the body's own constants")
        else:
            where = "computed at run time"
        raise Skip("non_constant", f"{what} '{name}' of {node.op_type} '{node.name}' is not a constant ({where})")
    return value


@dataclass
class ConvParams:
    node_name: str
    weight: np.ndarray
    bias: np.ndarray | None
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    group: int

    @property
    def kernel(self) -> tuple[int, ...]:
        # (not a functools.cached_property: on Python 3.11 that takes a lock on every first
        # read, which costs more than this tuple)
        return self.weight.shape[2:]


def conv_params(view: GraphView, node: onnx.NodeProto, inputs: list[str] | None = None) -> ConvParams:
    """A Conv's constant weight and bias and its explicit geometry (auto_pad resolved).
    `inputs`: the node's inputs, when the caller has read them (view.inputs_of)."""
    if inputs is None:
        inputs = node.input[:]
    if len(inputs) < 2:
        raise Skip("malformed", f"Conv '{node.name}' has no weight input")
    weight = const(view, inputs[1], "weight", node)
    if weight.dtype not in FLOAT_DTYPES:
        raise Skip("dtype", f"Conv '{node.name}' weight dtype {weight.dtype} is not float16/32/64")
    if weight.ndim < 3:
        raise Skip("malformed", f"Conv '{node.name}' weight has rank {weight.ndim}")
    bias = None
    if len(inputs) > 2 and inputs[2]:
        bias = const(view, inputs[2], "bias", node)
        if bias.shape != (weight.shape[0],):
            raise Skip("malformed", f"Conv '{node.name}' bias shape {bias.shape} != ({weight.shape[0]},)")
    n = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    key, attrs = shared_attributes(node)
    # The geometry follows from the attributes, the kernel and Cout alone: worked out once per
    # combination (a refusal names its node, so only a geometry that passes is remembered).
    memo = (key, kernel, weight.shape[0]) if key is not None else None
    geometry = _CONV_GEOMETRY.get(memo) if memo is not None else None
    if geometry is None:
        geometry = _conv_geometry(node, attrs, n, kernel, weight.shape[0])
        if memo is not None and len(_CONV_GEOMETRY) < 4096:
            _CONV_GEOMETRY[memo] = geometry
    strides, dilations, begin, end, group = geometry
    return ConvParams(node.name, weight, bias, strides, dilations, begin, end, group)


def _conv_geometry(node: onnx.NodeProto, attrs: dict, n: int, kernel: tuple[int, ...], cout: int) -> tuple:
    """(strides, dilations, pads begin, pads end, group) of a Conv with these attributes and
    kernel, auto_pad resolved; or Skip."""
    declared = attrs.get("kernel_shape")
    if declared is not None and tuple(declared) != kernel:
        raise Skip("malformed", f"Conv '{node.name}' kernel_shape {tuple(declared)} != weight {kernel}")
    strides = tuple(attrs.get("strides", [1] * n))
    dilations = tuple(attrs.get("dilations", [1] * n))
    group = int(attrs.get("group", 1))
    if len(strides) != n or len(dilations) != n:
        raise Skip("malformed", f"Conv '{node.name}' strides/dilations do not match {n} spatial axes")
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "NOTSET":
        pads = tuple(attrs.get("pads", [0] * (2 * n)))
        if len(pads) != 2 * n:
            raise Skip("malformed", f"Conv '{node.name}' has {len(pads)} pads for {n} axes")
        begin, end = pads[:n], pads[n:]
    elif auto_pad == "VALID":
        begin, end = (0,) * n, (0,) * n
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(s != 1 for s in strides):
            raise Skip("auto_pad", f"Conv '{node.name}' auto_pad={auto_pad} with stride {strides}: "
                       "its pads depend on the input size")
        totals = [d * (k - 1) for d, k in zip(dilations, kernel)]
        small = tuple(t // 2 for t in totals)
        large = tuple(t - t // 2 for t in totals)
        begin, end = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    else:
        raise Skip("auto_pad", f"Conv '{node.name}' has unknown auto_pad {auto_pad!r}")
    if group < 1 or cout % group:
        raise Skip("malformed", f"Conv '{node.name}' has group {group} for {cout} outputs")
    check_window(f"Conv '{node.name}'", strides, dilations, tuple(begin) + tuple(end))
    return strides, dilations, tuple(begin), tuple(end), group


def check_window(what: str, strides: tuple, dilations: tuple, pads: tuple) -> None:
    """Strides and dilations of 1 or more, pads of 0 or more, as the operators' definitions ask
    (onnx.checker passes others; onnxruntime refuses them); or Skip."""
    if any(s < 1 for s in strides) or any(d < 1 for d in dilations) or any(p < 0 for p in pads):
        raise Skip("malformed", f"{what} has strides {list(strides)}, dilations {list(dilations)}, pads {list(pads)}: "
                   "strides and dilations must be 1 or more, pads 0 or more")


# (attribute bytes, kernel, Cout) -> conv_params' geometry (a pure function of them)
_CONV_GEOMETRY: dict[tuple, tuple] = {}


def bn_training_reason(view: GraphView, node: onnx.NodeProto, opset: int, attrs: dict | None = None) -> str | None:
    """Why a BatchNormalization runs in training mode (batch statistics), by its opset's own
    definition, or None when it normalizes with its running statistics:

        opset < 7     the is_test attribute (0, the default, is training);
        opsets 7-13   the outputs: declaring any output beyond Y selects training mode, even
                      when nothing reads it (onnxruntime then uses batch statistics);
        opset >= 14   the training_mode attribute (0 by default); its extra outputs exist
                      only in training mode.
    """
    extras = [name for name in node.output[1:] if name]
    if opset < 7:
        if int(attribute(node, "is_test", 0)) == 0:
            return "has is_test=0 (training)"
    elif opset < 14:
        if extras:
            return (f"declares {len(extras)} training output(s) ({', '.join(extras)}): from opset 7 to 13 "
                    "that selects training mode (batch statistics), used or not")
        return None
    elif int((attrs if attrs is not None else attributes(node)).get("training_mode", 0)) != 0:
        return "has training_mode=1"
    used = [name for name in extras if view.use_count(name)]
    if used:
        return f"output '{used[0]}' (a training statistic) is used"
    return None


def _bn_epsilon(view: GraphView, node: onnx.NodeProto, opset: int, wiring: tuple[list[str], list[str]] | None = None
                ) -> float:
    """The checks of the BN node itself (inference mode, spatial, five inputs), and its epsilon;
    or Skip. `wiring`: the node's (inputs, outputs) when the caller has read them."""
    attrs = shared_attributes(node)[1]  # read only
    inputs, outputs = wiring if wiring is not None else (node.input, node.output)
    if opset >= 14 and len(inputs) == 5 and not any(outputs[1:]) and int(attrs.get("training_mode", 0)) == 0:
        return float(attrs.get("epsilon", 1e-5))  # the common inference BN: every check below passes
    reason = bn_training_reason(view, node, opset, attrs)
    if reason:
        raise Skip("bn_training", f"BatchNormalization '{node.name}' {reason}")
    if opset < 9 and int(attrs.get("spatial", 1)) != 1:
        raise Skip("bn_spatial", f"BatchNormalization '{node.name}' has spatial=0 (per-element statistics)")
    if len(node.input) != 5:
        raise Skip("malformed", f"BatchNormalization '{node.name}' has {len(node.input)} inputs")
    return float(attrs.get("epsilon", 1e-5))


def bn_parameters(view: GraphView, node: onnx.NodeProto, opset: int):
    """An inference-mode BN's (gamma, beta, mean, var) constants, checked to be per-channel
    vectors, and its epsilon; or Skip (every check of bn_affine but the variance's)."""
    eps = _bn_epsilon(view, node, opset)
    return _bn_vectors(view, node), eps


def _bn_vectors(view: GraphView, node: onnx.NodeProto) -> tuple[np.ndarray, ...]:
    inputs = node.input
    gamma, beta, mean, var = (const(view, name, what, node) for name, what in
                              zip(inputs[1:], ("scale", "bias", "mean", "var")))
    channels = gamma.shape
    if len(channels) != 1 or beta.shape != channels or mean.shape != channels or var.shape != channels:
        raise Skip("malformed", f"BatchNormalization '{node.name}' parameters are not per-channel vectors")
    return gamma, beta, mean, var


def _bad_variance(node: onnx.NodeProto) -> Skip:
    return Skip("bn_variance", f"BatchNormalization '{node.name}' has var + eps <= 0")


def bn_affine(view: GraphView, node: onnx.NodeProto, opset: int) -> tuple[np.ndarray, np.ndarray]:
    """An inference-mode BN as per-channel (scale, shift) in float64, or Skip."""
    parameters, eps = bn_parameters(view, node, opset)
    params = np.array(parameters, dtype=np.float64)  # one conversion: the shapes are equal
    if (params[3] + eps <= 0).any():
        raise _bad_variance(node)
    return algebra.bn_scale_shift(params[0], params[1], params[2], params[3], eps)


def bn_affines(view: GraphView, indices: list[int], opset: int) -> list:
    """bn_affine of each node (by index in `view`), as (scale, shift) or the Skip it raises: the
    arithmetic of the BNs of C channels done in one numpy call per C (the same float64
    operations, element by element; the vectors handed out are read-only rows of one array)."""
    results: list = [None] * len(indices)
    groups: dict[int, list] = defaultdict(list)  # C -> (position, parameters, eps): arrays read one by one
    raw: dict[tuple, list] = defaultdict(list)   # (dtype, C) -> (position, raw bytes of the four, eps)
    nodes, inputs_of, outputs_of = view.nodes, view.inputs_of, view.outputs_of
    raw_vectors = view.raw_vectors
    for position, index in enumerate(indices):
        node = nodes[index]
        inputs = inputs_of[index]
        try:
            eps = _bn_epsilon(view, node, opset, (inputs, outputs_of[index]))
            vectors = raw_vectors(inputs[1:5])
            if vectors is not None:  # four inline vectors of one dtype and length: read below, all at once
                raw[vectors[0]].append((position, vectors[1], eps))
                continue
            parameters = _bn_vectors(view, node)
        except Skip as skip:
            results[position] = skip.with_traceback(None)  # kept without its frames (no reference cycle)
            continue
        groups[parameters[0].shape[0]].append((position, parameters, eps))
    blocks = [(np.array([m[1] for m in members], dtype=np.float64), members) for members in groups.values()]
    for (dtype, channels), members in raw.items():  # the same float64 values as from the arrays
        data = np.frombuffer(b"".join(b for m in members for b in m[1]), dtype=dtype)
        blocks.append((data.reshape(len(members), 4, channels).astype(np.float64), members))
    for params, members in blocks:  # params: (BNs, 4, C)
        epsilons = np.array([m[2] for m in members])[:, None]
        bad = (params[:, 3] + epsilons <= 0).any(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # only in rows refused below
            scale, shift = algebra.bn_scale_shift(params[:, 0], params[:, 1], params[:, 2], params[:, 3], epsilons)
        scale.flags.writeable = shift.flags.writeable = False
        for row, (position, _, _) in enumerate(members):
            results[position] = _bad_variance(nodes[indices[position]]) if bad[row] else (scale[row], shift[row])
    return results


@dataclass
class GemmParams:
    """A Gemm as alpha * X @ W + beta * C with W as (in, out) and C per output, float64."""

    weight: np.ndarray          # (in, out): B, or B^T when transB=1
    bias: np.ndarray            # (out,): C broadcast per output (zeros without C)
    alpha: float
    beta: float
    trans_b: bool
    has_bias: bool
    dtype: np.dtype


def gemm_params(view: GraphView, node: onnx.NodeProto) -> GemmParams:
    """A Gemm's constant weight and bias read with checks, or Skip (transA=1, a weight that is
    not a 2-D float constant, a C that is not per output)."""
    if int(attribute(node, "transA", 0)) != 0:
        raise Skip("gemm_transA", f"Gemm '{node.name}' transposes its input (transA=1)")
    if len(node.input) < 2:
        raise Skip("malformed", f"Gemm '{node.name}' has no weight")
    b = const(view, node.input[1], "weight", node)
    if b.dtype not in FLOAT_DTYPES or b.ndim != 2:
        raise Skip("dtype", f"Gemm '{node.name}' weight is not a 2-D float tensor")
    trans_b = int(attribute(node, "transB", 0)) == 1
    weight = (b.T if trans_b else b).astype(np.float64)
    out = weight.shape[1]
    bias = np.zeros(out)
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if has_bias:
        c = const(view, node.input[2], "bias", node).astype(np.float64)
        if c.size == 1:
            bias = np.full(out, c.reshape(-1)[0])
        elif c.shape in ((out,), (1, out)):
            bias = c.reshape(-1)
        else:
            raise Skip("not_per_channel", f"Gemm '{node.name}' bias of shape {c.shape} is not per output")
    return GemmParams(weight, bias, float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0)),
                      trans_b, has_bias, b.dtype)


@dataclass
class PoolParams:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]


def pool_params(view: GraphView, node: onnx.NodeProto) -> PoolParams:
    """An AveragePool that is exactly a depthwise conv with weights 1/prod(k), or Skip.

    With count_include_pad=0 the border windows divide by fewer taps: not a convolution.
    """
    kernel = tuple(attribute(node, "kernel_shape", []))
    n = len(kernel)
    if not n:
        raise Skip("malformed", f"AveragePool '{node.name}' has no kernel_shape")
    if int(attribute(node, "count_include_pad", 0)) != 1:
        raise Skip("pool_exclude_pad", f"AveragePool '{node.name}' has count_include_pad=0: border windows "
                   "divide by fewer taps, which no convolution does")
    if int(attribute(node, "ceil_mode", 0)) != 0:
        raise Skip("pool_ceil_mode", f"AveragePool '{node.name}' has ceil_mode=1")
    if any(d != 1 for d in attribute(node, "dilations", [1] * n)):
        raise Skip("dilation_mismatch", f"AveragePool '{node.name}' is dilated")
    strides = tuple(attribute(node, "strides", [1] * n))
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "NOTSET":
        pads = tuple(attribute(node, "pads", [0] * (2 * n)))
    elif auto_pad == "VALID":
        pads = (0,) * (2 * n)
    else:
        raise Skip("auto_pad", f"AveragePool '{node.name}' has auto_pad={auto_pad}")
    if len(strides) != n or len(pads) != 2 * n:
        raise Skip("malformed", f"AveragePool '{node.name}' strides/pads do not match {n} spatial axes")
    check_window(f"AveragePool '{node.name}'", strides, (), pads)
    return PoolParams(kernel, strides, pads[:n], pads[n:])
