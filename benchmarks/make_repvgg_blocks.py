"""Generate a deep stack of small train-time RepVGG blocks, BNs unfolded: many nodes, few bytes.

    python benchmarks/make_repvgg_blocks.py OUT.onnx --blocks 3000 [--channels 8] [--verify]

Each block is what the TorchScript exporter writes for a RepVGG block (tests/reference/repvgg.py)
exported with do_constant_folding=False, which keeps every BatchNormalization: 8 nodes,

    Conv3x3 -> BN,  Conv1x1 -> BN,  Add,  BN(x),  Add,  Relu

with the exporter's node, value and initializer names (/0/rbr_dense/conv/Conv,
0.rbr_dense.bn.running_var, ...), IR 9, opset 20, input "input.1" of shape
(1, C, 8, 8). Weights and BN statistics are random (fresh BNs would make the exporter
share them). The existing make_repvgg_graph.py writes the folded form (BN inside the conv,
6 nodes a block); this one gives the issue's 8 nodes a block: 3,000 blocks = 24,000 nodes.
The torch export itself is too slow for this (300 blocks take ~12 s, growing faster than
linearly), so the graph is written with onnx.helper; --verify exports 3 blocks with torch
and checks that the node pattern is the same, name for name.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IMAGE = 8


def _bn_params(rng, channels: int) -> list[np.ndarray]:
    return [rng.uniform(0.5, 1.5, channels), rng.uniform(-1, 1, channels),
            rng.uniform(-1, 1, channels), rng.uniform(0.5, 2, channels)]


def build(blocks: int, channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(i: int, branch: str, x: str, k: int) -> str:
        weight = init(f"{i}.{branch}.conv.weight", rng.standard_normal((channels, channels, k, k)) * 0.1)
        out = f"/{i}/{branch}/conv/Conv_output_0"
        nodes.append(helper.make_node("Conv", [x, weight], [out], name=f"/{i}/{branch}/conv/Conv",
                                      dilations=[1, 1], group=1, kernel_shape=[k, k], pads=[k // 2] * 4,
                                      strides=[1, 1]))
        return out

    def bn(x: str, prefix: str, scope: str) -> str:
        params = [init(f"{prefix}.{p}", v) for p, v in
                  zip(("weight", "bias", "running_mean", "running_var"), _bn_params(rng, channels))]
        out = f"{scope}/BatchNormalization_output_0"
        nodes.append(helper.make_node("BatchNormalization", [x] + params, [out], name=f"{scope}/BatchNormalization",
                                      epsilon=1e-5, momentum=0.9, training_mode=0))
        return out

    x = "input.1"
    for i in range(blocks):
        dense = bn(conv(i, "rbr_dense", x, 3), f"{i}.rbr_dense.bn", f"/{i}/rbr_dense/bn")
        one = bn(conv(i, "rbr_1x1", x, 1), f"{i}.rbr_1x1.bn", f"/{i}/rbr_1x1/bn")
        nodes.append(helper.make_node("Add", [dense, one], [f"/{i}/Add_output_0"], name=f"/{i}/Add"))
        ident = bn(x, f"{i}.rbr_identity", f"/{i}/rbr_identity")
        nodes.append(helper.make_node("Add", [f"/{i}/Add_output_0", ident], [f"/{i}/Add_1_output_0"], name=f"/{i}/Add_1"))
        x = f"/{i}/act/Relu_output_0" if i < blocks - 1 else "output"
        nodes.append(helper.make_node("Relu", [f"/{i}/Add_1_output_0"], [x], name=f"/{i}/act/Relu"))
    shape = [1, channels, IMAGE, IMAGE]
    graph = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="pytorch")
    model.ir_version = 9
    return model


def verify(channels: int = 8) -> None:
    """Export 3 blocks of tests/reference/repvgg.py with TorchScript (do_constant_folding=False) and
    check that build(3) has the same nodes: names, ops, inputs, outputs, attributes."""
    import sys
    import tempfile
    import warnings

    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.reference.repvgg import RepVGGBlock

    module = torch.nn.Sequential(*[RepVGGBlock(channels, channels) for _ in range(3)]).eval()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # distinct statistics: no shared initializers
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ref.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.randn(1, channels, IMAGE, IMAGE),), path, dynamo=False,
                              do_constant_folding=False)
        ref = onnx.load(path)
    ours = build(3, channels)
    last = ref.graph.output[0].name

    def key(node):
        return (node.name, node.op_type, list(node.input), [("output" if o == last else o) for o in node.output],
                sorted(a.SerializeToString() for a in node.attribute))
    mismatched = [(a.name, b.name) for a, b in zip(ref.graph.node, ours.graph.node) if key(a) != key(b)]
    if len(ref.graph.node) != len(ours.graph.node) or mismatched:
        raise SystemExit(f"node pattern differs from the torch export: {len(ref.graph.node)} vs "
                         f"{len(ours.graph.node)} nodes, first differences {mismatched[:3]}")
    if sorted(t.name for t in ref.graph.initializer) != sorted(t.name for t in ours.graph.initializer):
        raise SystemExit("initializer names differ from the torch export")
    print(f"verified: 3 blocks match the TorchScript export node for node ({len(ours.graph.node)} nodes)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output", nargs="?")
    p.add_argument("--blocks", type=int, default=3000)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--verify", action="store_true", help="compare 3 blocks with a real torch export first")
    a = p.parse_args()
    if a.verify:
        verify(a.channels)
    if a.output:
        model = build(a.blocks, a.channels)
        onnx.save(model, a.output)
        print(f"wrote {a.output}: {len(model.graph.node)} nodes, {os.path.getsize(a.output) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
