"""Rule: parallel linear branches of one tensor summed by Add -> one Conv.

Pattern (any order and association of the binary Adds, or an n-ary Sum):

    Sum_i  branch_i(X),  branch in { Conv(X, W[, B]), BN(Conv(X, W[, B])), BN(X), X }

Preconditions, each checked below and reported as a Reason when it fails:
  * at least one Conv branch; weights, biases and BN parameters are constants;
  * BN in inference mode (training_mode 0, spatial 1);
  * all Convs share groups, Cout, Cin/groups, strides, and dilation on every axis
    where a kernel is wider than 1;
  * every branch kernel lands at a whole-number offset in one covering kernel, and
    every branch gives the same output size for any input size
    (pad_begin + pad_end - dilation*(k-1) is equal for all branches);
  * an identity branch needs stride 1 and Cin == Cout;
  * every intermediate tensor has exactly one use and is not a graph output.

Formula: with each BN folded (W*s, (b-m)*s + beta, s = g/sqrt(v+eps)), and each
branch kernel zero-padded into the covering kernel at its offset,
    W_fused = sum_i W_i,   b_fused = sum_i b_i.
An identity branch is the kernel with a 1 at [c, c % (Cin/groups), offset].

Addends that are not branches of X (another tensor, a nonlinear branch) stay in
the sum: the fused Conv replaces only the branches of X.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx

from .. import algebra
from ..block import Block, Candidate, ConvGeometry, Reason, Term
from ..graph import GraphView, attribute

NAME = "branch_sum"
SUM_OPS = ("Add", "Sum")
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class Skip(Exception):
    """Raised inside the checks; carries the Reason the block is left alone."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.reason = Reason(code, message)


def _is_op(node: onnx.NodeProto | None, *ops: str) -> bool:
    return node is not None and node.op_type in ops and node.domain in ("", "ai.onnx")


# --- the Add tree --------------------------------------------------------------

def is_sum_root(view: GraphView, index: int) -> bool:
    """A sum node whose output is not privately summed by another sum node."""
    node = view.nodes[index]
    if not _is_op(node, *SUM_OPS) or len(node.output) != 1:
        return False
    out = node.output[0]
    if view.is_private(out):
        consumer_index, _ = view.consumers[out][0]
        if _is_op(view.nodes[consumer_index], *SUM_OPS):
            return False
    return True


def flatten_sum(view: GraphView, root: int) -> tuple[list[str], list[int]]:
    """Leaves (addend tensors, in order) and node indices of the sum tree under root."""
    leaves: list[str] = []
    tree: list[int] = [root]
    pending = list(reversed(view.nodes[root].input))  # left-to-right depth-first
    while pending:
        name = pending.pop()
        child = view.producer.get(name)
        if (child is not None and _is_op(view.nodes[child], *SUM_OPS)
                and view.is_private(name) and len(view.nodes[child].output) == 1):
            tree.append(child)
            pending.extend(reversed(view.nodes[child].input))
        else:
            leaves.append(name)
    return leaves, tree


# --- one branch ----------------------------------------------------------------

@dataclass
class BranchShape:
    """What a leaf looks like structurally, before any precondition is checked."""

    leaf: str
    kind: str                      # "conv", "conv_bn", "bn", "identity"
    source: str                    # the X this branch reads
    conv: int | None = None        # node index
    bn: int | None = None          # node index


def deep_shape(view: GraphView, leaf: str) -> BranchShape | None:
    """Interpret a leaf as Conv(X), BN(Conv(X)) or BN(X); None if it is none of them."""
    index = view.producer.get(leaf)
    if index is None:
        return None
    node = view.nodes[index]
    if _is_op(node, "Conv") and node.input:
        return BranchShape(leaf, "conv", node.input[0], conv=index)
    if _is_op(node, "BatchNormalization") and node.input:
        inner = view.producer.get(node.input[0])
        if inner is not None and _is_op(view.nodes[inner], "Conv") and view.nodes[inner].input:
            return BranchShape(leaf, "conv_bn", view.nodes[inner].input[0], conv=inner, bn=index)
        return BranchShape(leaf, "bn", node.input[0], bn=index)
    return None


def choose_input(view: GraphView, leaves: list[str]) -> tuple[str | None, list[BranchShape], list[str]]:
    """Pick X with the most branches; return X, its branches and the other leaves."""
    shapes = [deep_shape(view, leaf) for leaf in leaves]
    votes: Counter[str] = Counter()
    for leaf, shape in zip(leaves, shapes):
        if shape is not None:
            votes[shape.source] += 1
    best, best_count = None, 0
    for source, conv_votes in votes.items():
        if not any(s is not None and s.source == source and s.conv is not None for s in shapes):
            continue
        count = conv_votes + sum(1 for leaf in leaves if leaf == source)
        if count > best_count:
            best, best_count = source, count
    if best is None or best_count < 2:
        return None, [], list(leaves)
    branches: list[BranchShape] = []
    others: list[str] = []
    for leaf, shape in zip(leaves, shapes):
        if leaf == best:
            branches.append(BranchShape(leaf, "identity", best))
        elif shape is not None and shape.source == best:
            branches.append(shape)
        else:
            others.append(leaf)
    return best, branches, others


# --- preconditions -------------------------------------------------------------

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


def _const(view: GraphView, name: str, what: str, node: onnx.NodeProto) -> np.ndarray:
    value = view.constant(name)
    if value is None:
        where = "a graph input" if name in view.graph_inputs else "computed at run time"
        raise Skip("non_constant", f"{what} '{name}' of {node.op_type} '{node.name}' is not a constant ({where})")
    return value


def conv_params(view: GraphView, node: onnx.NodeProto) -> ConvParams:
    if len(node.input) < 2:
        raise Skip("malformed", f"Conv '{node.name}' has no weight input")
    weight = _const(view, node.input[1], "weight", node)
    if weight.dtype not in FLOAT_DTYPES:
        raise Skip("dtype", f"Conv '{node.name}' weight dtype {weight.dtype} is not float16/32/64")
    if weight.ndim < 3:
        raise Skip("malformed", f"Conv '{node.name}' weight has rank {weight.ndim}")
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = _const(view, node.input[2], "bias", node)
        if bias.shape != (weight.shape[0],):
            raise Skip("malformed", f"Conv '{node.name}' bias shape {bias.shape} != ({weight.shape[0]},)")
    n = weight.ndim - 2
    kernel = tuple(weight.shape[2:])
    declared = attribute(node, "kernel_shape")
    if declared is not None and tuple(declared) != kernel:
        raise Skip("malformed", f"Conv '{node.name}' kernel_shape {tuple(declared)} != weight {kernel}")
    strides = tuple(attribute(node, "strides", [1] * n))
    dilations = tuple(attribute(node, "dilations", [1] * n))
    group = int(attribute(node, "group", 1))
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "NOTSET":
        pads = tuple(attribute(node, "pads", [0] * (2 * n)))
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
    if len(strides) != n or len(dilations) != n:
        raise Skip("malformed", f"Conv '{node.name}' strides/dilations do not match {n} spatial axes")
    if group < 1:
        raise Skip("malformed", f"Conv '{node.name}' has group {group}")
    return ConvParams(node.name, weight, bias, strides, dilations, tuple(begin), tuple(end), group)


def bn_params(view: GraphView, node: onnx.NodeProto, opset: int) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """BN as per-channel (scale, shift), or Skip when it is not an inference-mode BN."""
    if int(attribute(node, "training_mode", 0)) != 0:
        raise Skip("bn_training", f"BatchNormalization '{node.name}' has training_mode=1")
    if opset < 7 and int(attribute(node, "is_test", 0)) == 0:
        raise Skip("bn_training", f"BatchNormalization '{node.name}' has is_test=0 (training)")
    if int(attribute(node, "spatial", 1)) != 1:
        raise Skip("bn_spatial", f"BatchNormalization '{node.name}' has spatial=0 (per-element statistics)")
    if len(node.input) != 5:
        raise Skip("malformed", f"BatchNormalization '{node.name}' has {len(node.input)} inputs")
    for extra in node.output[1:]:
        if extra and view.use_count(extra):
            raise Skip("bn_training", f"BatchNormalization '{node.name}' output '{extra}' (a training statistic) is used")
    gamma, beta, mean, var = (_const(view, name, what, node) for name, what in
                              zip(node.input[1:], ("scale", "bias", "mean", "var")))
    channels = gamma.shape
    if len(channels) != 1 or any(p.shape != channels for p in (beta, mean, var)):
        raise Skip("malformed", f"BatchNormalization '{node.name}' parameters are not per-channel vectors")
    if np.any(np.asarray(var, dtype=np.float64) + float(attribute(node, "epsilon", 1e-5)) <= 0):
        raise Skip("bn_variance", f"BatchNormalization '{node.name}' has var + eps <= 0")
    scale, shift = algebra.bn_scale_shift(gamma, beta, mean, var, attribute(node, "epsilon", 1e-5))
    return scale, shift, gamma.dtype


def _label(kernel: tuple[int, ...]) -> str:
    return "x".join(str(k) for k in kernel)


def _check_private(view: GraphView, name: str, what: str) -> None:
    if name in view.graph_outputs:
        raise Skip("intermediate_is_output", f"{what} '{name}' is a graph output")
    uses = len(view.consumers.get(name, ()))
    if uses != 1:
        raise Skip("intermediate_shared", f"{what} '{name}' has {uses} uses; the block needs it private")


def build_block(view: GraphView, anchor: onnx.NodeProto, x: str, shapes: list[BranchShape],
                others: list[str], tree: list[int], opset: int) -> Block:
    """Check every precondition and return the Block, or raise Skip with the first failure."""
    leaf_counts = Counter(s.leaf for s in shapes if s.kind != "identity")
    for leaf, count in leaf_counts.items():
        if count > 1:
            raise Skip("intermediate_shared", f"branch output '{leaf}' is summed {count} times")
    if not any(s.conv is not None for s in shapes):
        raise Skip("no_conv", "no Conv branch")

    convs: list[tuple[BranchShape, ConvParams]] = []
    for shape in shapes:
        if shape.kind == "identity":
            continue
        _check_private(view, shape.leaf, "branch output")
        if shape.conv is not None:
            conv = view.nodes[shape.conv]
            if shape.bn is not None:
                _check_private(view, conv.output[0], "Conv output")
            convs.append((shape, conv_params(view, conv)))

    first = convs[0][1]
    n = first.weight.ndim - 2
    cout, cin_per_group = first.weight.shape[:2]
    for _, p in convs:
        if p.weight.ndim - 2 != n:
            raise Skip("rank_mismatch", f"Conv '{p.node_name}' is {p.weight.ndim - 2}-D, Conv '{first.node_name}' is {n}-D")
        if p.group != first.group:
            raise Skip("group_mismatch", f"Conv '{p.node_name}' group {p.group} != {first.group} of '{first.node_name}'")
        if p.weight.shape[:2] != (cout, cin_per_group):
            raise Skip("channel_mismatch", f"Conv '{p.node_name}' weight {p.weight.shape[:2]} != "
                       f"{(cout, cin_per_group)} of '{first.node_name}'")
        if p.strides != first.strides:
            raise Skip("stride_mismatch", f"Conv '{p.node_name}' stride {p.strides} != {first.strides} of '{first.node_name}'")
        if p.weight.dtype != first.weight.dtype:
            raise Skip("dtype", f"Conv '{p.node_name}' dtype {p.weight.dtype} != {first.weight.dtype}")
    group, strides = first.group, first.strides
    cin = cin_per_group * group

    # Dilation matters only on axes where a kernel is wider than 1.
    dilations = []
    for axis in range(n):
        wide = {p.dilations[axis] for _, p in convs if p.weight.shape[2 + axis] > 1}
        if len(wide) > 1:
            raise Skip("dilation_mismatch", f"branches have dilations {sorted(wide)} on spatial axis {axis}")
        dilations.append(wide.pop() if wide else 1)

    # Each branch as (kernel sizes, pad begins, pad ends); identity is a 1-wide kernel with no pad.
    extents = []
    for shape in shapes:
        if shape.kind == "identity" or shape.conv is None:
            if any(s != 1 for s in strides):
                raise Skip("identity_stride", f"identity branch '{shape.leaf}' needs stride 1, the convs have {strides}")
            if cin != cout:
                raise Skip("identity_channels", f"identity branch '{shape.leaf}' needs Cin == Cout, the convs map {cin} -> {cout}")
            extents.append(((1,) * n, (0,) * n, (0,) * n))
    for _, p in convs:
        extents.append((tuple(p.weight.shape[2:]), p.pads_begin, p.pads_end))

    kernel_shape, pad_begin, pad_end = [], [], []
    offsets_by_axis = []
    for axis in range(n):
        d = dilations[axis]
        reach = {b[axis] + e[axis] - d * (k[axis] - 1) for k, b, e in extents}
        if len(reach) > 1:
            raise Skip("output_shape_mismatch", f"branches give different output sizes on spatial axis {axis} "
                       f"(pad_begin + pad_end - dilation*(k-1) = {sorted(reach)})")
        begin = max(b[axis] for _, b, _ in extents)
        offsets = []
        for k, b, _ in extents:
            shift = begin - b[axis]
            if shift % d:
                raise Skip("kernel_offset", f"a {_label(k)} branch sits {shift} pixels off the grid of dilation {d} on axis {axis}")
            offsets.append(shift // d)
        size = max(o + k[axis] for o, (k, _, _) in zip(offsets, extents))
        end = reach.pop() + d * (size - 1) - begin
        if end < 0:
            raise Skip("kernel_offset", f"fused kernel would need a negative pad on axis {axis}")
        kernel_shape.append(size)
        pad_begin.append(begin)
        pad_end.append(end)
        offsets_by_axis.append(offsets)
    branch_offsets = [tuple(offsets_by_axis[a][i] for a in range(n)) for i in range(len(extents))]

    # Terms in float64, in the order the extents were listed: identities first, then convs.
    terms: list[Term] = []
    identity_shapes = [s for s in shapes if s.kind == "identity" or s.conv is None]
    for shape, offsets in zip(identity_shapes, branch_offsets):
        kernel = algebra.identity_kernel(cout, group, (1,) * n, (0,) * n)
        bias = np.zeros(cout)
        label = "id"
        if shape.kind == "bn":
            bn = view.nodes[shape.bn]
            scale, shift, _ = bn_params(view, bn, opset)
            if scale.shape != (cout,):
                raise Skip("channel_mismatch", f"BatchNormalization '{bn.name}' has {scale.shape[0]} channels, the block {cout}")
            kernel, bias = algebra.scale_output_channels(kernel, bias, scale, shift)
            label = "bn"
        terms.append(Term(label, kernel, bias, offsets))
    for (shape, p), offsets in zip(convs, branch_offsets[len(identity_shapes):]):
        kernel = np.asarray(p.weight, dtype=np.float64)
        bias = np.zeros(cout) if p.bias is None else np.asarray(p.bias, dtype=np.float64)
        if shape.bn is not None:
            bn = view.nodes[shape.bn]
            scale, shift, _ = bn_params(view, bn, opset)
            if scale.shape != (cout,):
                raise Skip("channel_mismatch", f"BatchNormalization '{bn.name}' has {scale.shape[0]} channels, Conv '{p.node_name}' {cout}")
            kernel, bias = algebra.scale_output_channels(kernel, bias, scale, shift)
        terms.append(Term(_label(p.weight.shape[2:]), kernel, bias, offsets))

    removed = list(tree)
    for shape in shapes:
        removed += [i for i in (shape.conv, shape.bn) if i is not None]
    main = max(convs, key=lambda c: int(np.prod(c[1].weight.shape[2:])))[1]
    geometry = ConvGeometry(tuple(kernel_shape), tuple(strides), tuple(dilations),
                            tuple(pad_begin) + tuple(pad_end), group)
    return Block(anchor=anchor.name, root_output=anchor.output[0], input=x, terms=terms,
                 geometry=geometry, dtype=first.weight.dtype, removed_nodes=removed,
                 other_leaves=list(others), name_hint=main.node_name)


def _describe(view: GraphView, shapes: list[BranchShape]) -> list[str]:
    labels = []
    for s in shapes:
        if s.kind == "identity":
            labels.append("id")
        elif s.kind == "bn":
            labels.append("bn")
        else:
            conv = view.nodes[s.conv]
            w = view.constant(conv.input[1]) if len(conv.input) > 1 else None
            labels.append(_label(w.shape[2:]) if w is not None and w.ndim > 2 else "conv")
    # Widest kernels first, then identities, as people write them: 3x3+1x1+id.
    def key(label: str) -> tuple[int, int]:
        if label[0].isdigit():
            return (0, -int(np.prod([int(v) for v in label.split("x")])))
        return (1, 0)
    return sorted(labels, key=key)


def find(view: GraphView, opset: int) -> list[Candidate]:
    """Every sum of parallel branches in the graph, as a Block or a Reason."""
    candidates = []
    for index, node in enumerate(view.nodes):
        if not is_sum_root(view, index):
            continue
        leaves, tree = flatten_sum(view, index)
        x, shapes, others = choose_input(view, leaves)
        if x is None:
            continue
        candidate = Candidate(anchor=node.name or node.output[0], branch_labels=_describe(view, shapes))
        try:
            block = build_block(view, node, x, shapes, others, tree, opset)
        except Skip as skip:
            candidate.reason = skip.reason
        else:
            candidate.block = block
            candidate.group = block.geometry.group
            candidate.strides = block.geometry.strides
        candidates.append(candidate)
    return candidates
