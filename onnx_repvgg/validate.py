"""Prove a fused model equal to its original, with onnxruntime (graph optimizations disabled,
so its own fusions cannot hide a difference) on seeded random inputs.

The proof has two parts (onnx_repvgg.proof):

1. Block by block. Every region the fusion changed (proof.changes: the new nodes, and the
   original nodes that computed the same tensors from the same inputs) is run alone, original
   against fused, on random inputs at least as large as each fused kernel's extent, so that a
   wrong tap, bias or channel shows whatever follows the block (top-k, NMS, argmax).
2. End to end. Both models run on the same inputs; their graph outputs and every tensor they
   share at the blocks' edges are compared, so a wiring error shows where it happens. A tensor
   past a discontinuous op that a changed value reaches (proof.continuity) is measured but not
   held to the tolerance: near-tied scores may swap rows there by rounding alone.

Dynamic dims are chosen so that every convolution window meets data (the batch is 1); the
report says which. --input-shape / --input-data override.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from .graph import ReferenceAttribute, attributes
from .proof.blocks import WINDOW_OPS, check_regions
from .proof.changes import find_regions
from .proof.compare import DEFAULT_ATOL, DEFAULT_RTOL, HALF_ATOL, HALF_RTOL, arrays_in, compare, tolerances
from .proof.continuity import not_comparable
from .proof.runtime import ModelSource, ValidationError, extra_outputs, feeds_for, one_line, open_model, session
from .report import OutputCheck, Validation, human_bytes

__all__ = ["validate", "compare", "ValidationError", "DEFAULT_RTOL", "DEFAULT_ATOL", "HALF_RTOL", "HALF_ATOL"]

# Sizes tried for dynamic non-batch dims: the first at which shape inference shows every
# window meeting data, then the rest, then smaller ones for models that need them.
SIZES = (32, 64, 128, 224, 256, 320, 512, 640)
SMALL_SIZES = (16, 8, 4, 2, 1)


def validate(original, fused, *, input_sets: int = 1, rtol: float | None = None, atol: float | None = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
             input_data: Mapping[str, np.ndarray] | None = None, base_dir: str | None = None) -> Validation:
    """Prove `fused` equal to `original` (ModelProtos or paths): each changed block alone, then
    both models end to end.

    rtol/atol default to 1e-4/1e-5, and to 1e-2/1e-3 for float16 tensors. `input_data` gives
    real arrays for some inputs (used in every input set); the rest are random. Dynamic dims
    not given by `input_shapes` are chosen (see SIZES). `base_dir` is where the external data
    of ModelProtos given without it loaded lies (the original's folder, for fuse()'s output).
    Raises ValidationError if onnxruntime cannot run a model, if `input_shapes`/`input_data`
    name an input the model lacks or do not fit it, or if the `input_sets` (whose inputs and
    outputs are kept for the comparison) would take more than half the memory available.
    """
    start = time.perf_counter()
    a, b = open_model(original, "original", base_dir), open_model(fused, "fused", base_dir)
    real_inputs = _inputs(a.model.graph)
    data = dict(input_data or {})
    overrides = {name: [int(d) for d in dims] for name, dims in (input_shapes or {}).items()}
    for flag, names in (("input_shapes (--input-shape)", overrides), ("input_data (--input-data)", data)):
        unknown = [name for name in names if name not in real_inputs]
        if unknown:
            raise ValidationError(f"{flag} names {', '.join(repr(n) for n in unknown)}, which is not an input of "
                                  f"the model (its inputs: {', '.join(real_inputs)})", "input")
    for name, array in data.items():
        overrides.setdefault(name, list(np.shape(array)))
    empty = [name for name, dims in overrides.items() if any(d <= 0 for d in dims)]
    if empty:
        raise ValidationError(f"input '{empty[0]}' would have a dim of 0 ({overrides[empty[0]]}): nothing would be "
                              "compared", "input")

    regions = find_regions(a.model.graph, b.model.graph)
    block_outputs = list(dict.fromkeys(o for r in regions for o in r.outputs))
    block_inputs = list(dict.fromkeys(i for r in regions for i in r.inputs if i not in block_outputs))
    jumped = not_comparable(b.model.graph, set(block_outputs))
    graph_outputs = [v.name for v in a.model.graph.output]
    in_original = _tensor_names(a.model.graph)
    fetch = [n for n in dict.fromkeys(graph_outputs + block_outputs + block_inputs) if n in in_original]

    shapes, defaulted, covered = _choose_shapes(a, b, real_inputs, overrides)
    runs, shapes = _run_original(a, fetch, shapes, data, input_sets, seed, defaulted)
    expected_inputs = {name: runs[0][0][name] for name in real_inputs}
    captured = {**expected_inputs, **runs[0][1]}

    fused_fetch = [name for name in fetch if name in _tensor_names(b.model.graph)]
    missing = [name for name in graph_outputs if name not in fused_fetch]
    if missing or [v.name for v in b.model.graph.output] != graph_outputs:
        raise ValidationError("the fused model's outputs differ from the original's")
    if _inputs(b.model.graph) != real_inputs:
        raise ValidationError("the fused model's inputs differ from the original's")
    with extra_outputs(b.model, fused_fetch):
        candidate = session(b.model, b.base_dir, "fused")
    roles = {**{n: "block input" for n in block_inputs}, **{n: "block output" for n in block_outputs},
             **{n: "output" for n in graph_outputs}}
    worst: dict[str, OutputCheck] = {}
    for feeds, expected in runs:
        try:
            actual = dict(zip(fused_fetch, candidate.run(fused_fetch, feeds)))
        except Exception as err:
            raise ValidationError(f"onnxruntime cannot run the fused model: {one_line(err)}") from None
        for name in fused_fetch:
            worst[name] = _worse(worst.get(name), _check(name, roles[name], expected[name], actual[name],
                                                         jumped.get(name), rtol, atol))
    del candidate, runs
    end_to_end = time.perf_counter() - start

    blocks = check_regions(regions, a, b, captured, rtol, atol, seed)
    result = Validation(passed=True, input_sets=max(1, input_sets),
                        outputs=[worst[n] for n in graph_outputs],
                        tensors=[worst[n] for n in fused_fetch if n not in graph_outputs],
                        blocks=blocks, input_shapes=shapes, defaulted_dims=defaulted,
                        kernels_covered=covered if defaulted else None,
                        timings={"end_to_end": end_to_end, "blocks": time.perf_counter() - start - end_to_end},
                        given_inputs=sorted(data))
    result.passed = all(o.passed for o in result.compared) and all(blk.passed for blk in blocks if blk.checked)
    # A block that could not be checked alone is proven only by its own outputs, compared end
    # to end: another output that happens to be comparable says nothing about it.
    compared = {o.name for o in result.outputs + result.tensors if o.comparable}
    for blk in blocks:
        if not blk.checked and not all(name in compared for name in blk.outputs):
            result.passed = False
            result.notes.append(f"block '{blk.nodes[0]}' could not be checked alone and its outputs are not "
                                "comparable end to end: nothing proves it")
    if real_inputs and not any(np.size(o) for o in [captured.get(n) for n in real_inputs] if o is not None):
        result.passed = False
        result.notes.append("every input is empty: nothing was compared")
    return result


def _inputs(graph: onnx.GraphProto) -> list[str]:
    initializers = {t.name for t in graph.initializer}
    return [v.name for v in graph.input if v.name not in initializers]


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    """Every value the graph holds: inputs, initializers (a graph output may be one) and node outputs."""
    names = {v.name for v in graph.input}
    names.update(t.name for t in graph.initializer)
    names.update(sparse.values.name for sparse in graph.sparse_initializer)
    for node in graph.node:
        names.update(out for out in node.output if out)
    return names


def _check(name: str, role: str, expected, actual, jumped: str | None, rtol, atol) -> OutputCheck:
    r, t = tolerances(expected, rtol, atol)
    check = compare(name, expected, actual, r, t)
    check.role = role
    if jumped is not None:
        check.comparable, check.reason, check.passed = False, jumped, True
    return check


def _worse(previous: OutputCheck | None, check: OutputCheck) -> OutputCheck:
    if previous is None:
        return check
    previous.max_abs_diff = max(previous.max_abs_diff, check.max_abs_diff)
    previous.max_rel_diff = max(previous.max_rel_diff, check.max_rel_diff)
    previous.passed = previous.passed and check.passed
    if not check.passed and previous.reason is None:  # (a NaN in one model only, in a later input set)
        previous.reason = check.reason
    return previous


# -- input sizes ------------------------------------------------------------------------------

def _declared_dims(graph: onnx.GraphProto, names: list[str]) -> dict[str, list[int | None]]:
    dims: dict[str, list[int | None]] = {}
    for value in graph.input:
        if value.name in names:
            shape = value.type.tensor_type.shape
            # (a negative dim_value is no size: dynamic, as for the pass's own reading of declared dims)
            dims[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in shape.dim]
    return dims


def _shapes_at(declared, overrides, size: int) -> dict[str, list[int]]:
    return {name: list(overrides[name]) if name in overrides else
            [d if d is not None else (1 if axis == 0 else size) for axis, d in enumerate(dims)]
            for name, dims in declared.items()}


def _choose_shapes(a: ModelSource, b: ModelSource, inputs: list[str], overrides):
    """Input shapes, the dims chosen ("x[2]"), and whether every window then meets data."""
    declared = _declared_dims(a.model.graph, inputs)
    defaulted = [f"{name}[{axis}]" for name, dims in declared.items() if name not in overrides
                 for axis, d in enumerate(dims) if d is None]
    if not defaulted:
        return _shapes_at(declared, overrides, 1), [], None
    for size in SIZES:
        covered = _windows_covered(b.model, _shapes_at(declared, overrides, size))
        if covered is not False:
            return _shapes_at(declared, overrides, size), defaulted, covered
    return _shapes_at(declared, overrides, SIZES[-1]), defaulted, False


def _windows_covered(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> bool | None:
    """Whether, at these input shapes, every window op's input is at least as large as its
    window on each spatial axis (by onnx shape inference); None when inference cannot tell."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for value in light.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for d, size in zip(dims, shapes[value.name]):
                d.ClearField("dim_param")
                d.dim_value = size
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:
        return None
    known = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info):
        t = value.type.tensor_type
        if t.HasField("shape"):
            known[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    seen = False
    for node in model.graph.node:
        if node.op_type not in WINDOW_OPS or not node.input or node.input[0] not in known:
            continue
        try:
            attrs = attributes(node)
        except ReferenceAttribute:  # no value outside a function: this window tells nothing
            continue
        kernel = attrs.get("kernel_shape") or (weights.get(node.input[1], [])[2:] if len(node.input) > 1 else [])
        if not kernel:
            continue
        dilations = attrs.get("dilations") or [1] * len(kernel)
        spatial = known[node.input[0]][2:]
        for extent, k, d in zip(spatial, kernel, dilations):
            if extent is None:
                continue
            seen = True
            if extent < d * (k - 1) + 1:
                return False
    return True if seen else None


def _check_sets_fit(first: tuple[dict, dict], given: Mapping[str, np.ndarray], input_sets: int) -> None:
    """Every input set's inputs and outputs are kept until the fused model has run on them:
    ValidationError ("sets") when that many sets of the size of the first would take more than
    half the memory available, before it is spent (the kernel would end the process unannounced).
    The arrays of `given` (--input-data) are the same objects in every set: counted once."""
    available = available_memory()
    if available is None:
        return
    feeds, outputs = first
    # (given data of another dtype is converted anew for every set: shared only when fed as it is)
    shared = sum(_nbytes(feeds[name]) for name in given if name in feeds and feeds[name] is given[name])
    per_set = _nbytes(feeds) - shared + _nbytes(outputs)
    budget = available // 2 - shared
    if per_set * input_sets > budget:
        most = max(0, budget) // max(per_set, 1)
        raise ValidationError(f"{input_sets} input sets would keep {human_bytes(shared + per_set * input_sets)} of "
                              f"inputs and outputs for the comparison ({human_bytes(per_set)} a set), more than half "
                              f"the memory available ({human_bytes(available)}): ask for at most {max(most, 1)} "
                              "(--check)", "sets")


def _nbytes(value) -> int:
    """Bytes held by a run's value (or a dict of them): its arrays' (compare.arrays_in)."""
    return sum(array.nbytes for array in arrays_in(value))


def available_memory() -> int | None:
    """Bytes of memory a new allocation may take without swapping or being killed: the least of
    Linux's MemAvailable and the room left under the process's cgroup memory limit (a container's
    --memory), or what sysconf says elsewhere; None where the system does not say."""
    found = [room for room in (_meminfo_available(), _cgroup_room()) if room is not None]
    if found:
        return min(found)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _meminfo_available() -> int | None:
    kilobytes = _file_value("/proc/meminfo", "MemAvailable:")
    return None if kilobytes is None else kilobytes * 1024


_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current",  # cgroup v2
                  "/sys/fs/cgroup/memory.stat", "inactive_file"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
                  "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))  # v1


def _cgroup_room(files=_CGROUP_FILES) -> int | None:
    """The limit of the cgroup this process runs in, less its working set (its usage less the
    inactive file cache, which the kernel reclaims before it kills: the kubelet's measure);
    None without a limit."""
    for limit_path, usage_path, stat_path, inactive_key in files:
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # no limit (v1 says so with a huge number)
            return None
        return max(0, int(limit) - max(0, usage - (_file_value(stat_path, inactive_key) or 0)))
    return None


def _file_value(path: str, key: str) -> int | None:
    """The number after `key` on its line of a "key value [unit]" file (/proc/meminfo, a cgroup's
    memory.stat); None when it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[0] == key:
                    return int(fields[1])
    except (OSError, ValueError):
        pass
    return None


def _run_original(a: ModelSource, fetch: list[str], shapes, data, input_sets: int, seed: int, defaulted):
    """Run the original on every input set: [(feeds, {name: value})], and the shapes used.
    A model that cannot run at the chosen sizes is tried at the others."""
    with extra_outputs(a.model, fetch):
        reference = session(a.model, a.base_dir, "original")
    tried = [shapes]
    if defaulted:
        declared = _declared_dims(a.model.graph, list(shapes))
        fixed = {name: shape for name, shape in shapes.items() if not any(d.startswith(name + "[") for d in defaulted)}
        tried += [_shapes_at(declared, fixed, size) for size in SIZES + SMALL_SIZES]
    first_error = None
    for candidate in tried:
        try:
            runs = []
            for k in range(max(1, input_sets)):
                feeds = feeds_for(reference.get_inputs(), candidate, data, seed + k)
                runs.append((feeds, dict(zip(fetch, reference.run(fetch, feeds)))))
                if k == 0 and input_sets > 1:
                    _check_sets_fit(runs[0], data, input_sets)
            return runs, candidate
        except ValidationError:
            raise
        except Exception as err:
            first_error = first_error or err
            if not defaulted:
                break
    text = one_line(first_error) if first_error else "no input shape worked"
    if "No corresponding Numpy type" in text:  # onnxruntime ran it, but cannot hand a value's type to Python
        raise ValidationError(f"onnxruntime cannot hand a value the comparison reads to numpy ({text})", "unsupported")
    shape_error = any(key in text for key in ("dimension", "Invalid rank", "shape", "Got:", "Expected:",
                                              "Unexpected input data type"))
    raise ValidationError(f"onnxruntime cannot run the original model at input shapes "
                          f"{ {k: list(v) for k, v in shapes.items()} }: {text}",
                          "input" if shape_error else "original")
