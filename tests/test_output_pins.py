"""The pass's output, byte for byte, pinned for a few models (issue 13: the cost per node came
down without changing what is written).

Each case runs the CLI with --no-check and compares the SHA-256 of every file it writes (the
model, and its data file when it has one) with the digest the pass gave before that work:
the sample models, unfolded RepVGG blocks (benchmarks/make_repvgg_blocks.py), a TorchScript
TransformerEncoder export with nothing to fuse (the path that infers static shapes), and
family exports with both exporters. A digest changes only with the output: a deliberate
change of what the pass writes updates it here (`python -m tests.test_output_pins` prints
the current ones).
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import onnx
import pytest
import torch

from onnx_repvgg.cli import main
from tests.reference import families as fam
from tests.reference.export import export
from tests.reference.repvgg import randomize_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_repvgg_blocks  # noqa: E402
import make_transformer_graph  # noqa: E402


def _sample(name: str):
    def make(folder: str) -> str:
        return os.path.join(ROOT, "models", name)
    return make


def _repvgg_blocks(folder: str) -> str:
    path = os.path.join(folder, "blocks.onnx")
    onnx.save(make_repvgg_blocks.build(40), path)
    return path


def _transformer(folder: str) -> str:
    path = os.path.join(folder, "transformer.onnx")
    make_transformer_graph.export(2, path)
    return path


def _family(net_factory, dynamo):
    def make(folder: str) -> str:
        torch.manual_seed(0)
        net = net_factory()
        randomize_bn(net, seed=0)
        exported = os.path.join(folder, "export", "family.onnx")
        os.makedirs(os.path.dirname(exported))
        export(net.eval(), torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0)), exported, dynamo)
        model = onnx.load(exported)
        for node in model.graph.node:  # the dynamo exporter writes stack traces, with this file's path
            del node.metadata_props[:]
        path = os.path.join(folder, "family.onnx")
        if dynamo:  # as that exporter writes it: weights in a data file
            onnx.save(model, path, save_as_external_data=True, location="family.onnx.data", size_threshold=0)
        else:
            onnx.save(model, path)
        return path
    return make


CASES = {
    "repvgg_a0_tiny_ts": _sample("repvgg_a0_tiny_ts.onnx"),
    "repvgg_a0_tiny_dynamo": _sample("repvgg_a0_tiny_dynamo.onnx"),
    "repvgg_tiny_g4_ts": _sample("repvgg_tiny_g4_ts.onnx"),
    "repvgg_blocks_40": _repvgg_blocks,
    "transformer_2_layers": _transformer,
    "mobileone_torchscript": _family(lambda: torch.nn.Sequential(fam.MobileOneBlock(8, 8, 3, num_branches=3),
                                                                 fam.MobileOneBlock(8, 8, 3, groups=8)), False),
    "qarepvgg_v2_dynamo": _family(lambda: torch.nn.Sequential(fam.QARepVGGBlockV2(8), fam.RepVggDw(8)), True),
    "repconv_acnet_dynamo": _family(lambda: torch.nn.Sequential(fam.UltralyticsRepConv(8), fam.ACBlock(8, 8)), True),
    "fastvit_unoptimized": _family(lambda: torch.nn.Sequential(fam.RepMixer(8), fam.RepCPE(8)), "unoptimized"),
}

PINNED = {  # before issue 13's changes
    'fastvit_unoptimized': {
        'out.onnx': '73aead055d73375ca13874a07789809e08fbba7e6de371a9f9db2574f7744bc0',
        'out.onnx.data': '988cdc4575fec5f2d3fee4871f7c42ec77eea7fc1d7c6fa383f73150c7469057',
    },
    'mobileone_torchscript': {
        'out.onnx': '18bceceb7caa500586ef052d6d4e7e82b8386250440f1a178629a3ac14c649c4',
    },
    'qarepvgg_v2_dynamo': {
        'out.onnx': 'a03e6adf184955b7cccfe5b810b6a7b39a8bf29418c4e366a7cdfffa4c543a98',
        'out.onnx.data': '283ec1f475cefbe32aeb4b9fb5a8ac7c46ca230a67e132e0533b38cebe419006',
    },
    'repconv_acnet_dynamo': {
        'out.onnx': '73cb3d9ed0f38d01fc0f1076d89c975a8bfe71168f36c29bb27fae1c01469783',
        'out.onnx.data': '5951e656fa6742793969b24e2a295ded7e774ede0c128c32eea92e8cb15e97ff',
    },
    'repvgg_a0_tiny_dynamo': {
        'out.onnx': '41236196a8b7c62cb65d16b35cb940e33a04bc50dab34e31a0dd53865457675b',
        'out.onnx.data': '53c3c09cf7c6328110151824c6ce77a716dcb74f167e327668b1e0a87ab1d659',
    },
    'repvgg_a0_tiny_ts': {
        'out.onnx': 'a9f7cb051ebcc2e3eb36e593d56179a9023ad11e1b3498c672aa0acefb5c4ffd',
    },
    'repvgg_blocks_40': {
        'out.onnx': '96c1d263436379c60c589e9cdd32684bd32f3b989a8d6ede4d1985293cddac41',
    },
    'repvgg_tiny_g4_ts': {
        'out.onnx': '9b9b46924774adf721b597ab3297ea15967f447557e4fe3aad859d0444be5031',
    },
    'transformer_2_layers': {
        'out.onnx': 'c9fbb4f5647b4018970f427d22aaf6e265717bb10a1fae59940d35e3a1bba958',
    },
}


def digests(make, folder: str) -> dict[str, str]:
    """SHA-256 of each file the CLI writes for the model `make(folder)` gives (--no-check)."""
    source = make(folder)
    out_dir = os.path.join(folder, "out")
    os.makedirs(out_dir, exist_ok=True)
    assert main([source, os.path.join(out_dir, "out.onnx"), "--no-check", "-q"]) == 0
    found = {}
    for name in sorted(os.listdir(out_dir)):
        with open(os.path.join(out_dir, name), "rb") as f:
            found[name] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_is_pinned(tmp_path, case):
    assert digests(CASES[case], str(tmp_path)) == PINNED[case]


def test_pinned_cases_are_the_cases():
    assert sorted(PINNED) == sorted(CASES)


if __name__ == "__main__":  # print the current digests, to paste into PINNED
    import tempfile

    np.set_printoptions(linewidth=200)
    for case in sorted(CASES):
        with tempfile.TemporaryDirectory() as folder:
            print(f"    {case!r}: {digests(CASES[case], folder)!r},")
