"""transpose_affine: an elementwise affine by constants taken through a Transpose onto another
Transpose of the same tensor (tf2onnx's NHWC identity BN), on hand-built graphs and on random
ones: one Transpose fewer and the same outputs, bit for bit, or the graph left as it is."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_repvgg import fuse
from tests.graphs import op_counts, run

NHWC_TO_NCHW = (0, 3, 1, 2)


def _model(x_shape, perm, chain, shared_first=True, extra_use=False, other_perm=None):
    """x -> chain (op, constant, constant_first) -> Transpose(perm) -> Relu -> y1, and
    Transpose(x, other_perm or perm) -> Neg -> y2 (placed before or after the chain)."""
    rank = len(x_shape)
    inits, chain_nodes, current = [], [], "x"
    for i, (op, constant, first) in enumerate(chain):
        name = f"c{i}"
        inits.append(onnx.numpy_helper.from_array(np.asarray(constant, np.float32), name))
        out = f"a{i}"
        chain_nodes.append(helper.make_node(op, [name, current] if first else [current, name], [out], name=f"op{i}"))
        current = out
    t1 = [helper.make_node("Transpose", [current], ["t1"], perm=list(perm), name="T1"),
          helper.make_node("Relu", ["t1"], ["y1"], name="relu")]
    t0 = [helper.make_node("Transpose", ["x"], ["t0"], perm=list(other_perm or perm), name="T0"),
          helper.make_node("Neg", ["t0"], ["y2"], name="neg")]
    nodes = t0 + chain_nodes + t1 if shared_first else chain_nodes + t1 + t0
    outputs = [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [None] * rank),
               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None] * rank)]
    if extra_use:
        nodes.append(helper.make_node("Sigmoid", ["a0"], ["y3"], name="sig"))
        outputs.append(helper.make_tensor_value_info("y3", TensorProto.FLOAT, [None] * rank))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    assert rank == len(perm)
    return model


def _same_outputs(a, b, x_shape, seed=0):
    feeds = {"x": np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)}
    for want, got in zip(run(a, feeds), run(b, feeds)):
        assert want.shape == got.shape
        np.testing.assert_array_equal(want, got)


@pytest.mark.parametrize("shared_first", [True, False])
def test_nhwc_batch_norm_moves_onto_the_shared_transpose(shared_first):
    rng = np.random.default_rng(1)
    shape = (1, 5, 6, 3)
    chain = [("Mul", rng.standard_normal(3), False), ("Add", rng.standard_normal(3), False)]
    model = _model(shape, NHWC_TO_NCHW, chain, shared_first=shared_first)
    fused, report = fuse(model)
    onnx.checker.check_model(fused, full_check=True)
    assert op_counts(fused) == {"Transpose": 1, "Mul": 1, "Add": 1, "Relu": 1, "Neg": 1}
    assert [r.branches for r in report.fused] == [["affine", "transpose"]]
    _same_outputs(model, fused, shape)


@pytest.mark.parametrize("perm, shape, constants", [
    ((0, 2, 3, 1), (2, 3, 4, 5), [(), (1, 1, 1, 5), (4, 1), (2, 1, 1, 1)]),
    ((1, 0), (4, 6), [(6,), (4, 1), ()]),
    ((2, 0, 1), (3, 4, 2), [(2,), (4, 1), (3, 1, 1)]),
])
def test_constants_of_any_rank_and_side(perm, shape, constants):
    rng = np.random.default_rng(2)
    ops = ["Mul", "Sub", "Div", "Add"]
    chain = [(ops[i % 4], rng.uniform(0.5, 2.0, c) * rng.choice([-1, 1], c or None), i % 2 == 1)
             for i, c in enumerate(constants)]
    model = _model(shape, perm, chain)
    fused, _ = fuse(model)
    assert op_counts(fused)["Transpose"] == 1
    _same_outputs(model, fused, shape)


def test_left_alone_when_the_perms_differ_or_a_link_is_shared():
    rng = np.random.default_rng(3)
    shape = (1, 4, 4, 3)
    chain = [("Mul", rng.standard_normal(3), False), ("Add", rng.standard_normal(3), False)]
    for model in (_model(shape, NHWC_TO_NCHW, chain, other_perm=(0, 3, 2, 1)),
                  _model(shape, NHWC_TO_NCHW, chain, extra_use=True)):
        fused, _ = fuse(model)
        if op_counts(fused)["Transpose"] == 2:  # left alone
            assert fused.SerializeToString() == model.SerializeToString()
        _same_outputs(model, fused, shape)
    # a shared first link: the chain starts after it (x is then a0, which T0 does not read)
    fused, _ = fuse(_model(shape, NHWC_TO_NCHW, chain, extra_use=True))
    assert op_counts(fused)["Transpose"] == 2


def test_random_chains_are_equal_or_left_alone():
    """60 random graphs (perms, chain lengths 1-4, constants of rank 0 to 4 on either side,
    the shared Transpose before or after): every rewrite gives the same outputs bit for bit."""
    rewritten = 0
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        rank = int(rng.integers(2, 5))
        shape = tuple(int(d) for d in rng.integers(1, 5, rank))
        perm = tuple(int(p) for p in rng.permutation(rank))
        chain = []
        for _ in range(int(rng.integers(1, 5))):
            c_rank = int(rng.integers(0, rank + 1))
            c_shape = tuple(d if rng.integers(0, 2) else 1 for d in shape[rank - c_rank:])
            op = str(rng.choice(["Mul", "Add", "Sub", "Div"]))
            value = rng.uniform(0.5, 2.0, c_shape) * np.where(rng.integers(0, 2, c_shape), 1, -1)
            chain.append((op, value, bool(rng.integers(0, 2))))
        model = _model(shape, perm, chain, shared_first=bool(rng.integers(0, 2)))
        fused, _ = fuse(model)
        onnx.checker.check_model(fused, full_check=True)
        rewritten += op_counts(fused)["Transpose"] == 1
        _same_outputs(model, fused, shape, seed)
    assert rewritten == 60
