"""Comparing an original tensor with its fused counterpart, element by element.

Each element is held to atol + rtol * max(|expected|, RMS of the tensor): float32 rounding
follows the size of the sums behind an element, not the element itself, so elements near zero
are not held to their own size, while a small-valued part of a tensor (class scores beside box
coordinates) is not measured against its largest values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..report import OutputCheck

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
# float16 keeps 11 significant bits: a sum re-associated by fusion moves by ~1e-3.
HALF_RTOL = 1e-2
HALF_ATOL = 1e-3


def tolerances(expected, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """The tolerances for a tensor (or the tensors of a sequence or map output): the ones given,
    else the defaults of its dtype."""
    half = next(arrays_in(expected), _EMPTY).dtype == np.float16
    return (rtol if rtol is not None else (HALF_RTOL if half else DEFAULT_RTOL),
            atol if atol is not None else (HALF_ATOL if half else DEFAULT_ATOL))


def arrays_in(value) -> Iterator[np.ndarray | np.generic]:
    """The numpy values in a value as onnxruntime gives it: an array; a list of them for a
    sequence output; a dict, or a list of dicts, for a map output; None for an absent optional
    one (anything else holds none)."""
    if isinstance(value, (np.ndarray, np.generic)):
        yield value
    elif isinstance(value, (list, tuple, dict)):
        for part in value.values() if isinstance(value, dict) else value:
            yield from arrays_in(part)


_EMPTY = np.zeros(0, np.float32)


def compare(name: str, expected, actual, rtol: float, atol: float) -> OutputCheck:
    if isinstance(expected, (list, tuple, dict)) or isinstance(actual, (list, tuple, dict)) \
            or expected is None or actual is None:
        return _compare_parts(name, expected, actual, rtol, atol)
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return OutputCheck(name, float("inf"), float("inf"), rtol, atol, False,
                           reason=f"the fused model gives {actual.dtype}{list(actual.shape)}, the original "
                                  f"{expected.dtype}{list(expected.shape)}")
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
    check = OutputCheck(name, max_abs, max_rel, rtol, atol, passed)
    apart = ~(same_nan & same_inf)
    if apart.any():  # the differences above are of the elements finite in both: say what else differs
        first = np.unravel_index(int(np.argmax(apart)), apart.shape) if apart.ndim else ()
        check.reason = (f"{int(apart.sum())} element(s) NaN or infinite in one model and not the same in the other "
                        f"(at {list(map(int, first))}: original {expected[first]}, fused {actual[first]}); "
                        f"the elements finite in both differ by at most {max_abs:.3g} (rel {max_rel:.3g})")
    return check


def _compare_parts(name: str, expected, actual, rtol: float, atol: float) -> OutputCheck:
    """A sequence output (a list of tensors), a map (a dict), a sequence of maps, or an optional
    output that is absent (None): equal in structure (lengths, keys) and part by part within
    the tolerances; the worst part is reported."""
    def differs(what: Callable[[Any], str]) -> OutputCheck:
        return OutputCheck(name, float("inf"), float("inf"), rtol, atol, False,
                           reason=f"the fused model gives {what(actual)}, the original {what(expected)}")

    if expected is None or actual is None:
        if expected is None and actual is None:
            return OutputCheck(name, 0.0, 0.0, rtol, atol, True)
        return differs(lambda v: "no value" if v is None else "a value")
    if isinstance(expected, dict) or isinstance(actual, dict):
        if not (isinstance(expected, dict) and isinstance(actual, dict)) or list(expected) != list(actual):
            return differs(lambda v: f"a map with keys {sorted(v)[:8]}" if isinstance(v, dict) else type(v).__name__)
        pairs = [(expected[k], actual[k]) for k in expected]
    elif not (isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple))) or len(expected) != len(actual):
        return differs(lambda v: f"a sequence of {len(v)}" if isinstance(v, (list, tuple)) else "a tensor")
    else:
        pairs = list(zip(expected, actual))
    worst = OutputCheck(name, 0.0, 0.0, rtol, atol, True)
    for e, a in pairs:
        part = compare(name, e, a, rtol, atol)
        worst.max_abs_diff = max(worst.max_abs_diff, part.max_abs_diff)
        worst.max_rel_diff = max(worst.max_rel_diff, part.max_rel_diff)
        if not part.passed:
            worst.passed = False
            worst.reason = worst.reason or part.reason  # (the first part that says what differs)
    return worst
