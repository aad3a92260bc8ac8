"""Pattern rules, applied in this order each round.

Each rule module exposes NAME, find(view, opset) -> Candidates (each a match or a Reason),
materialize(match, view, names) -> Rewrite, and a one-line description in its docstring.
A rule with DEFAULT = False runs only when asked for; one with LATE = True runs only once
the others have reached their fixed point. A rule may also expose materialize_many(matches,
view, names) (with batchable(match) and batch_bytes(match)): the pipeline then materializes
its matches of many small blocks together, each with the result materialize() would give.
"""

from . import (
    affine_consumer,
    bn_consumer,
    bn_to_conv,
    branch_sum,
    conv_transpose,
    dense_affine,
    pad_into_conv,
    sequential,
    token_bn,
    transpose_affine,
)

RULES = {pad_into_conv.NAME: pad_into_conv, transpose_affine.NAME: transpose_affine, sequential.NAME: sequential,
         branch_sum.NAME: branch_sum,
         conv_transpose.NAME: conv_transpose, token_bn.NAME: token_bn, bn_consumer.NAME: bn_consumer,
         affine_consumer.NAME: affine_consumer, dense_affine.NAME: dense_affine, bn_to_conv.NAME: bn_to_conv}
DEFAULT_RULES = [name for name, rule in RULES.items() if getattr(rule, "DEFAULT", True)]

# The published blocks these rules cover, as one-line diagrams: (family, train-time form, rule).
PATTERNS = [
    ("RepVGG", "act(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))  -> act(conv3x3(x))", "branch_sum"),
    ("MobileOne / GhostNetV3", "act(sum_i BN(convKxK_i(x)) + BN(conv1x1(x)) + BN(x))  -> act(convKxK(x))", "branch_sum"),
    ("RepViT RepVggDw", "BN(BN(dw3x3(x)) + dw1x1(x) + x)  -> dw3x3(x)", "branch_sum"),
    ("QARepVGG (YOLOv6)", "act(BN(BN(conv3x3(x)) + conv1x1(x) + x [+ avgpool3x3(x)]))  -> act(conv3x3(x))", "branch_sum"),
    ("YOLOv6/v7, ultralytics RepConv", "act(BN(conv3x3(x)) + BN(conv1x1(x)) [+ BN(x) | + 0])  -> act(conv3x3(x))",
     "branch_sum"),
    ("FastViT RepMixer", "x + g * (mixer(x) - BN(x))  -> dwKxK(x)", "branch_sum"),
    ("FastViT RepCPE / CPE", "x + dwKxK(x)  -> dwKxK(x)", "branch_sum"),
    ("RepLKNet, YOLOv10 RepVGGDW, FastViT", "BN(dwLxL(x)) + BN(dwSxS(x))  -> dwLxL(x)", "branch_sum"),
    ("UniRepLKNet dilated reparam", "BN(dwLxL(x)) + sum_i BN(dwKxK_dilated_r(x))  -> dwLxL(x)", "branch_sum"),
    ("ACNet", "BN(conv3x3(x)) + BN(conv1x3(x)) + BN(conv3x1(x))  -> conv3x3(x)", "branch_sum"),
    ("PP-LCNetV2", "BN(dw5x5(x)) + BN(dw3x3(x)) + BN(dw1x1(x)) + BN(x)  -> dw5x5(x)", "branch_sum"),
    ("RepGhost", "BN(dw3x3(x)) + BN(x)  -> dw3x3(x)", "branch_sum"),
    ("layer scale", "x + g * conv(x), conv(x) * g  -> conv(x)", "branch_sum"),
    ("unfolded export", "BN(conv(x)), conv(x) + bias  -> conv(x)", "branch_sum"),
    ("distilled heads (RepViT, LeViT)", "(linear(BN1d(x)) + linear'(BN1d'(x))) / 2  -> linear(x)",
     "bn_into_consumer + branch_sum"),
    ("BN before a conv or linear", "conv_pad0(BN(x)), linear(BN1d(x))  -> conv(x), linear(x)", "bn_into_consumer"),
    ("LeViT LinearNorm (BN over tokens)", "reshape(BN1d(flatten(x @ W)))  -> x @ W' + b", "bn_into_matmul"),
    ("BN before a token linear", "reshape(BN1d(flatten(x))) @ W  -> x @ W' + b", "bn_into_consumer"),
    ("decoder / segmentation upsampling", "act(BN(convT(x))), convT(x) * g + b  -> act(convT(x))", "conv_transpose"),
    ("parallel transposed upsamplers", "BN(convT4x4_s2(x)) + BN(convT2x2_s2(x))  -> convT4x4_s2(x)", "conv_transpose"),
    ("scale before a transposed conv", "convT(x * s)  -> convT(x)", "conv_transpose"),
    ("scale before a layer", "conv(x * s), linear(x * s + t), (x * s) @ W  -> conv(x), linear(x), x @ W'",
     "affine_into_consumer"),
    ("scale after a token linear", "(x @ W + b) * s  -> x @ W' + b'", "dense_affine"),
    ("addend into a linear's C", "a * linear(x) + c * y  -> Gemm(x, W, y, alpha=a, beta=c)", "dense_affine"),
    ("stray BN (opt-in)", "BN(x)  -> dw1x1(x)", "bn_to_conv"),
    ("explicit zero padding", "conv_pad0(ZeroPad(x))  -> conv_padded(x)", "pad_into_conv"),
    ("NHWC affine before a Transpose (tf2onnx)", "T(x * s + t), T(x)  -> T(x) * s' + t'", "transpose_affine"),
    ("DBB 1x1 -> kxk, 1x1 -> avg", "convKxK(fill_b(conv1x1(x))), avgpool(fill_b(conv1x1(x)))  -> convKxK_padded(x)",
     "sequential"),
]


def describe(name: str) -> str:
    doc = (RULES[name].__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


__all__ = ["RULES", "DEFAULT_RULES", "PATTERNS", "describe"]
