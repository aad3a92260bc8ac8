"""Make the sample models in this folder: train-time RepVGG exports, as users produce them.

    python models/make_models.py        (needs the test extra and torch==2.13.0)

Writes, next to this script:
  repvgg_a0_tiny_ts.onnx             RepVGG-A0 depth, tiny width, TorchScript exporter
  repvgg_a0_tiny_dynamo.onnx(.data)  the same model, dynamo exporter (external data)
  repvgg_tiny_g4_ts.onnx             groupwise (g=4) layers as in RepVGG-B1g4, TorchScript exporter
BN statistics are randomized with a fixed seed, so the files are reproducible.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from tests.reference.export import export  # noqa: E402
from tests.reference.repvgg import randomize_bn, repvgg_a0_tiny, repvgg_tiny_grouped  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    a0 = randomize_bn(repvgg_a0_tiny(), seed=1)
    g4 = randomize_bn(repvgg_tiny_grouped(groups=4), seed=2)
    for name, model, dynamo in [("repvgg_a0_tiny_ts.onnx", a0, False),
                                ("repvgg_a0_tiny_dynamo.onnx", a0, True),
                                ("repvgg_tiny_g4_ts.onnx", g4, False)]:
        path = os.path.join(HERE, name)
        for stale in (path, path + ".data"):
            if os.path.exists(stale):
                os.remove(stale)
        export(model, x, path, dynamo=dynamo)
        print("wrote", path)


if __name__ == "__main__":
    main()
