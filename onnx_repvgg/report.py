"""The Report: one object behind the terminal text, --json and the Python API."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

import onnx

from .storage.external import elements

SCHEMA_VERSION = 2
NOTHING_TO_FUSE = ("nothing to fuse: no re-parameterizable block was found (the model is already in deploy form, "
                   "or its blocks are none of the supported patterns: --list-patterns)")
COUNTED_OPS = ("Conv", "BatchNormalization", "Add")
# shown in the side-by-side table when the fusion changed their count
OTHER_COUNTED_OPS = ("ConvTranspose", "Gemm", "MatMul", "Mul", "Sub", "Div", "Pad", "Reshape", "Flatten", "Identity")


@dataclass
class BlockRecord:
    anchor: str                  # name of the root Add node of the block
    branches: list[str]          # e.g. ["3x3", "1x1", "bn"]
    status: str                  # "fused"; "skipped" (a near miss: 2+ branches or a BN, not fused);
                                 # "not_applicable" (a single-branch fold whose preconditions fail)
    reason_code: str | None = None
    reason: str | None = None
    group: int | None = None
    strides: list[int] | None = None
    fused_node: str | None = None
    check_max_rel_diff: float | None = None  # the block checked alone (validation)

    @property
    def pattern(self) -> str:
        return "+".join(self.branches)


@dataclass
class OutputCheck:
    """One tensor of the original against the same-named tensor of the fused model."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    rtol: float
    atol: float
    passed: bool
    role: str = "output"            # "output" (a graph output), "block output" or "block input"
    comparable: bool = True         # False: past a discontinuous op; measured, not held to the tolerance
    reason: str | None = None       # why not comparable, e.g. "after TopK '/head/TopK'"


@dataclass
class BlockCheck:
    """One changed region checked alone: its original nodes against its fused nodes."""

    nodes: list[str]                # the fused nodes (the block's Conv first)
    outputs: list[str]
    checked: bool = False           # False: could not be checked alone (see note)
    passed: bool = True
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    note: str | None = None
    reason: str | None = None       # failed: what differs beyond the diffs (a NaN or inf in one model only)


@dataclass
class Validation:
    passed: bool
    input_sets: int
    outputs: list[OutputCheck] = field(default_factory=list)    # the graph outputs
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    error: str | None = None
    defaulted_dims: list[str] = field(default_factory=list)  # "input[axis]" chosen by validation (see input_shapes)
    tensors: list[OutputCheck] = field(default_factory=list)    # block outputs and inputs, end to end
    blocks: list[BlockCheck] = field(default_factory=list)
    kernels_covered: bool | None = None  # the chosen sizes let every window meet data (None: unknown)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "end_to_end", "blocks"
    given_inputs: list[str] = field(default_factory=list)  # inputs with real data (input_data)

    @property
    def compared(self) -> list[OutputCheck]:
        return [o for o in self.outputs + self.tensors if o.comparable]

    @property
    def max_abs_diff(self) -> float:
        return max([o.max_abs_diff for o in self.compared] + [b.max_abs_diff for b in self.blocks if b.checked],
                   default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max([o.max_rel_diff for o in self.compared] + [b.max_rel_diff for b in self.blocks if b.checked],
                   default=0.0)


@dataclass
class ModelStats:
    op_counts: dict[str, int]
    nodes: int
    params: int

    @classmethod
    def of(cls, model: onnx.ModelProto) -> ModelStats:
        graph = model.graph
        counts = Counter([node.op_type for node in graph.node])
        params = sum([elements(tensor.dims) for tensor in graph.initializer])
        return cls(dict(counts), len(graph.node), params)


@dataclass
class Report:
    blocks: list[BlockRecord] = field(default_factory=list)
    before: ModelStats | None = None
    after: ModelStats | None = None
    rounds: int = 0
    validation: Validation | None = None
    input_path: str | None = None
    output_path: str | None = None
    size_before: int | None = None
    size_after: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    frozen_initializer_inputs: int = 0  # initializers removed from the graph inputs
    notes: list[str] = field(default_factory=list)
    left_alone: str | None = None  # why the pass did not look for blocks (then nothing says it is in deploy form)
    unsearched: str | None = None  # parts of the model the pass did not search (model-local functions' bodies)

    @property
    def fused(self) -> list[BlockRecord]:
        return [b for b in self.blocks if b.status == "fused"]

    @property
    def skipped(self) -> list[BlockRecord]:
        """Near misses: structures with two or more branches of one tensor, or with a BN, not fused."""
        return [b for b in self.blocks if b.status == "skipped"]

    @property
    def not_applicable(self) -> list[BlockRecord]:
        """Single-branch folds whose preconditions fail (e.g. a scale on a conv output that
        something else also reads): no re-parameterization block was missed there."""
        return [b for b in self.blocks if b.status == "not_applicable"]

    def to_dict(self) -> dict:
        from . import __version__
        # asdict() deep-copies field by field (~35 us a record); a record's fields are plain
        # values and lists of them, copied here directly (same keys, same order).
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("left_alone", "unsearched") and value is None:
                continue  # (a key only where the model, or a part of it, was not searched)
            if f.name == "blocks":
                data[f.name] = [{k: list(v) if isinstance(v, list) else v for k, v in vars(b).items()} for b in value]
            else:
                data[f.name] = asdict(value) if is_dataclass(value) and not isinstance(value, type) else copy.deepcopy(value)
        data["schema_version"] = SCHEMA_VERSION
        data["tool_version"] = __version__
        data["summary"] = {"fused": len(self.fused), "skipped": len(self.skipped),
                           "not_applicable": len(self.not_applicable)}
        return data

    def to_text(self, verbose: bool = False, max_rows: int = 30, color: bool = False, dry_run: bool = False) -> str:
        """The terminal report; `color` adds ANSI colours (the CLI asks only for a terminal);
        `dry_run` words it as what would be done."""
        paint = _painter(color)
        fused_word = "would be fused" if dry_run else "fused"
        lines = [f"blocks: {len(self.fused)} {fused_word}, {len(self.skipped)} skipped"]
        if self.left_alone:
            lines.append(f"not searched: {self.left_alone}")
        elif not self.fused and not self.skipped and self.unsearched:
            lines.append("nothing found in the graph; not searched: " + self.unsearched)
        elif not self.fused and not self.skipped:
            lines.append(NOTHING_TO_FUSE)
        elif not self.fused:
            lines.append(f"nothing fused: {len(self.skipped)} block{'s' if len(self.skipped) != 1 else ''} found, none "
                         "of them safe to fuse (the reasons below); the model is not in deploy form")
        shown = [b for b in self.blocks if b.status != "not_applicable"]
        rows = shown if len(shown) <= max_rows else self.skipped
        if verbose:
            rows = self.blocks
        for b in rows:
            shape = b.pattern
            extra = ""
            if b.group is not None:
                extra = f" g={b.group} s={','.join(map(str, b.strides or []))}"
            if b.status == "fused":
                lines.append(f"  {paint('fused', 'green')}    {b.anchor}  {shape}{extra}")
            elif b.status == "skipped":
                lines.append(f"  {paint('skipped', 'yellow')}  {b.anchor}  {shape}: {b.reason}")
            else:
                lines.append(f"  not applicable  {b.anchor}  {shape}: {b.reason}")
        if self.not_applicable and not verbose:
            count = len(self.not_applicable)
            lines.append(f"  {count} single-branch fold{'s' if count != 1 else ''} not applicable (-v lists "
                         f"{'them' if count != 1 else 'it'})")
        if rows is not shown and not verbose:
            patterns = Counter(b.pattern for b in self.fused)
            summary = ", ".join(f"{n}x {p}" for p, n in patterns.most_common())
            lines.append(f"  fused: {summary} (-v lists every block)")
        if self.frozen_initializer_inputs:
            lines.append(f"  {self.frozen_initializer_inputs} initializers removed from the graph inputs "
                         "(--freeze-initializers)")
        if self.unsearched and (self.fused or self.skipped):
            lines.append(f"not searched: {self.unsearched}")
        lines.extend(f"note: {note}" for note in self.notes)
        if self.before and self.after:
            lines.append("")
            lines.extend(_side_by_side(self))
        if self.validation is not None:
            lines.append("")
            lines.append(_validation_text(self.validation, paint))
        if self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return str(n)


def _side_by_side(report: Report) -> list[str]:
    b, a = report.before, report.after
    assert b is not None and a is not None
    changed = [op for op in OTHER_COUNTED_OPS if b.op_counts.get(op, 0) != a.op_counts.get(op, 0)]
    rows = [(op, str(b.op_counts.get(op, 0)), str(a.op_counts.get(op, 0))) for op in COUNTED_OPS + tuple(changed)]
    rows.append(("nodes", str(b.nodes), str(a.nodes)))
    rows.append(("params", f"{b.params:,}", f"{a.params:,}"))
    if report.size_before is not None or report.size_after is not None:
        rows.append(("file size", human_bytes(report.size_before), human_bytes(report.size_after)))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len("original"), *(len(r[1]) for r in rows))
    w2 = max(len("fused"), *(len(r[2]) for r in rows))
    out = [f"  {'':<{w0}}  {'original':>{w1}}  {'fused':>{w2}}"]
    out += [f"  {r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}" for r in rows]
    return out


_COLORS = {"green": "32", "yellow": "33", "red": "31"}


def _painter(enabled: bool):
    def paint(text: str, color: str) -> str:
        return f"\033[{_COLORS[color]}m{text}\033[0m" if enabled else text
    return paint


_PLAIN = _painter(False)


def _dim_value(v: Validation, dim: str) -> str:
    """The value validation gave a dynamic dim 'input[axis]' (from its input shapes)."""
    name, _, axis = dim.rpartition("[")
    shape = v.input_shapes.get(name) or []
    try:
        return str(shape[int(axis.rstrip("]"))])
    except (TypeError, ValueError, IndexError):
        return "?"


def _validation_text(v: Validation, paint=_PLAIN) -> str:
    if v.error:
        return f"validation: {paint('could not run', 'red')}: {v.error}"
    head = paint("passed", "green") if v.passed else paint("FAILED", "red")
    plural = "s" if v.input_sets != 1 else ""
    sets = (f"{v.input_sets} input set{plural}: {', '.join(v.given_inputs)} given, the rest random" if v.given_inputs
            else f"{v.input_sets} random input set{plural}")
    lines = [f"validation: {head} ({sets}; onnxruntime, optimizations disabled)"]
    checked = [b for b in v.blocks if b.checked]
    if v.blocks:
        worst = max((b.max_rel_diff for b in checked), default=0.0)
        whole = " with every kernel tap on data" if checked and not any(b.note for b in checked) else ""
        lines.append(f"  blocks: {len(checked)} of {len(v.blocks)} checked alone{whole}: max rel diff {worst:.3g}")
    compared = v.compared
    outputs = [o for o in v.outputs if o.comparable]
    tensors = [t for t in v.tensors if t.comparable]
    end = (f"  end to end: {len(outputs)} of {len(v.outputs)} outputs (max abs diff "
           f"{max((o.max_abs_diff for o in outputs), default=0.0):.3g}, max rel diff "
           f"{max((o.max_rel_diff for o in outputs), default=0.0):.3g})")
    if v.tensors:
        end += (f" and {len(tensors)} block tensors (max rel diff "
                f"{max((t.max_rel_diff for t in tensors), default=0.0):.3g})")
    lines.append(end + " compared")
    if v.defaulted_dims:
        chosen = ", ".join(f"{d}={_dim_value(v, d)}" for d in v.defaulted_dims)
        covered = {True: " (every kernel meets data)", False: " (some kernels are larger than their input)",
                   None: ""}[v.kernels_covered]
        lines.append(f"  dynamic dims chosen: {chosen}{covered}; --input-shape NAME:D0,D1,... sets them")
    for o in v.outputs + v.tensors:
        if not o.comparable:
            lines.append(f"  not comparable: {o.role} '{o.name}' {o.reason} (max abs diff {o.max_abs_diff:.3g}, "
                         "not held to the tolerance)")
    for b in v.blocks:
        if b.checked and not b.passed and b.reason:
            lines.append(f"  block '{b.nodes[0]}' checked alone: {b.reason}")
        elif b.checked and not b.passed:
            lines.append(f"  block '{b.nodes[0]}' checked alone: max abs diff {b.max_abs_diff:.3g}, max rel diff "
                         f"{b.max_rel_diff:.3g} exceed the tolerance")
        elif b.note:
            lines.append(f"  block '{b.nodes[0]}': {b.note}")
    for o in compared:
        if not o.passed and o.reason:
            lines.append(f"  {o.role} '{o.name}': {o.reason}")
        elif not o.passed:
            lines.append(f"  {o.role} '{o.name}': max abs diff {o.max_abs_diff:.3g}, max rel diff "
                         f"{o.max_rel_diff:.3g} exceed rtol {o.rtol:g}, atol {o.atol:g}")
    lines.extend(f"  note: {note}" for note in v.notes)
    return "\n".join(lines)
