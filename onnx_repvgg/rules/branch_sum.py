"""Parallel linear branches of one tensor, summed -> one Conv (or one Gemm, for Linear branches).

Pattern: a linear tree (rules/linear_tree.py: Add, Sum, Sub, Neg, Mul/Div by a
constant, inference BatchNormalization) whose leaves include branches of one tensor X:

    sum_i  s_i * Conv_i(X)  +  sum_j  t_j * X  +  per-channel constants  [+ other addends]

where s_i, t_j are per-channel scales. This covers RepVGG (3x3 + 1x1 + BN(X)), unfolded
Conv -> BN branches, MobileOne's N parallel kxk branches, BN after the sum (RepViT,
QARepVGG), raw residuals X + conv(X), layer scales and RepMixer's x + g*(mixer(x) - BN(x)),
constant addends such as `+ 0`, and a lone Conv -> BN / Conv -> Mul / Conv -> Add(bias).

Preconditions, each checked below and reported as a Reason when it fails:
  * weights, biases, BN parameters and scales are constants; scales are per-channel;
  * BN in inference mode (training_mode 0, spatial 1);
  * all Convs share groups, Cout, Cin/groups and strides; on each axis where a kernel is
    wider than 1, a branch whose dilation is a multiple r of the others' is written with
    r-1 zeros between its taps (UniRepLKNet's dilated branches), when the fused kernel has
    no more taps than the branches together (else only with --allow-densify);
  * every branch kernel lands at a whole-number offset in one covering kernel, and
    every branch gives the same output size for any input size
    (pad_begin + pad_end - dilation*(k-1) is equal for all branches), or, where the
    dims declared on the model's inputs fix the input's size, at that size;
  * an identity branch needs stride 1 and Cin == Cout;
  * every intermediate tensor has exactly one use and is not a graph output;
  * the rewrite removes more nodes than it adds.

Formula: each branch is (W_i, b_i) on the covering kernel grid, scaled per output
channel by its factor vector s_i; an identity is the kernel with a 1 at
[c, c % (Cin/groups), centre]. Then W = sum_i s_i*W_i and b = sum_i s_i*b_i + sum_j c_j.

Addends that are not branches of X (another tensor, a nonlinear branch) stay in the
sum, unscaled: the fused Conv replaces only the branches of X.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .. import algebra, rewrite
from ..block import Block, Candidate, ConvGeometry, Rewrite, Term
from ..graph import GraphView
from .common import ConvParams, NotWorthIt, Skip, conv_params, is_op, pool_params
from .dense import DenseBlock, build_dense_block
from .linear_tree import (
    Addend,
    LinearIndex,
    LinearTree,
    addend_scale,
    channel_vector,
    constant_bias,
    linear_index,
    per_channel_vector,
)

NAME = "branch_sum"
LEAF_OPS = ("Conv", "Gemm", "MatMul")  # a branch of X is one of these applied to X (or X itself)


@dataclass
class Branch:
    """A leaf of the tree read as a branch of X."""

    addend: Addend
    kind: str                 # "conv", "pool" (AveragePool), "identity", "problem"
    node: int = -1            # index of the Conv/Gemm/MatMul/AveragePool, or of a linear-looking
                              # node that is not usable ("problem"); -1 for an identity


def _deep_source(view: GraphView, index: LinearIndex, leaf: Addend) -> Branch | None:
    """If a leaf is Conv(X), or a not-usable BN over X or over Conv(X), say so."""
    producer = view.producer.get(leaf.name)
    if producer is None:
        return None
    op = view.foldable_op(producer)
    if op in LEAF_OPS and view.inputs_of[producer]:
        return Branch(leaf, "conv", node=producer)
    if op == "AveragePool" and view.inputs_of[producer]:
        return Branch(leaf, "pool", node=producer)
    if op == "BatchNormalization":  # the only op whose expansion can carry a problem
        exp = index.expansion(producer)
        if exp is not None and exp.problem is not None and view.inputs_of[producer]:
            return Branch(leaf, "problem", node=producer)
    return None


def _source_of(view: GraphView, branch: Branch, index: LinearIndex) -> str:
    if branch.kind in ("conv", "pool"):
        return view.inputs_of[branch.node][0]
    node = view.nodes[branch.node]
    inner = view.producer.get(index.origin(node.input[0]))  # a BN over Conv(X), maybe through an Identity
    if inner is not None and is_op(view.nodes[inner], *LEAF_OPS) and view.nodes[inner].input:
        return view.nodes[inner].input[0]
    return node.input[0]


def choose_input(view: GraphView, index: LinearIndex, tree: LinearTree):
    """Pick the X with the most branches; return X, its branches and the other leaves.

    Branches read X or a value-preserving copy of it (Identity(X), ...): they are grouped by
    the value they copy (index.origin). The fused node reads a name some branch reads (it is
    computed before the block and outlives this round): X itself if one does, else the copy
    most of them read."""
    deep = [_deep_source(view, index, leaf) for leaf in tree.leaves]
    if not any(b is not None and b.kind in ("conv", "problem") for b in deep):
        return None, [], list(tree.leaves)  # AveragePool and identity branches alone are not worth a conv
    raw = [(_source_of(view, b, index) if b is not None else None) for b in deep]
    sources = [(index.origin(s) if s is not None else None) for s in raw]
    leaf_sources = [index.origin(leaf.name) for leaf in tree.leaves]
    best, best_count = None, 0
    for source in dict.fromkeys(s for s in sources if s is not None):
        if not any(s == source and b.kind in ("conv", "problem") for s, b in zip(sources, deep) if b):
            continue  # AveragePool and identity branches alone are not worth a conv
        count = sum(1 for s in sources if s == source) + sum(1 for s in leaf_sources if s == source)
        if count > best_count:
            best, best_count = source, count
    if best is None:
        return None, [], list(tree.leaves)
    branches, others, names = [], [], []
    for leaf, b, s, r, origin in zip(tree.leaves, deep, sources, raw, leaf_sources):
        if origin == best:
            branches.append(Branch(leaf, "identity"))
            names.append(leaf.name)
        elif b is not None and r is not None and s == best:
            branches.append(b)
            names.append(r)
        else:
            others.append(leaf)
    # X itself where a branch reads it (the copies between then go with the block), else the most read copy
    return (best if best in names else Counter(names).most_common(1)[0][0]), branches, others


def _label(kernel) -> str:
    if not isinstance(kernel, tuple):
        return "x".join(str(k) for k in kernel)
    label = _KERNEL_LABELS.get(kernel)
    if label is None:
        label = "x".join(str(k) for k in kernel)
        if len(_KERNEL_LABELS) < 1024:
            _KERNEL_LABELS[kernel] = label
    return label


_KERNEL_LABELS: dict[tuple, str] = {}  # kernel sizes -> "3x3"


def _check_private(view: GraphView, name: str, what: str) -> None:
    if name in view.graph_outputs:
        raise Skip("intermediate_is_output", f"{what} '{name}' is a graph output")
    uses = len(view.consumers.get(name, ()))
    if uses != 1:
        raise Skip("intermediate_shared", f"{what} '{name}' has {uses} uses; the block needs it private")


def _identity_label(view: GraphView, branch: Branch) -> str:
    parent = branch.addend.parent
    return "bn" if parent >= 0 and view.foldable_op(parent) == "BatchNormalization" else "id"


def build_block(view: GraphView, index: LinearIndex, tree: LinearTree, x: str,
                branches: list[Branch], others: list, allow_densify: bool = False) -> Block | DenseBlock:
    """Check every precondition and return the Block, or raise Skip with the first failure."""
    for b in branches:
        problem = index.expansions[b.node].problem if b.kind == "problem" else None
        if problem is not None:
            raise Skip(problem.code, problem.message)
    summed = [b.addend.name for b in branches if b.kind in ("conv", "pool")]
    if len(set(summed)) != len(summed):
        for leaf, count in Counter(summed).items():
            if count > 1:
                raise Skip("intermediate_shared", f"branch output '{leaf}' is summed {count} times")
    ops = sorted({view.ops[b.node] for b in branches if b.kind == "conv"})
    conv_only = ops == ["Conv"]  # the common case, which none of the three checks below stops
    if not conv_only and "MatMul" in ops and not set(ops) <= {"Gemm", "MatMul"}:
        raise NotWorthIt()  # a MatMul beside a Conv is no block
    if not conv_only and len(ops) > 1 and set(ops) != {"Gemm", "MatMul"}:
        raise Skip("mixed_ops", f"branches mix {' and '.join(ops)}")
    pools = [(b, pool_params(view, view.nodes[b.node])) for b in branches if b.kind == "pool"]
    if not conv_only and set(ops) <= {"Gemm", "MatMul"}:
        if pools:
            raise Skip("mixed_ops", "branches mix Gemm and AveragePool")
        for b in branches:
            if b.kind == "conv":
                _check_private(view, b.addend.name, "branch output")
        dense = build_dense_block(view, tree, x, branches, others)
        dense.removed_nodes += _dead_copies(view, index, x, dense.removed_nodes, branches)
        return dense

    convs: list[tuple[Branch, ConvParams]] = []
    for b in branches:
        if b.kind == "conv":
            _check_private(view, b.addend.name, "branch output")
            convs.append((b, conv_params(view, view.nodes[b.node], view.inputs_of[b.node])))
    if not convs:
        raise NotWorthIt()
    for b, _ in pools:
        _check_private(view, b.addend.name, "branch output")
    first = convs[0][1]
    n = first.weight.ndim - 2
    groups = {p.group for _, p in convs}
    if len(groups) > 1:
        other = next(p for _, p in convs if p.group != first.group)
        if not allow_densify:
            raise Skip("group_mismatch", f"Conv '{other.node_name}' group {other.group} != {first.group} of "
                       f"'{first.node_name}' (--allow-densify merges them into a denser conv)")
        convs = _regroup(convs, math.gcd(*groups))
        first = convs[0][1]
    cout, cin_per_group = first.weight.shape[:2]
    for _, p in convs:
        if p.weight.ndim - 2 != n:
            raise Skip("rank_mismatch", f"Conv '{p.node_name}' is {p.weight.ndim - 2}-D, Conv '{first.node_name}' is {n}-D")
        if p.weight.shape[:2] != (cout, cin_per_group):
            raise Skip("channel_mismatch", f"Conv '{p.node_name}' weight {p.weight.shape[:2]} != "
                       f"{(cout, cin_per_group)} of '{first.node_name}'")
        if p.strides != first.strides:
            raise Skip("stride_mismatch", f"Conv '{p.node_name}' stride {p.strides} != {first.strides} of '{first.node_name}'")
        if p.weight.dtype != first.weight.dtype:
            raise Skip("dtype", f"Conv '{p.node_name}' dtype {p.weight.dtype} != {first.weight.dtype}")
    group, strides = first.group, first.strides
    cin = cin_per_group * group
    rank = n + 2
    for b, pp in pools:
        name = view.nodes[b.node].name
        if len(pp.kernel) != n:
            raise Skip("rank_mismatch", f"AveragePool '{name}' is {len(pp.kernel)}-D, the convs {n}-D")
        if pp.strides != strides:
            raise Skip("stride_mismatch", f"AveragePool '{name}' stride {pp.strides} != {strides} of the convs")
        if cin != cout:
            raise Skip("identity_channels", f"AveragePool branch '{name}' needs Cin == Cout, the convs map {cin} -> {cout}")

    identities = [b for b in branches if b.kind == "identity"]
    # The fused kernel's geometry depends on the branches' kernels, dilations and pads alone:
    # found once per combination (the code below, run on the first block that has it).
    shape_key = (n, tuple([(p.kernel, p.dilations, p.pads_begin, p.pads_end) for _, p in convs]),
                 tuple([(pp.kernel, pp.pads_begin, pp.pads_end) for _, pp in pools]), len(identities), allow_densify)
    plan = _PLANS.get(shape_key)
    if plan is not None:
        dilations, dilated, kernel_shape, pad_begin, pad_end, branch_offsets = plan
        if dilated:
            convs = [(b, _on_dilation_grid(p, dilations)) for b, p in convs]
        _check_identities(identities, strides, cin, cout, x)
    else:
        # Dilation matters only on axes where a kernel is wider than 1. Each axis takes the gcd of
        # the branches' dilations; a branch dilated more is written with zeros between its taps
        # (UniRepLKNet's dilated branches beside a large kernel).
        dilations = []
        for axis in range(n):
            wide = {p.dilations[axis] for _, p in convs if p.kernel[axis] > 1}
            wide |= {1 for _, pp in pools if pp.kernel[axis] > 1}
            dilations.append(math.gcd(*wide) if wide else 1)
        branch_taps = sum(math.prod(p.kernel) for _, p in convs)
        dilated = sorted({p.dilations for _, p in convs
                          if any(k > 1 and d != dilations[a] for a, (k, d) in enumerate(zip(p.kernel, p.dilations)))})
        if dilated:
            convs = [(b, _on_dilation_grid(p, dilations)) for b, p in convs]

        _check_identities(identities, strides, cin, cout, x)

        # Each branch as (kernel sizes, pad begins, pad ends); an identity is a 1-wide kernel without pad.
        extents = [((1,) * n, (0,) * n, (0,) * n) for _ in identities]
        extents += [(pp.kernel, pp.pads_begin, pp.pads_end) for _, pp in pools]
        extents += [(p.kernel, p.pads_begin, p.pads_end) for _, p in convs]
        kernel_shape, pad_begin, pad_end, offsets_by_axis = [], [], [], []
        size_specific = False  # a plan that holds at the input's fixed size only is not remembered
        for axis in range(n):
            d = dilations[axis]
            reach = {pb[axis] + pe[axis] - d * (k[axis] - 1) for k, pb, pe in extents}
            if len(reach) > 1:
                _check_fixed_size_agrees(view, x, n, axis, strides[axis], reach)
                size_specific = True
            begin = max(pb[axis] for _, pb, _ in extents)
            offsets = []
            for k, pb, _ in extents:
                shift = begin - pb[axis]
                if shift % d:
                    raise Skip("kernel_offset", f"a {_label(k)} branch sits {shift} pixels off the grid of dilation {d} "
                               f"on spatial axis {axis}")
                offsets.append(shift // d)
            size = max(o + k[axis] for o, (k, _, _) in zip(offsets, extents))
            # the smallest end pad that gives the branches' output size (one reach, or at a fixed size any)
            end = next((e for e in sorted(r + d * (size - 1) - begin for r in reach) if e >= 0), -1)
            if end < 0:
                raise Skip("kernel_offset", f"fused kernel would need a negative pad on spatial axis {axis}")
            kernel_shape.append(size)
            pad_begin.append(begin)
            pad_end.append(end)
            offsets_by_axis.append(offsets)
        branch_offsets = [tuple(offsets_by_axis[a][i] for a in range(n)) for i in range(len(extents))]
        if dilated and math.prod(kernel_shape) > branch_taps and not allow_densify:
            raise Skip("dilation_mismatch", f"merging dilations {sorted({tuple(dilations)}.union(dilated))} needs one "
                       f"{_label(kernel_shape)} kernel of dilation {tuple(dilations)}: {math.prod(kernel_shape)} taps "
                       f"against {branch_taps} in the branches (--allow-densify merges them)")
        if len(_PLANS) < 1024 and not size_specific:
            _PLANS[shape_key] = (tuple(dilations), tuple(dilated), tuple(kernel_shape), tuple(pad_begin),
                                 tuple(pad_end), tuple(branch_offsets))

    terms: list[Term] = []
    for b, grid in zip(identities, branch_offsets):
        vector = per_channel_vector(b.addend.factors, cout)  # (a BN's: no message built)
        scale = vector.astype(np.float64) if vector is not None else \
            channel_vector(b.addend.factors, rank, cout, f"identity branch '{x}'")
        kernel = _identity_kernel(cout, group, n)
        terms.append(Term(kernel, np.zeros(cout), grid, scale))
    for (b, pp), grid in zip(pools, branch_offsets[len(identities):]):
        if any(d != 1 for d, k in zip(dilations, pp.kernel) if k > 1):
            raise Skip("dilation_mismatch", f"AveragePool '{view.nodes[b.node].name}' taps are contiguous, "
                       f"the convs are dilated {tuple(dilations)}")
        scale = channel_vector(b.addend.factors, rank, cout, f"branch '{b.addend.name}'")
        kernel = algebra.avgpool_kernel(cout, group, pp.kernel)
        terms.append(Term(kernel, np.zeros(cout), grid, scale))
    for (b, p), grid in zip(convs, branch_offsets[len(identities) + len(pools):]):
        vector = per_channel_vector(b.addend.factors, cout)
        factor = vector.astype(np.float64) if vector is not None else \
            channel_vector(b.addend.factors, rank, cout, f"branch '{b.addend.name}'") if b.addend.factors else None
        bias = np.zeros(cout) if p.bias is None else p.bias
        terms.append(Term(p.weight, bias, grid, factor))
    bias_from_constants, kept = constant_bias(tree.constants, rank, cout)
    other_names = [o.name for o in others] + kept
    # An addend that is not a branch of X but is scaled inside the sum stays as Mul(addend, scale).
    other_scales = [addend_scale(o.factors, rank) if o.factors else None for o in others] + [None] * len(kept)
    added = 1 + len(other_names) + sum(1 for s in other_scales if s is not None)
    if len(tree.nodes) + len(convs) + len(pools) <= added:
        raise NotWorthIt()

    removed = list(tree.nodes) + [b.node for b, _ in convs] + [b.node for b, _ in pools]
    removed += _dead_copies(view, index, x, removed, branches)
    main = convs[0][1]  # the first of the widest kernels (max() of the taps)
    for _, p in convs[1:]:
        if math.prod(p.kernel) > math.prod(main.kernel):
            main = p
    geometry = ConvGeometry(tuple(kernel_shape), tuple(strides), tuple(dilations),
                            tuple(pad_begin) + tuple(pad_end), group)
    root = view.nodes[tree.root]
    return Block(anchor=root.name or root.output[0], root_output=root.output[0], input=x, terms=terms,
                 geometry=geometry, dtype=first.weight.dtype, removed_nodes=removed,
                 other_leaves=other_names, other_scales=other_scales, name_hint=main.node_name,
                 constant_bias=bias_from_constants)


def _check_fixed_size_agrees(view: GraphView, x: str, n: int, axis: int, stride: int, reaches: set[int]) -> None:
    """Branches whose pads differ by more than the kernels do (Keras' padding='same' at stride 2
    on an even size pads a 3x3 by (0, 1) and a 1x1 by (0, 0)) give floor((size + reach - 1) /
    stride) + 1 outputs each: equal at some input sizes only. They are one conv where the input's
    size on the axis is fixed by the dims declared on the model's inputs (which runtimes enforce;
    not by value_info or a fed initializer, which they do not: GraphView.fixed_shape) and every
    branch gives the same number of outputs there; else Skip."""
    why = (f"branches give different output sizes on spatial axis {axis} "
           f"(pad_begin + pad_end - dilation*(k-1) = {sorted(reaches)})")
    shape = view.fixed_shape(x)
    size = shape[2 + axis] if shape is not None and len(shape) == n + 2 else -1
    if size <= 0:
        raise Skip("output_shape_mismatch", f"{why}, and the input's size on that axis is not fixed")
    outputs = sorted({(size + r - 1) // stride + 1 for r in reaches})
    if len(outputs) > 1 or outputs[0] < 1:
        raise Skip("output_shape_mismatch", f"{why}: at the input's size {size}, {outputs} outputs")


def _check_identities(identities: list[Branch], strides: tuple[int, ...], cin: int, cout: int, x: str) -> None:
    if identities:
        if any(s != 1 for s in strides):
            raise Skip("identity_stride", f"identity branch '{x}' needs stride 1, the convs have {strides}")
        if cin != cout:
            raise Skip("identity_channels", f"identity branch '{x}' needs Cin == Cout, the convs map {cin} -> {cout}")


# (rank, the convs' kernels, dilations and pads, the pools', identities, allow_densify) ->
# (dilations, dilated, kernel_shape, pad_begin, pad_end, branch_offsets) that build_block found
_PLANS: dict[tuple, tuple] = {}

_IDENTITY_KERNELS: dict[tuple[int, int, int], np.ndarray] = {}


def _identity_kernel(channels: int, group: int, n: int) -> np.ndarray:
    """algebra.identity_kernel of a 1x..x1 kernel, made once per (channels, group, rank) and
    shared: read-only."""
    key = (channels, group, n)
    if key not in _IDENTITY_KERNELS:
        kernel = algebra.identity_kernel(channels, group, (1,) * n, (0,) * n)
        kernel.flags.writeable = False
        _IDENTITY_KERNELS[key] = kernel
    return _IDENTITY_KERNELS[key]


def _dead_copies(view: GraphView, index: LinearIndex, x: str, removed: list[int], branches: list[Branch]) -> list[int]:
    """Value-preserving nodes between X and a branch that read a copy of X (Conv(Identity(X)))
    which only the block's removed nodes use: once the fused node reads X, they are dead."""
    reads = [view.inputs_of[b.node][0] for b in branches if b.kind in ("conv", "pool")]
    if all(name == x for name in reads):
        return []  # every branch reads X itself: no copy between (dead_chain of X is empty)
    gone = set(removed)
    for name in reads:
        gone.update(index.dead_chain(name, x, gone))
    return sorted(gone - set(removed))


def _on_dilation_grid(p: ConvParams, dilations: list[int]) -> ConvParams:
    """The conv written with `dilations` (each dividing its own on axes where its kernel is
    wider than 1): zeros between taps; pads, and so the map, unchanged."""
    rates = tuple(d // g if k > 1 else 1 for k, d, g in zip(p.kernel, p.dilations, dilations))
    weight = p.weight if all(r == 1 for r in rates) else algebra.dilate_kernel(p.weight, rates)
    return dataclasses.replace(p, weight=weight, dilations=tuple(dilations))


def _regroup(convs: list[tuple[Branch, ConvParams]], group: int) -> list[tuple[Branch, ConvParams]]:
    """Write every conv with `group` groups (a divisor of each one's own): --allow-densify."""
    out = []
    for b, p in convs:
        cin = p.weight.shape[1] * p.group
        if p.weight.shape[0] % group or cin % group or p.group % group:
            raise Skip("group_mismatch", f"Conv '{p.node_name}' with group {p.group} cannot be written with {group} groups")
        weight = algebra.regroup_kernel(p.weight, p.group, group)
        out.append((b, dataclasses.replace(p, weight=weight, group=group)))
    return out


def _describe(view: GraphView, branches: list[Branch]) -> list[str]:
    labels = []
    for b in branches:
        if b.kind == "identity":
            labels.append(_identity_label(view, b))
        elif b.kind == "problem":
            labels.append(view.nodes[b.node].op_type)
        elif b.kind == "pool":
            labels.append("avgpool")
        elif view.ops[b.node] == "Gemm":
            labels.append("linear")
        else:
            inputs = view.inputs_of[b.node]
            shape = view.constant_shape(inputs[1]) if len(inputs) > 1 else None
            labels.append(_label(shape[2:]) if shape is not None and len(shape) > 2 else "conv")

    return sorted(labels, key=_label_order)


def _label_order(label: str) -> tuple[int, int]:
    """Widest kernels first, identities last: 3x3+1x1+bn."""
    order = _LABEL_ORDER.get(label)
    if order is None:
        order = (0, -math.prod(int(v) for v in label.split("x"))) if label[0].isdigit() else (1, 0)
        if len(_LABEL_ORDER) < 4096:
            _LABEL_ORDER[label] = order
    return order


_LABEL_ORDER: dict[str, tuple[int, int]] = {}


def find(view: GraphView, opset: int, options: dict | None = None):
    """Every linear tree over branches of one tensor, as a Block or a Reason (a generator:
    each Block's float64 terms live only until the pipeline materializes it)."""
    index = linear_index(view, opset)
    for root in index.roots():
        tree = index.tree(root)
        if tree.passthrough_only:
            continue
        x, branches, others = choose_input(view, index, tree)
        if x is None:
            continue
        removed = sum(1 for n in tree.nodes if not index.is_passthrough(n)) + \
            sum(1 for b in branches if b.kind in ("conv", "pool", "problem"))
        if removed <= 1 + len(others):
            continue  # nothing to gain: e.g. a plain residual Add(conv(y), x) (an Identity after it or not)
        try:
            block = build_block(view, index, tree, x, branches, others, bool((options or {}).get("allow_densify")))
        except NotWorthIt:
            continue
        except Skip as skip:
            candidate = _candidate(view, root, tree, branches)
            candidate.reason = skip.reason
        else:
            # (labelled after the block is built: its weights' shapes are read by then)
            candidate = _candidate(view, root, tree, branches)
            candidate.block = block
            if isinstance(block, Block):
                candidate.group = block.geometry.group
                candidate.strides = block.geometry.strides
        yield candidate


def _candidate(view: GraphView, root: int, tree: LinearTree, branches: list[Branch]) -> Candidate:
    node = view.nodes[root]
    bns = any(view.foldable_op(i) == "BatchNormalization" for i in tree.nodes) or any(
        b.kind == "problem" for b in branches)
    return Candidate(anchor=node.name or node.output[0], branch_labels=_describe(view, branches),
                     near_miss=len(branches) >= 2 or bns)


def _summands(block: Block) -> tuple[list[tuple], tuple[int, ...], np.dtype]:
    """What algebra.sum_branches sums for the block: its terms (and its constants as a bias
    term), on its kernel grid, cast to its dtype."""
    terms: list[tuple] = [(t.kernel, t.bias, t.offsets, t.scale) for t in block.terms]
    if block.constant_bias is not None:
        cout = block.terms[0].kernel.shape[0]
        empty = np.zeros((cout, block.terms[0].kernel.shape[1]) + (0,) * len(block.geometry.kernel_shape))
        terms.append((empty, block.constant_bias, (0,) * len(block.geometry.kernel_shape), None))
    return terms, block.geometry.kernel_shape, block.dtype


def fused_weights(block: Block) -> tuple[np.ndarray, np.ndarray]:
    """The block's fused kernel and bias, summed in float64 and cast to the model's dtype."""
    terms, kernel_shape, dtype = _summands(block)
    return algebra.sum_branches(terms, kernel_shape, out_dtype=dtype)


def materialize(block, view: GraphView, names: rewrite.NameRegistry) -> Rewrite:
    if not isinstance(block, Block):
        return block.materialize(view, names)
    weight, bias = fused_weights(block)
    return rewrite.branch_sum_rewrite(block, weight, bias, view, names)


# A block whose kernels are larger is summed on its own: sum_branches works through it in
# cache-sized chunks, where stacking it with others would copy it whole into float64.
BATCH_BLOCK_BYTES = 1 << 18


def batchable(block) -> bool:
    """A small conv Block can wait for materialize_many (a Gemm block, or a large one, is made
    on its own)."""
    return isinstance(block, Block) and batch_bytes(block) <= BATCH_BLOCK_BYTES


def batch_bytes(block: Block) -> int:
    return sum(t.kernel.nbytes for t in block.terms)


def materialize_many(blocks: list[Block], view: GraphView, names: rewrite.NameRegistry) -> list:
    """materialize() of each block, in order (the same names), with the blocks' sums done
    together (algebra.sum_branches_many); a block whose values its dtype cannot hold gives
    the CastError materialize() would raise."""
    out: list = []
    for block, summed in zip(blocks, algebra.sum_branches_many([_summands(b) for b in blocks])):
        if isinstance(summed, algebra.CastError):
            out.append(summed)
            continue
        try:
            out.append(rewrite.branch_sum_rewrite(block, summed[0], summed[1], view, names))
        except algebra.CastError as err:
            out.append(err)
    return out
