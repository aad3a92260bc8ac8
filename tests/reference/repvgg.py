"""A PyTorch RepVGG written from the paper (Ding et al., CVPR 2021), with its deploy conversion.

Used by the tests and by models/make_models.py. The deploy conversion is the
authors' algorithm, written out here: fold each BN into its conv, pad the 1x1 kernel
to 3x3, write the identity BN as a 3x3 kernel with a 1 at the centre, sum.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k, stride, padding, groups, dilation=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale.reshape(-1, 1, 1, 1), (bias - bn.running_mean) * scale + bn.bias


class RepVGGBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN + identity BN (when shapes allow), summed, then ReLU.

    order: the order in which branches are summed, a permutation of "d1i"
    (d = 3x3 dense, 1 = 1x1, i = identity), to cover the Add trees seen in the wild.
    """

    def __init__(self, cin, cout, stride=1, groups=1, order="d1i", use_identity=True, activation=True):
        super().__init__()
        self.cin, self.cout, self.stride, self.groups = cin, cout, stride, groups
        self.order = order
        self.deployed = False
        self.rbr_dense = ConvBN(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = ConvBN(cin, cout, 1, stride, 0, groups)
        self.rbr_identity = nn.BatchNorm2d(cin) if use_identity and cin == cout and stride == 1 else None
        self.act = nn.ReLU() if activation else nn.Identity()

    def forward(self, x):
        if self.deployed:
            return self.act(self.rbr_reparam(x))
        parts = {"d": lambda: self.rbr_dense(x), "1": lambda: self.rbr_1x1(x),
                 "i": lambda: self.rbr_identity(x) if self.rbr_identity is not None else None}
        out = None
        for key in self.order:
            term = parts[key]()
            if term is not None:
                out = term if out is None else out + term
        return self.act(out)

    def equivalent_kernel_bias(self):
        k3, b3 = fuse_conv_bn(self.rbr_dense.conv, self.rbr_dense.bn)
        k1, b1 = fuse_conv_bn(self.rbr_1x1.conv, self.rbr_1x1.bn)
        kernel = k3 + nn.functional.pad(k1, [1, 1, 1, 1])
        bias = b3 + b1
        if self.rbr_identity is not None:
            in_per_group = self.cin // self.groups
            ident = torch.zeros(self.cin, in_per_group, 3, 3)
            for i in range(self.cin):
                ident[i, i % in_per_group, 1, 1] = 1.0
            bn = self.rbr_identity
            scale = bn.weight / (bn.running_var + bn.eps).sqrt()
            kernel = kernel + ident * scale.reshape(-1, 1, 1, 1)
            bias = bias + bn.bias - bn.running_mean * scale
        return kernel, bias

    @torch.no_grad()
    def switch_to_deploy(self):
        kernel, bias = self.equivalent_kernel_bias()
        self.rbr_reparam = nn.Conv2d(self.cin, self.cout, 3, self.stride, 1, groups=self.groups, bias=True)
        self.rbr_reparam.weight.copy_(kernel)
        self.rbr_reparam.bias.copy_(bias)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
        self.deployed = True


class RepVGG(nn.Module):
    """RepVGG: a stem block, then stages of blocks whose first block has stride 2."""

    def __init__(self, num_blocks=(2, 4, 14, 1), widths=(48, 48, 96, 192, 1280), num_classes=10,
                 group_layers=(), groups=1, in_channels=3, order="d1i"):
        super().__init__()
        self.stage0 = RepVGGBlock(in_channels, widths[0], stride=2, order=order)
        layer = 1
        stages = []
        cin = widths[0]
        for n, cout in zip(num_blocks, widths[1:]):
            blocks = []
            for i in range(n):
                g = groups if layer in group_layers else 1
                blocks.append(RepVGGBlock(cin, cout, stride=2 if i == 0 else 1, groups=g, order=order))
                cin = cout
                layer += 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stages(self.stage0(x))
        return self.linear(torch.flatten(self.gap(x), 1))


def repvgg_a0_tiny(**kw) -> RepVGG:
    """RepVGG-A0's depth (2, 4, 14, 1) at a width small enough to ship in the repo."""
    return RepVGG(num_blocks=(2, 4, 14, 1), widths=(16, 16, 32, 48, 256), **kw)


def repvgg_tiny_grouped(groups=4, **kw) -> RepVGG:
    """RepVGG-B-style groupwise layers (every other layer, as in B1g4) at a small width."""
    return RepVGG(num_blocks=(2, 3, 4, 1), widths=(16, 16, 32, 64, 128),
                  group_layers=tuple(range(2, 27, 2)), groups=groups, **kw)


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random statistics and affine parameters, as a trained model has.

    With fresh BN (mean 0, var 1, gamma 1, beta 0) a fusion that ignores BN still passes.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
            m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.copy_(torch.rand(c, generator=gen) * 2 - 1)
    return model.eval()


def deploy_copy(model: nn.Module) -> nn.Module:
    """The authors' conversion: a copy with every RepVGGBlock switched to deploy form."""
    deployed = copy.deepcopy(model)
    for m in deployed.modules():
        if isinstance(m, RepVGGBlock):
            m.switch_to_deploy()
    return deployed.eval()
