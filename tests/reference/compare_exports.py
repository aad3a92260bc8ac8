"""Compare regenerated Paddle exports with the checked-in ones (tests/data/paddle/).

    python -m tests.reference.compare_exports NEW_DIR CHECKED_IN_DIR

Needs onnx and onnxruntime (the paddle environment of .ci/paddle-exports has both). For each
file of either folder: the other has it; an ONNX model has the same opsets, the same inputs and
outputs, the same node sequence (op types, domains and attributes), and the same initializers in
order (shape, dtype, values to 1e-6); both models give the same outputs on the stored input; an
io file holds the same input and paddle's output to 1e-5. Prints one line per difference and
exits 1 if there is any; says which files are byte for byte the same.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def _nodes(model: onnx.ModelProto) -> list[tuple]:
    out = []
    for node in model.graph.node:
        attrs = []
        for attr in node.attribute:
            value = onnx.helper.get_attribute_value(attr)
            if isinstance(value, onnx.TensorProto):
                value = numpy_helper.to_array(value).tolist()
            attrs.append((attr.name, repr(value)))
        out.append((node.domain, node.op_type, len(node.input), len(node.output), tuple(sorted(attrs))))
    return out


def _signature(values) -> list[tuple]:
    return [(v.name, v.type.SerializeToString()) for v in values]


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def compare_models(new: onnx.ModelProto, old: onnx.ModelProto, x: np.ndarray | None) -> list[str]:
    problems = []
    if [(o.domain, o.version) for o in new.opset_import] != [(o.domain, o.version) for o in old.opset_import]:
        problems.append("opsets differ")
    if _signature(new.graph.input) != _signature(old.graph.input) or \
            _signature(new.graph.output) != _signature(old.graph.output):
        problems.append("graph inputs or outputs differ")
    a, b = _nodes(new), _nodes(old)
    if a != b:
        first = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
        problems.append(f"node sequences differ ({len(a)} vs {len(b)} nodes; first difference at node {first})")
    inits_new, inits_old = list(new.graph.initializer), list(old.graph.initializer)
    if len(inits_new) != len(inits_old):
        problems.append(f"{len(inits_new)} vs {len(inits_old)} initializers")
    for t_new, t_old in zip(inits_new, inits_old):
        v_new, v_old = numpy_helper.to_array(t_new), numpy_helper.to_array(t_old)
        if v_new.shape != v_old.shape or v_new.dtype != v_old.dtype:
            problems.append(f"initializer {t_old.name}: {v_new.dtype}{v_new.shape} vs {v_old.dtype}{v_old.shape}")
        elif not np.allclose(v_new, v_old, rtol=1e-6, atol=1e-7):
            problems.append(f"initializer {t_old.name}: values differ (max abs {float(np.abs(v_new - v_old).max()):.2e})")
    if x is not None and not problems:
        for i, (y_new, y_old) in enumerate(zip(_run(new, x), _run(old, x))):
            if y_new.shape != y_old.shape or not np.allclose(y_new, y_old, rtol=1e-5, atol=1e-6):
                problems.append(f"output {i} differs")
    return problems


def compare_io(new_path: str, old_path: str) -> list[str]:
    with np.load(new_path) as new, np.load(old_path) as old:
        if sorted(new.files) != sorted(old.files):
            return [f"arrays {sorted(new.files)} vs {sorted(old.files)}"]
        problems = []
        if not np.array_equal(new["x"], old["x"]):
            problems.append("the input differs")
        if new["y"].shape != old["y"].shape or not np.allclose(new["y"], old["y"], rtol=1e-5, atol=1e-6):
            problems.append("paddle's output differs")
        return problems


def main(new_dir: str, old_dir: str) -> int:
    new_files = {f for f in os.listdir(new_dir) if f.endswith((".onnx", ".npz"))}
    old_files = {f for f in os.listdir(old_dir) if f.endswith((".onnx", ".npz"))}
    failures = [f"{f}: only in the regenerated exports" for f in sorted(new_files - old_files)]
    failures += [f"{f}: only in {old_dir}" for f in sorted(old_files - new_files)]
    identical = 0
    for name in sorted(new_files & old_files):
        new_path, old_path = os.path.join(new_dir, name), os.path.join(old_dir, name)
        with open(new_path, "rb") as f_new, open(old_path, "rb") as f_old:
            if f_new.read() == f_old.read():
                identical += 1
                continue
        if name.endswith(".npz"):
            problems = compare_io(new_path, old_path)
        else:
            io_file = os.path.join(old_dir, name.rsplit("_", 1)[0] + "_io.npz")
            x = np.load(io_file)["x"] if os.path.exists(io_file) else None
            problems = compare_models(onnx.load(new_path), onnx.load(old_path), x)
        failures += [f"{name}: {p}" for p in problems]
        if not problems:
            print(f"{name}: equal (not byte for byte)")
    for line in failures:
        print(f"DIFFERENT {line}")
    print(f"{len(new_files & old_files)} files compared, {identical} byte for byte the same, "
          f"{len(failures)} differences")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
