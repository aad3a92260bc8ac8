"""Every fold that peers make on Conv / ConvTranspose / Gemm / MatMul with BN, Mul, Add or Pad,
and what onnx_repvgg does for the same graph (docs/peer_folds.md is this table).

Each row builds its small graph; the test runs onnx_repvgg on it and checks the row: a fold
removes the row's ops and keeps the outputs equal under onnxruntime; anything else leaves the
model as it was (with the reason code where the row names one). Where a peer that the tests
can afford (onnxruntime, onnxscript) folds the row, the test checks that it still does.

    python -m tests.test_peer_folds          # the whole table, every peer run live (needs the
                                             # bench peers: onnxsim, onnxslim, onnxoptimizer)
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_repvgg import fuse, validate
from tests.graphs import GraphBuilder, fuse_and_compare
from tests.test_conv_transpose import const, conv_transpose

# -- the graphs ------------------------------------------------------------------------------------


def _image():
    return GraphBuilder(channels=4, spatial=(6, 6), seed=1)


def _features():  # (batch, features): nn.Linear / BatchNorm1d heads
    return GraphBuilder(channels=4, spatial=(), seed=1, batch=3)


def _tokens():  # (batch, tokens, features): transformer linears
    return GraphBuilder(channels=5, spatial=(4,), seed=1, batch=2)


def conv(g, x, k=3, pads=None, **kw):
    return g.conv(x, 4, 4, k=k, pads=pads if pads is not None else [k // 2] * 4, **kw)


def gemm(g, x, bias=True):
    inputs = [x, g.constant(g.rng.standard_normal((6, 4)).astype(np.float32), "Wg")]
    if bias:
        inputs.append(g.constant(g.rng.standard_normal(6).astype(np.float32), "Bg"))
    return g.op("Gemm", inputs, transB=1)


def matmul(g, x):
    return g.op("MatMul", [x, g.constant(g.rng.standard_normal((4, 6)).astype(np.float32), "Wm")])


def pad(g, x, pads, value=None, mode=None):
    inputs = [x, g.constant(np.array(pads, np.int64), "pads")]
    if value is not None:
        inputs.append(g.constant(np.array(value, np.float32), "value"))
    return g.op("Pad", inputs, **({"mode": mode} if mode else {}))


def convt(g, x, cout=6, **kw):
    return conv_transpose(g, x, 4, cout, **kw)


@dataclass(frozen=True)
class Row:
    id: str
    fold: str                       # the graph, in words
    target: tuple[str, ...]         # the ops a fold removes
    graph: Callable                 # GraphBuilder factory
    body: Callable                  # (g) -> output tensor
    ours: str                       # "fold" (rule named in `how`), a reason code, "missing", "none", or
                                    # "declined" (the peers' rewrite adds nodes: the row is kept as it is)
    how: str                        # what onnx_repvgg does, in words
    peers: tuple[str, ...] = ()     # the peers that fold it (measured: python -m tests.test_peer_folds)

    def model(self) -> onnx.ModelProto:
        g = self.graph()
        return g.model([self.body(g)])


ROWS = [
    # Conv, then an affine op
    Row("conv-bn", "Conv -> BN", ("BatchNormalization",), _image, lambda g: g.bn(conv(g, "x"), 4),
        "fold", "branch_sum", ("onnxsim", "onnxslim", "onnxoptimizer", "ort-basic", "ort-extended", "onnxscript")),
    Row("conv-nobias-bn", "Conv (no bias) -> BN", ("BatchNormalization",), _image,
        lambda g: g.bn(conv(g, "x", bias=False), 4),
        "fold", "branch_sum", ("onnxsim", "onnxslim", "onnxoptimizer", "ort-basic", "ort-extended", "onnxscript")),
    Row("conv-mul-channel", "Conv -> Mul (per channel)", ("Mul",), _image,
        lambda g: g.op("Mul", [conv(g, "x"), const(g, (4, 1, 1))]),
        "fold", "branch_sum", ("onnxsim", "onnxslim", "ort-basic", "ort-extended")),
    Row("conv-mul-scalar", "Conv -> Mul (scalar)", ("Mul",), _image, lambda g: g.op("Mul", [conv(g, "x"), const(g, ())]),
        "fold", "branch_sum", ("onnxsim", "ort-basic", "ort-extended")),
    Row("conv-div-scalar", "Conv -> Div (scalar)", ("Div",), _image,
        lambda g: g.op("Div", [conv(g, "x"), const(g, (), 0.5, 2)]), "fold", "branch_sum"),
    Row("conv-add-channel", "Conv -> Add (per channel)", ("Add",), _image,
        lambda g: g.op("Add", [conv(g, "x"), const(g, (1, 4, 1, 1))]),
        "fold", "branch_sum", ("onnxslim", "ort-basic", "ort-extended")),
    Row("conv-nobias-add-channel", "Conv (no bias) -> Add (per channel)", ("Add",), _image,
        lambda g: g.op("Add", [conv(g, "x", bias=False), const(g, (4, 1, 1))]),
        "fold", "branch_sum", ("onnxsim", "onnxslim", "onnxoptimizer", "ort-basic", "ort-extended")),
    Row("conv-add-scalar", "Conv -> Add (scalar)", ("Add",), _image, lambda g: g.op("Add", [conv(g, "x"), const(g, (1,))]),
        "fold", "branch_sum"),
    Row("conv-sub-channel", "Conv -> Sub (per channel)", ("Sub",), _image,
        lambda g: g.op("Sub", [conv(g, "x"), const(g, (4, 1, 1))]), "fold", "branch_sum"),
    Row("conv-mul-add-channel", "Conv -> Mul -> Add (per channel)", ("Mul", "Add"), _image,
        lambda g: g.op("Add", [g.op("Mul", [conv(g, "x"), const(g, (4, 1, 1))]), const(g, (4, 1, 1))]),
        "fold", "branch_sum", ("onnxslim", "ort-basic", "ort-extended")),
    Row("conv-mul-add-scalar", "Conv -> Mul -> Add (scalars)", ("Mul", "Add"), _image,
        lambda g: g.op("Add", [g.op("Mul", [conv(g, "x"), const(g, ())]), const(g, ())]),
        "fold", "branch_sum", ("onnxscript-optin",)),
    Row("conv-parallel-sum", "BN(Conv3x3(x)) + BN(Conv1x1(x)) + BN(x) (RepVGG)", ("Add", "BatchNormalization"), _image,
        lambda g: g.add(g.add(g.bn(conv(g, "x"), 4), g.bn(conv(g, "x", k=1), 4)), g.bn("x", 4)), "fold", "branch_sum"),
    # an affine op, then Conv
    Row("bn-conv-pad0", "BN -> Conv (no padding)", ("BatchNormalization",), _image,
        lambda g: conv(g, g.bn("x", 4), k=1, pads=[0, 0, 0, 0]), "fold", "bn_into_consumer"),
    Row("bn-conv-padded", "BN -> Conv (padded)", ("BatchNormalization",), _image, lambda g: conv(g, g.bn("x", 4)),
        "consumer_padding", "not exact: the border would read 0, not BN(0)"),
    Row("mul-conv-pad0", "Mul (per channel) -> Conv (no padding)", ("Mul",), _image,
        lambda g: conv(g, g.op("Mul", ["x", const(g, (1, 4, 1, 1))]), k=1, pads=[0, 0, 0, 0]),
        "fold", "affine_into_consumer", ("onnxsim",)),
    Row("mul-conv-padded", "Mul (per channel) -> Conv (padded)", ("Mul",), _image,
        lambda g: conv(g, g.op("Mul", ["x", const(g, (1, 4, 1, 1))])),
        "fold", "affine_into_consumer (exact with padding: 0 * s = 0)", ("onnxsim",)),
    Row("mul-scalar-conv-padded", "Mul (scalar) -> Conv (padded)", ("Mul",), _image,
        lambda g: conv(g, g.op("Mul", ["x", const(g, ())])), "fold", "affine_into_consumer", ("onnxsim",)),
    Row("affine-scalar-conv-pad0", "Mul -> Add (scalars) -> Conv (no padding)", ("Mul", "Add"), _image,
        lambda g: conv(g, g.op("Add", [g.op("Mul", ["x", const(g, ())]), const(g, ())]), k=1, pads=[0, 0, 0, 0]),
        "fold", "affine_into_consumer", ("onnxscript-optin",)),
    Row("add-conv-padded", "Add (per channel) -> Conv (padded)", ("Add",), _image,
        lambda g: conv(g, g.op("Add", ["x", const(g, (1, 4, 1, 1))])), "consumer_padding",
        "not exact: the border would read 0, not the shift (reported as not applicable)"),
    # Pad, then Conv
    Row("pad-conv", "Pad (zeros) -> Conv", ("Pad",), _image,
        lambda g: conv(g, pad(g, "x", [0, 0, 1, 1, 0, 0, 1, 1]), pads=[0, 0, 0, 0]), "fold", "pad_into_conv",
        ("onnxsim", "onnxslim", "onnxoptimizer", "ort-basic", "ort-extended", "onnxscript")),
    Row("pad-conv-padded", "Pad (zeros, asymmetric) -> Conv (padded)", ("Pad",), _image,
        lambda g: conv(g, pad(g, "x", [0, 0, 1, 2, 0, 0, 0, 1])), "fold", "pad_into_conv",
        ("onnxsim", "onnxslim", "onnxoptimizer", "ort-basic", "ort-extended", "onnxscript")),
    Row("pad-value-conv", "Pad (value 0.5) -> Conv", ("Pad",), _image,
        lambda g: conv(g, pad(g, "x", [0, 0, 1, 1, 0, 0, 1, 1], 0.5), pads=[0, 0, 0, 0]), "pad_value",
        "not exact: a Conv pads with zeros"),
    Row("pad-reflect-conv", "Pad (reflect) -> Conv", ("Pad",), _image,
        lambda g: conv(g, pad(g, "x", [0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"), pads=[0, 0, 0, 0]), "pad_mode",
        "not exact: a Conv pads with zeros"),
    # ConvTranspose
    Row("convt-bn", "ConvTranspose -> BN", ("BatchNormalization",), _image,
        lambda g: g.bn(convt(g, "x", k=4, pads=[1] * 4), 6), "fold", "conv_transpose",
        ("onnxsim", "onnxslim", "ort-basic", "ort-extended", "onnxscript")),
    Row("convt-grouped-bn", "ConvTranspose (groups 2) -> BN", ("BatchNormalization",), _image,
        lambda g: g.bn(convt(g, "x", k=4, pads=[1] * 4, group=2), 6), "fold", "conv_transpose",
        ("onnxslim", "ort-basic", "ort-extended", "onnxscript")),
    Row("convt-mul-channel", "ConvTranspose -> Mul (per channel)", ("Mul",), _image,
        lambda g: g.op("Mul", [convt(g, "x", k=2), const(g, (6, 1, 1))]), "fold", "conv_transpose", ("onnxslim",)),
    Row("convt-div-scalar", "ConvTranspose -> Div (scalar)", ("Div",), _image,
        lambda g: g.op("Div", [convt(g, "x", k=2), const(g, (), 0.5, 2)]), "fold", "conv_transpose"),
    Row("convt-add-channel", "ConvTranspose -> Add (per channel)", ("Add",), _image,
        lambda g: g.op("Add", [convt(g, "x", k=2), const(g, (1, 6, 1, 1))]), "fold", "conv_transpose", ("onnxslim",)),
    Row("convt-nobias-add-channel", "ConvTranspose (no bias) -> Add (per channel)", ("Add",), _image,
        lambda g: g.op("Add", [convt(g, "x", k=2, bias=False), const(g, (6, 1, 1))]), "fold", "conv_transpose",
        ("onnxsim", "onnxslim")),
    Row("convt-mul-add-scalar", "ConvTranspose -> Mul -> Add (scalars)", ("Mul", "Add"), _image,
        lambda g: g.op("Add", [g.op("Mul", [convt(g, "x", k=2), const(g, ())]), const(g, ())]), "fold", "conv_transpose"),
    Row("convt-parallel-sum", "BN(ConvT4x4 s2 p1(x)) + BN(ConvT2x2 s2(x))", ("Add", "BatchNormalization"), _image,
        lambda g: g.add(g.bn(convt(g, "x", 4, k=4, pads=[1] * 4), 4), g.bn(convt(g, "x", 4, k=2), 4)),
        "fold", "conv_transpose"),
    Row("mul-convt", "Mul (per channel) -> ConvTranspose", ("Mul",), _image,
        lambda g: convt(g, g.op("Mul", ["x", const(g, (1, 4, 1, 1))]), k=3, pads=[1] * 4), "fold", "conv_transpose"),
    Row("bn-convt", "BN -> ConvTranspose", ("BatchNormalization",), _image, lambda g: convt(g, g.bn("x", 4), k=2),
        "bn_before_transpose", "not exact: a constant input gives a non-constant output at borders and stride phases"),
    Row("pad-convt", "Pad (zeros) -> ConvTranspose", ("Pad",), _image,
        lambda g: convt(g, pad(g, "x", [0, 0, 1, 1, 0, 0, 1, 1]), k=2), "none",
        "not a padding of the transposed conv (it would need negative pads); not a candidate"),
    # Gemm and 2-D MatMul
    Row("gemm-bn", "Gemm -> BN (Linear -> BatchNorm1d)", ("BatchNormalization",), _features,
        lambda g: g.bn(gemm(g, "x"), 6), "fold", "branch_sum", ("onnxscript",)),
    Row("gemm-mul", "Gemm -> Mul (per feature)", ("Mul",), _features, lambda g: g.op("Mul", [gemm(g, "x"), const(g, (6,))]),
        "fold", "branch_sum"),
    Row("gemm-add", "Gemm -> Add (per feature)", ("Add",), _features, lambda g: g.op("Add", [gemm(g, "x"), const(g, (6,))]),
        "fold", "branch_sum"),
    Row("gemm-sum-const", "Gemm (no C) -> Sum (per-feature constant)", ("Sum",), _features,
        lambda g: g.op("Sum", [gemm(g, "x", bias=False), const(g, (6,))]), "fold", "branch_sum",
        ("ort-basic", "ort-extended")),
    Row("gemm-sum-tensor", "Gemm (no C) -> Sum (another tensor)", ("Sum",), _features,
        lambda g: g.op("Sum", [gemm(g, "x", bias=False), g.op("Relu", [gemm(g, "x")])]), "fold",
        "dense_affine (the tensor becomes the Gemm's C)", ("ort-basic", "ort-extended")),
    Row("bn-gemm", "BN -> Gemm (BatchNorm1d -> Linear)", ("BatchNormalization",), _features,
        lambda g: gemm(g, g.bn("x", 4)), "fold", "bn_into_consumer"),
    Row("matmul-add", "MatMul -> Add (bias), 2-D", ("Add",), _features,
        lambda g: g.op("Add", [matmul(g, "x"), const(g, (6,))]), "fold", "branch_sum (one Gemm)",
        ("onnxsim", "onnxslim", "onnxoptimizer", "ort-basic", "ort-extended", "onnxscript-optin")),
    Row("matmul-bn", "MatMul -> BN, 2-D", ("BatchNormalization",), _features, lambda g: g.bn(matmul(g, "x"), 6),
        "fold", "branch_sum (one Gemm)", ("ort-basic", "ort-extended")),
    Row("matmul-mul", "MatMul -> Mul (per feature), 2-D", ("Mul",), _features,
        lambda g: g.op("Mul", [matmul(g, "x"), const(g, (6,))]), "fold", "branch_sum (one Gemm)"),
    Row("bn-matmul", "BN -> MatMul, 2-D", ("BatchNormalization",), _features, lambda g: matmul(g, g.bn("x", 4)),
        "fold", "bn_into_consumer (one Gemm)"),
    Row("mul-matmul", "Mul (scalar) -> MatMul, 2-D", ("Mul",), _features,
        lambda g: matmul(g, g.op("Mul", ["x", const(g, ())])), "fold",
        "affine_into_consumer (onnxruntime makes a com.microsoft FusedMatMul)", ("ort-extended",)),
    # MatMul on tokens (batch, tokens, features)
    Row("matmul-add-tokens", "MatMul -> Add (bias), 3-D", ("Add",), _tokens,
        lambda g: g.op("Add", [matmul(g, "x"), const(g, (6,))]), "declined",
        "kept: already the deploy form (peers make Reshape -> Gemm -> Reshape: one node more)",
        ("onnxsim", "onnxslim", "ort-basic", "ort-extended")),
    Row("matmul-add-mul-tokens", "MatMul -> Add -> Mul (per feature), 3-D", ("Mul",), _tokens,
        lambda g: g.op("Mul", [g.op("Add", [matmul(g, "x"), const(g, (6,))]), const(g, (6,))]), "fold",
        "dense_affine", ("onnxslim",)),
    Row("matmul-mul-scalar-tokens", "MatMul -> Mul (scalar), 3-D", ("Mul",), _tokens,
        lambda g: g.op("Mul", [matmul(g, "x"), const(g, ())]), "fold",
        "dense_affine (onnxruntime makes a com.microsoft FusedMatMul)", ("ort-extended",)),
    Row("mul-scalar-matmul-tokens", "Mul (scalar) -> MatMul, 3-D", ("Mul",), _tokens,
        lambda g: matmul(g, g.op("Mul", ["x", const(g, ())])), "fold",
        "affine_into_consumer (onnxruntime makes a com.microsoft FusedMatMul)", ("ort-extended",)),
    Row("matmul-reshape-bn-tokens", "MatMul -> Reshape (-1, D) -> BN -> Reshape, 3-D (LeViT)", ("BatchNormalization",),
        _tokens, lambda g: g.op("Reshape", [g.bn(g.op("Reshape", [matmul(g, "x"), g.constant(np.array([-1, 6]), "flat")]), 6),
                                            g.constant(np.array([2, 5, 6]), "shape")]),
        "fold", "bn_into_matmul"),
    Row("matmul-mul-feature-tokens", "MatMul -> Mul (per feature), 3-D", ("Mul",), _tokens,
        lambda g: g.op("Mul", [matmul(g, "x"), const(g, (6,))]), "fold", "dense_affine (no peer does)"),
]

# -- peers -----------------------------------------------------------------------------------------


def _quiet(f, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return f(*args)


def _onnxruntime(level):
    def optimize(model):
        with tempfile.TemporaryDirectory() as folder:
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
            options.log_severity_level = 3
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return onnx.load(options.optimized_model_filepath)
    return optimize


def _onnxscript(model):
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)  # what torch.onnx.export(dynamo=True) runs


def _onnxscript_optin(model):
    """onnxscript's rewrite rules that exist but are not in its default set (nor run by torch),
    alone."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _fuse_conv_affine, _matmul_add_to_gemm

    rules = [_fuse_conv_affine.affine_conv_fusion_rule, _fuse_conv_affine.conv_affine_fusion_rule,
             *_matmul_add_to_gemm.rules]
    return rewriter.rewrite(model, pattern_rewrite_rules=rules)


def _onnxsim(model):
    import onnxsim

    return _quiet(onnxsim.simplify, model)[0]


def _onnxslim(model):
    import onnxslim

    return _quiet(onnxslim.slim, model)


def _onnxoptimizer(model):
    import onnxoptimizer

    return onnxoptimizer.optimize(model)


CHEAP_PEERS = {"ort-basic": _onnxruntime(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
               "ort-extended": _onnxruntime(ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
               "onnxscript": _onnxscript, "onnxscript-optin": _onnxscript_optin}
BENCH_PEERS = {"onnxsim": _onnxsim, "onnxslim": _onnxslim, "onnxoptimizer": _onnxoptimizer}
PEER_ORDER = ["onnxsim", "onnxslim", "onnxoptimizer", "ort-basic", "ort-extended", "onnxscript", "onnxscript-optin"]


def folded(before: onnx.ModelProto, after: onnx.ModelProto, target: tuple[str, ...]) -> bool:
    """Every op of `target` has fewer nodes than before."""
    a, b = Counter(n.op_type for n in before.graph.node), Counter(n.op_type for n in after.graph.node)
    return all(b[op] < a[op] for op in target)


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_peer_fold(row: Row):
    model = row.model()
    if row.ours == "fold":
        fused, report = fuse_and_compare(model)
        assert folded(model, fused, row.target), (row.fold, Counter(n.op_type for n in fused.graph.node))
        assert len(fused.graph.node) < len(model.graph.node) and report.fused and not report.skipped
        assert validate(model, fused).passed
    else:
        fused, report = fuse(model)
        assert not report.fused and fused.SerializeToString() == model.SerializeToString()
        codes = [r.reason_code for r in report.skipped + report.not_applicable]
        if row.ours in ("missing", "none", "declined"):
            assert not codes, codes
        else:
            assert codes == [row.ours], codes
    for peer in row.peers:
        if peer in CHEAP_PEERS:
            assert folded(model, CHEAP_PEERS[peer](model), row.target), (peer, row.fold)


def test_every_peer_fold_is_classified():
    """Where a peer folds a row and onnx_repvgg does not, the row says so ("missing"): the
    table in docs/peer_folds.md lists those, and no other row hides one."""
    for row in ROWS:
        if row.peers and row.ours != "fold":
            assert row.ours in ("missing", "declined"), row.id


def peer_table() -> str:
    """Run every peer on every row (bench peers included) and return the markdown table;
    a measured cell that differs from the row's `peers` is marked with '!'."""
    peers = {**BENCH_PEERS, **CHEAP_PEERS}
    head = "| fold | " + " | ".join(PEER_ORDER) + " | onnx_repvgg | test |"
    lines = [head, "|" + "---|" * (len(PEER_ORDER) + 3)]
    for row in ROWS:
        model = row.model()
        cells = []
        for name in PEER_ORDER:
            grown = 0
            try:
                out = peers[name](model)
                did = folded(model, out, row.target)
                grown = len(out.graph.node) - len(model.graph.node)
            except Exception as err:  # noqa: BLE001 - a peer that crashes does not fold
                did = False
                print(f"{row.id}: {name} failed: {type(err).__name__}: {str(err)[:100]}")
            mark = ("yes" + (f" (+{grown} nodes)" if grown > 0 else "")) if did else "no"
            cells.append(mark + ("" if did == (name in row.peers) else " !"))
        ours = {"fold": f"**folds** ({row.how})", "missing": f"**missing**: {row.how}", "none": row.how,
                "declined": row.how}.get(
            row.ours, f"skipped, `{row.ours}`: {row.how}")
        lines.append(f"| {row.fold} | " + " | ".join(cells) + f" | {ours} | `test_peer_fold[{row.id}]` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(peer_table())
