"""Generate train-time RepVGG-shaped ONNX graphs with numpy + onnx.helper (no torch).

    python benchmarks/make_repvgg_graph.py OUT.onnx --blocks 4,6,16,1 --widths 64,256,512,1024,2048 [--groups 4]

Each block is what the TorchScript exporter writes for a RepVGG block: Conv 3x3 (BN folded,
with bias), Conv 1x1 (with bias), BatchNormalization on the identity when shapes allow, the
Adds, and a Relu. Weights are random float32. Models over ~1.9 GB are written with external
data (OUT.onnx.data).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(blocks, widths, groups=1, image=32, seed=0, classes=10) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = [0]

    def name(stem):
        counter[0] += 1
        return f"{stem}_{counter[0]}"

    def tensor(shape, scale=0.05):
        t = numpy_helper.from_array((rng.standard_normal(shape, dtype=np.float32) * scale), name("w"))
        inits.append(t)
        return t.name

    def block(x, cin, cout, stride, g):
        outs = []
        for k in (3, 1):
            out = name("conv")
            nodes.append(helper.make_node("Conv", [x, tensor((cout, cin // g, k, k)), tensor((cout,))], [out],
                                          name=name("Conv"), kernel_shape=[k, k], strides=[stride, stride],
                                          pads=[k // 2] * 4, group=g))
            outs.append(out)
        if cin == cout and stride == 1:
            out = name("bn")
            params = [numpy_helper.from_array(v.astype(np.float32), name("bnp")) for v in (
                rng.uniform(0.5, 1.5, cin), rng.uniform(-1, 1, cin), rng.uniform(-1, 1, cin), rng.uniform(0.5, 2, cin))]
            inits.extend(params)
            nodes.append(helper.make_node("BatchNormalization", [x] + [p.name for p in params], [out], name=name("BN")))
            outs.append(out)
        total = outs[0]
        for o in outs[1:]:
            s = name("add")
            nodes.append(helper.make_node("Add", [total, o], [s], name=name("Add")))
            total = s
        y = name("relu")
        nodes.append(helper.make_node("Relu", [total], [y], name=name("Relu")))
        return y

    x = "input"
    x = block(x, 3, widths[0], 2, 1)
    cin, layer = widths[0], 1
    for n, cout in zip(blocks, widths[1:]):
        for i in range(n):
            g = groups if layer % 2 == 0 else 1
            x = block(x, cin, cout, 2 if i == 0 else 1, g if cin % g == 0 and cout % g == 0 else 1)
            cin, layer = cout, layer + 1
    pooled = name("gap")
    nodes.append(helper.make_node("GlobalAveragePool", [x], [pooled]))
    flat = name("flat")
    nodes.append(helper.make_node("Flatten", [pooled], [flat]))
    nodes.append(helper.make_node("Gemm", [flat, tensor((classes, cin)), tensor((classes,))], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "repvgg_train", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                    [1, 3, image, image])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: str) -> None:
    big = sum(t.ByteSize() for t in model.graph.initializer) > 1_900_000_000
    for f in (path, path + ".data"):
        if os.path.exists(f):
            os.remove(f)
    if big:
        onnx.save_model(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
    else:
        onnx.save_model(model, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output")
    p.add_argument("--blocks", default="2,4,14,1")
    p.add_argument("--widths", default="48,48,96,192,1280")
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--image", type=int, default=32)
    a = p.parse_args()
    model = build([int(v) for v in a.blocks.split(",")], [int(v) for v in a.widths.split(",")], a.groups, a.image)
    save(model, a.output)
    size = os.path.getsize(a.output) + (os.path.getsize(a.output + ".data") if os.path.exists(a.output + ".data") else 0)
    print(f"wrote {a.output}: {len(model.graph.node)} nodes, {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
