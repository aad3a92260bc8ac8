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


def test_kept_bytes_of_a_run_count_arrays_in_sequences_and_maps_and_never_raise():
    from onnx_repvgg.validate import _nbytes

    ragged = [np.zeros((1, 4), np.float32), np.zeros((3, 4), np.float32)]  # SplitToSequence: pieces of two sizes
    assert _nbytes({"seq": ragged, "map": {1: np.zeros(2)}, "x": np.zeros(3, np.int64)}) == 64 + 16 + 24
    assert _nbytes({"odd": object(), "none": None}) == 0


def test_the_room_under_a_cgroup_limit_bounds_the_memory_available(tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("onnx_repvgg.validate")
    limit, usage, stat = tmp_path / "memory.max", tmp_path / "memory.current", tmp_path / "memory.stat"
    files = ((str(limit), str(usage), str(stat), "inactive_file"),)
    usage.write_text("1000\n")
    limit.write_text("max\n")
    assert module._cgroup_room(files) is None  # no limit
    limit.write_text(f"{1 << 62}\n")
    assert module._cgroup_room(files) is None  # cgroup v1's way of saying none
    limit.write_text("5000\n")
    assert module._cgroup_room(files) == 4000
    usage.write_text("9000\n")
    assert module._cgroup_room(files) == 0
    stat.write_text("anon 2000\ninactive_file 6000\nactive_file 1000\n")  # cache the kernel reclaims first
    assert module._cgroup_room(files) == 2000
    assert module._cgroup_room(((str(tmp_path / "absent"), str(usage), str(stat), "inactive_file"),)) is None
    monkeypatch.setattr(module, "_meminfo_available", lambda: 1 << 30)
    monkeypatch.setattr(module, "_cgroup_room", lambda: 1 << 20)
    assert module.available_memory() == 1 << 20  # the least of the two
    monkeypatch.setattr(module, "_cgroup_room", lambda: None)
    assert module.available_memory() == 1 << 30


def test_given_input_data_is_counted_once_not_per_set(monkeypatch):
    import importlib

    module = importlib.import_module("onnx_repvgg.validate")
    given = {"big": np.zeros(1 << 20, np.uint8)}  # 1 MB, the same array in every set
    first = ({"big": given["big"], "x": np.zeros(1000, np.uint8)}, {"y": np.zeros(24, np.uint8)})
    monkeypatch.setattr(module, "available_memory", lambda: 4 << 20)  # half: 2 MB, 1 MB of it the given array
    module._check_sets_fit(first, given, 900)  # 1 MB + 900 * 1,024 bytes fits
    with pytest.raises(module.ValidationError, match=r"ask for at most 1024 \(--check\)") as err:
        module._check_sets_fit(first, given, 1100)
    assert err.value.side == "sets"
    with pytest.raises(module.ValidationError, match="ask for at most"):  # counted per set, 900 would not fit
        module._check_sets_fit(first, {}, 900)


def test_sequence_map_and_absent_outputs_are_compared_part_by_part():
    seq = [np.ones((1, 2), np.float32), np.full((3, 2), 2.0, np.float32)]
    near = [seq[0] + 1e-7, seq[1]]
    assert compare("s", seq, near, 1e-4, 1e-5).passed
    off = compare("s", seq, [seq[0], seq[1] + 0.5], 1e-4, 1e-5)
    assert not off.passed and off.max_abs_diff == pytest.approx(0.5)
    short = compare("s", seq, seq[:1], 1e-4, 1e-5)
    assert not short.passed and "a sequence of 1, the original a sequence of 2" in short.reason
    assert not compare("s", seq, np.ones((1, 2), np.float32), 1e-4, 1e-5).passed
    maps = [{1: np.float32(0.25), 2: np.float32(0.75)}]  # ZipMap: a sequence of maps
    assert compare("m", maps, [{1: np.float32(0.25), 2: np.float32(0.75)}], 1e-4, 1e-5).passed
    assert not compare("m", maps, [{1: np.float32(0.25), 3: np.float32(0.75)}], 1e-4, 1e-5).passed
    assert not compare("m", maps, [{1: np.float32(0.25), 2: np.float32(0.5)}], 1e-4, 1e-5).passed
    assert compare("o", None, None, 1e-4, 1e-5).passed and not compare("o", None, seq[0], 1e-4, 1e-5).passed


def test_a_model_with_a_sequence_output_validates_and_a_wrong_weight_is_caught(tmp_path):
    """onnxruntime gives a sequence output as a list of arrays (SplitToSequence, here in pieces of
    two sizes): it was an internal error (exit 3) of the comparison."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from onnx_repvgg import fuse, validate
    from tests.graphs import GraphBuilder
    from tests.test_branch_sum import repvgg_block

    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity="bn")])
    graph = model.graph
    graph.node.append(helper.make_node("SplitToSequence", [graph.output[0].name, "split"], ["seq"], axis=1))
    graph.initializer.append(numpy_helper.from_array(np.array([1, 3], np.int64), "split"))
    graph.output.append(helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None))
    onnx.checker.check_model(model)
    fused, report = fuse(model)
    assert len(report.fused) == 1
    result = validate(model, fused)
    assert result.passed and [o.name for o in result.outputs][-1] == "seq"
    conv = next(n for n in fused.graph.node if n.op_type == "Conv")
    weight = next(t for t in fused.graph.initializer if t.name == conv.input[1])
    wrong = numpy_helper.to_array(weight).copy()
    wrong[0, 0, 1, 1] += 0.5
    weight.CopyFrom(numpy_helper.from_array(wrong, weight.name))
    result = validate(model, fused)
    assert not result.passed and not next(o for o in result.outputs if o.name == "seq").passed


def test_nan_or_inf_in_one_model_only_is_named_as_what_differs():
    expected = np.array([[1.0, np.nan, 3.0, np.inf]], np.float32)
    check = compare("y", expected, np.array([[1.0, np.inf, 3.0, np.inf]], np.float32), 1e-4, 1e-5)
    assert not check.passed and check.max_abs_diff == 0.0
    assert check.reason.startswith("1 element(s) NaN or infinite in one model and not the same in the other "
                                   "(at [0, 1]: original nan, fused inf)")
    assert compare("y", expected, expected.copy(), 1e-4, 1e-5).reason is None  # NaN where NaN, inf where inf


def test_a_model_without_inputs_is_compared_not_called_empty(tmp_path):
    """A model of no inputs (its data from a seeded RandomNormal) has no empty input: it was
    refused as "every input is empty: nothing was compared" (exit 1)."""
    import onnx
    from onnx import helper

    from onnx_repvgg import fuse, validate
    from onnx_repvgg.cli import main
    from tests.graphs import GraphBuilder
    from tests.test_branch_sum import repvgg_block

    b = GraphBuilder()
    model = b.model([repvgg_block(b, identity="bn")])
    graph = model.graph
    graph.node.insert(0, helper.make_node("RandomNormal", [], [b.x], shape=list(b.input_shape), seed=1.0,
                                          dtype=onnx.TensorProto.FLOAT))
    del graph.input[:]
    onnx.checker.check_model(model, full_check=True)
    fused, report = fuse(model)
    assert len(report.fused) == 1
    result = validate(model, fused)
    assert result.passed and not result.notes and result.outputs[0].max_abs_diff < 1e-4
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    assert main([path, str(tmp_path / "out.onnx"), "-q"]) == 0


def test_a_block_that_failed_on_nan_or_inf_says_so_in_the_report():
    from onnx_repvgg.report import BlockCheck, Validation, _validation_text

    why = "output 'y': 1 element(s) NaN or infinite in one model and not the same in the other"
    failed = BlockCheck(["conv"], ["y"], checked=True, passed=False, reason=why)
    text = _validation_text(Validation(passed=False, input_sets=1, blocks=[failed]))
    assert f"block 'conv' checked alone: {why}" in text
    failed.reason = None
    assert "block 'conv' checked alone: max abs diff 0, max rel diff 0 exceed the tolerance" in \
        _validation_text(Validation(passed=False, input_sets=1, blocks=[failed]))


def test_a_later_input_set_or_part_that_differs_by_a_nan_keeps_its_reason():
    from onnx_repvgg.validate import _check, _worse

    ones = np.ones(3, np.float32)
    nan = np.array([1.0, np.nan, 1.0], np.float32)
    merged = _worse(_check("y", "output", ones, ones, None, None, None), _check("y", "output", ones, nan, None, None, None))
    assert not merged.passed and "NaN or infinite in one model" in merged.reason
    parts = compare("s", [ones, ones, ones], [ones + 1, ones, nan], 1e-4, 1e-5)  # the first failing part says nothing
    assert not parts.passed and "NaN or infinite in one model" in parts.reason


def test_given_data_converted_for_every_set_is_counted_per_set(monkeypatch):
    import importlib

    module = importlib.import_module("onnx_repvgg.validate")
    given = {"x": np.zeros(1 << 17, np.float64)}  # 1 MB of float64 for a float32 input: a new array each set
    first = ({"x": given["x"].astype(np.float32)}, {"y": np.zeros(0, np.float32)})
    monkeypatch.setattr(module, "available_memory", lambda: 4 << 20)  # half: 2 MB, 512 KB a set
    module._check_sets_fit(first, given, 4)
    with pytest.raises(module.ValidationError, match="ask for at most 4"):
        module._check_sets_fit(first, given, 5)
