"""fuse(model) -> (model, Report): the whole flow of the pass, written down once.

    for each graph (the main graph and every If/Loop/Scan body):
        repeat until nothing changes (a fusion can expose the next one):
            index the graph                  (graph.GraphView: constants folded on demand)
            match: each rule finds Candidates, each a match or a Reason
                   (pad_into_conv, branch_sum, bn_into_consumer; bn_to_conv last, if asked)
            fuse:  numpy algebra turns each match into new weights (float64, cast back),
                   handed at once to a sink when there is one (the output's data file,
                   or arrays kept for the writer: onnx_repvgg.sinks)
            rewrite: swap the matched nodes for the new ones; drop constants left unused
        late rules (bn_to_conv) run only after the others have reached their fixed point
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from . import rewrite
from .algebra import CastError
from .graph import GraphView, infer_static_shapes, model_names, opset_version, subgraphs_of
from .report import BlockRecord, ModelStats, Report
from .rules import DEFAULT_RULES, RULES, bn_audit
from .storage.external import all_tensors
from .storage.sinks import TensorReader

MAX_ROUNDS = 32


class UnsupportedModel(ValueError):
    """The model cannot be processed at all (as opposed to one block being skipped)."""


def fuse(model: onnx.ModelProto, *, rules: Iterable[str] | None = None, inplace: bool = False,
         base_dir: str | None = None, sink=None, allow_densify: bool = False,
         freeze_initializer_inputs: bool = False) -> tuple[onnx.ModelProto, Report]:
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
    """
    if not inplace:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    opset = opset_version(model, "")
    if opset is None:
        raise UnsupportedModel("the model imports no default-domain (ai.onnx) opset")
    if base_dir is None and any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model)):
        raise UnsupportedModel("the model's external data is not loaded: pass base_dir= (its folder), "
                               "or load it with onnx.load(path)")
    chosen = list(DEFAULT_RULES) if rules is None else list(rules)
    unknown = [r for r in chosen if r not in RULES]
    if unknown:
        raise ValueError(f"unknown rule(s) {unknown}; known: {sorted(RULES)}")

    report = Report(before=ModelStats.of(model))
    overridable = _initializer_inputs(model.graph)
    if overridable and freeze_initializer_inputs:
        _remove_inputs(model, overridable)
        report.frozen_initializer_inputs = len(overridable)
    elif overridable:
        report.notes.append(
            f"{len(overridable)} initializers are also graph inputs: they may be overridden at run time, so "
            "blocks that use them are not fused; --freeze-initializers (API: freeze_initializer_inputs=True) "
            "makes them constants and removes them from the inputs")
    names = rewrite.NameRegistry(model_names(model))
    reader = TensorReader(base_dir, sink)
    for graph in _graphs(model.graph):
        _fuse_graph(graph, opset, [RULES[r] for r in chosen], names, report, reader, sink,
                    {"allow_densify": allow_densify}, model if graph is model.graph else None)
    report.after = ModelStats.of(model)
    return model, report


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


def _view_with_shapes(graph: onnx.GraphProto, opset: int, reader: TensorReader,
                      model: onnx.ModelProto | None) -> GraphView:
    """Index the graph, with the static shapes that make exporters' shape arithmetic constant.

    onnx shape inference stops at ops whose parameters are computed; the view carries shapes
    through data-movement ops whose parameters it can evaluate, and inference is run again
    with those as hints, until nothing new is learned. Graphs with no Shape node skip this."""
    if model is None:
        return GraphView(graph, opset, reader.base_dir, reader=reader)
    shapes = infer_static_shapes(model, graph=graph)
    view = GraphView(graph, opset, reader.base_dir, shapes, reader=reader)
    for _ in range(16):
        if view.static_shapes == shapes:
            break
        shapes = infer_static_shapes(model, hints=view.static_shapes, graph=graph)
        view = GraphView(graph, opset, reader.base_dir, shapes, reader=reader)
    return view


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for sub in subgraphs_of(node):
            yield from _graphs(sub)


def _fuse_graph(graph: onnx.GraphProto, opset: int, rules, names: rewrite.NameRegistry,
                report: Report, reader: TensorReader, sink, options: dict,
                model: onnx.ModelProto | None) -> None:
    last_skips: list[BlockRecord] = []
    early = [r for r in rules if not getattr(r, "LATE", False)]
    late = [r for r in rules if getattr(r, "LATE", False)]
    active = early
    for _ in range(MAX_ROUNDS):
        view = _view_with_shapes(graph, opset, reader, model)
        replacements = []
        claimed: set[int] = set()
        skips: list[BlockRecord] = []
        for rule in active:
            for candidate in rule.find(view, opset, options):
                near = candidate.near_miss if candidate.near_miss is not None else getattr(rule, "NEAR_MISS", True)
                record = BlockRecord(anchor=candidate.anchor, branches=candidate.branch_labels,
                                     status="skipped" if near else "not_applicable", group=candidate.group,
                                     strides=list(candidate.strides) if candidate.strides else None)
                block = candidate.block
                if block is None:
                    record.reason_code, record.reason = candidate.reason.code, candidate.reason.message
                    skips.append(record)
                    continue
                if claimed.intersection(block.removed_nodes):
                    continue  # overlaps a block fused this round; it is matched again next round
                try:
                    change = rule.materialize(block, view, names)
                except CastError as err:  # a value the model's dtype cannot hold
                    record.reason_code, record.reason = err.code, str(err)
                    skips.append(record)
                    continue
                claimed.update(block.removed_nodes)
                rewrite.spill(change, sink)
                replacements.append(change)
                candidate.block = block = None  # free the float64 terms now
                record.status = "fused"
                record.fused_node = change.fused_node
                report.blocks.append(record)
        report.rounds += 1
        if not replacements:
            if active is early and late:
                active = early + late  # the others are done: now the late rules may run
                continue
            last_skips = skips
            break
        last_skips = skips
        rewrite.apply(graph, view, replacements, sink)
    report.blocks.extend(last_skips)
    if replacements:  # the rounds ran out right after a rewrite: index the final graph
        view = _view_with_shapes(graph, opset, reader, model)
    for near in bn_audit.unrecorded(view, opset, {record.anchor for record in last_skips}):
        if near.reason is not None:
            report.blocks.append(BlockRecord(anchor=near.anchor, branches=near.branch_labels, status="skipped",
                                             reason_code=near.reason.code, reason=near.reason.message))
    rewrite.drop_stale_value_info(graph)
