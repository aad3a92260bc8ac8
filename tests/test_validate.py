"""The output comparison behind validation: what passes, what fails, and what is reported."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_repvgg.validate import compare


def test_rounding_noise_at_elements_near_zero_passes():
    """Values of size ~100 computed in another order differ by ~1e-5 everywhere, also where
    an element happens to be ~0: that is rounding, not a wrong model."""
    rng = np.random.default_rng(0)
    expected = (rng.standard_normal(10_000) * 100).astype(np.float32)
    expected[:10] = 1e-4
    actual = expected + (rng.standard_normal(10_000) * 2e-5).astype(np.float32)
    check = compare("y", expected, actual, rtol=1e-4, atol=1e-5)
    assert check.passed
    assert check.max_abs_diff > 1e-5 and check.max_rel_diff < 1e-6


def test_error_in_a_small_valued_part_of_an_output_fails():
    """Box coordinates (~300) beside class scores (~0.5) in one tensor: a 0.05 error in one
    score is caught, not hidden behind the largest values."""
    rng = np.random.default_rng(1)
    expected = np.concatenate([rng.uniform(0, 640, (1, 4, 100)), rng.uniform(0, 1, (1, 80, 100))], axis=1)
    expected = expected.astype(np.float32)
    actual = expected.copy()
    actual[0, 10, 7] += 0.05
    check = compare("y", expected, actual, rtol=1e-4, atol=1e-5)
    assert not check.passed
    assert check.max_abs_diff == pytest.approx(0.05, rel=1e-3)


def test_reported_relative_difference_matches_the_verdict():
    expected = np.array([1000.0, 0.0, -1000.0], np.float32)
    actual = expected + np.array([0.0, 0.05, 0.0], np.float32)  # rms ~816: 0.05 is 6e-5 of it
    check = compare("y", expected, actual, rtol=1e-4, atol=0.0)
    assert check.passed and check.max_rel_diff == pytest.approx(0.05 / np.sqrt(2e6 / 3), rel=1e-5)
    check = compare("y", expected, actual, rtol=1e-5, atol=0.0)
    assert not check.passed


@pytest.mark.parametrize("expected,actual,passed", [
    ([np.nan, 1.0], [np.nan, 1.0], True),
    ([np.nan, 1.0], [0.0, 1.0], False),
    ([np.inf, 1.0], [np.inf, 1.0], True),
    ([np.inf, 1.0], [-np.inf, 1.0], False),
    ([0.0, 0.0], [0.0, 0.0], True),
    ([0.0, 0.0], [0.0, 1e-3], False),
])
def test_special_values(expected, actual, passed):
    check = compare("y", np.array(expected, np.float32), np.array(actual, np.float32), rtol=1e-4, atol=1e-5)
    assert check.passed is passed


def test_integer_outputs_must_be_equal():
    assert compare("i", np.arange(4), np.arange(4), 1e-4, 1e-5).passed
    assert not compare("i", np.arange(4), np.arange(4) + 1, 1e-4, 1e-5).passed
