"""Build small ONNX graphs by hand (onnx.helper) and check a fusion end to end."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnx_repvgg import fuse

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.float64): TensorProto.DOUBLE}


class GraphBuilder:
    """Appends nodes in order; every weight is a seeded random initializer unless told otherwise."""

    def __init__(self, channels=4, spatial=(6, 6), dtype=np.float32, opset=17, seed=0, batch=2):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.extra_inputs: list[onnx.ValueInfoProto] = []
        self.counter = itertools.count()
        self.input_shape = [batch, channels, *spatial]
        self.x = "x"

    def fresh(self, stem):
        return f"{stem}_{next(self.counter)}"

    def constant(self, value, stem="w", as_node=False, via_identity=False):
        value = np.asarray(value)
        name = self.fresh(stem)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("Constant"),
                                               value=numpy_helper.from_array(value, name + "_value")))
        else:
            self.initializers.append(numpy_helper.from_array(value, name))
        if via_identity:
            out = self.fresh(stem + "_id")
            self.nodes.append(helper.make_node("Identity", [name], [out], name=self.fresh("Identity")))
            return out
        return name

    def conv(self, x, cin, cout, k=3, stride=1, pads=None, group=1, dilation=1, bias=True,
             as_node=False, via_identity=False, auto_pad=None, weight_name=None, bias_name=None):
        k = (k, k) if isinstance(k, int) else tuple(k)
        n = len(k)
        stride = [stride] * n if isinstance(stride, int) else list(stride)
        dilation = [dilation] * n if isinstance(dilation, int) else list(dilation)
        w = weight_name or self.constant(self.rng.standard_normal((cout, cin // group, *k)).astype(self.dtype) * 0.3,
                                         "W", as_node, via_identity)
        inputs = [x, w]
        if bias:
            inputs.append(bias_name or self.constant(self.rng.standard_normal(cout).astype(self.dtype), "B",
                                                     as_node, via_identity))
        attrs = dict(kernel_shape=list(k), strides=stride, dilations=dilation, group=group)
        if auto_pad:
            attrs["auto_pad"] = auto_pad
        else:
            attrs["pads"] = list(pads) if pads is not None else [d * (kk // 2) for d, kk in zip(dilation, k)] * 2
        out = self.fresh("conv")
        self.nodes.append(helper.make_node("Conv", inputs, [out], name=self.fresh("Conv"), **attrs))
        return out

    def bn(self, x, c, eps=1e-5, training_mode=None, params=None, as_node=False):
        if params is None:
            r = self.rng
            params = [self.constant(v.astype(self.dtype), s, as_node) for v, s in zip(
                [r.uniform(0.5, 1.5, c), r.uniform(-1, 1, c), r.uniform(-1, 1, c), r.uniform(0.25, 2, c)],
                ["gamma", "beta", "mean", "var"])]
        out = self.fresh("bn")
        attrs = {"epsilon": eps}
        if training_mode is not None:
            attrs["training_mode"] = training_mode
        outputs = [out] + ([self.fresh("running_mean"), self.fresh("running_var")] if training_mode else [])
        self.nodes.append(helper.make_node("BatchNormalization", [x, *params], outputs, name=self.fresh("BN"), **attrs))
        return out

    def op(self, op_type, inputs, **attrs):
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.fresh(op_type), **attrs))
        return out

    def add(self, a, b):
        return self.op("Add", [a, b])

    def model(self, outputs, input_shape=None):
        elem = _NP_TO_ONNX[self.dtype]
        inputs = [helper.make_tensor_value_info(self.x, elem, input_shape or self.input_shape)] + self.extra_inputs
        outs = [helper.make_tensor_value_info(o, elem, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "test", inputs, outs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = min(model.ir_version, 10)
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for out in model.graph.output:
            if out.name in known and known[out.name].type.tensor_type.HasField("shape"):
                out.type.CopyFrom(known[out.name].type)
            else:  # e.g. after a training-mode BN, which shape inference leaves open
                out.type.CopyFrom(helper.make_tensor_type_proto(elem, input_shape or self.input_shape))
        onnx.checker.check_model(model, full_check=True)
        return model


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # an unused test initializer is not worth a warning
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feed(model: onnx.ModelProto, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in model.graph.input:
        shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def fuse_and_compare(model: onnx.ModelProto, rtol=1e-4, atol=1e-5, seeds=(0, 1), **options):
    """Fuse, check the result with the full checker, and compare outputs under onnxruntime."""
    fused, report = fuse(model, **options)
    onnx.checker.check_model(fused, full_check=True)
    for seed in seeds:
        feeds = random_feed(model, seed)
        for expected, actual in zip(run(model, feeds), run(fused, feeds)):
            np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol)
    return fused, report
