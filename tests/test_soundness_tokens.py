"""Property: BatchNorm over token layouts folds only where its channel axis is the MatMul's
feature axis; every other layout is a skip with a reason, never a wrong model.

Each example is a MatMul by a constant over rank-3 or rank-4 tokens, with a BN after it
(bn_into_matmul) or before it (bn_into_consumer), and random layout ops on both sides of the
BN: Reshapes that keep the feature axis, split it, merge it with the tokens, Flatten at any
axis, Unsqueeze/Squeeze, Identity, a Reshape back to the start shape or to Shape(start).
Near misses are mixed in: tensors with another use or that are graph outputs, training-mode
BN, a weight that is a graph input, float16.

Beside check_sound (valid and equal under onnxruntime, or untouched with a reason), an
oracle computed from the shapes here says whether the BN should fold: its input has the
MatMul's feature count on axis 1 and size 1 after it, and nothing else reads what the fold
changes. A BN that should fold is gone; one that should not is still there and named by a
skipped record (the audit), so no BN is ever left without a reason.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_repvgg import fuse
from tests.graphs import GraphBuilder
from tests.test_soundness import check_sound

LAYOUTS = ["keep", "flatten", "split_last", "split_last_t", "merge_first", "unsqueeze_last", "unsqueeze_mid",
           "squeeze", "identity", "to_rank3"]
POST_ONLY = ["back", "reshape_as"]


@st.composite
def token_spec(draw):
    rank = draw(st.sampled_from([3, 4]))
    dims = [draw(st.integers(1, 2))] + [draw(st.integers(1, 3)) for _ in range(rank - 2)]
    dims.append(draw(st.sampled_from([1, 2, 4, 6])))
    return dict(
        dims=dims,
        direction=draw(st.sampled_from(["after", "before"])),
        features=draw(st.sampled_from([1, 2, 4, 6])),
        pre=draw(st.lists(st.tuples(st.sampled_from(LAYOUTS), st.integers(1, 3)), max_size=2)),
        post=draw(st.lists(st.tuples(st.sampled_from(LAYOUTS + POST_ONLY * 2), st.integers(1, 3)), max_size=2)),
        extra_use=draw(st.sampled_from([None] * 6 + list(range(5)))),   # index into the chain's tensors
        output_too=draw(st.sampled_from([None] * 8 + list(range(5)))),
        training=draw(st.integers(0, 15)) == 0,
        weight_as_input=draw(st.integers(0, 15)) == 0,
        dtype=draw(st.sampled_from(["float32"] * 5 + ["float16"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _layout(b: GraphBuilder, x: str, shape: list[int], op: str, k: int, start: tuple[str, list[int]]):
    """Apply one layout op; returns (tensor, shape), or None where it does not apply."""
    total = int(np.prod(shape))
    rank = len(shape)

    def reshape(target, actual):
        return b.op("Reshape", [x, b.constant(np.array(target, np.int64), "shape")]), actual

    if op == "keep":
        return reshape([-1, shape[-1]], [total // shape[-1], shape[-1]])
    if op == "flatten":
        axis = min(k, rank - 1)
        return b.op("Flatten", [x], axis=axis), [int(np.prod(shape[:axis])), int(np.prod(shape[axis:]))]
    if op in ("split_last", "split_last_t"):
        if shape[-1] % 2:
            return None
        half = shape[-1] // 2
        tail = [half, 2] if op == "split_last" else [2, half]
        return reshape([-1] + tail, [total // shape[-1]] + tail)
    if op == "merge_first":
        return reshape([shape[0], -1], [shape[0], total // shape[0]])
    if op == "to_rank3":
        return reshape([shape[0], -1, shape[-1]], [shape[0], total // (shape[0] * shape[-1]), shape[-1]])
    if op in ("unsqueeze_last", "unsqueeze_mid"):
        axis = rank if op == "unsqueeze_last" else 1
        out = list(shape)
        out.insert(axis, 1)
        return b.op("Unsqueeze", [x, b.constant(np.array([axis], np.int64), "axes")]), out
    if op == "squeeze":
        ones = [i for i, d in enumerate(shape) if d == 1]
        if not ones or rank <= 2:
            return None
        axis = ones[k % len(ones)]
        return b.op("Squeeze", [x, b.constant(np.array([axis], np.int64), "axes")]), shape[:axis] + shape[axis + 1:]
    if op == "identity":
        return b.op("Identity", [x]), list(shape)
    if op == "back":
        return reshape(start[1], list(start[1]))
    if op == "reshape_as":
        return b.op("Reshape", [x, b.op("Shape", [start[0]])]), list(start[1])
    raise ValueError(op)


def _chain(b, x, shape, ops, start, tensors):
    for op, k in ops:
        done = _layout(b, x, shape, op, k, start)
        if done is not None:
            x, shape = done
            tensors.append(x)
    return x, shape


def _matmul(b: GraphBuilder, spec, x: str, fin: int, fout: int) -> str:
    if spec["weight_as_input"]:
        b.extra_inputs.append(helper.make_tensor_value_info("w_in", helper.np_dtype_to_tensor_dtype(b.dtype), [fin, fout]))
        return b.op("MatMul", [x, "w_in"])
    return b.op("MatMul", [x, b.constant((b.rng.standard_normal((fin, fout)) * 0.3).astype(b.dtype), "W")])


def build(spec):
    """The model, the BN's node name, and whether the oracle says the BN should fold."""
    dtype = np.float16 if spec["dtype"] == "float16" else np.float32
    b = GraphBuilder(dtype=dtype, seed=spec["seed"])
    dims = list(spec["dims"])
    b.input_shape = dims
    after = spec["direction"] == "after"
    if after:
        x = _matmul(b, spec, b.x, dims[-1], spec["features"])
        shape = dims[:-1] + [spec["features"]]
    else:
        x, shape = b.x, dims
    start = (x, list(shape))
    before_bn = [x] if after else []        # tensors whose values the fold changes (after) ...
    x, shape = _chain(b, x, shape, spec["pre"], start, before_bn)
    bn_input_shape = list(shape)
    if len(shape) < 2:
        return None
    y = b.bn(x, shape[1], training_mode=1 if spec["training"] else None)
    bn_name = b.nodes[-1].name
    after_bn = [y]                          # ... or that it changes (before)
    y, shape = _chain(b, y, shape, spec["post"], start, after_bn)
    out = y if after else _matmul(b, spec, y, shape[-1], spec["features"])
    chain = before_bn + after_bn
    extra_outputs = []
    if spec["extra_use"] is not None and spec["extra_use"] < len(chain):
        extra_outputs.append(b.op("Relu", [chain[spec["extra_use"]]]))
    if spec["output_too"] is not None and spec["output_too"] < len(chain) and chain[spec["output_too"]] != out:
        extra_outputs.append(chain[spec["output_too"]])
    try:
        model = b.model([out] + extra_outputs)
    except Exception:
        return None
    # The oracle: the BN's channel axis is the feature axis, and the tensors the fold changes
    # have no other use (in either direction the first tensor of `changed` is the fold's own).
    features = spec["features"] if after else shape[-1]
    axis_ok = bn_input_shape[1] == features and all(d == 1 for d in bn_input_shape[2:])
    changed = before_bn if after else after_bn
    touched = {chain[i] for i in (spec["extra_use"], spec["output_too"]) if i is not None and i < len(chain)}
    private = not touched.intersection(changed)
    should_fold = axis_ok and private and not spec["training"] and not spec["weight_as_input"]
    return model, bn_name, should_fold


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(token_spec())
def test_token_bn_fusion_is_sound(spec):
    built = build(spec)
    if built is None:
        return
    model, bn_name, should_fold = built
    check_sound(model)
    fused, report = fuse(model)
    left = [n.name for n in fused.graph.node if n.op_type == "BatchNormalization"]
    if should_fold:
        assert left == [], report.to_text()
        assert any(r.status == "fused" for r in report.blocks)
    else:
        assert left == [bn_name], report.to_text()
        assert bn_name in {r.anchor for r in report.skipped}, report.to_text()
        assert onnx.checker.check_model(fused, full_check=True) is None
