"""PyTorch reference blocks of the re-parameterization family, each with its deploy form.

Written from the papers (MobileOne, RepViT, QARepVGG/YOLOv6, FastViT, YOLOv10, RepLKNet,
ACNet, PP-LCNetV2, ultralytics RepConv, RepGhost). Every block's `deploy()` returns the
authors' single-conv form, computed with the usual algebra: fold BN into its conv,
centre-pad smaller kernels, write identities as a centred 1, sum.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean(x))))): a nonlinear block after the sum."""

    def __init__(self, c, ratio=0.25):
        super().__init__()
        hidden = max(1, int(c * ratio))
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, groups=1, padding=None, bias=False):
        super().__init__()
        kh, kw = (k, k) if isinstance(k, int) else k
        padding = (kh // 2, kw // 2) if padding is None else padding
        self.conv = nn.Conv2d(cin, cout, (kh, kw), stride, padding, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)

    def kernel_bias(self):
        return fold(self.conv, self.bn)

    @torch.no_grad()
    def deploy(self):
        """Conv2d_BN.fuse() of RepViT/LeViT: the BN folded into the conv."""
        c = self.conv
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, groups=c.groups, bias=True)
        w, b = self.kernel_bias()
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        return conv


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None):
    w = conv.weight
    b = conv.bias if conv.bias is not None else torch.zeros(w.shape[0])
    if bn is None:
        return w, b
    s = bn.weight / (bn.running_var + bn.eps).sqrt()
    return w * s.reshape(-1, 1, 1, 1), (b - bn.running_mean) * s + bn.bias


def identity_kernel_bias(channels, groups, bn: nn.BatchNorm2d | None = None):
    k = torch.zeros(channels, channels // groups, 1, 1)
    for i in range(channels):
        k[i, i % (channels // groups), 0, 0] = 1.0
    if bn is None:
        return k, torch.zeros(channels)
    s = bn.weight / (bn.running_var + bn.eps).sqrt()
    return k * s.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * s


def pad_to(k: torch.Tensor, size) -> torch.Tensor:
    kh, kw = size
    dh, dw = kh - k.shape[2], kw - k.shape[3]
    return F.pad(k, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])


def conv_from(kernels_biases, cin, cout, stride=1, groups=1):
    """One Conv2d from centre-aligned (kernel, bias) pairs."""
    size = (max(k.shape[2] for k, _ in kernels_biases), max(k.shape[3] for k, _ in kernels_biases))
    weight = sum(pad_to(k, size) for k, _ in kernels_biases)
    bias = sum(b for _, b in kernels_biases)
    conv = nn.Conv2d(cin, cout, size, stride, (size[0] // 2, size[1] // 2), groups=groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    with torch.no_grad():
        w, b = fold(conv, bn)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    return conv


class Deployed(nn.Module):
    def __init__(self, conv, act=None):
        super().__init__()
        self.conv, self.act = conv, act or nn.Identity()

    def forward(self, x):
        return self.act(self.conv(x))


class MobileOneBlock(nn.Module):
    """N parallel kxk conv-BN + 1x1 'scale' conv-BN (k > 1) + identity BN, then act."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, num_branches=3, act=True, use_scale=True, se=False):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = cin, cout, k, stride, groups
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.scale = ConvBN(cin, cout, 1, stride, groups) if k > 1 and use_scale else None
        self.convs = nn.ModuleList([ConvBN(cin, cout, k, stride, groups) for _ in range(num_branches)])
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        out = 0
        if self.skip is not None:
            out = self.skip(x)
        if self.scale is not None:
            out = out + self.scale(x)
        for c in self.convs:
            out = out + c(x)
        return self.act(self.se(out))

    def kernel_bias_list(self):
        kb = [c.kernel_bias() for c in self.convs]
        if self.scale is not None:
            kb.append(self.scale.kernel_bias())
        if self.skip is not None:
            kb.append(identity_kernel_bias(self.cin, self.groups, self.skip))
        return kb

    def deploy(self):
        conv = conv_from(self.kernel_bias_list(), self.cin, self.cout, self.stride, self.groups)
        return Deployed(conv, nn.Sequential(self.se, self.act))


class RepVggDw(nn.Module):
    """RepViT token mixer: BN(dw3x3-BN(x) + dw1x1(x) + x)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.conv = ConvBN(c, c, 3, groups=c)
        self.conv1 = nn.Conv2d(c, c, 1, groups=c, bias=True)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)

    def deploy(self):
        conv = conv_from([self.conv.kernel_bias(), fold(self.conv1), identity_kernel_bias(self.c, self.c)],
                         self.c, self.c, groups=self.c)
        return Deployed(bn_after(conv, self.bn))


class QARepVGGBlock(nn.Module):
    """QARepVGG (YOLOv6 v3): ReLU(BN(3x3-BN(x) + 1x1(x) + x)), 1x1 without BN or bias."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.dense = ConvBN(c, c, 3)
        self.one = nn.Conv2d(c, c, 1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.dense(x) + self.one(x) + x))

    def deploy(self):
        conv = conv_from([self.dense.kernel_bias(), fold(self.one), identity_kernel_bias(self.c, 1)], self.c, self.c)
        return Deployed(bn_after(conv, self.bn), nn.ReLU())


class QARepVGGBlockV2(nn.Module):
    """YOLOv6 QARepVGGBlockV2: ReLU(BN(3x3-BN(x) + 1x1(x) + x + AvgPool3x3(x))), count_include_pad on."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.dense = ConvBN(c, c, 3)
        self.one = nn.Conv2d(c, c, 1, bias=False)
        self.avg = nn.AvgPool2d(3, 1, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.dense(x) + self.one(x) + x + self.avg(x)))

    def deploy(self):
        avg = torch.zeros(self.c, self.c, 3, 3)
        for i in range(self.c):
            avg[i, i] = 1.0 / 9
        kb = [self.dense.kernel_bias(), fold(self.one), identity_kernel_bias(self.c, 1), (avg, torch.zeros(self.c))]
        return Deployed(bn_after(conv_from(kb, self.c, self.c), self.bn), nn.ReLU())


class YoloV6RepVGGBlock(nn.Module):
    """YOLOv6 RepVGGBlock: id_out is the int 0 when there is no identity branch."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.dense = ConvBN(cin, cout, 3, stride)
        self.one = ConvBN(cin, cout, 1, stride, padding=0)

    def forward(self, x):
        id_out = 0 if self.identity is None else self.identity(x)
        return torch.relu(self.dense(x) + self.one(x) + id_out)

    def deploy(self):
        kb = [self.dense.kernel_bias(), self.one.kernel_bias()]
        if self.identity is not None:
            kb.append(identity_kernel_bias(self.cin, 1, self.identity))
        return Deployed(conv_from(kb, self.cin, self.cout, self.stride), nn.ReLU())


class RepMixer(nn.Module):
    """FastViT RepMixer: x + layer_scale * (mixer(x) - norm(x)), mixer/norm depthwise MobileOne."""

    def __init__(self, c, k=3):
        super().__init__()
        self.c = c
        self.mixer = MobileOneBlock(c, c, k, groups=c, num_branches=1, act=False)
        self.norm = MobileOneBlock(c, c, k, groups=c, num_branches=0, act=False, use_scale=False)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    def deploy(self):
        ls = self.layer_scale.reshape(-1)
        kb = [identity_kernel_bias(self.c, self.c)]
        kb += [(k * ls.reshape(-1, 1, 1, 1), b * ls) for k, b in self.mixer.kernel_bias_list()]
        kb += [(-k * ls.reshape(-1, 1, 1, 1), -b * ls) for k, b in self.norm.kernel_bias_list()]
        return Deployed(conv_from(kb, self.c, self.c, groups=self.c))


class RepCPE(nn.Module):
    """FastViT conditional positional encoding: x + dw7x7(x) with bias."""

    def __init__(self, c, k=7):
        super().__init__()
        self.c = c
        self.pe = nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=True)

    def forward(self, x):
        return x + self.pe(x)

    def deploy(self):
        return Deployed(conv_from([fold(self.pe), identity_kernel_bias(self.c, self.c)], self.c, self.c, groups=self.c))


class LargeSmallDw(nn.Module):
    """Large + small parallel depthwise conv-BN: RepLKNet (13 + 5), YOLOv10 RepVGGDW (7 + 3)."""

    def __init__(self, c, large=13, small=5, act=False):
        super().__init__()
        self.c = c
        self.large = ConvBN(c, c, large, groups=c)
        self.small = ConvBN(c, c, small, groups=c)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.large(x) + self.small(x))

    def deploy(self):
        return Deployed(conv_from([self.large.kernel_bias(), self.small.kernel_bias()], self.c, self.c,
                                  groups=self.c), self.act)


class DilatedReparam(nn.Module):
    """UniRepLKNet's Dilated Reparam Block: a large depthwise conv-BN beside smaller depthwise
    conv-BNs of growing dilation, each padded to keep the size ((k-1)*r + 1 <= large)."""

    BRANCHES = {7: ((5, 1), (3, 2), (3, 3)), 9: ((5, 1), (5, 2), (3, 3), (3, 4))}

    def __init__(self, c, large=7):
        super().__init__()
        self.c = c
        self.large = ConvBN(c, c, large, groups=c)
        self.dilated = nn.ModuleList()
        self.rates = []
        for k, r in self.BRANCHES[large]:
            branch = ConvBN(c, c, k, groups=c, padding=r * (k - 1) // 2)
            branch.conv.dilation = (r, r)
            self.dilated.append(branch)
            self.rates.append(r)

    def forward(self, x):
        out = self.large(x)
        for branch in self.dilated:
            out = out + branch(x)
        return out

    def deploy(self):
        """merge_dilated_into_large_kernel: each dilated kernel with r-1 zeros between taps."""
        parts = [self.large.kernel_bias()]
        for branch, r in zip(self.dilated, self.rates):
            w, b = branch.kernel_bias()
            k = w.shape[2]
            dense = torch.zeros(w.shape[0], w.shape[1], (k - 1) * r + 1, (k - 1) * r + 1)
            dense[:, :, ::r, ::r] = w
            parts.append((dense, b))
        return Deployed(conv_from(parts, self.c, self.c, groups=self.c))


class ACBlock(nn.Module):
    """ACNet: 3x3-BN + 1x3-BN + 3x1-BN."""

    def __init__(self, cin, cout):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.square = ConvBN(cin, cout, 3)
        self.hor = ConvBN(cin, cout, (1, 3))
        self.ver = ConvBN(cin, cout, (3, 1))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)

    def deploy(self):
        kb = [self.square.kernel_bias(), self.hor.kernel_bias(), self.ver.kernel_bias()]
        return Deployed(conv_from(kb, self.cin, self.cout))


class RepDepthwise(nn.Module):
    """PP-LCNetV2 RepDepthwiseSeparable's dw part: dw 5x5 + 3x3 + 1x1 conv-BN + identity BN."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.branches = nn.ModuleList([ConvBN(c, c, k, groups=c) for k in (5, 3, 1)])
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.identity(x)
        for b in self.branches:
            out = out + b(x)
        return out

    def deploy(self):
        kb = [b.kernel_bias() for b in self.branches] + [identity_kernel_bias(self.c, self.c, self.identity)]
        return Deployed(conv_from(kb, self.c, self.c, groups=self.c))


class UltralyticsRepConv(nn.Module):
    """ultralytics RepConv: SiLU(BN(x) + 3x3-BN(x) + 1x1-BN(x))."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.bn = nn.BatchNorm2d(c)
        self.conv1 = ConvBN(c, c, 3)
        self.conv2 = ConvBN(c, c, 1, padding=0)

    def forward(self, x):
        return F.silu(self.bn(x) + self.conv1(x) + self.conv2(x))

    def deploy(self):
        kb = [self.conv1.kernel_bias(), self.conv2.kernel_bias(), identity_kernel_bias(self.c, 1, self.bn)]
        return Deployed(conv_from(kb, self.c, self.c), nn.SiLU())


class RepGhostCheap(nn.Module):
    """RepGhost: dw3x3-BN(x) + BN(x) (the fusion BN re-parameterizes the ghost concat)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.cheap = ConvBN(c, c, 3, groups=c)
        self.fusion_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.cheap(x) + self.fusion_bn(x))

    def deploy(self):
        return Deployed(conv_from([self.cheap.kernel_bias(), identity_kernel_bias(self.c, self.c, self.fusion_bn)],
                                  self.c, self.c, groups=self.c), nn.ReLU())


class Net(nn.Module):
    """stem conv -> blocks (with GELU between) -> head, so blocks see real activations."""

    def __init__(self, blocks, cin=3, c=8):
        super().__init__()
        self.stem = nn.Conv2d(cin, c, 3, 1, 1)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = F.gelu(b(x))
        return x.mean((2, 3))

    @torch.no_grad()
    def deploy(self):
        import copy
        net = copy.deepcopy(self)
        net.blocks = nn.ModuleList([b.deploy() for b in net.blocks])
        return net.eval()


class NormLinear(nn.Module):
    """BatchNorm1d -> Linear, as in RepViT/LeViT classifier heads."""

    def __init__(self, cin, cout):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.l = nn.Linear(cin, cout)

    def forward(self, x):
        return self.l(self.bn(x))

    def fused(self):
        s = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        h = self.bn.bias - self.bn.running_mean * s
        return self.l.weight * s[None, :], self.l.bias + self.l.weight @ h


class DistilledClassifier(nn.Module):
    """RepViT classifier at inference: (head(x) + head_dist(x)) / 2, each a NormLinear."""

    def __init__(self, c=8, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 2, 1)
        self.head = NormLinear(c, classes)
        self.head_dist = NormLinear(c, classes)

    def forward(self, x):
        x = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.stem(x)), 1), 1)
        return (self.head(x) + self.head_dist(x)) / 2

    @torch.no_grad()
    def deploy(self):
        import copy
        net = copy.deepcopy(self)
        (w1, b1), (w2, b2) = self.head.fused(), self.head_dist.fused()
        linear = nn.Linear(w1.shape[1], w1.shape[0])
        linear.weight.copy_((w1 + w2) / 2)
        linear.bias.copy_((b1 + b2) / 2)

        class Deploy(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem, self.linear = net.stem, linear

            def forward(self, x):
                return self.linear(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.stem(x)), 1), 1))
        return Deploy().eval()



def deploy_net(net: nn.Module) -> nn.Module:
    """The authors' conversion of a whole net: every sub-block with deploy() is replaced by it."""
    import copy

    net = copy.deepcopy(net)

    def convert(module):
        for name, child in list(module.named_children()):
            if hasattr(child, "deploy"):
                setattr(module, name, child.deploy())
            else:
                convert(child)

    with torch.no_grad():
        convert(net)
    return net.eval()


class MobileOneS0Like(nn.Module):
    """MobileOne-S0's layout at small width: stem, stages of (dw kxk, pw 1x1) MobileOne pairs
    with stride 2 at each stage's start, SE after the sum in the last stage, ReLU, linear head."""

    def __init__(self, widths=(16, 24, 32), depths=(2, 2, 2), branches=4, classes=10):
        super().__init__()
        self.stem = MobileOneBlock(3, widths[0], 3, stride=2, num_branches=1)
        blocks, cin = [], widths[0]
        for stage, (cout, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                stride = 2 if i == 0 else 1
                se = stage == len(widths) - 1
                blocks += [MobileOneBlock(cin, cin, 3, stride, groups=cin, num_branches=branches, se=se),
                           MobileOneBlock(cin, cout, 1, 1, num_branches=branches, se=se)]
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    def deploy(self):
        return deploy_net(self)


class RepViTBlock(nn.Module):
    """RepViT block: token mixer RepVggDw (+ SE), then a residual 1x1 conv-BN MLP with GELU."""

    def __init__(self, c, se=False):
        super().__init__()
        self.token_mixer = RepVggDw(c)
        self.se = SqueezeExcite(c) if se else nn.Identity()
        self.mlp = nn.Sequential(ConvBN(c, 2 * c, 1, padding=0), nn.GELU(), ConvBN(2 * c, c, 1, padding=0))

    def forward(self, x):
        x = self.se(self.token_mixer(x))
        return x + self.mlp(x)


class RepViTLike(nn.Module):
    """RepViT's layout at small width: conv-BN stem with GELU, RepViT blocks, a downsample
    (block, dw 3x3 s2 conv-BN, pw conv-BN, residual MLP), and the distilled NormLinear head."""

    def __init__(self, widths=(16, 32), classes=10):
        super().__init__()
        c0, c1 = widths
        self.stem = nn.Sequential(ConvBN(3, c0 // 2, 3, 2), nn.GELU(), ConvBN(c0 // 2, c0, 3, 2))
        self.stage1 = nn.Sequential(RepViTBlock(c0, se=True), RepViTBlock(c0))
        self.down = nn.Sequential(RepViTBlock(c0), ConvBN(c0, c0, 3, 2, groups=c0), ConvBN(c0, c1, 1, padding=0))
        self.down_mlp = nn.Sequential(ConvBN(c1, 2 * c1, 1, padding=0), nn.GELU(), ConvBN(2 * c1, c1, 1, padding=0))
        self.stage2 = nn.Sequential(RepViTBlock(c1, se=True), RepViTBlock(c1))
        self.head = NormLinear(c1, classes)
        self.head_dist = NormLinear(c1, classes)

    def forward(self, x):
        x = self.down(self.stage1(self.stem(x)))
        x = self.stage2(x + self.down_mlp(x))
        x = x.mean((2, 3))
        return (self.head(x) + self.head_dist(x)) / 2

    @torch.no_grad()
    def deploy(self):
        net = deploy_net(self)
        (w1, b1), (w2, b2) = self.head.fused(), self.head_dist.fused()
        linear = nn.Linear(w1.shape[1], w1.shape[0])
        linear.weight.copy_((w1 + w2) / 2)
        linear.bias.copy_((b1 + b2) / 2)
        net.head, net.head_dist = linear, None

        def forward(x):
            x = net.down(net.stage1(net.stem(x)))
            x = net.stage2(x + net.down_mlp(x))
            return net.head(x.mean((2, 3)))
        net.forward = forward
        return net


class GhostModuleV3(nn.Module):
    """GhostNetV3's re-parameterized ghost module: primary = (N kxk conv-BN + 1x1 conv-BN + BN(x)),
    ReLU; cheap = depthwise (N 3x3 conv-BN + BN) on the primary output; concat."""

    def __init__(self, cin, cout, branches=3):
        super().__init__()
        init = cout // 2
        self.primary = MobileOneBlock(cin, init, 1, num_branches=branches)
        self.cheap = MobileOneBlock(init, cout - init, 3, groups=init, num_branches=branches)

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)

    def deploy(self):
        return deploy_net(self)


class BNAndPad(nn.Module):
    """DBB's BN that pads its output with its own value at a zero input (the BN shift)."""

    def __init__(self, c, pad):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.pad = pad

    def forward(self, x):
        out = self.bn(x)
        if self.pad > 0:
            bn = self.bn
            pad_values = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
            out = F.pad(out, [self.pad] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            out[:, :, 0:self.pad, :] = pad_values
            out[:, :, -self.pad:, :] = pad_values
            out[:, :, :, 0:self.pad] = pad_values
            out[:, :, :, -self.pad:] = pad_values
        return out


class DiverseBranchBlock(nn.Module):
    """DBB (Ding et al., CVPR 2021): kxk-BN + 1x1-BN + (1x1 -> BNAndPad -> AvgPool -> BN)
    + (1x1 (identity-initialized) -> BNAndPad -> kxk -> BN), then ReLU."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = cin, cout, k, stride, groups
        p = k // 2
        self.origin = ConvBN(cin, cout, k, stride, groups)
        self.one = ConvBN(cin, cout, 1, stride, groups, padding=0)
        self.avg_conv = nn.Conv2d(cin, cout, 1, groups=groups, bias=False)
        self.avg_pad = BNAndPad(cout, p)
        self.avg = nn.AvgPool2d(k, stride, 0)
        self.avg_bn = nn.BatchNorm2d(cout)
        self.seq_conv1 = nn.Conv2d(cin, cin, 1, groups=groups, bias=False)
        self.seq_pad = BNAndPad(cin, p)
        self.seq_conv2 = nn.Conv2d(cin, cout, k, stride, 0, groups=groups, bias=False)
        self.seq_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        out = self.origin(x) + self.one(x)
        out = out + self.avg_bn(self.avg(self.avg_pad(self.avg_conv(x))))
        out = out + self.seq_bn(self.seq_conv2(self.seq_pad(self.seq_conv1(x))))
        return torch.relu(out)

    @torch.no_grad()
    def deploy(self):
        """DBB's transforms: fuse BN; 1x1 -> kxk by a per-group product; AvgPool as a kernel."""
        k, g = self.k, self.groups
        kb = [self.origin.kernel_bias(), self.one.kernel_bias()]

        def seq(w1, b1, w2, b2):  # w1 (cm, cin/g, 1, 1), w2 (cout, cm/g, k, k)
            cout, cm = w2.shape[0], w1.shape[0]
            w = torch.zeros(cout, w1.shape[1], k, k)
            b = b2.clone()
            for grp in range(g):
                o = slice(grp * cout // g, (grp + 1) * cout // g)
                m = slice(grp * cm // g, (grp + 1) * cm // g)
                w[o] = torch.einsum("omhw,mi->oihw", w2[o], w1[m, :, 0, 0])
                b[o] += torch.einsum("omhw,m->o", w2[o], b1[m])
            return w, b

        s1 = self.avg_pad.bn
        w1, b1 = fold(self.avg_conv, s1)
        avg_kernel = torch.zeros(self.cout, self.cout // g, k, k)
        for c in range(self.cout):
            avg_kernel[c, c % (self.cout // g)] = 1.0 / (k * k)
        w2, b2 = fold(nn.Conv2d(self.cout, self.cout, k, groups=g, bias=False).requires_grad_(False), self.avg_bn)
        w2 = avg_kernel * (self.avg_bn.weight / (self.avg_bn.running_var + self.avg_bn.eps).sqrt()).reshape(-1, 1, 1, 1)
        kb.append(seq(w1, b1, w2, b2))
        w1, b1 = fold(self.seq_conv1, self.seq_pad.bn)
        w2, b2 = fold(self.seq_conv2, self.seq_bn)
        kb.append(seq(w1, b1, w2, b2))
        return Deployed(conv_from(kb, self.cin, self.cout, self.stride, g), nn.ReLU())
