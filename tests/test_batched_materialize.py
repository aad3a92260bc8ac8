"""Blocks materialized together (issue 13): algebra.sum_branches_many and the pipeline's
batches of branch_sum matches give exactly what one block at a time gives.

sum_branches_many against sum_branches on random blocks of several structures and dtypes,
with overflow, non-finite values and underflow in some (those raise the same error); and the
whole pass with the batches switched off against the pass as it is, on the adversarial
corpus (float16 overflow and underflow included), unfolded RepVGG blocks and family exports:
the same bytes and the same report.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import torch

from onnx_repvgg import algebra, fuse
from onnx_repvgg.rules import branch_sum
from tests.adversarial import corpus
from tests.reference import families as fam
from tests.reference.export import export
from tests.reference.repvgg import randomize_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import make_repvgg_blocks  # noqa: E402


def _block(rng, dtype, c=4, k=3, scale=1.0, small=False):
    """Branches of a RepVGG-like block; `scale` multiplies every factor (1e30: overflow below
    float64), `small` makes every factor and bias ~1e-50 (flushed to 0 below float64)."""
    kernel = rng.standard_normal((c, c, k, k)).astype(dtype)
    one = rng.standard_normal((c, c, 1, 1)).astype(dtype)
    identity = algebra.identity_kernel(c, 1, (1, 1), (0, 0))
    tiny = 1e-50 if small else 1.0
    factors = [rng.uniform(0.5, 1.5, c) * scale * tiny for _ in range(3)]
    return [(kernel, rng.standard_normal(c) * tiny, (0, 0), factors[0]),
            (one, np.zeros(c), (k // 2, k // 2), factors[1]),
            (identity, np.zeros(c), (k // 2, k // 2), factors[2]),
            (np.zeros((c, c, 0, 0)), rng.standard_normal(c) * tiny, (0, 0), None)]


def _same(a, b) -> bool:
    if isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def test_sum_branches_many_equals_one_by_one():
    rng = np.random.default_rng(0)
    items = []
    for i in range(60):
        dtype = (np.float32, np.float16, np.float64)[i % 3]
        if i % 7 == 3:
            items.append((_block(rng, dtype, scale=1e30), (3, 3), dtype))  # overflow (not in float64)
        elif i % 11 == 5:
            items.append((_block(rng, dtype, small=True), (3, 3), dtype))  # underflow in float16
        elif i % 13 == 4:
            items.append((_block(rng, dtype, c=2, k=5), (5, 5), dtype))  # another structure
        else:
            items.append((_block(rng, dtype), (3, 3), dtype))
    nan = _block(rng, np.float32)
    nan[0] = (nan[0][0], nan[0][1], (0, 0), np.full(4, np.nan))
    items.append((nan, (3, 3), np.float32))
    many = algebra.sum_branches_many(items)
    alone = []
    for branches, shape, dtype in items:
        try:
            alone.append(algebra.sum_branches(branches, shape, out_dtype=dtype))
        except algebra.CastError as err:
            alone.append(err)
    kinds = {type(a).__name__ for a in alone}
    assert {"tuple", "FusedOverflow", "FusedUnderflow"} <= kinds  # every path is exercised
    for position, (a, b) in enumerate(zip(many, alone)):
        assert _same(a, b), position


def _models(folder: str) -> dict[str, onnx.ModelProto]:
    found = {case.name: case.model for case in corpus() if case.layout == "inline"}
    found["repvgg_blocks_40"] = make_repvgg_blocks.build(40)
    torch.manual_seed(0)
    net = randomize_bn(fam.Net([fam.MobileOneBlock(8, 8, 3, num_branches=3), fam.RepVggDw(8),
                                fam.UltralyticsRepConv(8), fam.ACBlock(8, 8)]), seed=5)
    for tag, dynamo in (("ts", False), ("dynamo", True)):
        path = os.path.join(folder, f"family_{tag}.onnx")
        export(net.eval(), torch.randn(1, 3, 16, 16), path, dynamo)
        found[f"family_{tag}"] = onnx.load(path)
    return found


def test_batches_change_nothing(tmp_path, monkeypatch):
    models = _models(str(tmp_path))
    batched = {name: fuse(model) for name, model in models.items()}
    monkeypatch.delattr(branch_sum, "materialize_many")
    for name, model in models.items():
        fused, report = fuse(model)
        assert fused.SerializeToString() == batched[name][0].SerializeToString(), name
        assert report.to_dict() == batched[name][1].to_dict(), name
    assert sum(len(r.fused) for _, r in batched.values()) > 40
