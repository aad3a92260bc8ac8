"""Each changed region checked alone: its original nodes against its fused nodes, as two small
models, on random inputs large enough that every kernel tap meets data.

Regions are grouped into a few pairs of models (names prefixed per region, so they do not
meet), bounded in weight bytes, so the cost stays linear in the number of blocks. The inputs
take their shapes from the end-to-end run of the original (so shapes agree with whatever the
block's original computes from them); a spatial size smaller than a fused kernel's extent is
raised to it, where the region's inputs allow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from ..graph import ReferenceAttribute, attribute, subgraphs_of
from ..report import BlockCheck
from ..storage.external import tensor_nbytes
from .changes import GraphIndex, Region
from .compare import compare, tolerances
from .runtime import ModelSource, ValidationError, drop_trailing_empty_outputs, one_line, random_value, session

CHUNK_BYTES = 1 << 28      # weights per pair of models
CHUNK_REGIONS = 1000
WINDOW_OPS = ("Conv", "ConvTranspose", "AveragePool", "MaxPool", "LpPool")  # ops with a kernel window


@dataclass
class _Side:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]


def _side(source: ModelSource, index: GraphIndex, node_ids, prefix: str) -> _Side:
    graph = source.model.graph
    reads = {name for i in node_ids for name in index.inputs_of[i]}
    constant_nodes = index.constant_nodes_for(n for n in reads if n not in index.initializers)
    ids = sorted(set(node_ids) | constant_nodes)
    reads |= {name for i in constant_nodes for name in index.inputs_of[i]}
    tensors = {t.name: t for t in graph.initializer if t.name in reads and t.name in index.initializers}
    rename = (lambda n: prefix + n if n else n) if prefix else (lambda n: n)
    nodes = []
    for i in ids:
        node = onnx.NodeProto()
        node.CopyFrom(graph.node[i])
        drop_trailing_empty_outputs(node)  # (as extra_outputs does for whole models)
        if prefix:
            node.name = rename(node.name or f"node{i}")
            node.input[:] = [rename(n) for n in node.input]
            node.output[:] = [rename(n) for n in node.output]
        nodes.append(node)
    initializers = []
    for name, tensor in tensors.items():
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = rename(name)
        initializers.append(copy)
    return _Side(nodes, initializers)


def _model(source: ModelSource, sides: list[_Side], inputs: list[onnx.ValueInfoProto], outputs: list[str]):
    graph = helper.make_graph([n for s in sides for n in s.nodes], f"{source.label}_blocks", inputs,
                              [onnx.ValueInfoProto(name=o) for o in outputs],  # types left to onnxruntime
                              initializer=[t for s in sides for t in s.initializers])
    model = helper.make_model(graph, opset_imports=list(source.model.opset_import))
    model.ir_version = source.model.ir_version
    model.functions.extend(source.model.functions)
    return model


def _needed_extent(b: ModelSource, region: Region) -> int:
    """The spatial size at which every window (kernel) of the region's fused nodes meets data."""
    need = 0
    graph = b.model.graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for i in region.fused_nodes:
        node = graph.node[i]
        if node.op_type not in WINDOW_OPS:
            continue
        try:
            kernel = attribute(node, "kernel_shape")
            if kernel is None and len(node.input) > 1 and node.input[1] in shapes:
                kernel = shapes[node.input[1]][2:]
            if not kernel:
                continue
            dilations = attribute(node, "dilations", [1] * len(kernel))
            strides = attribute(node, "strides", [1] * len(kernel))
        except ReferenceAttribute:  # no value outside a function: this window tells nothing
            continue
        need = max(need, max(d * (k - 1) + 1 + s - 1 for k, d, s in zip(kernel, dilations, strides)))
    return need


def _input_shapes(region: Region, captured: Mapping[str, np.ndarray], need: int) -> tuple[dict, str | None]:
    """Shapes for the region's inputs: the captured ones, with spatial axes raised to `need`
    when all float inputs of rank >= 3 share their spatial size (so they stay consistent)."""
    shapes = {name: list(captured[name].shape) for name in region.inputs}
    spatial = [name for name in region.inputs
               if np.issubdtype(captured[name].dtype, np.floating) and captured[name].ndim >= 3]
    small = [name for name in spatial if min(shapes[name][2:], default=need) < need]
    if not small:
        return shapes, None
    sizes = {tuple(shapes[name][2:]) for name in spatial}
    if len(sizes) != 1:
        return shapes, (f"checked at the model's own sizes: its inputs differ in spatial size and "
                        f"{min(min(shapes[n][2:]) for n in small)} < a kernel extent of {need}")
    for name in spatial:
        shapes[name] = shapes[name][:2] + [max(d, need) for d in shapes[name][2:]]
    return shapes, None


def check_regions(regions: list[Region], a: ModelSource, b: ModelSource, captured: Mapping[str, np.ndarray],
                  rtol: float | None, atol: float | None, seed: int) -> list[BlockCheck]:
    """One BlockCheck per region (regions that cannot be checked alone say why)."""
    a_index, b_index = GraphIndex(a.model.graph), GraphIndex(b.model.graph)
    checks: list[BlockCheck] = []
    pending: list[tuple[Region, BlockCheck, bool]] = []  # (region, its check, alone: has subgraphs)
    for region in regions:
        check = BlockCheck(nodes=region.names(b.model.graph), outputs=list(region.outputs))
        checks.append(check)
        if region.problem:
            check.note = f"not checked alone: {region.problem}"
            continue
        missing = [name for name in region.inputs if name not in captured]
        if missing:
            check.note = f"not checked alone: no value of '{missing[0]}' from the original run"
            continue
        alone = any(any(True for _ in subgraphs_of(b.model.graph.node[i])) for i in region.fused_nodes) or any(
            any(True for _ in subgraphs_of(a.model.graph.node[i])) for i in region.original_nodes)
        pending.append((region, check, alone))
    chunk: list[tuple[Region, BlockCheck]] = []
    weight = 0
    for region, check, alone in pending:
        if alone:
            _run_chunk([(region, check)], a, b, a_index, b_index, captured, rtol, atol, seed, prefix=False)
            continue
        size = sum(tensor_nbytes(t) or 0 for t in b.model.graph.initializer
                   if t.name in {n for i in region.fused_nodes for n in b_index.inputs_of[i]})
        if chunk and (weight + size > CHUNK_BYTES or len(chunk) >= CHUNK_REGIONS):
            _run_chunk(chunk, a, b, a_index, b_index, captured, rtol, atol, seed, prefix=True)
            chunk, weight = [], 0
        chunk.append((region, check))
        weight += size
    if chunk:
        _run_chunk(chunk, a, b, a_index, b_index, captured, rtol, atol, seed, prefix=True)
    return checks


def _run_chunk(chunk, a: ModelSource, b: ModelSource, a_index: GraphIndex, b_index: GraphIndex,
               captured, rtol, atol, seed: int, prefix: bool) -> None:
    """Build the pair of models for these regions, run both on the same random inputs, compare."""
    rng = np.random.default_rng(seed + 7919)
    a_sides: list[_Side] = []
    b_sides: list[_Side] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[str] = []
    feeds: dict[str, np.ndarray] = {}
    plan = []
    for k, (region, check) in enumerate(chunk):
        p = f"b{k}/" if prefix else ""
        shapes, note = _input_shapes(region, captured, _needed_extent(b, region))
        check.note = note
        check.input_shapes = {name: list(shape) for name, shape in shapes.items()}
        for name in region.inputs:
            value = captured[name]
            elem = helper.np_dtype_to_tensor_dtype(value.dtype)
            inputs.append(helper.make_tensor_value_info(p + name, elem, shapes[name]))
            if np.issubdtype(value.dtype, np.floating):
                feeds[p + name] = random_value(shapes[name], value.dtype, rng)
            else:  # indices, shapes, flags: the original run's own values
                feeds[p + name] = value
        a_sides.append(_side(a, a_index, region.original_nodes, p))
        b_sides.append(_side(b, b_index, region.fused_nodes, p))
        outputs.extend(p + o for o in region.outputs)
        plan.append((region, check, p))
    try:
        original = session(_model(a, a_sides, inputs, outputs), a.base_dir, "original")
        expected = dict(zip(outputs, original.run(outputs, feeds)))
    except Exception as err:
        if len(chunk) > 1:  # find the region the original cannot run alone
            for item in chunk:
                _run_chunk([item], a, b, a_index, b_index, captured, rtol, atol, seed, prefix)
            return
        chunk[0][1].note = f"not checked alone: onnxruntime cannot run its original alone ({one_line(err, 160)})"
        return
    del original
    fused = session(_model(b, b_sides, inputs, outputs), b.base_dir, "fused")
    try:
        actual = dict(zip(outputs, fused.run(outputs, feeds)))
    except Exception as err:
        raise ValidationError(f"onnxruntime cannot run the fused block {chunk[0][1].nodes[0]!r} alone: "
                              f"{one_line(err)}") from None
    for region, check, p in plan:
        check.checked = True
        check.passed = True
        for name in region.outputs:
            e, f = expected[p + name], actual[p + name]
            r, t = tolerances(e, rtol, atol)
            result = compare(name, e, f, r, t)
            check.max_abs_diff = max(check.max_abs_diff, result.max_abs_diff)
            check.max_rel_diff = max(check.max_rel_diff, result.max_rel_diff)
            check.passed = check.passed and result.passed
            if not result.passed and result.reason and not check.reason:
                check.reason = f"output '{name}': {result.reason}"
