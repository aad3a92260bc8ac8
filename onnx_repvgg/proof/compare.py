"""Comparing an original tensor with its fused counterpart, element by element.

Each element is held to atol + rtol * max(|expected|, RMS of the tensor): float32 rounding
follows the size of the sums behind an element, not the element itself, so elements near zero
are not held to their own size, while a small-valued part of a tensor (class scores beside box
coordinates) is not measured against its largest values.
"""

from __future__ import annotations

import numpy as np

from ..report import OutputCheck

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
# float16 keeps 11 significant bits: a sum re-associated by fusion moves by ~1e-3.
HALF_RTOL = 1e-2
HALF_ATOL = 1e-3


def tolerances(expected: np.ndarray, rtol: float | None, atol: float | None) -> tuple[float, float]:
    """The tolerances for a tensor: the ones given, else the defaults of its dtype."""
    half = np.asarray(expected).dtype == np.float16
    return (rtol if rtol is not None else (HALF_RTOL if half else DEFAULT_RTOL),
            atol if atol is not None else (HALF_ATOL if half else DEFAULT_ATOL))


def compare(name: str, expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float) -> OutputCheck:
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
    return OutputCheck(name, max_abs, max_rel, rtol, atol, passed)
