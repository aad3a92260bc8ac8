"""BN and per-channel affine ops around ConvTranspose folded into it; parallel ConvTranspose
branches of one input, summed, merged into one (decoder and segmentation upsamplers).

Patterns, each a linear tree (rules/linear_tree.py) whose leaves are ConvTranspose(X):

    BN(ConvT(X)), ConvT(X) * g + b, ConvT(X) / g - b       -> ConvT'(X)
    sum_i s_i * ConvT_i(X) + per-channel constants         -> ConvT'(X)
    ConvT(X * s)  (s per input channel, or a scalar)       -> ConvT'(X)

The weight of a ConvTranspose is (Cin, Cout/group, k...): output channel g*(Cout/group) + o
reads W[g*Cin/group:(g+1)*Cin/group, o].

Preconditions, each checked below and reported as a Reason when it fails:
  * weights, biases, BN parameters and scales are constants; scales are per output channel
    (per input channel for a scale before the ConvTranspose); BN in inference mode;
  * every intermediate tensor has exactly one use and is not a graph output;
  * branches share group, Cin, Cout/group, rank, dtype and strides, and dilations on every
    axis where a kernel is wider than 1;
  * every branch gives the same output size for every input size: on each axis
    reach = dilation*(k-1) - pad_begin - pad_end + output_padding is equal (the output is
    stride*(in-1) + 1 + reach), and pad_begin differs by whole taps, so a smaller kernel sits
    in the larger one at offset (max pad_begin - pad_begin) / dilation. Branches with
    auto_pad SAME_* or output_shape (pads the runtime resolves from the input size) merge only
    when their geometry is identical;
  * the rewrite removes more nodes than it adds.
A BN *before* a ConvTranspose is a near miss (`bn_before_transpose`): its shift would have
to become ConvTranspose(constant image), which is not constant at the borders or across
stride phases, so no per-channel bias equals it.

Formula: W'[c, o] = sum_i s_i[ch(c, o)] * W_i[c, o] placed at the branch's offset,
b' = sum_i s_i * b_i + constants, with ch(c, o) = (c // (Cin/group)) * (Cout/group) + o;
a scale s before the ConvTranspose gives W'[c] = W[c] * s[c].
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .. import algebra, rewrite
from ..block import Candidate, Rewrite
from ..graph import GraphView, attribute
from ..graph import attributes as read_attributes
from .common import FLOAT_DTYPES, NotWorthIt, Skip, check_window, const, data_consumers, is_op
from .linear_tree import Addend, Factor, LinearIndex, LinearTree, addend_scale, channel_vector, constant_bias

NAME = "conv_transpose"
# A BN before a ConvTranspose whose input comes from one of these folds backwards into it
# (branch_sum, or this rule), so it is no near miss.
_FOLDS_BACKWARDS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class TransposeParams:
    """A ConvTranspose's constant weight and bias and its geometry, as written on the node."""

    index: int
    node_name: str
    weight: np.ndarray              # (Cin, Cout/group, k...)
    bias: np.ndarray | None
    group: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...] | None   # None: the runtime resolves them (auto_pad SAME_*, output_shape)
    pads_end: tuple[int, ...] | None
    output_padding: tuple[int, ...]
    signature: tuple                # every geometry attribute, to tell identical geometries

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def cout(self) -> int:
        return self.weight.shape[1] * self.group


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def transpose_params(view: GraphView, index: int) -> TransposeParams:
    """A ConvTranspose's constant weight and bias and its geometry, or Skip."""
    node = view.nodes[index]
    if len(node.input) < 2 or not node.input[1]:
        raise Skip("malformed", f"ConvTranspose '{node.name}' has no weight input")
    weight = const(view, node.input[1], "weight", node)
    if weight.dtype not in FLOAT_DTYPES:
        raise Skip("dtype", f"ConvTranspose '{node.name}' weight dtype {weight.dtype} is not float16/32/64")
    if weight.ndim < 3:
        raise Skip("malformed", f"ConvTranspose '{node.name}' weight has rank {weight.ndim}")
    n = weight.ndim - 2
    group = int(attribute(node, "group", 1))
    if group < 1 or weight.shape[0] % group:
        raise Skip("malformed", f"ConvTranspose '{node.name}' has group {group} for {weight.shape[0]} inputs")
    cout = weight.shape[1] * group
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = const(view, node.input[2], "bias", node)
        if bias.shape != (cout,):
            raise Skip("malformed", f"ConvTranspose '{node.name}' bias shape {bias.shape} != ({cout},)")
    kernel = tuple(weight.shape[2:])
    declared = attribute(node, "kernel_shape")
    if declared is not None and tuple(declared) != kernel:
        raise Skip("malformed", f"ConvTranspose '{node.name}' kernel_shape {tuple(declared)} != weight {kernel}")
    strides = tuple(attribute(node, "strides", [1] * n))
    dilations = tuple(attribute(node, "dilations", [1] * n))
    output_padding = tuple(attribute(node, "output_padding", [0] * n))
    output_shape = attribute(node, "output_shape")
    auto_pad = _text(attribute(node, "auto_pad", b"NOTSET"))
    pads = tuple(attribute(node, "pads", [0] * (2 * n)))
    if len(strides) != n or len(dilations) != n or len(output_padding) != n or len(pads) != 2 * n:
        raise Skip("malformed", f"ConvTranspose '{node.name}' strides/dilations/pads/output_padding do not "
                   f"match {n} spatial axes")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise Skip("auto_pad", f"ConvTranspose '{node.name}' has unknown auto_pad {auto_pad!r}")
    check_window(f"ConvTranspose '{node.name}'", strides, dilations, pads)
    if any(p < 0 for p in output_padding):
        raise Skip("malformed", f"ConvTranspose '{node.name}' has output_padding {list(output_padding)}")
    signature = (kernel, strides, dilations, output_padding, auto_pad,
                 tuple(output_shape) if output_shape is not None else None, pads if auto_pad == "NOTSET" else None)
    begin: tuple[int, ...] | None
    end: tuple[int, ...] | None
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin = end = None
    elif auto_pad == "VALID":
        begin, end = (0,) * n, (0,) * n
    else:
        begin, end = pads[:n], pads[n:]
    return TransposeParams(index, node.name, weight, bias, group, strides, dilations, begin, end,
                           output_padding, signature)


@dataclass
class Branch:
    addend: Addend
    node: int                        # the ConvTranspose, or a not-usable BN over one ("problem")
    problem: bool = False


@dataclass
class TransposeBlock:
    """Parallel ConvTranspose branches of one input (often just one), scaled and summed."""

    anchor: str
    root_output: str
    input: str
    terms: list[tuple[np.ndarray, np.ndarray | None, tuple[int, ...], np.ndarray | None]]  # kernel, bias, offsets, scale
    kernel_shape: tuple[int, ...]
    attributes: dict                 # of the fused ConvTranspose
    group: int
    strides: tuple[int, ...]
    dtype: np.dtype
    removed_nodes: list[int]
    other_leaves: list[str] = field(default_factory=list)
    other_scales: list[np.ndarray | None] = field(default_factory=list)
    name_hint: str = ""
    constant_bias: np.ndarray | None = None

    def fused_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The fused kernel and bias, summed in float64 and cast to the model's dtype."""
        weight, bias = algebra.sum_transposed_branches(self.terms, self.kernel_shape, self.group)
        if self.constant_bias is not None:
            bias = bias + self.constant_bias
        return algebra.cast_like(weight, self.dtype), algebra.cast_like(bias, self.dtype)

    def materialize(self, view: GraphView, names) -> Rewrite:
        weight, bias = self.fused_weights()
        stem = self.name_hint or self.anchor
        w_name, b_name = names.fresh(f"{stem}.fused_weight"), names.fresh(f"{stem}.fused_bias")
        out = rewrite.fused_output(self, names)
        node = helper.make_node("ConvTranspose", [self.input, w_name, b_name], [out],
                                name=self.name_hint or names.fresh(stem), **self.attributes)
        rest, extra = rewrite.rest_of_sum(self, out, names)
        return Rewrite(self.removed_nodes, [(view.producer[self.root_output], [node] + rest)],
                       [(w_name, weight), (b_name, bias)] + extra, node.name)


@dataclass
class InputScaleFold:
    """ConvTranspose(X * s) for every consumer of X * s -> ConvTranspose'(X)."""

    anchor: str
    input: str
    consumers: list[tuple[int, np.ndarray]]  # (ConvTranspose index, new weight float64)
    removed_nodes: list[int]

    def materialize(self, view: GraphView, names) -> Rewrite:
        insertions, tensors = [], []
        for index, weight in self.consumers:
            node = view.nodes[index]
            w_name = names.fresh(f"{node.name or node.output[0]}.scaled_weight")
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.input[0] = self.input
            new.input[1] = w_name
            new.name = names.fresh(node.name or node.op_type)
            tensors.append((w_name, algebra.cast_like(weight, view.constant_dtype(node.input[1]))))
            insertions.append((index, [new]))
        return Rewrite(self.removed_nodes, insertions, tensors, insertions[0][1][0].name)


# -- matching -------------------------------------------------------------------------------

def _transposed_leaf(view: GraphView, index: LinearIndex, leaf: Addend) -> tuple[str, Branch] | None:
    """(X, branch) if the leaf is ConvTranspose(X), or a not-usable BN over ConvTranspose(X)."""
    producer = view.producer.get(leaf.name) if leaf.name is not None else None
    if producer is None:
        return None
    node = view.nodes[producer]
    if is_op(node, "ConvTranspose") and node.input and node.input[0]:
        return node.input[0], Branch(leaf, producer)
    exp = index.expansions.get(producer) if is_op(node, "BatchNormalization") else None  # only BNs have problems
    if exp is not None and exp.problem is not None and node.input:
        inner = view.producer.get(node.input[0])
        if inner is not None and is_op(view.nodes[inner], "ConvTranspose") and view.nodes[inner].input:
            return view.nodes[inner].input[0], Branch(leaf, producer, problem=True)
    return None


def choose_input(view: GraphView, index: LinearIndex, tree: LinearTree):
    """The X with the most ConvTranspose branches in the tree, its branches, and the other leaves.

    Branches that read a value-preserving copy of X (Identity(X), ...) count as branches of X
    (index.origin); the fused node reads X itself if a branch does, else the copy most read."""
    found = [_transposed_leaf(view, index, leaf) for leaf in tree.leaves]
    counts = Counter(index.origin(f[0]) for f in found if f is not None)
    if not counts:
        return None, [], list(tree.leaves)
    best = counts.most_common(1)[0][0]
    branches, others, read = [], [], []
    for leaf, f in zip(tree.leaves, found):
        if f is not None and index.origin(f[0]) == best:
            branches.append(f[1])
            read.append(f[0])
        else:
            others.append(leaf)
    return (best if best in read else Counter(read).most_common(1)[0][0]), branches, others


def _check_private(view: GraphView, name: str, what: str) -> None:
    if name in view.graph_outputs:
        raise Skip("intermediate_is_output", f"{what} '{name}' is a graph output")
    uses = len(view.consumers.get(name, ()))
    if uses != 1:
        raise Skip("intermediate_shared", f"{what} '{name}' has {uses} uses; the block needs it private")


def _branch_label(view: GraphView, branch: Branch) -> str:
    node = view.nodes[branch.node]
    if branch.problem:
        return node.op_type
    shape = view.constant_shape(node.input[1]) if len(node.input) > 1 else None
    return "convT" + ("x".join(str(k) for k in shape[2:]) if shape is not None and len(shape) > 2 else "")


def _tree_labels(view: GraphView, tree: LinearTree) -> list[str]:
    ops = {view.nodes[i].op_type for i in tree.nodes}
    labels = [label for op, label in (("BatchNormalization", "bn"), ("Mul", "mul"), ("Div", "div")) if op in ops]
    if any(c.name for c in tree.constants):  # a constant addend (a BN's shift has no name)
        labels.append("bias")
    return labels


def _merge_geometry(params: list[TransposeParams]):
    """The fused kernel shape, node attributes and each branch's offsets, or Skip."""
    first = params[0]
    n = len(first.kernel)
    if all(p.signature == first.signature for p in params):
        # Identical geometry (any auto_pad or output_shape): sum the kernels, keep the attributes.
        return first.kernel, None, [(0,) * n for _ in params]
    pads = []
    for p in params:
        if p.pads_begin is None or p.pads_end is None:
            raise Skip("auto_pad", f"ConvTranspose '{p.node_name}' sets auto_pad or output_shape (pads the runtime "
                       "resolves from the input size) and its geometry differs from the other branches'")
        pads.append((p.pads_begin, p.pads_end))
    dilations = []
    for axis in range(n):
        wide = {p.dilations[axis] for p in params if p.kernel[axis] > 1}
        if len(wide) > 1:
            raise Skip("dilation_mismatch", f"ConvTranspose branches have dilations {sorted(wide)} on spatial axis {axis}")
        dilations.append(wide.pop() if wide else 1)
    kernel, begin, end, output_padding, offsets = [], [], [], [], []
    for axis in range(n):
        d, s = dilations[axis], first.strides[axis]
        axis_branches = [(p.kernel[axis], pb[axis], pe[axis], p.output_padding[axis]) for p, (pb, pe) in zip(params, pads)]
        reach = {algebra.transposed_reach(k, d, pb, pe, op) for k, pb, pe, op in axis_branches}
        if len(reach) > 1:
            raise Skip("output_shape_mismatch", f"ConvTranspose branches give different output sizes on spatial axis "
                       f"{axis} (dilation*(k-1) - pad_begin - pad_end + output_padding = {sorted(reach)})")
        top = max(pb for _, pb, _, _ in axis_branches)
        for k, pb, _, _ in axis_branches:
            if (top - pb) % d:
                raise Skip("kernel_offset", f"a {k}-tap branch sits {top - pb} pixels off the grid of dilation {d} "
                           f"on spatial axis {axis}")
        try:
            size, pb, pe, op, offs = algebra.merge_transposed_axis(axis_branches, d, s)
        except ValueError as err:
            raise Skip("kernel_offset", f"spatial axis {axis}: {err}") from None
        kernel.append(size)
        begin.append(pb)
        end.append(pe)
        output_padding.append(op)
        offsets.append(offs)
    attributes = dict(kernel_shape=kernel, strides=list(first.strides), dilations=dilations, pads=begin + end,
                      group=first.group)
    if any(output_padding):
        attributes["output_padding"] = output_padding
    return tuple(kernel), attributes, [tuple(offsets[a][i] for a in range(n)) for i in range(len(params))]


def _node_attributes(node: onnx.NodeProto) -> dict:
    return read_attributes(node)


def build_block(view: GraphView, index: LinearIndex, tree: LinearTree, x: str, branches: list[Branch],
                others: list[Addend]) -> TransposeBlock:
    """Check every precondition and return the block, or raise Skip with the first failure."""
    for b in branches:
        problem = index.expansions[b.node].problem if b.problem else None
        if problem is not None:
            raise Skip(problem.code, problem.message)
    for leaf, count in Counter(b.addend.name for b in branches).items():
        if count > 1:
            raise Skip("intermediate_shared", f"branch output '{leaf}' is summed {count} times")
    for b in branches:
        _check_private(view, str(b.addend.name), "branch output")
    params = [transpose_params(view, b.node) for b in branches]
    first = params[0]
    n = len(first.kernel)
    for p in params[1:]:
        if len(p.kernel) != n:
            raise Skip("rank_mismatch", f"ConvTranspose '{p.node_name}' is {len(p.kernel)}-D, '{first.node_name}' is {n}-D")
        if p.group != first.group:
            raise Skip("group_mismatch", f"ConvTranspose '{p.node_name}' group {p.group} != {first.group} of "
                       f"'{first.node_name}'")
        if p.weight.shape[:2] != first.weight.shape[:2]:
            raise Skip("channel_mismatch", f"ConvTranspose '{p.node_name}' weight {p.weight.shape[:2]} != "
                       f"{first.weight.shape[:2]} of '{first.node_name}'")
        if p.strides != first.strides:
            raise Skip("stride_mismatch", f"ConvTranspose '{p.node_name}' stride {p.strides} != {first.strides} of "
                       f"'{first.node_name}'")
        if p.weight.dtype != first.weight.dtype:
            raise Skip("dtype", f"ConvTranspose '{p.node_name}' dtype {p.weight.dtype} != {first.weight.dtype}")
    kernel_shape, attributes, offsets = _merge_geometry(params)
    if attributes is None:  # identical geometry: the first branch's own attributes
        attributes = _node_attributes(view.nodes[first.index])
    rank, cout = n + 2, first.cout
    terms = []
    for b, p, off in zip(branches, params, offsets):
        scale = channel_vector(b.addend.factors, rank, cout, f"branch '{b.addend.name}'") if b.addend.factors else None
        terms.append((p.weight, p.bias, off, scale))
    bias_from_constants, kept = constant_bias(tree.constants, rank, cout)
    other_names = [str(o.name) for o in others] + kept
    other_scales = [addend_scale(o.factors, rank) if o.factors else None for o in others] + [None] * len(kept)
    added = 1 + len(other_names) + sum(1 for s in other_scales if s is not None)
    if sum(1 for i in tree.nodes if not index.is_passthrough(i)) + len(params) <= added:
        raise NotWorthIt()
    removed = list(tree.nodes) + [p.index for p in params]
    gone = set(removed)
    for p in params:  # copies of X (Identity(X)) that only the removed branches read die with them
        gone.update(index.dead_chain(view.nodes[p.index].input[0], x, gone))
    removed += sorted(gone - set(removed))
    main = max(params, key=lambda p: int(np.prod(p.kernel)))
    root = view.nodes[tree.root]
    return TransposeBlock(anchor=root.name or root.output[0], root_output=root.output[0], input=x, terms=terms,
                          kernel_shape=kernel_shape, attributes=attributes, group=first.group, strides=first.strides,
                          dtype=first.weight.dtype, removed_nodes=removed,
                          other_leaves=other_names, other_scales=other_scales, name_hint=main.node_name,
                          constant_bias=bias_from_constants)


def _tree_candidates(view: GraphView, index: LinearIndex):
    for root in index.roots():
        tree = index.tree(root)
        if tree.passthrough_only:
            continue
        x, branches, others = choose_input(view, index, tree)
        if x is None or sum(1 for i in tree.nodes if not index.is_passthrough(i)) + len(branches) <= 1 + len(others):
            continue  # nothing to gain: e.g. a plain residual Add(convT(y), z)
        node = view.nodes[root]
        labels = sorted((_branch_label(view, b) for b in branches), reverse=True)
        bns = any(is_op(view.nodes[i], "BatchNormalization") for i in tree.nodes) or any(b.problem for b in branches)
        candidate = Candidate(anchor=node.name or node.output[0], branch_labels=labels + _tree_labels(view, tree),
                              near_miss=len(branches) >= 2 or bns)
        try:
            block = build_block(view, index, tree, x, branches, others)
        except NotWorthIt:
            continue
        except Skip as skip:
            candidate.reason = skip.reason
        else:
            candidate.block = block
            candidate.group, candidate.strides = block.group, block.strides
        yield candidate


def _leaf_of_tree(index: LinearIndex, name: str) -> bool:
    """Is `name` privately read as a summand by a usable linear node (so a tree reports it)?"""
    view = index.view
    if not view.is_private(name):
        return False
    consumer, _ = view.consumers[name][0]
    return index.usable(consumer) and any(child == name for child, _ in index.expansions[consumer].children)


def _input_scale(view: GraphView, node: onnx.NodeProto, cin: int, rank: int) -> tuple[str, np.ndarray] | None:
    """(X, scale per input channel) if `node` is Mul(X, c), Mul(c, X) or Div(X, c) by a float
    constant c that leaves X's shape as it is; None if it is not such a scale."""
    if len(node.input) != 2 or not all(node.input):
        return None
    consts = [view.constant(name) for name in node.input]
    if (consts[0] is None) == (consts[1] is None) or (node.op_type == "Div" and consts[1] is None):
        return None
    x, value = (node.input[1], consts[0]) if consts[0] is not None else (node.input[0], consts[1])
    if value is None or not np.issubdtype(value.dtype, np.floating) or (node.op_type == "Div" and np.any(value == 0)):
        return None
    value = value.astype(np.float64)
    if node.op_type == "Div":
        value = 1.0 / value
    if value.size != 1 or value.ndim > 1:  # a scalar never broadcasts X to a larger shape
        shape = view.shape(x)
        if shape is None or len(shape) != rank or shape[1] != cin:
            return None  # X's shape is unknown: the constant might broadcast it to more channels or axes
    what = f"scale of {node.op_type} '{node.name}' before a ConvTranspose"
    return x, channel_vector((Factor(value, False),), rank, cin, what)


def _folds_elsewhere(view: GraphView, index: LinearIndex, bn: int) -> bool:
    """Does the tree that the BN ends have a leaf that a producer rule folds it into (branch_sum's
    Conv/Gemm/MatMul, or a ConvTranspose here)?"""
    if not index.usable(bn):
        return False
    return any(leaf.name is not None and is_op(view.producer_of(leaf.name), *_FOLDS_BACKWARDS)
               for leaf in index.tree(bn).leaves)


def _before_transpose_candidates(view: GraphView, index: LinearIndex):
    """A scale before ConvTransposes folded into them; a BN before one is a near miss."""
    for i in view.of_type("Mul", "Div", "BatchNormalization"):
        node = view.nodes[i]
        if not is_op(node, "Mul", "Div", "BatchNormalization") or not node.output:
            continue
        uses = view.consumers.get(node.output[0], [])
        readers = [j for j, slot in uses if slot == 0 and is_op(view.nodes[j], "ConvTranspose")]
        if not readers:
            continue
        first = view.nodes[readers[0]]
        anchor = node.name or node.output[0]
        if node.op_type == "BatchNormalization":
            if _folds_elsewhere(view, index, i):
                continue
            yield Candidate(anchor=anchor, branch_labels=["bn", "convT"], reason=Skip(
                "bn_before_transpose", f"BatchNormalization '{node.name}' feeds ConvTranspose '{first.name}': its "
                "shift would spread unevenly over the output (a constant input does not give a constant output at "
                "the borders or between stride phases), so it cannot become a bias").reason)
            continue
        if data_consumers(view, node, "ConvTranspose") is None:
            continue  # other readers too: the scale stays
        candidate = Candidate(anchor=anchor, branch_labels=[node.op_type.lower(), "convT"], near_miss=False)
        try:
            folds = []
            scale_input = ""
            for j in readers:
                reader = view.nodes[j]
                shape = view.constant_shape(reader.input[1]) if len(reader.input) > 1 else None
                found = _input_scale(view, node, shape[0], len(shape)) if shape is not None and len(shape) > 2 else None
                if found is None:
                    raise NotWorthIt()  # not a scale by a constant, or a weight computed at run time
                scale_input, scale = found
                p = transpose_params(view, j)
                folds.append((j, algebra.scale_transposed_input_channels(p.weight, scale)))
        except NotWorthIt:
            continue
        except Skip as skip:
            candidate.reason = skip.reason
        else:
            candidate.block = InputScaleFold(anchor, scale_input, folds, [i] + readers)
        yield candidate


def _problem_bn_candidates(view: GraphView, index: LinearIndex):
    """ConvTranspose -> BN that is not in inference form (training_mode, ...), alone."""
    for i in view.of_type("BatchNormalization"):
        exp = index.expansion(i)
        node = view.nodes[i]
        if exp is None or exp.problem is None or not is_op(node, "BatchNormalization") or not node.input:
            continue
        if not is_op(view.producer_of(node.input[0]), "ConvTranspose") or _leaf_of_tree(index, node.output[0]):
            continue
        yield Candidate(anchor=node.name or node.output[0], branch_labels=["convT", "bn"], reason=exp.problem)


def find(view: GraphView, opset: int, options: dict | None = None):
    """Every linear tree over ConvTranspose branches of one tensor, every scale before a
    ConvTranspose, and the near misses, as Candidates."""
    if not view.of_type("ConvTranspose"):
        return  # every candidate here reads or writes a ConvTranspose
    index = LinearIndex(view, opset)
    yield from _tree_candidates(view, index)
    yield from _before_transpose_candidates(view, index)
    yield from _problem_bn_candidates(view, index)


def materialize(match, view: GraphView, names) -> Rewrite:
    return match.materialize(view, names)
