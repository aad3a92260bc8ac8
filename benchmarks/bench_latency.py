"""Inference speed of the fused model against the train-time export and the authors' deploy export.

    python benchmarks/bench_latency.py [--size 128] [--runs 30]

For each sample network (built from tests/reference, randomized BN, TorchScript exporter):
latency in onnxruntime CPU with 1 thread, median of interleaved runs, with graph
optimizations ORT_ENABLE_ALL and ORT_DISABLE_ALL (edge runtimes do not have onnxruntime's
own Conv+Add fusions), plus parameter and MAC counts. Needs torch and the test extra.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from onnx_repvgg import fuse  # noqa: E402
from tests.reference import families as fam  # noqa: E402
from tests.reference.export import export  # noqa: E402
from tests.reference.repvgg import deploy_copy, randomize_bn, repvgg_a0_tiny, repvgg_tiny_grouped  # noqa: E402


def networks():
    c = 32
    yield "RepVGG-A0 (tiny width)", randomize_bn(repvgg_a0_tiny(), 1), deploy_copy
    yield "RepVGG grouped g4", randomize_bn(repvgg_tiny_grouped(), 2), deploy_copy
    blocks = []
    for cin, cout in ((c, c), (c, 2 * c), (2 * c, 2 * c)):
        blocks += [fam.MobileOneBlock(cin, cin, 3, stride=1 if cin == cout else 2, groups=cin, num_branches=4),
                   fam.MobileOneBlock(cin, cout, 1, num_branches=4)]
    mobileone = fam.Net(blocks, c=c)
    yield "MobileOne-style", randomize_bn(mobileone, 3), lambda m: m.deploy()
    repvit = fam.Net([b for _ in range(2) for b in (fam.RepVggDw(c), fam.MobileOneBlock(c, c, 1, num_branches=1),
                                                   fam.RepMixer(c), fam.RepCPE(c))], c=c)
    yield "RepViT/FastViT-style", randomize_bn(repvit, 4), lambda m: m.deploy()


def macs_and_params(model: onnx.ModelProto) -> tuple[int, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and node.output[0] in shapes and node.input[1] in inits:
            w = inits[node.input[1]]
            macs += int(np.prod(shapes[node.output[0]])) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm" and node.input[1] in inits:
            macs += int(np.prod(inits[node.input[1]]))
    params = sum(int(np.prod(d)) for d in inits.values())
    return macs, params


def session(path: str, level) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = level
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--runs", type=int, default=30)
    a = p.parse_args()
    work = tempfile.mkdtemp()
    levels = [("ENABLE_ALL", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
              ("DISABLE_ALL", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)]
    print("| network | ORT opt | train ms | fused ms | deploy ms | fused/deploy | speedup vs train |"
          " params train -> fused (deploy) | MMACs train -> fused (deploy) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, net, to_deploy in networks():
        cin = 3 if not isinstance(net, fam.Net) else net.stem.in_channels
        x = torch.randn(1, cin, a.size, a.size)
        paths = {k: os.path.join(work, f"{k}.onnx") for k in ("train", "deploy", "fused")}
        export(net, x, paths["train"], dynamo=False)
        export(to_deploy(net), x, paths["deploy"], dynamo=False)
        fused, _ = fuse(onnx.load(paths["train"]))
        onnx.save(fused, paths["fused"])
        counts = {k: macs_and_params(onnx.load(v)) for k, v in paths.items()}
        feed = x.numpy()
        for label, level in levels:
            sessions = {k: session(v, level) for k, v in paths.items()}
            inp = {k: {s.get_inputs()[0].name: feed} for k, s in sessions.items()}
            for k, s in sessions.items():
                for _ in range(3):
                    s.run(None, inp[k])
            times = {k: [] for k in sessions}
            for _ in range(a.runs):
                for k, s in sessions.items():
                    t = time.perf_counter()
                    s.run(None, inp[k])
                    times[k].append((time.perf_counter() - t) * 1000)
            med = {k: statistics.median(v) for k, v in times.items()}
            (tm, tp), (fm, fp), (dm, dp) = counts["train"], counts["fused"], counts["deploy"]
            print(f"| {name} | {label} | {med['train']:.2f} | {med['fused']:.2f} | {med['deploy']:.2f} | "
                  f"{med['fused'] / med['deploy']:.3f} | {med['train'] / med['fused']:.2f}x | "
                  f"{tp:,} -> {fp:,} ({dp:,}) | {tm / 1e6:.1f} -> {fm / 1e6:.1f} ({dm / 1e6:.1f}) |")


if __name__ == "__main__":
    main()
