"""Property: for every random graph of blocks and near-misses, the fused model is valid
(full onnx check) and equal to the original under onnxruntime, or left untouched with
a stated reason. Never a wrong output. A larger run: benchmarks/soundness.py."""

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings

from onnx_repvgg import fuse
from tests.graphs import random_feed, run
from tests.soundness_graphs import build, graph_spec


def check_sound(model: onnx.ModelProto, allow_densify: bool = False) -> dict:
    fused, report = fuse(model, allow_densify=allow_densify)
    onnx.checker.check_model(fused, full_check=True)
    for record in report.skipped:
        assert record.reason and record.reason_code
    if not report.fused:
        assert fused.SerializeToString() == model.SerializeToString()
    half = model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    for seed in (0, 1):
        feeds = random_feed(model, seed)
        for name, expected, actual in zip([o.name for o in model.graph.output], run(model, feeds), run(fused, feeds)):
            e = expected.astype(np.float64)
            a = actual.astype(np.float64)
            assert e.shape == a.shape, name
            scale = max(1.0, float(np.abs(e[np.isfinite(e)]).max(initial=0)))
            tol = (2e-2 if half else 1e-4) * scale
            finite = np.isfinite(e)
            assert np.array_equal(finite, np.isfinite(a)), name
            assert np.all(np.abs(e[finite] - a[finite]) <= tol), (name, float(np.abs(e[finite] - a[finite]).max()), tol)
    return {"fused": len(report.fused), "skipped": [r.reason_code for r in report.skipped]}


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(graph_spec())
def test_fusion_is_sound(spec):
    model = build(spec)
    if model is None:
        return
    check_sound(model, allow_densify=spec["seed"] % 2 == 0)
