"""Prove a fused model equal to its original: onnxruntime, optimizations off, seeded inputs.

Graph optimizations are disabled so that onnxruntime's own Conv/BN/Add fusions cannot
hide a difference. Dynamic dimensions are resolved to 1 unless a shape is given (dynamic
spatial dims larger when the original model cannot run that small). Each output is compared
element by element, relative to max(|original|, RMS of the output).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from .report import OutputCheck, Validation

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
# float16 keeps 11 significant bits: a sum re-associated by fusion moves by ~1e-3.
HALF_RTOL = 1e-2
HALF_ATOL = 1e-3
_PROTO_LIMIT = 2**31 - 2**25  # serialize in memory below ~1.97 GB, else go through a file

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


class ValidationError(RuntimeError):
    """onnxruntime could not run a model, so nothing could be proven.

    `side` is "original" when the input model itself cannot run (the user may choose
    --no-check), "fused" when only the fused model fails (a failed proof).
    """

    def __init__(self, message: str, side: str = "fused"):
        super().__init__(message)
        self.side = side


def _session(model, label: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        if isinstance(model, (str, os.PathLike)):
            return ort.InferenceSession(os.fspath(model), options, providers=["CPUExecutionProvider"])
        if model.ByteSize() < _PROTO_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValidationError(f"onnxruntime cannot load the {label} model: {_first_line(err)}", label) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def resolve_shape(name: str, shape: Sequence, overrides: Mapping[str, Sequence[int]]) -> list[int]:
    if name in overrides:
        return [int(d) for d in overrides[name]]
    return [d if isinstance(d, int) and d >= 0 else 1 for d in shape]


def random_inputs(session, overrides: Mapping[str, Sequence[int]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        shape = resolve_shape(arg.name, arg.shape, overrides)
        dtype = _ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise ValidationError(f"input '{arg.name}' has type {arg.type}, which random inputs do not cover",
                                  "original")
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[arg.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[arg.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def compare(name: str, expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float) -> OutputCheck:
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return OutputCheck(name, float("inf"), float("inf"), rtol, atol, False)
    if not np.issubdtype(expected.dtype, np.floating):
        equal = bool(np.array_equal(expected, actual))
        return OutputCheck(name, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"), rtol, atol, equal)
    e = expected.astype(np.float64)
    a = actual.astype(np.float64)
    same_nan = np.isnan(e) == np.isnan(a)
    finite = np.isfinite(e) & np.isfinite(a)
    same_inf = np.where(np.isinf(e) | np.isinf(a), e == a, True)
    diff = np.abs(e[finite] - a[finite])
    magnitude = np.abs(e[finite])
    max_abs = float(diff.max()) if diff.size else 0.0
    # Each element is compared relative to max(|expected|, RMS of the output). Float32 rounding
    # error follows the size of the sums that made an element, not the element itself, so a
    # plain elementwise rtol fails elements that happen to sit near zero; the RMS (not the
    # max) keeps a small-valued part of an output (class scores beside box coordinates in a
    # detection head) from hiding behind its largest values.
    rms = float(np.sqrt(np.mean(np.square(magnitude)))) if magnitude.size else 0.0
    scale = np.maximum(magnitude, rms)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(scale > 0, diff / scale, np.where(diff > 0, np.inf, 0.0))
    max_rel = float(relative.max()) if relative.size else 0.0
    passed = bool(same_nan.all() and same_inf.all() and np.all(diff <= atol + rtol * scale))
    return OutputCheck(name, max_abs, max_rel, rtol, atol, passed)


# Dynamic spatial dims are first set to 1 (cheap, and the centre tap of every kernel); a model
# that cannot run that small (pooling windows, upsample-and-concat necks) is tried at these.
FALLBACK_SIZES = (32, 64, 128, 224, 256, 320, 512, 640)


def _run_at_larger_sizes(reference, overrides: dict, run_original) -> tuple[list | None, dict]:
    """Retry the original with the dynamic dims on axes >= 2 (spatial) set to each of
    FALLBACK_SIZES; the runs and the shapes of the first size that works, or (None, overrides)."""
    spatial = {}
    for arg in reference.get_inputs():
        if arg.name in overrides:
            continue
        axes = [axis for axis, d in enumerate(arg.shape) if axis >= 2 and not (isinstance(d, int) and d >= 0)]
        if axes:
            spatial[arg.name] = (resolve_shape(arg.name, arg.shape, overrides), axes)
    for size in FALLBACK_SIZES if spatial else ():
        trial = dict(overrides)
        for name, (shape, axes) in spatial.items():
            trial[name] = [size if axis in axes else d for axis, d in enumerate(shape)]
        try:
            return run_original(reference, trial), trial
        except ValidationError:
            raise
        except Exception:
            continue
    return None, overrides


def validate(original, fused, *, input_sets: int = 1, rtol: float | None = None, atol: float | None = None,
             input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
             input_data: Mapping[str, np.ndarray] | None = None) -> Validation:
    """Run both models (ModelProto or path) on seeded random inputs and compare every output.

    rtol/atol default to 1e-4/1e-5, and to 1e-2/1e-3 for float16 outputs. `input_data`
    gives real arrays for some inputs (used in every input set); the rest are random.
    Dynamic dims not given by `input_shapes` are set to 1; if the original cannot run so
    small, its dynamic spatial dims (axes >= 2) are tried at FALLBACK_SIZES.
    Raises ValidationError if onnxruntime cannot run a model.
    """
    overrides = dict(input_shapes or {})
    data = dict(input_data or {})
    for name, array in data.items():
        overrides.setdefault(name, list(np.shape(array)))
    # One model in memory at a time: the original runs every input set, then is released.
    reference = _session(original, "original")
    ref_inputs = [(a.name, a.type) for a in reference.get_inputs()]
    unknown = sorted(set(data) - {name for name, _ in ref_inputs})
    if unknown:
        raise ValidationError(f"--input-data names {unknown}, which are not model inputs", "original")
    output_names = [o.name for o in reference.get_outputs()]

    def run_original(session, chosen: Mapping[str, Sequence[int]]) -> list:
        runs = []
        for k in range(max(1, input_sets)):
            feeds = random_inputs(session, chosen, seed + k)
            for name, array in data.items():
                feeds[name] = np.asarray(array, dtype=feeds[name].dtype)
            runs.append((feeds, session.run(None, feeds)))
        return runs

    try:
        runs = run_original(reference, overrides)
    except ValidationError:
        raise
    except Exception as err:
        runs, overrides = _run_at_larger_sizes(reference, overrides, run_original)
        if runs is None:
            raise ValidationError(f"onnxruntime cannot run the original model: {_first_line(err)}",
                                  "original") from None
    shapes = {a.name: resolve_shape(a.name, a.shape, overrides) for a in reference.get_inputs()}
    given = set(input_shapes or {}) | set(data)
    defaulted = [f"{a.name}[{axis}]" for a in reference.get_inputs() if a.name not in given
                 for axis, d in enumerate(a.shape) if not (isinstance(d, int) and d >= 0)]
    del reference
    candidate = _session(fused, "fused")
    if ref_inputs != [(a.name, a.type) for a in candidate.get_inputs()]:
        raise ValidationError("the fused model's inputs differ from the original's")
    if output_names != [o.name for o in candidate.get_outputs()]:
        raise ValidationError("the fused model's outputs differ from the original's")
    worst: dict[str, OutputCheck] = {}
    for feeds, expected in runs:
        try:
            actual = candidate.run(None, feeds)
        except Exception as err:
            raise ValidationError(f"onnxruntime cannot run the fused model: {_first_line(err)}") from None
        for name, e, a in zip(output_names, expected, actual):
            half = np.asarray(e).dtype == np.float16
            r = rtol if rtol is not None else (HALF_RTOL if half else DEFAULT_RTOL)
            t = atol if atol is not None else (HALF_ATOL if half else DEFAULT_ATOL)
            check = compare(name, e, a, r, t)
            prev = worst.get(name)
            if prev is None:
                worst[name] = check
            else:
                worst[name] = OutputCheck(name, max(prev.max_abs_diff, check.max_abs_diff),
                                          max(prev.max_rel_diff, check.max_rel_diff), r, t,
                                          prev.passed and check.passed)
    outputs = [worst[n] for n in output_names]
    return Validation(passed=all(o.passed for o in outputs), input_sets=max(1, input_sets),
                      outputs=outputs, input_shapes=shapes, defaulted_dims=defaulted)
