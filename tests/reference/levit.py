"""LeViT (Graham et al., "LeViT: a Vision Transformer in ConvNet's Clothing for Faster
Inference", ICCV 2021) at small widths, with its deploy conversion.

Written from the paper. Every linear map is followed by a BatchNorm (the paper's choice over
LayerNorm, so that it folds away at inference):

  * LinearBN: Linear(bias=False) over tokens [B, N, C], then BatchNorm1d over the flattened
    tokens [B*N, D], reshaped back to [B, N, D];
  * the conv stem: 3x3 stride-2 Conv + BN2d with Hardswish between;
  * attention: one fused q/k/v LinearBN, heads of key dim kd and value dim vd, a learned
    attention bias per head indexed by the relative position |dx|, |dy|, softmax, Hardswish,
    then the output projection LinearBN;
  * the MLP: LinearBN (x2), Hardswish, LinearBN, as a residual;
  * subsample attention between stages: keys and values from every token, queries from every
    other token of every other row (LinearBN on the subsampled tokens), more heads and a wider
    output, then an MLP;
  * the distilled classifier: mean over tokens, two BN1d + Linear heads averaged at inference.

`use_conv=True` is the "levit_conv" form: tokens stay [B, C, H, W] and each LinearBN is a 1x1
Conv + BN2d (queries subsampled by a stride-2 1x1 average pool).

`deploy()` is LeViT's own inference conversion: every LinearBN becomes a Linear with a bias,
every Conv + BN a Conv with a bias, and the two heads one Linear (their average).
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """BN at inference as y = x * scale + shift."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


class LinearBN(nn.Module):
    """Linear(bias=False) over the last axis of [B, N, C], BatchNorm1d over the flattened tokens."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)

    @torch.no_grad()
    def deploy(self) -> nn.Linear:
        scale, shift = bn_scale_shift(self.bn)
        linear = nn.Linear(self.linear.in_features, self.linear.out_features)
        linear.weight.copy_(self.linear.weight * scale[:, None])
        linear.bias.copy_(shift)
        return linear


class ConvBN(nn.Module):
    """Conv2d(bias=False) + BatchNorm2d: the stem, and the 1x1 form of LinearBN (use_conv)."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))

    @torch.no_grad()
    def deploy(self) -> nn.Conv2d:
        c = self.conv
        scale, shift = bn_scale_shift(self.bn)
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding)
        conv.weight.copy_(c.weight * scale[:, None, None, None])
        conv.bias.copy_(shift)
        return conv


def norm(cin: int, cout: int, use_conv: bool) -> nn.Module:
    return ConvBN(cin, cout) if use_conv else LinearBN(cin, cout)


def relative_bias_index(query_grid: list[tuple[int, int]], key_grid: list[tuple[int, int]], width: int) -> torch.Tensor:
    """Index of the learned bias of each (query, key) pair: the offset |dy| * width + |dx|."""
    return torch.tensor([[abs(qy - ky) * width + abs(qx - kx) for ky, kx in key_grid] for qy, qx in query_grid])


class AttentionBias(nn.Module):
    """A learned bias per head and relative offset between a query and a key position."""

    def __init__(self, heads: int, resolution: int, stride: int = 1):
        super().__init__()
        keys = list(itertools.product(range(resolution), repeat=2))
        queries = list(itertools.product(range(0, resolution, stride), repeat=2))
        self.table = nn.Parameter(torch.randn(heads, resolution * resolution) * 0.5)
        self.register_buffer("index", relative_bias_index(queries, keys, resolution), persistent=False)

    def forward(self):
        return self.table[:, self.index]  # (heads, queries, keys)


class Attention(nn.Module):
    """LeViT attention: one q/k/v LinearBN, per-head attention bias, Hardswish, projection LinearBN."""

    def __init__(self, dim: int, key_dim: int, heads: int, value_ratio: int, resolution: int, use_conv: bool):
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_ratio * key_dim
        self.use_conv = use_conv
        self.qkv = norm(dim, heads * (2 * key_dim + self.value_dim), use_conv)
        self.act = nn.Hardswish()
        self.proj = norm(heads * self.value_dim, dim, use_conv)
        self.bias = AttentionBias(heads, resolution)

    def forward(self, x):
        split = [self.key_dim, self.key_dim, self.value_dim]
        if self.use_conv:
            b, _, h, w = x.shape
            q, k, v = self.qkv(x).view(b, self.heads, -1, h * w).split(split, dim=2)  # (B, heads, d, N)
            attn = (q.transpose(-2, -1) @ k) * self.key_dim ** -0.5 + self.bias()
            out = (v @ attn.softmax(dim=-1).transpose(-2, -1)).view(b, -1, h, w)
        else:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).view(b, n, self.heads, -1).split(split, dim=3)  # (B, N, heads, d)
            q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
            attn = (q @ k) * self.key_dim ** -0.5 + self.bias()
            out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.act(out))


class Subsample(nn.Module):
    """Every `stride`-th token of every `stride`-th row of a [B, H*W, C] token grid."""

    def __init__(self, resolution: int, stride: int):
        super().__init__()
        self.resolution, self.stride = resolution, stride

    def forward(self, x):
        b, _, c = x.shape
        grid = x.view(b, self.resolution, self.resolution, c)[:, ::self.stride, ::self.stride]
        return grid.reshape(b, -1, c)


class AttentionSubsample(nn.Module):
    """LeViT's shrinking attention: keys/values from all tokens, queries from the subsampled ones."""

    def __init__(self, dim: int, out_dim: int, key_dim: int, heads: int, value_ratio: int, resolution: int,
                 use_conv: bool, stride: int = 2):
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_ratio * key_dim
        self.use_conv = use_conv
        self.resolution_out = (resolution - 1) // stride + 1
        self.kv = norm(dim, heads * (key_dim + self.value_dim), use_conv)
        self.subsample = nn.AvgPool2d(1, stride) if use_conv else Subsample(resolution, stride)
        self.q = norm(dim, heads * key_dim, use_conv)
        self.act = nn.Hardswish()
        self.proj = norm(heads * self.value_dim, out_dim, use_conv)
        self.bias = AttentionBias(heads, resolution, stride)

    def forward(self, x):
        split = [self.key_dim, self.value_dim]
        if self.use_conv:
            b, _, h, w = x.shape
            k, v = self.kv(x).view(b, self.heads, -1, h * w).split(split, dim=2)
            q = self.q(self.subsample(x)).view(b, self.heads, self.key_dim, -1)
            attn = (q.transpose(-2, -1) @ k) * self.key_dim ** -0.5 + self.bias()
            r = self.resolution_out
            out = (v @ attn.softmax(dim=-1).transpose(-2, -1)).reshape(b, -1, r, r)
        else:
            b, n, _ = x.shape
            k, v = self.kv(x).view(b, n, self.heads, -1).split(split, dim=3)
            k, v = k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
            q = self.q(self.subsample(x)).view(b, -1, self.heads, self.key_dim).permute(0, 2, 1, 3)
            attn = (q @ k) * self.key_dim ** -0.5 + self.bias()
            out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, -1, self.heads * self.value_dim)
        return self.proj(self.act(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: int, use_conv: bool):
        super().__init__()
        self.fc1 = norm(dim, ratio * dim, use_conv)
        self.act = nn.Hardswish()
        self.fc2 = norm(ratio * dim, dim, use_conv)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, key_dim: int, heads: int, resolution: int, use_conv: bool):
        super().__init__()
        self.attn = Attention(dim, key_dim, heads, 2, resolution, use_conv)
        self.mlp = Mlp(dim, 2, use_conv)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Shrink(nn.Module):
    """Between stages: subsample attention (no residual: the shape changes), then a residual MLP."""

    def __init__(self, dim: int, out_dim: int, key_dim: int, resolution: int, use_conv: bool):
        super().__init__()
        self.attn = AttentionSubsample(dim, out_dim, key_dim, dim // key_dim, 2, resolution, use_conv)
        self.mlp = Mlp(out_dim, 2, use_conv)

    def forward(self, x):
        x = self.attn(x)
        return x + self.mlp(x)


class BNLinear(nn.Module):
    """A classifier head: BatchNorm1d, then Linear."""

    def __init__(self, cin: int, classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.linear = nn.Linear(cin, classes)

    def forward(self, x):
        return self.linear(self.bn(x))

    @torch.no_grad()
    def weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = bn_scale_shift(self.bn)
        return self.linear.weight * scale[None, :], self.linear.bias + self.linear.weight @ shift


class LeViT(nn.Module):
    """Stem (two 3x3 stride-2 Conv-BN with Hardswish), a stage of LeViT blocks, subsample
    attention, a second stage, and the distilled head. For a 16x16 input: 4x4 then 2x2 tokens."""

    def __init__(self, widths=(16, 24), key_dim: int = 4, heads=(2, 3), depths=(2, 1), image: int = 16,
                 classes: int = 10, use_conv: bool = False):
        super().__init__()
        self.use_conv = use_conv
        c0, c1 = widths
        self.stem = nn.Sequential(ConvBN(3, c0 // 2, 3, 2), nn.Hardswish(), ConvBN(c0 // 2, c0, 3, 2))
        r0 = image // 4
        r1 = (r0 - 1) // 2 + 1
        self.stage1 = nn.Sequential(*[Block(c0, key_dim, heads[0], r0, use_conv) for _ in range(depths[0])])
        self.shrink = Shrink(c0, c1, key_dim, r0, use_conv)
        self.stage2 = nn.Sequential(*[Block(c1, key_dim, heads[1], r1, use_conv) for _ in range(depths[1])])
        self.head = BNLinear(c1, classes)
        self.head_dist = BNLinear(c1, classes)

    def features(self, x):
        x = self.stem(x)
        if not self.use_conv:
            x = x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> tokens [B, H*W, C]
        x = self.stage2(self.shrink(self.stage1(x)))
        return x.mean((2, 3)) if self.use_conv else x.mean(1)

    def forward(self, x):
        x = self.features(x)
        return (self.head(x) + self.head_dist(x)) / 2

    @torch.no_grad()
    def deploy(self) -> nn.Module:
        """LeViT's fuse: LinearBN -> Linear, Conv-BN -> Conv, the two heads -> one Linear."""
        net = copy.deepcopy(self)

        def convert(module: nn.Module) -> None:
            for name, child in list(module.named_children()):
                if isinstance(child, (LinearBN, ConvBN)):
                    setattr(module, name, child.deploy())
                elif not isinstance(child, BNLinear):
                    convert(child)

        convert(net)
        (w1, b1), (w2, b2) = self.head.weight_bias(), self.head_dist.weight_bias()
        return DeployedLeViT(net, (w1 + w2) / 2, (b1 + b2) / 2).eval()


class DeployedLeViT(nn.Module):
    def __init__(self, net: LeViT, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.net = net
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        del self.net.head, self.net.head_dist

    def forward(self, x):
        return self.head(self.net.features(x))
