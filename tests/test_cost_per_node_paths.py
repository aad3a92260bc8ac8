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
  waits for the garbage collector);
- graph.attributes (looked up by the bytes of a node's attribute fields) against a direct read
  of every attribute type, and the byte walk's refusals;
- common.bn_affines (four raw vectors read together, GraphView.raw_vectors) against bn_affine
  one BN at a time, with parameters that take each way;
- the loader's parameter count against ModelStats, and the bound on the fused model's tensor
  bytes that spares the CLI a walk over every tensor.
"""

from __future__ import annotations

import gc
import glob
import os
import weakref

import numpy as np
import onnx
import pytest
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


# -- attributes by their bytes, BN vectors read together, counts from the loader --------------------
def _attribute_nodes() -> list[onnx.NodeProto]:
    tensor = numpy_helper.from_array(np.arange(4, dtype=np.float32), "t")
    body = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "body", [], [])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], name="c1", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[1, 1], dilations=[1, 1], group=1),
        helper.make_node("Conv", ["x2", "w2", "b2"], ["y2"], name="a much longer name " * 10, kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1),  # same attributes
        helper.make_node("Conv", ["x", "w"], ["y3"], kernel_shape=[3, 3], pads=[0, 0, 0, 0], group=2),
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], epsilon=1e-3, momentum=0.9),
        helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n2"], epsilon=1e-5, training_mode=1),
        helper.make_node("Conv", ["x", "w"], ["y4"], auto_pad="SAME_UPPER", doc_string="doc", domain="ai.onnx"),
        helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT16),
        helper.make_node("Constant", [], ["k"], value=tensor),
        helper.make_node("Constant", [], ["k2"], value_floats=[1.0, 2.0] * 100),  # a field of > 127 bytes
        helper.make_node("If", ["cond"], ["o"], then_branch=body, else_branch=body),
        helper.make_node("Relu", ["x"], ["r"]),  # no attributes
    ]
    duplicated = helper.make_node("Conv", ["x", "w"], ["y5"], group=1)
    duplicated.attribute.append(helper.make_attribute("group", 3))  # a name given twice: the first counts
    nodes.append(duplicated)
    entry = nodes[0].metadata_props.add()
    entry.key, entry.value = "source", "a.py:1"
    return nodes


def test_attributes_read_by_their_bytes_equal_a_direct_read():
    from onnx_repvgg import graph as graph_module

    graph_module._ATTRIBUTES.clear()
    for _ in range(2):  # the first time read and remembered, the second looked up
        for node in _attribute_nodes():
            expected = graph_module._read_attributes(node)
            got = graph_module.attributes(node)
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                if isinstance(value, (onnx.TensorProto, onnx.GraphProto)):
                    assert got[key].SerializeToString() == value.SerializeToString()
                else:
                    assert got[key] == value and type(got[key]) is type(value), (node.op_type, key)
    assert graph_module.attributes(_attribute_nodes()[-1])["group"] == 1
    # the two Convs with the same attributes and different wiring and names share one entry
    first, second = _attribute_nodes()[:2]
    key = graph_module._attribute_bytes(first.SerializeToString())
    assert key and key == graph_module._attribute_bytes(second.SerializeToString())
    assert graph_module._attribute_bytes(_attribute_nodes()[-2].SerializeToString()) == b""


def test_attribute_bytes_refuses_what_it_does_not_expect():
    from onnx_repvgg.graph import _attribute_bytes

    node = helper.make_node("Conv", ["x", "w"], ["y"], group=1, strides=[1, 1])
    data = node.SerializeToString()
    assert _attribute_bytes(data) is not None
    assert _attribute_bytes(data[:-1]) is None                        # truncated
    attr = helper.make_attribute("group", 2).SerializeToString()
    run = bytes([(5 << 3) | 2, len(attr)]) + attr
    name = bytes([(3 << 3) | 2, 1]) + b"n"
    assert _attribute_bytes(run + name + run) is None                 # attribute fields in two runs
    assert _attribute_bytes(bytes([(9 << 3) | 0, 1]) + run) is None   # a varint field
    assert _attribute_bytes(bytes([0x80 | 5, 0x01, 2]) + b"ab") is None  # a two-byte tag
    assert _attribute_bytes(name + run + run) == run + run


def _bn_graph(data_dir) -> tuple[onnx.GraphProto, int]:
    """BNs whose parameters take each way through bn_affines: four inline raw vectors of one
    dtype and length (float32, float16), typed fields, mixed dtypes, mixed lengths, a 2-D one, a
    graph input, an external one."""
    rng = np.random.default_rng(3)
    c = 4
    inits, inputs, nodes = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 2, 2])], []

    def params(prefix, dtype=np.float32, lengths=(c, c, c, c), typed=False, shapes=None):
        names = []
        for part, n in zip("gbmv", lengths):
            value = (rng.uniform(0.5, 1.5, n) if part in "gv" else rng.uniform(-1, 1, n)).astype(dtype)
            if shapes and part in shapes:
                value = value.reshape(shapes[part])
            name = f"{prefix}.{part}"
            tensor = (helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape,
                                         value.reshape(-1).tolist()) if typed else numpy_helper.from_array(value, name))
            inits.append(tensor)
            names.append(name)
        return names

    cases = [params("raw32"), params("raw16", np.float16), params("raw64", np.float64), params("typed", typed=True),
             params("mixed", lengths=(c, c, c, c)), params("short", lengths=(c, c, c, c - 1)),
             params("flat2d", shapes={"m": (1, c)}), params("fed"), params("far"), params("raw32b")]
    inits[[t.name for t in inits].index("mixed.b")] = numpy_helper.from_array(rng.uniform(-1, 1, c).astype(np.float16),
                                                                           "mixed.b")
    inputs.append(helper.make_tensor_value_info("fed.m", TensorProto.FLOAT, [c]))
    inits = [t for t in inits if t.name != "fed.m"]
    far = inits[[t.name for t in inits].index("far.v")]
    with open(os.path.join(data_dir, "far.bin"), "wb") as f:
        f.write(far.raw_data)
    far.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "far.bin"), ("offset", "0"), ("length", str(4 * c))):
        entry = far.external_data.add()
        entry.key, entry.value = key, value
    far.ClearField("raw_data")
    for i, names in enumerate(cases):
        nodes.append(helper.make_node("BatchNormalization", ["x"] + names, [f"y{i}"], epsilon=1e-3))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None)
                                                   for i in range(len(nodes))], inits)
    return graph, len(nodes)


def test_bn_vectors_read_together_equal_one_by_one(tmp_path):
    from onnx_repvgg.rules.common import bn_affines

    graph, count = _bn_graph(str(tmp_path))
    view = GraphView(graph, 15, base_dir=str(tmp_path))
    together = bn_affines(view, list(range(count)), 15)
    raw_kinds = 0
    for i, result in enumerate(together):
        try:
            expected = bn_affine(view, view.nodes[i], 15)
        except Skip as skip:
            assert isinstance(result, Skip) and result.reason == skip.reason, i
            continue
        assert not isinstance(result, Skip), (i, result)
        assert np.array_equal(result[0], expected[0]) and np.array_equal(result[1], expected[1]), i
        raw_kinds += view.raw_vectors(view.inputs_of[i][1:5]) is not None
    assert raw_kinds == 4  # raw32, raw16, raw64, raw32b
    assert view.raw_vectors(["raw32.g", "raw16.g"]) is None and view.raw_vectors(["short.m", "short.v"]) is None
    assert view.raw_vectors(["fed.g", "fed.m"]) is None and view.raw_vectors(["far.g", "far.v"]) is None
    assert view.raw_vectors(["flat2d.m"]) is None and view.raw_vectors(["typed.g"]) is None


def test_parameter_count_and_tensor_bytes_from_the_loader(tmp_path):
    """The loader's survey counts the main graph's initializer elements as ModelStats does
    (strings, scalars and empty tensors included), and the CLI's bound on the fused model's
    tensor bytes (the loaded ones plus every new one) holds."""
    from onnx_repvgg import pipeline
    from onnx_repvgg.report import ModelStats
    from onnx_repvgg.storage import io as rio

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [helper.make_tensor("s", TensorProto.STRING, [3], [b"a", b"b", b"c"]),
                               numpy_helper.from_array(np.array(1.5, dtype=np.float32), "scalar"),
                               numpy_helper.from_array(np.zeros((0, 4), dtype=np.float32), "empty"),
                               numpy_helper.from_array(np.ones((2, 3), dtype=np.int64), "ints"),
                               helper.make_tensor("four_a", TensorProto.INT4, [3], [1, 2, 3]),
                               helper.make_tensor("four_b", TensorProto.UINT4, [5], [1, 2, 3, 4, 5]),
                               numpy_helper.from_array(np.ones(3, dtype=np.float16), "half")])
    path = str(tmp_path / "m.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    loaded = rio.load(path)
    assert loaded.initializer_elements == ModelStats.of(loaded.model).params == 3 + 1 + 0 + 6 + 3 + 5 + 3
    # bytes from shapes: sub-byte types rounded up per tensor (2 + 3), strings not counted
    assert loaded.tensor_bytes == rio.tensor_bytes(loaded.model) == 4 + 0 + 48 + 2 + 3 + 6

    for model_path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "models", "*.onnx"))):
        loaded = rio.load(model_path, load_external_data=False)
        assert loaded.initializer_elements == ModelStats.of(loaded.model).params
        sink = MemorySink()
        model, report = pipeline.fuse(loaded.model, inplace=True, base_dir=loaded.base_dir, sink=sink,
                                      _initializer_elements=loaded.initializer_elements)
        assert report.fused and report.before.params == loaded.initializer_elements
        assert 0 < rio.tensor_bytes(model) <= loaded.tensor_bytes + sink.offered_bytes


def _computed_weights_model(blocks: int) -> onnx.ModelProto:
    """Blocks of 3x3 + 1x1 convs whose weights are Neg(initializer): constants the pass computes
    with onnx's ReferenceEvaluator, which leaves a reference cycle per run."""
    rng = np.random.default_rng(6)
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        for k in (3, 1):
            inits.append(numpy_helper.from_array(rng.standard_normal((4, 4, k, k)).astype(np.float32), f"raw{k}_{i}"))
            nodes.append(helper.make_node("Neg", [f"raw{k}_{i}"], [f"w{k}_{i}"]))
            nodes.append(helper.make_node("Conv", [x, f"w{k}_{i}"], [f"c{k}_{i}"], pads=[k // 2] * 4))
        nodes.append(helper.make_node("Add", [f"c3_{i}", f"c1_{i}"], [f"r{i}"]))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_pass_leaves_no_cyclic_garbage():
    """pipeline.fuse switches the cyclic collector off while it runs: everything it allocates
    must be freed by reference counting. Fused sample models, and a graph whose blocks are
    refused (skips carry exceptions, whose frames could hold cycles), leave nothing for the
    collector. Constants computed by onnx's ReferenceEvaluator leave a cycle each; evaluate.fold
    collects them every EVALUATIONS_PER_COLLECTION runs, so a pass with 400 of them leaves at
    most that many runs' worth."""
    from onnx_repvgg import evaluate, pipeline

    graph, _ = _linear_graph()
    refused = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    models = [onnx.load(p) for p in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "models", "*.onnx")))]
    computed = _computed_weights_model(200)
    enabled = gc.isenabled()
    try:
        for model in models + [refused, computed]:
            gc.collect()
            gc.disable()
            fused, report = pipeline.fuse(model)
            assert report.blocks and not gc.isenabled()  # switched back on only if it was on before
            del fused, report
            left = gc.collect()
            if model is computed:
                assert len(pipeline.fuse(model)[1].fused) == 200
                assert 0 < left <= 40 * evaluate.EVALUATIONS_PER_COLLECTION  # not 400 runs' worth
            else:
                assert left == 0
            gc.enable()
            pipeline.fuse(model)
            assert gc.isenabled()
    finally:
        if enabled:
            gc.enable()
        else:
            gc.disable()


def test_attributes_holding_messages_or_many_bytes_are_not_remembered():
    """graph._ATTRIBUTES keeps plain attribute values only: a tensor or graph value is part of
    its model (an entry would keep the model alive), and a long attribute run is not worth
    keeping; both are read afresh each time, with the same result."""
    from onnx_repvgg import graph as graph_module

    body = helper.make_graph([], "body", [], [])
    holding = [helper.make_node("Conv", ["x", "w"], ["y"], group=1, extra=numpy_helper.from_array(np.ones(2), "t")),
               helper.make_node("If", ["c"], ["o"], then_branch=body, else_branch=body),
               helper.make_node("Custom", [], ["z"], domain="x", many=[body, body]),
               helper.make_node("Conv", ["x", "w"], ["y"], pads=list(range(400)))]  # > 1024 bytes
    plain = helper.make_node("Conv", ["x", "w"], ["y"], group=3, pads=[1, 1, 1, 1], auto_pad="NOTSET")
    for node in holding + [plain]:
        key, values = graph_module.shared_attributes(node)
        assert key is not None
        assert (key in graph_module._ATTRIBUTES) == (node is plain)
        assert graph_module.attributes(node).keys() == graph_module._read_attributes(node).keys()


def test_remembered_conv_geometry_equals_a_fresh_reading():
    """conv_params remembers a Conv's geometry by its attribute bytes, kernel and Cout: each
    reading equals one made with the memo emptied, and a refusal is made afresh for each node
    (its message names the node)."""
    from onnx_repvgg.rules import common

    rng = np.random.default_rng(5)
    cases = [dict(pads=[1, 1, 1, 1]), dict(pads=[0, 1, 0, 1], strides=[2, 2]), dict(auto_pad="SAME_UPPER"),
             dict(auto_pad="SAME_LOWER", dilations=[2, 2]), dict(auto_pad="VALID"), dict(group=2),
             dict(kernel_shape=[3, 3]), dict(kernel_shape=[1, 1]), dict(auto_pad="SAME_UPPER", strides=[2, 2]),
             dict(group=3), dict(pads=[1, 1]), dict(strides=[1])]
    inits, nodes = [numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w")], []
    for i, attrs in enumerate(cases):
        for copy in ("a", "b"):  # two nodes with the same attributes
            nodes.append(helper.make_node("Conv", ["x", "w"], [f"y{i}{copy}"], name=f"conv{i}{copy}", **attrs))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes], inits)
    view = GraphView(graph, 17)

    def read(node):
        try:
            p = common.conv_params(view, node)
            return (p.node_name, p.strides, p.dilations, p.pads_begin, p.pads_end, p.group)
        except Skip as skip:
            return skip.reason

    common._CONV_GEOMETRY.clear()
    remembered = [read(node) for node in view.nodes]
    fresh = []
    for node in view.nodes:
        common._CONV_GEOMETRY.clear()
        fresh.append(read(node))
    assert remembered == fresh
    refused = [(node.name, r) for node, r in zip(view.nodes, remembered) if not isinstance(r, tuple)]
    assert [name for name, _ in refused] == [f"conv{i}{c}" for i in (7, 8, 9, 10, 11) for c in "ab"]
    assert all(f"'{name}'" in reason.message for name, reason in refused)


def test_json_report_text_parses_to_what_the_indented_dump_gives(tmp_path):
    """cli.json_text (the report written by parts with the C encoder, a record a line) parses
    to exactly what json.dumps(indent=2) of the same dict does, on a validated run's report and
    on edge values (empty containers, nested lists, NaN, non-ASCII, tiny floats)."""
    import json

    from onnx_repvgg import cli

    out, report_path = str(tmp_path / "out.onnx"), str(tmp_path / "report.json")
    model = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "models", "*_ts.onnx")))[0]
    assert cli.main([model, out, "-q", "--json", report_path]) == 0
    with open(report_path) as f:
        data = json.load(f)
    assert data["validation"]["passed"] and data["blocks"]
    edge = {"a": [], "b": {}, "c": [[1, [2, {"x": float("nan")}]], {"y": "é"}], "d": 1e-300, "e": None, "f": [1, 2],
            3: {2.5: "number keys", True: "bool", None: "null"}}
    for value in (data, edge, [], {}, [{"k": 1}], "text"):
        text = cli.json_text(value)  # parsed, the same as json's own text (compared as text: NaN != NaN)
        assert json.dumps(json.loads(text), sort_keys=True) == json.dumps(json.loads(json.dumps(value, indent=2)),
                                                                           sort_keys=True)
    lines = cli.json_text(data).splitlines()
    assert sum(line.startswith('    {"anchor"') for line in lines) == len(data["blocks"])  # a record a line


def test_names_read_from_the_index_are_every_name_of_the_model():
    """model_names with the main graph's index looks its tables up instead of copying them:
    the same names as all_names reads (sample models, and a graph with a subgraph, a sparse
    initializer, value_info, node names and a function), "" never taken, names added and
    discarded as a set does."""
    from onnx_repvgg.graph import model_names

    body = helper.make_graph([helper.make_node("Identity", ["outer"], ["inner"], name="in_body")], "body", [],
                             [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(2, dtype=np.float32), "sv"),
                                       numpy_helper.from_array(np.array([0, 3], dtype=np.int64), "si"), [4])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["o"], name="branch", then_branch=body, else_branch=body),
         helper.make_node("Relu", ["x"], ["outer"], name="relu"), helper.make_node("Add", ["outer", "w"], ["y"])],
        "main", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                 helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]), helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(4, dtype=np.float32), "w")],
        value_info=[helper.make_tensor_value_info("declared_only", TensorProto.FLOAT, [4])], sparse_initializer=[sparse])
    function = helper.make_function("custom", "fn", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"], name="fn_neg")],
                                     [helper.make_opsetid("", 17)])
    models = [helper.make_model(graph, functions=[function])]
    models += [onnx.load(p, load_external_data=False)
               for p in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "models", "*.onnx")))]
    for number, model in enumerate(models):
        expected = model_names(model)  # read from the protobuf: a set
        if number == 0:
            assert {"in_body", "branch", "declared_only", "sv", "si", "main", "fn", "fn_neg", "outer"} <= expected
        names = model_names(model, GraphView(model.graph, 17))
        assert isinstance(expected, set) and not isinstance(names, set)
        assert all(name in names for name in expected)
        assert "" not in names and "surely.not.a.name" not in names
        names.add("surely.not.a.name")
        assert "surely.not.a.name" in names
        names.discard("surely.not.a.name")
        assert "surely.not.a.name" not in names
        first_node = model.graph.node[0].output[0]
        names.discard(first_node)  # a name of the model stays taken
        assert first_node in names



def test_foldable_op_is_is_op_read_from_the_index():
    """GraphView.foldable_op(i) in ops is is_op(node, *ops) for every op but control flow
    (never folded: None), for nodes of the default domain under both its names and custom ones."""
    from onnx_repvgg.rules.common import is_op

    nodes = [n for n in _attribute_nodes() if n.op_type != "Constant"]
    nodes += [helper.make_node("Add", ["a", "b"], ["s"], domain="ai.onnx"), helper.make_node("Add", ["a", "b"], ["t"],
                                                                                             domain="custom")]
    view = GraphView(helper.make_graph(nodes, "g", [], []), 17)
    for i, node in enumerate(view.nodes):
        for op in ("Conv", "BatchNormalization", "Add", "Relu", "Cast", "Custom", "If"):
            expected = is_op(node, op) and op != "If"
            assert (view.foldable_op(i) == op) == expected, (node.op_type, node.domain, op)


@pytest.mark.parametrize("moves_at_most", [0, 1 << 60])
def test_stale_value_info_is_dropped_the_same_in_one_pass_or_one_by_one(monkeypatch, moves_at_most):
    """A fused dynamo export leaves most of its value_info stale; many deletions one by one each
    move the entries after them (quadratic), so the kept entries are put back in one pass: the
    same entries in the same order."""
    graph = onnx.GraphProto()
    graph.value_info.extend(helper.make_tensor_value_info(f"t{i}", TensorProto.FLOAT, [1, i % 7 + 1]) for i in range(300))
    graph.node.extend(helper.make_node("Relu", ["x"], [f"t{i}"]) for i in range(0, 300, 7))
    expected = [v.SerializeToString() for v in graph.value_info if int(v.name[1:]) % 7 == 0]
    monkeypatch.setattr(rewrite, "_MOVES_AT_MOST", moves_at_most)
    stale = rewrite.stale_value_info(graph)
    assert len(stale) == 300 - len(expected)
    rewrite.drop_stale_value_info(graph, stale)
    assert [v.SerializeToString() for v in graph.value_info] == expected
    assert rewrite.stale_value_info(graph) == []
