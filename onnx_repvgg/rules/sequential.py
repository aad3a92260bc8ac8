"""A 1x1 conv, then a border fill, then a kxk conv (or AveragePool) -> one kxk conv (DBB).

DBB's 1x1 -> kxk and 1x1 -> AvgPool branches pad the 1x1 output with its own value at a
zero input ("BNAndPad"), so that the pair equals one kxk conv on zero-padded X. Exporters
write that fill as data movement (Pad, ScatterND, Transpose, Identity) with constant
operands. The rule probes that chain with two inputs (+arange, -arange) to learn, for every
output element, which input element or which constant it holds, and accepts it only if it
is exactly "pad by (top, left, bottom, right) with a per-channel value v".

Preconditions: Conv1 is 1x1, stride 1, no padding, constant weights; the chain is pure data
movement with constant operands and private intermediates, and its input shape is declared;
v equals Conv1's output at a zero input (its bias): the padding condition; Conv2 has no
padding, dilation 1, the same groups as Conv1, constant weights; Conv1 has at least as many
output channels as input channels, so the merged conv never costs more MACs.
Formula, per group: W[o, i] = sum_m W2[o, m] * W1[m, i] (over every tap of W2),
b[o] = b2[o] + sum_m,taps W2[o, m, taps] * b1[m]; pads = the fill's (top, left, bottom, right).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .. import algebra
from ..block import Candidate, Rewrite
from ..graph import GraphView, attribute
from .common import Skip, bn_affine, conv_params, is_op

NAME = "sequential"
CHAIN_OPS = ("Pad", "ScatterND", "Transpose", "Identity")
_PROBE_LIMIT = 1 << 22  # elements: probes stay exact in float32 below 2**24


@dataclass
class SequentialMatch:
    anchor: str
    input: str
    output: str
    weight: np.ndarray
    bias: np.ndarray
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    group: int
    dtype: np.dtype
    removed_nodes: list[int]
    name_hint: str
    stand_ins: list[tuple[str, np.ndarray]]

    def materialize(self, view: GraphView, names) -> Rewrite:
        w_name = names.fresh(f"{self.name_hint}.fused_weight")
        b_name = names.fresh(f"{self.name_hint}.fused_bias")
        node = helper.make_node("Conv", [self.input, w_name, b_name], [self.output], name=self.name_hint,
                                kernel_shape=list(self.kernel), strides=list(self.strides),
                                pads=list(self.pads), group=self.group)
        weight = algebra.cast_like(self.weight, self.dtype)
        bias = algebra.cast_like(self.bias, self.dtype)
        return Rewrite(self.removed_nodes, [(view.producer[self.output], [node])],
                       [(w_name, weight), (b_name, bias)] + list(self.stand_ins), node.name)


def _declared_shape(view: GraphView, name: str) -> tuple[int, ...] | None:
    """The shape of a tensor if every dim is known."""
    dims = view.shape(name)
    return dims if dims is not None and all(d > 0 for d in dims) else None


def _shape_only(view: GraphView, index: int) -> bool:
    """A node that reads a tensor only for its static shape or its type.

    A constant node that reads a non-constant tensor can only be a Shape of a statically
    shaped tensor or a CastLike to its type (see GraphView); a node whose every output feeds
    only such constant nodes (TorchScript slices a tensor to shape a fill) reads it for that too.
    """
    if view.is_constant_node(index):
        return True
    node = view.nodes[index]
    if any(out in view.graph_outputs for out in node.output if out):
        return False
    readers = [i for out in node.output if out for i, _ in view.consumers.get(out, [])]
    return bool(readers) and all(view.is_constant_node(i) for i in readers)


def _with_meta_readers(view: GraphView, side: list[int]) -> list[int]:
    """Side nodes plus, for a non-constant one (a Slice), the constant nodes that read it:
    all of them go with the chain, their constant outputs standing in where still read."""
    out = list(side)
    for i in side:
        if not view.is_constant_node(i):
            out += [j for o in view.nodes[i].output if o for j, _ in view.consumers.get(o, [])]
    return out


def _chain_to(view: GraphView, u: str) -> tuple[list[int], str, list[int]] | None:
    """The data-movement nodes producing `u`, back to the first tensor not made by one, and
    the side nodes that read chain tensors only for their shapes."""
    chain: list[int] = []
    side: list[int] = []
    name = u
    while True:
        index = view.producer.get(name)
        if index is None or not is_op(view.nodes[index], *CHAIN_OPS):
            break
        node = view.nodes[index]
        if any(view.constant(i) is None for i in node.input[1:] if i):
            return None
        out = node.output[0]
        if out in view.graph_outputs:
            return None
        readers = [i for i, _ in view.consumers.get(out, [])]
        data_readers = [i for i in readers if not _shape_only(view, i)]
        if len(data_readers) != 1:
            return None
        side += _with_meta_readers(view, [i for i in readers if i not in data_readers])
        chain.append(index)
        name = node.input[0]
    if not chain:
        return None
    # The chain's input may be read for its shape too.
    side += _with_meta_readers(view, [i for i, _ in view.consumers.get(name, []) if _shape_only(view, i)])
    return list(reversed(chain)), name, side


def _run_chain(view: GraphView, chain: list[int], t: str, probe: np.ndarray, opset: int) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    nodes = [view.nodes[i] for i in chain]
    consts: dict[str, np.ndarray] = {}
    for n in nodes:
        for name in n.input[1:]:
            value = view.constant(name) if name else None
            if value is not None:  # the chain was accepted only with constant operands
                consts[name] = value
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(probe.dtype), probe.shape)],
        [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.UNDEFINED, None)],
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return np.asarray(ReferenceEvaluator(model).run(None, {t: probe})[0])  # type: ignore[index]


def fill_geometry(view: GraphView, chain: list[int], t: str, shape: tuple[int, ...], dtype, opset: int):
    """(pads, v) if the chain is exactly a 2-D pad of `t` with a per-channel value v, else Skip."""
    count = int(np.prod(shape))
    if count > _PROBE_LIMIT or len(shape) != 4:
        raise Skip("pad_chain", f"cannot probe the fill in front of the kxk conv (shape {shape})")
    base = (np.arange(count, dtype=np.float64) + 1).reshape(shape)
    try:
        a = _run_chain(view, chain, t, base.astype(dtype), opset).astype(np.float64)
        b = _run_chain(view, chain, t, (-base).astype(dtype), opset).astype(np.float64)
    except Exception as err:  # an op the reference evaluator does not cover
        raise Skip("pad_chain", f"cannot evaluate the fill chain: {type(err).__name__}") from None
    n, c, h, w = shape
    if a.shape[:2] != (n, c) or a.ndim != 4:
        raise Skip("pad_chain", "the fill chain changes batch or channels")
    from_t = (b == -a) & (a >= 1)
    const = a == b
    if not np.all(from_t | const):
        raise Skip("pad_chain", "the fill chain is not pure data movement")
    rows = np.nonzero(from_t.any(axis=(0, 1, 3)))[0]
    cols = np.nonzero(from_t.any(axis=(0, 1, 2)))[0]
    if rows.size != h or cols.size != w:
        raise Skip("pad_chain", "the fill chain does not keep every input pixel")
    top, left = int(rows[0]), int(cols[0])
    bottom, right = a.shape[2] - h - top, a.shape[3] - w - left
    inner = a[:, :, top:top + h, left:left + w]
    if not np.array_equal(inner, base) or not from_t[:, :, top:top + h, left:left + w].all():
        raise Skip("pad_chain", "the fill chain moves pixels around")
    border = np.ones(a.shape[2:], dtype=bool)
    border[top:top + h, left:left + w] = False
    values = a[:, :, border]  # (n, c, border pixels)
    v = values[0, :, 0] if values.size else np.zeros(c)
    if values.size and not np.all(values == v[None, :, None]):
        raise Skip("pad_chain", "the fill value varies along the border")
    return (top, left, bottom, right), v


def find(view: GraphView, opset: int, options: dict | None = None):
    if not any(view.of_type(op) for op in CHAIN_OPS):
        return  # no fill chain anywhere: nothing for _chain_to to find
    for index in view.of_type("Conv", "AveragePool"):
        node = view.nodes[index]
        if not (is_op(node, "Conv") or is_op(node, "AveragePool")) or not node.input:
            continue
        found = _chain_to(view, node.input[0])
        if found is None:
            continue
        chain, t, side = found
        c1_index = view.producer.get(t)
        if c1_index is None or t in view.graph_outputs:
            continue
        if [i for i, _ in view.consumers.get(t, []) if i not in side] != [chain[0]]:
            continue
        bn_index = None
        if is_op(view.nodes[c1_index], "BatchNormalization"):  # unfolded export: 1x1 conv -> BN -> fill
            bn_index, inner = c1_index, view.nodes[c1_index].input[0]
            c1_index = view.producer.get(inner)
            if c1_index is None or not view.is_private(inner):
                continue
        if not is_op(view.nodes[c1_index], "Conv"):
            continue
        conv1 = view.nodes[c1_index]
        candidate = Candidate(anchor=node.name or node.output[0], branch_labels=["1x1", "fill", node.op_type.lower()])
        try:
            p1 = conv_params(view, conv1)
            if p1.kernel != (1, 1) or any(p1.pads_begin) or any(p1.pads_end):
                raise Skip("sequential_geometry", f"Conv '{conv1.name}' is not a plain 1x1 conv")
            if any(s != 1 for s in p1.strides):
                raise Skip("sequential_geometry", f"Conv '{conv1.name}' has stride {p1.strides}")
            cm, cin_g = p1.weight.shape[:2]
            cin = cin_g * p1.group
            if cm < cin:
                raise Skip("sequential_cost", f"Conv '{conv1.name}' narrows {cin} -> {cm} channels: merging "
                           "would cost more")
            shape = _declared_shape(view, t)
            if shape is None:  # a 1x1 conv with stride 1 and no pad keeps X's spatial shape
                x_shape = _declared_shape(view, conv1.input[0])
                shape = None if x_shape is None or len(x_shape) != 4 else (x_shape[0], cm) + x_shape[2:]
            if shape is None:
                raise Skip("pad_chain", f"the shape of '{t}' is not declared; cannot probe the fill")
            pads, v = fill_geometry(view, chain, t, shape, p1.weight.dtype, opset)
            b1 = np.zeros(cm) if p1.bias is None else p1.bias.astype(np.float64)
            w1 = p1.weight.astype(np.float64)[:, :, 0, 0]  # (cm, cin/g)
            if bn_index is not None:
                scale, shift = bn_affine(view, view.nodes[bn_index], opset)
                w1, b1 = w1 * scale[:, None], b1 * scale + shift
            if not np.allclose(v, b1, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b1).max(initial=0)))):
                raise Skip("pad_condition", f"the border holds {v[:3].tolist()}..., but Conv '{conv1.name}' gives "
                           f"{b1[:3].tolist()}... at a zero input: not one conv")
            if is_op(node, "Conv"):
                p2 = conv_params(view, node)
                if any(p2.pads_begin) or any(p2.pads_end):
                    raise Skip("sequential_geometry", f"Conv '{node.name}' pads again after the fill")
                if any(d != 1 for d in p2.dilations):
                    raise Skip("dilation_mismatch", f"Conv '{node.name}' is dilated")
                if p2.group != p1.group or p2.weight.shape[1] * p2.group != cm:
                    raise Skip("group_mismatch", f"Conv '{node.name}' groups {p2.group} != {p1.group} of '{conv1.name}'")
                w2 = p2.weight.astype(np.float64)
                cout = w2.shape[0]
                g = p1.group
                out_g, mid_g = cout // g, cm // g
                weight = np.zeros((cout, cin_g) + w2.shape[2:])
                bias = np.zeros(cout) if p2.bias is None else p2.bias.astype(np.float64)
                for grp in range(g):
                    o = slice(grp * out_g, (grp + 1) * out_g)
                    m = slice(grp * mid_g, (grp + 1) * mid_g)
                    weight[o] = np.einsum("omhw,mi->oihw", w2[o], w1[m])
                    bias[o] += np.einsum("omhw,m->o", w2[o], b1[m])
                kernel, strides, dtype = p2.kernel, p2.strides, p2.weight.dtype
            else:
                kernel = tuple(attribute(node, "kernel_shape", []))
                if len(kernel) != 2 or any(attribute(node, "pads", [0] * 4)) or int(attribute(node, "ceil_mode", 0)) \
                        or any(d != 1 for d in attribute(node, "dilations", [1, 1])):
                    raise Skip("sequential_geometry", f"AveragePool '{node.name}' pads again, is dilated or rounds up")
                auto_pad = attribute(node, "auto_pad", b"NOTSET")
                if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) not in ("NOTSET", "VALID"):
                    raise Skip("auto_pad", f"AveragePool '{node.name}' has auto_pad")
                taps = float(np.prod(kernel))  # no padding inside the pool: every window has all taps
                weight = np.repeat(np.repeat(w1[:, :, None, None], kernel[0], 2), kernel[1], 3) / taps
                bias = b1.copy()
                strides, dtype = tuple(attribute(node, "strides", [1, 1])), p1.weight.dtype
            pads4 = (pads[0], pads[1], pads[2], pads[3])
        except Skip as skip:
            candidate.reason = skip.reason
        else:
            side = sorted(set(side))
            # Shapes read off the removed tensors stay available as constants to whatever else reads them.
            stand_ins = [(out, value) for i in side if view.is_constant_node(i)
                         for out in view.nodes[i].output if out
                         for value in [view.constant(out)] if value is not None]
            candidate.block = SequentialMatch(candidate.anchor, conv1.input[0], node.output[0], weight, bias,
                                              tuple(kernel), tuple(strides), pads4, p1.group, dtype,
                                              [c1_index] + ([bn_index] if bn_index is not None else []) + chain
                                              + side + [index], node.name or conv1.name,
                                              stand_ins)
        yield candidate


def materialize(match: SequentialMatch, view: GraphView, names) -> Rewrite:
    return match.materialize(view, names)
