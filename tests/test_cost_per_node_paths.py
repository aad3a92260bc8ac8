"""The shortcuts of the cost-per-node work (issue 13) give what the general paths give.

- rewrite._add_initializers (new initializers parsed into the graph together, from their wire
  form) against rewrite.add_initializer one at a time: the same graph bytes, for arrays of
  several dtypes, shapes (scalar, empty, big-endian), long and non-ASCII names, ready
  TensorProtos and arrays a sink takes;
- LinearIndex's direct expansions (an Add of two non-constants, every BatchNormalization)
  against linear_tree.expand, on a graph with the cases each shortcut must leave to it (a
  neutral Add, a constant operand, a training-mode BN, a BN whose extra output is used, a
  BN of four inputs, a custom-domain Add);
- a view's LinearIndex is freed by reference counting once the view is released (no cycle
  waits for the garbage collector).
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_repvgg import rewrite
from onnx_repvgg.graph import GraphView
from onnx_repvgg.rules.common import Skip, bn_affine
from onnx_repvgg.rules.linear_tree import LinearIndex, expand
from onnx_repvgg.storage.sinks import MemorySink


def _arrays():
    rng = np.random.default_rng(0)
    long_name = "блок." + "x" * 200  # a name of more than 127 bytes: a two-byte length
    return [
        ("w", rng.standard_normal((8, 8, 3, 3)).astype(np.float32)),
        ("b", rng.standard_normal(8).astype(np.float32)),
        ("half", rng.standard_normal((4, 2, 1, 1)).astype(np.float16)),
        ("double", rng.standard_normal((3, 5))),
        ("flags", np.array([True, False, True])),
        ("scalar", np.array(2.5, dtype=np.float32)),
        ("empty", np.zeros((0, 3), dtype=np.float32)),
        ("big_endian", rng.standard_normal((2, 3)).astype(">f4")),
        ("strided", rng.standard_normal((6, 6)).astype(np.float32)[::2, ::3]),
        (long_name, rng.standard_normal(300).astype(np.float32)),  # > 127 bytes of data too
        ("proto", numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(2, 3), "proto")),
        ("large", rng.standard_normal((64, 64, 3, 3)).astype(np.float32)),  # past MemorySink.threshold
        ("after_large", rng.standard_normal(8).astype(np.float32)),
    ]


def _graph() -> onnx.GraphProto:
    graph = helper.make_graph([], "g", [], [],
                              [numpy_helper.from_array(np.ones(2, dtype=np.float32), "existing")])
    return graph


def test_add_initializers_equals_one_at_a_time():
    for sink_kind in (None, "memory"):
        one_sink = MemorySink() if sink_kind else None
        many_sink = MemorySink() if sink_kind else None
        one, many = _graph(), _graph()
        for name, value in _arrays():
            rewrite.add_initializer(one, name, value, one_sink)
        rewrite._add_initializers(many, _arrays(), many_sink)
        assert many.SerializeToString() == one.SerializeToString()
        assert [t.name for t in many.initializer][0] == "existing"
        if sink_kind:
            assert len(many_sink.arrays) == len(one_sink.arrays) == 1  # "large" went to the sink


def test_add_initializers_in_small_batches(monkeypatch):
    monkeypatch.setattr(rewrite, "_BATCH_BYTES", 100)  # a flush after almost every array
    one, many = _graph(), _graph()
    for name, value in _arrays():
        rewrite.add_initializer(one, name, value)
    rewrite._add_initializers(many, _arrays())
    assert many.SerializeToString() == one.SerializeToString()


def _linear_graph() -> tuple[onnx.GraphProto, int]:
    c = 3
    rng = np.random.default_rng(1)
    inits = []

    def bn_params(prefix: str) -> list[str]:
        names = []
        for part, value in zip(("g", "b", "m", "v"), (rng.uniform(0.5, 1.5, c), rng.uniform(-1, 1, c),
                                                      rng.uniform(-1, 1, c), rng.uniform(0.5, 2, c))):
            inits.append(numpy_helper.from_array(value.astype(np.float32), f"{prefix}.{part}"))
            names.append(f"{prefix}.{part}")
        return names

    inits.append(numpy_helper.from_array(np.zeros((1, c, 1, 1), dtype=np.float32), "zeros"))
    inits.append(numpy_helper.from_array(np.full((1, c, 1, 1), 2.0, dtype=np.float32), "twos"))
    inits.append(numpy_helper.from_array(np.ones((c, c, 1, 1), dtype=np.float32), "w"))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"]),
        helper.make_node("Conv", ["x", "w"], ["c2"]),
        helper.make_node("BatchNormalization", ["c1"] + bn_params("bn1"), ["n1"]),          # the direct path
        helper.make_node("BatchNormalization", ["c2"] + bn_params("bn2"), ["n2"], training_mode=1),
        helper.make_node("BatchNormalization", ["x"] + bn_params("bn3"), ["n3", "mean", "var"]),
        helper.make_node("BatchNormalization", ["x"] + bn_params("bn4")[:3], ["n4"]),       # four inputs
        helper.make_node("Add", ["n1", "n2"], ["s1"]),                                         # the direct path
        helper.make_node("Add", ["s1", "zeros"], ["s2"]),                                      # neutral: x + 0
        helper.make_node("Add", ["s2", "twos"], ["s3"]),                                       # a constant operand
        helper.make_node("Add", ["s3", "n3"], ["s4"], domain="custom"),
        helper.make_node("Add", ["s4", "n4"], ["s5"]),
        helper.make_node("Mul", ["s5", "mean"], ["y"]),                                       # uses the BN's extra output
    ]
    shape = [1, c, 4, 4]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return graph, len(nodes)


def _same_expansion(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if (a.problem, a.passthrough, len(a.children), len(a.offsets)) != (b.problem, b.passthrough,
                                                                      len(b.children), len(b.offsets)):
        return False
    for (name_a, fa), (name_b, fb) in zip(a.children, b.children):
        if name_a != name_b or len(fa) != len(fb):
            return False
        if any(x.per_channel != y.per_channel or not np.array_equal(x.value, y.value) for x, y in zip(fa, fb)):
            return False
    return all(x.per_channel == y.per_channel and np.array_equal(x.value, y.value) for x, y in zip(a.offsets, b.offsets))


def test_direct_expansions_equal_expand():
    graph, count = _linear_graph()
    for opset in (15, 13, 8):  # training_mode, then the training outputs, then spatial decide
        view = GraphView(graph, opset)
        index = LinearIndex(view, opset)
        for i in range(count):
            node = view.nodes[i]
            affine = None
            if node.op_type == "BatchNormalization":
                try:
                    affine = bn_affine(view, node, opset)
                except Skip as skip:
                    affine = skip
            general = expand(view, node, opset, affine) if node.op_type in ("Add", "BatchNormalization") else None
            if node.op_type in ("Add", "BatchNormalization"):
                assert _same_expansion(index.expansion(i), general), (opset, node.output[0])
        problems = {view.nodes[i].output[0]: index.expansion(i).problem.code for i in range(count)
                    if view.ops[i] == "BatchNormalization" and index.expansion(i) is not None
                    and index.expansion(i).problem is not None}
        if opset == 15:
            assert problems == {"n2": "bn_training", "n3": "bn_training", "n4": "malformed"}
        assert view.shape_questions == 0


def test_linear_index_is_freed_without_the_collector():
    graph, _ = _linear_graph()
    view = GraphView(graph, 15)
    index = LinearIndex(view, 15)
    index.roots()
    assert index.expansions.get(2) is not None
    ref_index, ref_view = weakref.ref(index), weakref.ref(view)
    enabled = gc.isenabled()
    gc.disable()
    try:
        view.release()
        del index, view
        assert ref_index() is None and ref_view() is None
    finally:
        if enabled:
            gc.enable()


def test_remembered_geometry_changes_nothing(tmp_path, monkeypatch):
    """branch_sum finds a fused kernel's geometry once per combination of the branches'
    kernels, dilations and pads: the pass with every geometry found afresh (the memo emptied
    before each block) gives the bytes and report of the pass as it is (one memo for all
    models, so each model also meets geometries others found: dilated, densified, skipped)."""
    from onnx_repvgg import fuse
    from onnx_repvgg.rules import branch_sum
    from tests.test_batched_materialize import _models

    models = _models(str(tmp_path))
    for densify in (False, True):
        warm = {name: fuse(model, allow_densify=densify) for name, model in models.items()}
        assert branch_sum._PLANS
        fresh = _Forgetful()
        monkeypatch.setattr(branch_sum, "_PLANS", fresh)
        for name, model in models.items():
            fused, report = fuse(model, allow_densify=densify)
            assert fused.SerializeToString() == warm[name][0].SerializeToString(), name
            assert report.to_dict() == warm[name][1].to_dict(), name
        assert fresh.asked > 40  # every block asked, and found its geometry afresh
        monkeypatch.undo()


class _Forgetful(dict):
    """A memo that remembers nothing (and counts how often it was asked)."""

    def __init__(self):
        super().__init__()
        self.asked = 0

    def get(self, key, default=None):
        self.asked += 1
        return default

    def __setitem__(self, key, value):
        pass


def _model_with_initializer_inputs(path: str) -> None:
    """Conv -> BN whose weights are also graph inputs (an IR 3 export), two of them."""
    rng = np.random.default_rng(2)
    c = 2
    inits = [numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32), "w")]
    for part, value in zip(("g", "b", "m", "v"), (rng.uniform(0.5, 1.5, c), rng.uniform(-1, 1, c),
                                                  rng.uniform(-1, 1, c), rng.uniform(0.5, 2, c))):
        inits.append(numpy_helper.from_array(value.astype(np.float32), part))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])]
    shape = [1, c, 4, 4]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [c, c, 3, 3]),
              helper.make_tensor_value_info("g", TensorProto.FLOAT, [c])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.save(model, path)


def test_initializers_that_are_inputs_read_once(tmp_path):
    """The note on initializers that are graph inputs (now made from the main graph's index) and
    the CLI's input-name checks (from the load survey) say what they said."""
    from onnx_repvgg import fuse
    from onnx_repvgg.cli import main
    from onnx_repvgg.storage import io

    path = str(tmp_path / "ir3.onnx")
    _model_with_initializer_inputs(path)
    model = onnx.load(path)
    _, report = fuse(model)
    assert [n.split(":")[0] for n in report.notes] == ["2 initializers are also graph inputs"]
    assert not report.fused
    _, frozen = fuse(model, freeze_initializer_inputs=True)
    assert frozen.notes == [] and frozen.frozen_initializer_inputs == 2 and len(frozen.fused) == 1
    assert io.load(path).initializer_inputs == {"w", "g"}
    out = str(tmp_path / "out.onnx")
    assert main([path, out, "-q", "--no-check", "--input-shape", "w:2,2,3,3"]) == 2  # an initializer, not an input
    assert main([path, out, "-q", "--no-check", "--input-shape", "x:1,2,4,4"]) == 0


def test_a_scalar_initializer_keeps_rank_zero():
    """A 0-d array is written with dims [] (np.ascontiguousarray alone would make it [1]), one at
    a time and batched alike."""
    value = np.array(2.5, dtype=np.float32)
    one, many = onnx.GraphProto(), onnx.GraphProto()
    rewrite.add_initializer(one, "s", value, None)
    rewrite._add_initializers(many, [("s", value)], None)
    for graph in (one, many):
        (tensor,) = graph.initializer
        assert list(tensor.dims) == []
        assert onnx.numpy_helper.to_array(tensor).shape == () and float(onnx.numpy_helper.to_array(tensor)) == 2.5
