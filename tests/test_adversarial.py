"""The adversarial corpus (tests/adversarial.py) through the CLI, in both modes.

For every case: --no-check writes a model equal to the original (compared in onnxruntime at
the model's static sizes, where every kernel tap meets data) or leaves the block as it was,
with the case's expected reasons; the validated run agrees; the input files are byte-identical
afterwards; and a failed run leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import pytest

from onnx_repvgg.cli import main
from tests.adversarial import Case, corpus, save
from tests.graphs import run

CASES = corpus()


def _digest(folder: str) -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def _feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        t = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        shape = [d.dim_value for d in t.shape.dim]
        feeds[value.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                             else np.asarray(rng.integers(0, 2, shape)).astype(dtype))
    return feeds


def _load(path: str) -> onnx.ModelProto:
    """The model with its external data, each tensor reading exactly its own bytes: onnx's
    loader reads a tensor without `length` to the end of its file."""
    from onnx_repvgg.storage.external import all_tensors, tensor_nbytes

    model = onnx.load(path, load_external_data=False)
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not any(e.key == "length" for e in tensor.external_data):
            entry = tensor.external_data.add()
            entry.key, entry.value = "length", str(tensor_nbytes(tensor))
    onnx.external_data_helper.load_external_data_for_model(model, os.path.dirname(path))
    return model


def _run(model: onnx.ModelProto, feeds: dict, in_ort: bool) -> list[np.ndarray]:
    if in_ort:
        return run(model, feeds)
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def _compare(case: Case, original: onnx.ModelProto, fused: onnx.ModelProto) -> None:
    half = any(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in original.graph.output)
    for seed in (0, 1):
        feeds = _feeds(original, seed)
        expected, actual = _run(original, feeds, case.runs_in_ort), _run(fused, feeds, case.runs_in_ort)
        for name, e, a in zip([o.name for o in original.graph.output], expected, actual):
            e, a = e.astype(np.float64), a.astype(np.float64)
            scale = max(1.0, float(np.abs(e).max(initial=0)))
            assert np.all(np.abs(e - a) <= (2e-2 if half else 1e-4) * scale), (case.name, name)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_adversarial_case(tmp_path, capsys, case: Case):
    source = tmp_path / "in"
    source.mkdir()
    path = save(case, str(source))
    onnx.checker.check_model(path, full_check=True)
    before = _digest(str(source))
    original = _load(path)

    unchecked = tmp_path / "unchecked"
    unchecked.mkdir()
    report_path = tmp_path / "unchecked.json"
    code = main([path, str(unchecked / "out.onnx"), "--no-check", "--json", str(report_path), "-q"])
    err = capsys.readouterr().err
    assert code == 0, (case.name, err)
    report = json.loads(report_path.read_text())
    codes = {b["reason_code"] for b in report["blocks"] if b["status"] in ("skipped", "not_applicable")}
    assert case.reasons <= codes or case.reasons & codes, (case.name, codes)
    fused_count = report["summary"]["fused"]
    if case.expect == "fuse":
        assert fused_count >= 1, case.name
    elif case.expect == "keep":
        assert fused_count == 0, case.name
    fused = _load(str(unchecked / "out.onnx"))
    onnx.checker.check_model(fused, full_check=True)
    if fused_count:
        _compare(case, original, fused)
    else:
        assert [n.op_type for n in fused.graph.node] == [n.op_type for n in original.graph.node], case.name

    checked = tmp_path / "checked"
    checked.mkdir()
    code = main([path, str(checked / "out.onnx"), "-q"])
    err = capsys.readouterr().err
    if case.runs_in_ort:
        assert code == 0, (case.name, err)
    else:  # the original cannot run: exit 2, one line, nothing written
        assert code == 2 and len(err.strip().splitlines()) == 1, (case.name, err)
        assert os.listdir(checked) == []
    assert _digest(str(source)) == before, case.name


def test_corpus_size():
    """The README states this count: keep the two in step."""
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)
