"""PyTorch references with transposed convolutions, each with its deploy form.

A segmentation head upsamples with stride-2 ConvTranspose2d -> BN -> ReLU steps (FCN/UNet-style
decoders, keypoint heads, mask prototypes); a parallel-branch upsampler trains a 4x4, a 2x2
and a 1x1 transposed conv of one input side by side, each followed by BN, and deploys as one
4x4. deploy() computes the usual conversion in PyTorch: fold BN into the transposed conv
(its output channel o of group g is weight[g*Cin/groups:(g+1)*Cin/groups, o % (Cout/groups)]),
zero-pad smaller kernels to where their padding puts them, sum.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def fold_transposed(convt: nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(convt(x)) as one transposed conv's (weight, bias)."""
    w = convt.weight
    cin, per_group = w.shape[:2]
    g = convt.groups
    s = bn.weight / (bn.running_var + bn.eps).sqrt()
    b = convt.bias if convt.bias is not None else torch.zeros(per_group * g)
    scaled = w.reshape(g, cin // g, per_group, *w.shape[2:]) * s.reshape(g, 1, per_group, 1, 1)
    return scaled.reshape(w.shape), (b - bn.running_mean) * s + bn.bias


def transposed_like(convt: nn.ConvTranspose2d, weight, bias, **overrides) -> nn.ConvTranspose2d:
    args = dict(stride=convt.stride, padding=convt.padding, output_padding=convt.output_padding,
                groups=convt.groups, dilation=convt.dilation)
    args.update(overrides)
    out = nn.ConvTranspose2d(convt.in_channels, convt.out_channels, tuple(weight.shape[2:]), bias=True, **args)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out


class UpBlock(nn.Module):
    """ConvTranspose2d(bias=False) -> BN -> ReLU: one upsampling step of a decoder."""

    def __init__(self, cin, cout, k=2, stride=2, padding=0, output_padding=0, groups=1, dilation=1):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, k, stride, padding, output_padding, groups=groups, bias=False,
                                     dilation=dilation)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.up(x)))

    @torch.no_grad()
    def deploy(self):
        return nn.Sequential(transposed_like(self.up, *fold_transposed(self.up, self.bn)), nn.ReLU())


class ConvBNReLU(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

    @torch.no_grad()
    def deploy(self):
        s = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, 3, self.conv.stride, 1)
        conv.weight.copy_(self.conv.weight * s.reshape(-1, 1, 1, 1))
        conv.bias.copy_(self.bn.bias - self.bn.running_mean * s)
        return nn.Sequential(conv, nn.ReLU())


class SegmentationHead(nn.Module):
    """Encoder of two stride-2 conv-BN-ReLU, then a decoder of stride-2 transposed-conv-BN-ReLU
    steps: dense 2x2, grouped 4x4 (pad 1), depthwise 3x3 (pad 1, output_padding 1), and a dense
    3x3 dilated 2 (pad 2, output_padding 1); a 1x1 classifier per pixel."""

    def __init__(self, cin=3, c=16, classes=5):
        super().__init__()
        self.encoder = nn.Sequential(ConvBNReLU(cin, c, 2), ConvBNReLU(c, 2 * c, 2))
        self.decoder = nn.Sequential(
            UpBlock(2 * c, c, k=2),
            UpBlock(c, c, k=4, padding=1, groups=4),
            UpBlock(c, c, k=3, padding=1, output_padding=1, groups=c),
            UpBlock(c, c // 2, k=3, padding=2, output_padding=1, dilation=2))
        self.classifier = nn.Conv2d(c // 2, classes, 1)

    def forward(self, x):
        return self.classifier(self.decoder(self.encoder(x)))

    @torch.no_grad()
    def deploy(self):
        net = copy.deepcopy(self)
        net.encoder = nn.Sequential(*[b.deploy() for b in self.encoder])
        net.decoder = nn.Sequential(*[b.deploy() for b in self.decoder])
        return net.eval()


class ParallelUpsampler(nn.Module):
    """BN(convT4x4 s2 p1(x)) + BN(convT2x2 s2(x)) + BN(convT1x1 s2 output_padding 1(x)), ReLU.

    All three double the size: the 2x2 (pad 0) sits at offset 1 in the 4x4 (pad 1), the 1x1
    at offset 1 too (its output_padding is the 4x4's extra end tap)."""

    def __init__(self, cin, cout, groups=1):
        super().__init__()
        self.large = nn.ConvTranspose2d(cin, cout, 4, 2, 1, groups=groups, bias=False)
        self.small = nn.ConvTranspose2d(cin, cout, 2, 2, 0, groups=groups, bias=False)
        self.point = nn.ConvTranspose2d(cin, cout, 1, 2, 0, output_padding=1, groups=groups, bias=False)
        self.bn_large, self.bn_small, self.bn_point = nn.BatchNorm2d(cout), nn.BatchNorm2d(cout), nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn_large(self.large(x)) + self.bn_small(self.small(x)) + self.bn_point(self.point(x)))

    @torch.no_grad()
    def deploy(self):
        w4, b4 = fold_transposed(self.large, self.bn_large)
        w2, b2 = fold_transposed(self.small, self.bn_small)
        w1, b1 = fold_transposed(self.point, self.bn_point)
        # offset = (pad of the 4x4 - own pad) = 1 on each axis
        weight = w4 + F.pad(w2, [1, 1, 1, 1]) + F.pad(w1, [1, 2, 1, 2])
        return nn.Sequential(transposed_like(self.large, weight, b4 + b2 + b1), nn.ReLU())


class UpsamplerNet(nn.Module):
    """stem conv -> parallel upsamplers (dense, grouped, depthwise) -> 1x1 head."""

    def __init__(self, cin=3, c=8):
        super().__init__()
        self.stem = nn.Conv2d(cin, c, 3, 2, 1)
        self.ups = nn.Sequential(ParallelUpsampler(c, c), ParallelUpsampler(c, c, groups=2),
                                 ParallelUpsampler(c, c, groups=c))
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.head(self.ups(self.stem(x)))

    @torch.no_grad()
    def deploy(self):
        net = copy.deepcopy(self)
        net.ups = nn.Sequential(*[u.deploy() for u in self.ups])
        return net.eval()
