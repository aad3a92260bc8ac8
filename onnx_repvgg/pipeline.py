"""fuse(model) -> (model, Report): the whole flow of the pass, written down once.

    for each graph (the main graph and every If/Loop/Scan body):
        repeat until nothing changes (a fusion can expose the next one):
            index the graph                  (graph.GraphView: constants folded on demand)
            match: each rule finds Candidates, each a match or a Reason
                   (the rules of rules/__init__.py, in order; bn_to_conv last, if asked)
                   first without static shapes; when a rule asks something they could
                   answer differently, onnx shape inference runs and the round goes on with
                   them (the candidates handled so far stand: they asked nothing of shapes)
            fuse:  numpy algebra turns each match into new weights (float64, cast back),
                   handed at once to a sink when there is one (the output's data file,
                   or arrays kept for the writer: onnx_repvgg.storage.sinks)
            rewrite: swap the matched nodes for the new ones; drop constants left unused
        late rules (bn_to_conv) run only after the others have reached their fixed point
"""

from __future__ import annotations

import contextlib
import gc
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx

from . import rewrite
from .algebra import CastError
from .evaluate import Memo
from .graph import (
    AmbiguousOpset,
    GraphView,
    ReferenceAttribute,
    UnreadableTensor,
    has_stray_subgraphs,
    infer_static_shapes,
    model_names,
    opset_version,
    stray_subgraph_holder,
    subgraphs_of,
)
from .report import BlockRecord, ModelStats, Report
from .rules import DEFAULT_RULES, RULES, bn_audit
from .storage.external import all_tensors, elements, ordinary_op, stray_holders
from .storage.sinks import TensorReader

MAX_ROUNDS = 32


class UnsupportedModel(ValueError):
    """The model cannot be processed at all (as opposed to one block being skipped)."""


def fuse(model: onnx.ModelProto, *, rules: Iterable[str] | None = None, inplace: bool = False,
         base_dir: str | None = None, sink=None, allow_densify: bool = False,
         freeze_initializer_inputs: bool = False, _initializer_elements: int | None = None,
         _stray_subgraphs: bool | None = None) -> tuple[onnx.ModelProto, Report]:
    """Fuse every re-parameterizable block of `model`.

    Returns the fused model (the same object when inplace=True, else a copy) and a
    Report of every block fused or skipped, with the reason for each skip.
    `rules` names the rules to run (default: onnx_repvgg.rules.DEFAULT_RULES).
    A model whose external data is not loaded needs `base_dir` (the model's folder);
    weights are then read from disk only for the blocks that use them. `sink`
    (sinks.DataSink or sinks.MemorySink) takes the new initializers' bytes instead of the
    model, as soon as each block is fused.
    `allow_densify` lets branches with different groups (depthwise beside dense) merge into
    one conv with their common divisor of groups, and dilated branches merge into a kernel
    with more taps than they have together; either can cost more than it saves.
    Initializers that are also graph inputs (IR 3 exports, keep_initializers_as_inputs=True)
    may be overridden at run time, so they are not constants; `freeze_initializer_inputs`
    removes them from the graph inputs first (the model then has fewer inputs), as
    onnxruntime's remove_initializer_from_input tool does.
    A model whose meaning onnx.checker leaves open (an attribute that refers to a function's
    attribute outside a function, a weight no reader takes, the default opset imported twice)
    raises UnsupportedModel; with inplace=True the model may then hold the rewrites of the rounds
    done before it (each complete: the model computes what it did).
    (`_initializer_elements`: the element count of the main graph's initializers when the
    caller has it, e.g. from the loader's survey; it saves reading every initializer's dims.
    `_stray_subgraphs`: whether a node of an op that is neither control flow nor custom holds a
    subgraph (graph.has_stray_subgraphs), when the caller knows; it saves reading every node's
    attributes.)
    """
    # Values out of range are refused by explicit checks (algebra.cast_like): numpy's warnings
    # about them (an inf constant times a scale, say) would only reach the user's stderr.
    with no_collections(), np.errstate(all="ignore"):
        try:
            return _fuse(model, rules=rules, inplace=inplace, base_dir=base_dir, sink=sink,
                         allow_densify=allow_densify, freeze_initializer_inputs=freeze_initializer_inputs,
                         initializer_elements=_initializer_elements, stray_subgraphs=_stray_subgraphs)
        except (ReferenceAttribute, UnreadableTensor) as err:  # read in a match: the pass cannot tell what it holds
            raise UnsupportedModel(str(err)) from None


@contextlib.contextmanager
def no_collections():
    """The cyclic garbage collector switched off while the pass runs (then back on, unless the
    caller had switched it off). The pass allocates many small containers (the index of a graph
    of 10^5 nodes) that live until its end; the collector, run every 700 allocations by default,
    would only scan them (about 4% of the pass on 24,000 nodes) and find nothing: the pass frees
    everything by reference counting, since each view releases the rule indexes that refer back
    to it. The one exception, onnx's ReferenceEvaluator (constants computed by a node), leaves a
    small cycle per run: evaluate.fold collects the young generation every 64 runs while the
    collector is off. (test_cost_per_node_paths.py checks both.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _fuse(model: onnx.ModelProto, *, rules, inplace: bool, base_dir, sink, allow_densify: bool,
          freeze_initializer_inputs: bool, initializer_elements: int | None = None,
          stray_subgraphs: bool | None = None) -> tuple[onnx.ModelProto, Report]:
    if not inplace:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    try:
        opset = opset_version(model, "")
    except AmbiguousOpset as err:
        raise UnsupportedModel(str(err)) from None
    if opset is None:
        raise UnsupportedModel("the model imports no default-domain (ai.onnx) opset")
    holders: list = []  # (read on the walk below, when there is one)
    if base_dir is None and any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model, holders)):
        raise UnsupportedModel("the model's external data is not loaded: pass base_dir= (its folder), "
                               "or load it with onnx.load(path)")
    chosen = list(DEFAULT_RULES) if rules is None else list(rules)
    unknown = [r for r in chosen if r not in RULES]
    if unknown:
        raise ValueError(f"unknown rule(s) {unknown}; known: {sorted(RULES)}")

    report = Report()  # report.before: from the main graph's first index (_stats), before anything changes
    if stray_subgraphs is None:
        stray_subgraphs = stray_holders(holders) if base_dir is None else has_stray_subgraphs(model.graph)
    if stray_subgraphs:
        return model, _left_alone(model, report)
    if freeze_initializer_inputs:
        overridable = _initializer_inputs(model.graph)
        if overridable:
            _remove_inputs(model, overridable)
            report.frozen_initializer_inputs = len(overridable)
    # else the note on initializers that are graph inputs is made from the main graph's first index
    source = _ModelNames(model)
    names = rewrite.NameRegistry(source)  # read on the first name asked for
    reader = TensorReader(base_dir, sink)
    memo = Memo()
    rewritten = False
    for graph in _graphs(model.graph):  # subgraphs are found in the rewritten graph
        main = graph is model.graph
        rewritten |= _fuse_graph(graph, opset, [RULES[r] for r in chosen], names, report, reader, sink,
                                 {"allow_densify": allow_densify}, model if main else None, memo,
                                 source if main else None, initializer_elements)
        source.view = None
    report.unsearched = _unsearched_functions(model)
    before = report.before
    assert before is not None
    report.after = ModelStats.of(model) if rewritten else ModelStats(dict(before.op_counts), before.nodes, before.params)
    return model, report


_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "BatchNormalization", "Gemm", "MatMul"})


def _unsearched_functions(model: onnx.ModelProto) -> str | None:
    """What the report says of the model-local functions that hold layers a rule folds (a
    TorchScript export with export_modules_as_functions puts each block in one), in their
    bodies, the subgraphs there, or the functions they call: the pass searches graphs, not
    function bodies, so blocks in them stay as they are. None when no such function is called."""
    local = {(f.domain, f.name): f for f in model.functions}
    if not local:
        return None
    holding: dict[tuple[str, str], bool] = {}
    calls_of: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for key, function in local.items():
        nodes = list(_nodes_within(function.node))
        holding[key] = any(n.domain in ("", "ai.onnx") and n.op_type in _LAYER_OPS for n in nodes)
        calls_of[key] = {(n.domain, n.op_type) for n in nodes} & local.keys()
    changed = True
    while changed:  # a function holds layers when one it calls does (a fixed point: cycles end)
        changed = False
        for key, called in calls_of.items():
            if not holding[key] and any(holding[c] for c in called):
                holding[key] = changed = True
    calls: Counter[str] = Counter()
    for node in _nodes_within(model.graph.node):
        key = (node.domain, node.op_type)
        if key in local and holding[key]:
            calls[node.op_type if node.domain == "local" else f"{node.domain}.{node.op_type}"] += 1
    if not calls:
        return None
    listed = ", ".join(f"{name} x{count}" for name, count in calls.most_common(5))
    return (f"{sum(calls.values())} calls of model-local functions that hold layers ({listed}): the pass searches "
            "graphs, not function bodies, so blocks inside them are not fused; inline them first "
            "(onnx.inliner.inline_local_functions) to fuse them")


def _nodes_within(nodes):
    """These nodes and those of the subgraphs they hold, at any depth."""
    for node in nodes:
        yield node
        for sub in subgraphs_of(node):
            yield from _nodes_within(sub.node)


def _left_alone(model: onnx.ModelProto, report: Report) -> Report:
    """The report on a model with a subgraph on a node of an op that is neither control flow nor
    custom (onnx.checker passes one in an attribute named "__...", its internal symbols). The
    rules keep, copy and move nodes they match by op type, and such a subgraph reads values by
    name: the pass does not touch the model. onnxruntime refuses the node itself unless its
    optimizer removes it, and so runs such a model only with its optimizations on."""
    holder = stray_subgraph_holder(model.graph)
    where = f"{holder.op_type} '{holder.name}'" if holder is not None else "a node"
    report.left_alone = (f"{where} holds a subgraph, which only control flow and custom ops may (onnxruntime "
                         "refuses such a node unless its optimizer removes it): the model is left as it is")
    report.before = ModelStats.of(model)
    report.after = ModelStats(dict(report.before.op_counts), report.before.nodes, report.before.params)
    return report


class _ModelNames:
    """model_names(model), for the NameRegistry: read from the main graph's first index when
    there is one (the names are asked for before the model changes)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.view: GraphView | None = None

    def __call__(self):
        return model_names(self.model, self.view)


def _note_overridable(report: Report, view: GraphView) -> None:
    """The note on the main graph's initializers that are also graph inputs (_initializer_inputs,
    read from its index)."""
    overridable = [name for name in view.graph_inputs if name in view.initializers]
    if overridable:
        report.notes.append(
            f"{len(overridable)} initializers are also graph inputs: they may be overridden at run time, so "
            "blocks that use them are not fused; --freeze-initializers (API: freeze_initializer_inputs=True) "
            "makes them constants and removes them from the inputs")


def _stats(model: onnx.ModelProto, view: GraphView, params: int | None = None) -> ModelStats:
    """ModelStats.of(model), with the op counts read from the main graph's index (and the
    parameter count, if given, from the loader's survey)."""
    if params is None:
        params = 0
        for tensor in model.graph.initializer:
            params += elements(tensor.dims)
    return ModelStats({op: len(indices) for op, indices in view.by_op.items()}, len(view.nodes), params)


def _initializer_inputs(graph: onnx.GraphProto) -> set[str]:
    initializers = {t.name for t in graph.initializer}
    return {value.name for value in graph.input if value.name in initializers}


def _remove_inputs(model: onnx.ModelProto, names: set[str]) -> None:
    inputs = model.graph.input
    for index in range(len(inputs) - 1, -1, -1):
        if inputs[index].name in names:
            del inputs[index]
    if model.ir_version < 4:  # IR 3 requires every initializer to be a graph input
        model.ir_version = 4


def _view_with_shapes(graph: onnx.GraphProto, opset: int, reader: TensorReader, model: onnx.ModelProto | None,
                      memo: Memo, base: GraphView | None = None) -> GraphView:
    """Index the graph, with the static shapes that make exporters' shape arithmetic constant.

    onnx shape inference stops at ops whose parameters are computed; the view carries shapes
    through data-movement ops whose parameters it can evaluate, and inference is run again
    with those as hints, until nothing new is learned. `base`, a view of the same graph
    without shapes, lends its index (producers, consumers) to the new view."""
    if model is None:  # a subgraph: declared shapes only
        return GraphView(graph, opset, reader.base_dir, reader=reader, memo=memo)
    if base is None:
        base = GraphView(graph, opset, reader.base_dir, reader=reader, memo=memo, shapes_pending=True, main_graph=True)
    view = base.with_shapes(infer_static_shapes(model, graph=graph))
    hints: dict[str, tuple[int, ...]] = {}
    for _ in range(16):
        if not view.learned:
            break
        hints.update(view.learned)  # every shape carried so far, as the view now has it
        hints = {name: view.static_shapes[name] for name in hints}
        view.release()
        view = None  # type: ignore[assignment]  # one view (and one inference's shapes) at a time
        view = base.with_shapes(infer_static_shapes(model, hints=hints, graph=graph))
    return view


class _Round:
    """What one round has done so far: the rewrites, the nodes they take, the skips."""

    def __init__(self) -> None:
        self.replacements: list = []
        self.claimed: set[int] = set()
        self.skips: list[BlockRecord] = []
        self.handled: list[str] = []  # anchors of the candidates handled, in order


def _run_round(view: GraphView, rules, opset: int, options: dict, names: rewrite.NameRegistry,
               report: Report, sink, state: _Round) -> bool:
    """Handle every candidate of `rules` on `view`, in order, skipping the ones `state` has
    handled already (on a view without shapes that had asked no shape question by then: the
    same candidates, the same decisions). False when `view` (shapes pending) asked a question
    that inferred shapes could answer differently: the round must go on with shapes."""
    done = len(state.handled)
    count = 0
    for rule in rules:
        batch = _Batch(rule, view, names, report, sink, state) if hasattr(rule, "materialize_many") else None
        for candidate in rule.find(view, opset, options):
            if view.shape_questions:
                if batch is not None:
                    batch.flush()  # its candidates were handled without a question: they stand
                return False  # this candidate, or one the rule passed over, read a shape
            if count < done:
                if candidate.anchor != state.handled[count]:
                    raise RuntimeError(f"internal error: candidate {count} is '{candidate.anchor}' with static shapes, "
                                       f"'{state.handled[count]}' without")
                count += 1
                continue
            if batch is not None and batch.takes(candidate):
                state.handled.append(candidate.anchor)
                count += 1
                continue
            if batch is not None:
                batch.flush()  # every candidate before this one is done, in order
            mark = names.mark()
            outcome = _handle(candidate, rule, view, names, report, sink, state)
            if view.shape_questions:  # materializing read a shape: this candidate is redone with shapes
                names.rollback(mark)  # nothing else of it was kept: _commit did not run
                return False
            state.handled.append(candidate.anchor)
            count += 1
            _commit(outcome, report, sink, state)
        if batch is not None:
            batch.flush()
    return not view.shape_questions


class _Batch:
    """Matches of one rule whose materialization is done together (the rule's materialize_many
    does the numpy work of many small blocks in one call), each then committed in the order the
    rule found them, as _handle and _commit would have one by one: the same names, records and
    claimed nodes. A match joins only when it overlaps no block fused or waiting; any other
    candidate first flushes the ones waiting. A rule with materialize_many says which of its
    matches can wait (batchable)."""

    MAX_BLOCKS = 512
    MAX_BYTES = 1 << 24  # of the matches' float64 terms, held until the flush

    def __init__(self, rule, view: GraphView, names: rewrite.NameRegistry, report: Report, sink, state: _Round):
        self.rule, self.view, self.names, self.report, self.sink, self.state = rule, view, names, report, sink, state
        self.waiting: list = []  # (candidate, record)
        self.nodes: set[int] = set()
        self.bytes = 0

    def takes(self, candidate) -> bool:
        block = candidate.block
        if block is None or not self.rule.batchable(block):
            return False
        removed = block.removed_nodes
        if self.state.claimed.intersection(removed) or self.nodes.intersection(removed):
            return False
        self.waiting.append((candidate, _record(candidate, self.rule)))
        self.nodes.update(removed)
        self.bytes += self.rule.batch_bytes(block)
        if len(self.waiting) >= self.MAX_BLOCKS or self.bytes >= self.MAX_BYTES:
            self.flush()
        return True

    def flush(self) -> None:
        if not self.waiting:
            return
        asked = self.view.shape_questions
        results = self.rule.materialize_many([c.block for c, _ in self.waiting], self.view, self.names)
        if self.view.shape_questions != asked:
            raise RuntimeError("internal error: a batched materialize read a shape")
        for (candidate, record), result in zip(self.waiting, results):
            if isinstance(result, CastError):  # a value the model's dtype cannot hold
                record.reason_code, record.reason = result.code, str(result)
                _commit((record, None, None), self.report, self.sink, self.state)
                continue
            _commit((record, result, candidate.block.removed_nodes), self.report, self.sink, self.state)
            candidate.block = None  # free the float64 terms now
        self.waiting, self.nodes, self.bytes = [], set(), 0


def _record(candidate, rule) -> BlockRecord:
    near = candidate.near_miss if candidate.near_miss is not None else getattr(rule, "NEAR_MISS", True)
    return BlockRecord(anchor=candidate.anchor, branches=candidate.branch_labels,
                       status="skipped" if near else "not_applicable", group=candidate.group,
                       strides=list(candidate.strides) if candidate.strides else None)


def _handle(candidate, rule, view: GraphView, names: rewrite.NameRegistry, report: Report, sink, state: _Round):
    """Materialize one candidate: (record, Rewrite or None), or None when it overlaps a block
    fused this round (it is matched again next round)."""
    record = _record(candidate, rule)
    block = candidate.block
    if block is None:
        record.reason_code, record.reason = candidate.reason.code, candidate.reason.message
        return record, None, None
    if state.claimed.intersection(block.removed_nodes):
        return None
    try:
        change = rule.materialize(block, view, names)
    except CastError as err:  # a value the model's dtype cannot hold
        record.reason_code, record.reason = err.code, str(err)
        return record, None, None
    candidate.block = None  # free the float64 terms now
    return record, change, block.removed_nodes


def _commit(outcome, report: Report, sink, state: _Round) -> None:
    if outcome is None:
        return
    record, change, removed = outcome
    if change is None:
        state.skips.append(record)
        return
    state.claimed.update(removed)
    rewrite.spill(change, sink)
    state.replacements.append(change)
    record.status = "fused"
    record.fused_node = change.fused_node
    report.blocks.append(record)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        if not ordinary_op(node):
            for sub in subgraphs_of(node):
                yield from _graphs(sub)


def _fuse_graph(graph: onnx.GraphProto, opset: int, rules, names: rewrite.NameRegistry,
                report: Report, reader: TensorReader, sink, options: dict,
                model: onnx.ModelProto | None, memo: Memo, source: _ModelNames | None = None,
                initializer_elements: int | None = None) -> bool:
    """Fuse one graph to its fixed point; True if it was rewritten.

    No node of the graph holds a subgraph unless it is control flow or custom: _fuse leaves a
    model with one alone.
    Each round first runs on a view without inferred shapes (onnx shape inference costs
    about as much as reading the model); only when a rule asks a question inferred shapes
    could answer differently does the round go on with them (see _run_round), and every
    later round of the graph then has them from the start."""
    last_skips: list[BlockRecord] = []
    early = [r for r in rules if not getattr(r, "LATE", False)]
    late = [r for r in rules if getattr(r, "LATE", False)]
    active = early
    with_shapes = False  # once a round of this graph needed static shapes, every round has them
    rewritten = False
    view: GraphView | None = None
    state = _Round()
    for _ in range(MAX_ROUNDS):
        if view is None:
            if with_shapes:
                view = _view_with_shapes(graph, opset, reader, model, memo)
            else:
                view = GraphView(graph, opset, reader.base_dir, reader=reader, memo=memo,
                                 shapes_pending=model is not None, main_graph=model is not None)
            if source is not None and not rewritten:
                source.view = view  # the graph as it was: its index holds the model's names
            if model is not None and report.before is None:
                report.before = _stats(model, view, initializer_elements)
                _note_overridable(report, view)  # none are left when they were frozen
        state = _Round()
        if not _run_round(view, active, opset, options, names, report, sink, state):
            with_shapes = True
            view.release()
            view = _view_with_shapes(graph, opset, reader, model, memo, base=view)
            if not _run_round(view, active, opset, options, names, report, sink, state):
                raise RuntimeError("internal error: a view with static shapes asked for them")
        report.rounds += 1
        if not state.replacements:
            if active is early and late:
                active = early + late  # the others are done: now the late rules may run (same graph, same view)
                continue
            last_skips = state.skips
            break
        last_skips = state.skips
        names.ensure()  # every name of the model as it was, before it changes
        if source is not None:
            source.view = None
        rewrite.apply(graph, view, state.replacements, sink)
        rewritten = True
        view.release()
        view = None
    report.blocks.extend(last_skips)
    if view is None:  # the rounds ran out right after a rewrite: index the final graph
        view = _view_with_shapes(graph, opset, reader, model, memo) if with_shapes else \
            GraphView(graph, opset, reader.base_dir, reader=reader, memo=memo, shapes_pending=model is not None,
                      main_graph=model is not None)
    recorded = {record.anchor for record in last_skips}
    audit = bn_audit.unrecorded(view, opset, recorded)
    if view.shape_questions:  # the audit read a shape: ask again with static shapes
        view.release()
        view = _view_with_shapes(graph, opset, reader, model, memo, base=view)
        audit = bn_audit.unrecorded(view, opset, recorded)
    view.release()  # its rule indexes refer back to it: freed now, not by the cyclic collector
    for near in audit:
        if near.reason is not None:
            report.blocks.append(BlockRecord(anchor=near.anchor, branches=near.branch_labels, status="skipped",
                                             reason_code=near.reason.code, reason=near.reason.message))
    stale = rewrite.stale_value_info(graph)
    if stale:
        names.ensure()
        rewrite.drop_stale_value_info(graph, stale)
        rewritten = True
    return rewritten
