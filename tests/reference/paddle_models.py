"""PaddlePaddle reference blocks of the re-parameterization family, each with its deploy form.

Written from the published designs (PaddleOCR's PP-LCNetV3, PaddleDetection's PP-YOLOE
CSPRepResNet, PaddleClas's PP-LCNetV2 and PP-HGNetV2); the code is this project's own.
Needs `paddlepaddle` (not in the project's environment: see .ci/paddle-exports), so nothing
in the test suite imports it; tests/reference/export_paddle.py exports the nets with
paddle2onnx and the tests read the checked-in ONNX files.

Each net's `deploy()` applies the library's re-parameterization to a copy, with the usual
algebra: fold each BN into its conv, centre-pad smaller kernels, write an identity BN as a
kernel with a centred 1, sum (scaled by PP-YOLOE's `alpha` where there is one). Blocks the
libraries do not re-parameterize keep their train-time layers in the deploy form (the
conv-BN stems and heads), except PP-HGNetV2, which has no branch to merge and deploys with
every BN folded into its conv (what Paddle Inference's conv-BN fusion does).

`randomize(net, seed)` sets every parameter and BN statistic from a seeded numpy generator,
so that exports do not depend on paddle's own random streams.
"""

from __future__ import annotations

import copy

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

# -- shared pieces -----------------------------------------------------------------------


class Affine(nn.Layer):
    """LearnableAffineBlock: one learnable scale and one learnable bias for the whole tensor."""

    def __init__(self):
        super().__init__()
        self.scale = self.create_parameter([1], default_initializer=nn.initializer.Constant(1.0))
        self.bias = self.create_parameter([1], default_initializer=nn.initializer.Constant(0.0))

    def forward(self, x):
        return self.scale * x + self.bias


class ConvNorm(nn.Layer):
    """Conv (no bias, 'same' padding for odd kernels) then BN, then an optional activation."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act=None):
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias_attr=False)
        self.bn = nn.BatchNorm2D(cout)
        self.act = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.act(y) if self.act is not None else y


def folded(conv: nn.Conv2D, bn: nn.BatchNorm2D) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of conv -> BN, in float64."""
    w = conv.weight.numpy().astype(np.float64)
    b = np.zeros(w.shape[0]) if conv.bias is None else conv.bias.numpy().astype(np.float64)
    s = bn.weight.numpy().astype(np.float64) / np.sqrt(bn._variance.numpy().astype(np.float64) + bn._epsilon)
    return w * s.reshape(-1, 1, 1, 1), (b - bn._mean.numpy()) * s + bn.bias.numpy()


def identity_folded(bn: nn.BatchNorm2D, channels: int, groups: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of BN(x) as a kxk conv of `groups` groups: a 1 at the centre of each channel's own tap."""
    per_group = channels // groups
    kernel = np.zeros((channels, per_group, k, k))
    for c in range(channels):
        kernel[c, c % per_group, k // 2, k // 2] = 1.0
    s = bn.weight.numpy().astype(np.float64) / np.sqrt(bn._variance.numpy().astype(np.float64) + bn._epsilon)
    return kernel * s.reshape(-1, 1, 1, 1), bn.bias.numpy() - bn._mean.numpy() * s


def centre_pad(kernel: np.ndarray, k: int) -> np.ndarray:
    pad = (k - kernel.shape[-1]) // 2
    return np.pad(kernel, ((0, 0), (0, 0), (pad, pad), (pad, pad)))


def conv_with(kernel: np.ndarray, bias: np.ndarray, stride: int, groups: int) -> nn.Conv2D:
    cout, cin_per_group, k, _ = kernel.shape
    conv = nn.Conv2D(cin_per_group * groups, cout, k, stride, (k - 1) // 2, groups=groups)
    conv.weight.set_value(kernel.astype(np.float32))
    conv.bias.set_value(bias.astype(np.float32))
    return conv


def fold_convnorm(layer: ConvNorm) -> None:
    """Replace a ConvNorm's conv and BN by one biased conv, in place."""
    k, b = folded(layer.conv, layer.bn)
    conv = layer.conv
    layer.conv = conv_with(k, b, conv._stride[0], conv._groups)
    layer.bn = nn.Identity()


class Hardswish(nn.Layer):
    def forward(self, x):
        return F.hardswish(x)


class Swish(nn.Layer):
    def forward(self, x):
        return F.swish(x)


# -- PP-LCNetV3 (PaddleOCR): LearnableRepLayer with LearnableAffineBlocks ---------------------


class LearnableRepLayer(nn.Layer):
    """sum of N kxk conv-BN + a 1x1 conv-BN (k > 1) + BN(x) (same shape), started as `out = 0`,
    then a learnable affine, then (not at stride 2) hardswish and another learnable affine.

    Deploy (`rep`): one kxk conv with bias; the affine after it and the activation stay."""

    def __init__(self, cin, cout, k, stride=1, groups=1, branches=4):
        super().__init__()
        self.cin, self.cout, self.k, self.stride, self.groups = cin, cout, k, stride, groups
        self.identity = nn.BatchNorm2D(cin) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.LayerList([ConvNorm(cin, cout, k, stride, groups) for _ in range(branches)])
        self.conv_1x1 = ConvNorm(cin, cout, 1, stride, groups) if k > 1 else None
        self.lab = Affine()
        self.act = Hardswish()
        self.act_lab = Affine()
        self.reparam = None

    def forward(self, x):
        if self.reparam is not None:
            out = self.lab(self.reparam(x))
        else:
            out = 0
            if self.identity is not None:
                out += self.identity(x)
            if self.conv_1x1 is not None:
                out += self.conv_1x1(x)
            for branch in self.conv_kxk:
                out += branch(x)
            out = self.lab(out)
        if self.stride != 2:
            out = self.act_lab(self.act(out))
        return out

    def rep(self):
        kernel = np.zeros((self.cout, self.cin // self.groups, self.k, self.k))
        bias = np.zeros(self.cout)
        parts = [folded(b.conv, b.bn) for b in self.conv_kxk]
        if self.conv_1x1 is not None:
            parts.append(folded(self.conv_1x1.conv, self.conv_1x1.bn))
        if self.identity is not None:
            parts.append(identity_folded(self.identity, self.cin, self.groups, self.k))
        for k, b in parts:
            kernel += centre_pad(k, self.k)
            bias += b
        self.reparam = conv_with(kernel, bias, self.stride, self.groups)
        del self.conv_kxk
        self.conv_1x1 = self.identity = None


class SqueezeExcite(nn.Layer):
    """x * hardsigmoid(conv(relu(conv(mean(x)))))."""

    def __init__(self, c, reduction=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.conv1 = nn.Conv2D(c, c // reduction, 1)
        self.conv2 = nn.Conv2D(c // reduction, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.conv2(F.relu(self.conv1(self.pool(x)))))


class LCNetV3Block(nn.Layer):
    """Depthwise LearnableRepLayer (kxk), optional SE, pointwise LearnableRepLayer (1x1)."""

    def __init__(self, cin, cout, k, stride, se=False, branches=4):
        super().__init__()
        self.dw = LearnableRepLayer(cin, cin, k, stride, groups=cin, branches=branches)
        self.se = SqueezeExcite(cin) if se else None
        self.pw = LearnableRepLayer(cin, cout, 1, 1, branches=branches)

    def forward(self, x):
        x = self.dw(x)
        if self.se is not None:
            x = self.se(x)
        return self.pw(x)


class PPLCNetV3Like(nn.Layer):
    """conv-BN stem (stride 2), then LCNetV3 blocks: dw 3x3 at stride 1 and 2, dw 5x5 with SE."""

    def __init__(self):
        super().__init__()
        self.stem = ConvNorm(3, 8, 3, 2)
        self.blocks = nn.Sequential(LCNetV3Block(8, 16, 3, 1), LCNetV3Block(16, 16, 3, 2),
                                    LCNetV3Block(16, 16, 5, 1, se=True))

    def forward(self, x):
        return self.blocks(self.stem(x))

    def deploy(self):
        net = copy.deepcopy(self)
        for layer in net.sublayers():
            if isinstance(layer, LearnableRepLayer):
                layer.rep()
        return net


# -- PP-YOLOE (PaddleDetection): CSPRepResNet's RepVggBlock, with and without alpha -------------


class RepVggBlock(nn.Layer):
    """act(BN(conv3x3(x)) + [alpha *] BN(conv1x1(x))); deploy (`convert_to_deploy`): act(conv3x3(x))."""

    def __init__(self, cin, cout, alpha=False):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.conv1 = ConvNorm(cin, cout, 3)
        self.conv2 = ConvNorm(cin, cout, 1)
        self.act = Swish()
        self.alpha = self.create_parameter([1], default_initializer=nn.initializer.Constant(1.0)) if alpha else None
        self.conv = None

    def forward(self, x):
        if self.conv is not None:
            return self.act(self.conv(x))
        if self.alpha is not None:
            y = self.conv1(x) + self.alpha * self.conv2(x)
        else:
            y = self.conv1(x) + self.conv2(x)
        return self.act(y)

    def convert_to_deploy(self):
        k3, b3 = folded(self.conv1.conv, self.conv1.bn)
        k1, b1 = folded(self.conv2.conv, self.conv2.bn)
        a = 1.0 if self.alpha is None else float(self.alpha.numpy()[0])
        self.conv = conv_with(k3 + a * centre_pad(k1, 3), b3 + a * b1, 1, 1)
        self.conv1 = self.conv2 = None


class BasicBlock(nn.Layer):
    """x + RepVggBlock(conv-BN-act(x))."""

    def __init__(self, c, alpha):
        super().__init__()
        self.conv1 = ConvNorm(c, c, 3, act=Swish())
        self.conv2 = RepVggBlock(c, c, alpha)

    def forward(self, x):
        return paddle.add(x, self.conv2(self.conv1(x)))


class EffectiveSE(nn.Layer):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2D(c, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class CSPResStage(nn.Layer):
    """stride-2 conv-BN-act, two 1x1 halves (one through the residual blocks), concat, ESE, 1x1."""

    def __init__(self, cin, cout, n, alpha):
        super().__init__()
        mid = (cin + cout) // 2
        self.down = ConvNorm(cin, mid, 3, 2, act=Swish())
        self.conv1 = ConvNorm(mid, mid // 2, 1, act=Swish())
        self.conv2 = ConvNorm(mid, mid // 2, 1, act=Swish())
        self.blocks = nn.Sequential(*[BasicBlock(mid // 2, alpha) for _ in range(n)])
        self.attn = EffectiveSE(mid)
        self.conv3 = ConvNorm(mid, cout, 1, act=Swish())

    def forward(self, x):
        x = self.down(x)
        y = paddle.concat([self.conv1(x), self.blocks(self.conv2(x))], axis=1)
        return self.conv3(self.attn(y))


class PPYOLOELike(nn.Layer):
    """CSPRepResNet layout: two-conv stem, a stage whose RepVggBlocks have alpha, one without."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(3, 8, 3, 2, act=Swish()), ConvNorm(8, 8, 3, 1, act=Swish()))
        self.stages = nn.Sequential(CSPResStage(8, 16, 2, alpha=True), CSPResStage(16, 16, 1, alpha=False))

    def forward(self, x):
        return self.stages(self.stem(x))

    def deploy(self):
        net = copy.deepcopy(self)
        for layer in net.sublayers():
            if isinstance(layer, RepVggBlock):
                layer.convert_to_deploy()
        return net


# -- PP-LCNetV2 (PaddleClas): RepDepthwiseSeparable ------------------------------------------


class RepDepthwiseSeparable(nn.Layer):
    """relu(sum of depthwise conv-BN of kernels k, k-2, ..., 1 (no 1x1 at stride 2)), optional SE,
    pointwise conv-BN-ReLU (or two, split), optional shortcut. Deploy (`rep`): one dw kxk conv."""

    def __init__(self, cin, cout, stride, k, split_pw=False, se=False, shortcut=False):
        super().__init__()
        self.cin, self.k, self.stride = cin, k, stride
        self.shortcut = shortcut and stride == 1 and cin == cout
        self.dw_convs = nn.LayerList([ConvNorm(cin, cin, size, stride, groups=cin)
                                      for size in range(k, 0, -2) if size > 1 or stride == 1])
        self.dw_conv = None
        self.se = SqueezeExcite(cin) if se else None
        if split_pw:
            self.pw = nn.Sequential(ConvNorm(cin, cout // 2, 1, act=nn.ReLU()), ConvNorm(cout // 2, cout, 1, act=nn.ReLU()))
        else:
            self.pw = ConvNorm(cin, cout, 1, act=nn.ReLU())

    def forward(self, x):
        if self.dw_conv is not None:
            y = F.relu(self.dw_conv(x))
        else:
            s = self.dw_convs[0](x)
            for branch in self.dw_convs[1:]:
                s += branch(x)
            y = F.relu(s)
        if self.se is not None:
            y = self.se(y)
        y = self.pw(y)
        return y + x if self.shortcut else y

    def rep(self):
        kernel, bias = np.zeros((self.cin, 1, self.k, self.k)), np.zeros(self.cin)
        for branch in self.dw_convs:
            k, b = folded(branch.conv, branch.bn)
            kernel += centre_pad(k, self.k)
            bias += b
        self.dw_conv = conv_with(kernel, bias, self.stride, self.cin)
        del self.dw_convs


class PPLCNetV2Like(nn.Layer):
    """conv-BN-ReLU stem, then RepDepthwiseSeparable: dw 5x5 stride 2 with SE and split pointwise,
    dw 5x5 stride 1 with shortcut, dw 3x3."""

    def __init__(self):
        super().__init__()
        self.stem = ConvNorm(3, 8, 3, 2, act=nn.ReLU())
        self.blocks = nn.Sequential(RepDepthwiseSeparable(8, 16, 2, 5, split_pw=True, se=True),
                                    RepDepthwiseSeparable(16, 16, 1, 5, shortcut=True),
                                    RepDepthwiseSeparable(16, 16, 1, 3))

    def forward(self, x):
        return self.blocks(self.stem(x))

    def deploy(self):
        net = copy.deepcopy(self)
        for layer in net.sublayers():
            if isinstance(layer, RepDepthwiseSeparable):
                layer.rep()
        return net


# -- PP-HGNetV2 (PaddleClas): HG block with use_lab -----------------------------------------


class ConvBNAct(nn.Layer):
    """conv-BN, then (use_act) ReLU and, with use_lab, a learnable affine after it."""

    def __init__(self, cin, cout, k, stride=1, groups=1, use_act=True, use_lab=True):
        super().__init__()
        self.conv_bn = ConvNorm(cin, cout, k, stride, groups)
        self.use_act = use_act
        self.lab = Affine() if use_act and use_lab else None

    def forward(self, x):
        x = self.conv_bn(x)
        if self.use_act:
            x = F.relu(x)
            if self.lab is not None:
                x = self.lab(x)
        return x


class LightConvBNAct(nn.Layer):
    """1x1 conv-BN (no activation), then depthwise kxk ConvBNAct."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 1, use_act=False)
        self.conv2 = ConvBNAct(cout, cout, k, groups=cout)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class HGV2Block(nn.Layer):
    """layers in sequence, every output concatenated with the input, squeeze and excite 1x1s, residual."""

    def __init__(self, cin, mid, cout, layers=3, k=3, identity=False):
        super().__init__()
        self.identity = identity
        self.layers = nn.LayerList([LightConvBNAct(cin if i == 0 else mid, mid, k) for i in range(layers)])
        self.squeeze = ConvBNAct(cin + layers * mid, cout // 2, 1)
        self.excite = ConvBNAct(cout // 2, cout, 1)

    def forward(self, x):
        outputs = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        y = self.excite(self.squeeze(paddle.concat(outputs, axis=1)))
        return y + x if self.identity else y


class PPHGNetV2Like(nn.Layer):
    """ConvBNAct stem (stride 2), an HG block, a depthwise stride-2 downsample (conv-BN only), an
    HG block with identity; use_lab everywhere."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNAct(3, 8, 3, 2)
        self.block1 = HGV2Block(8, 8, 16)
        self.down = ConvBNAct(16, 16, 3, 2, groups=16, use_act=False)
        self.block2 = HGV2Block(16, 8, 16, identity=True)

    def forward(self, x):
        return self.block2(self.down(self.block1(self.stem(x))))

    def deploy(self):
        net = copy.deepcopy(self)
        for layer in net.sublayers():
            if isinstance(layer, ConvNorm):
                fold_convnorm(layer)
        return net


NETS = {
    "pplcnetv3": PPLCNetV3Like,
    "ppyoloe": PPYOLOELike,
    "pplcnetv2": PPLCNetV2Like,
    "pphgnetv2": PPHGNetV2Like,
}
INPUT_SHAPE = (3, 32, 32)  # channels, height, width; the batch stays dynamic


@paddle.no_grad()
def randomize(net: nn.Layer, seed: int) -> nn.Layer:
    """Every parameter and BN statistic from numpy's generator `seed`: conv weights
    N(0, 1/fan_in), BN gamma U(0.5, 1.5), beta and mean U(-0.5, 0.5), var U(0.5, 2), affine
    scales (and alpha) U(0.5, 1.5), affine biases U(-0.5, 0.5)."""
    rng = np.random.default_rng(seed)
    for _, layer in sorted(net.named_sublayers(include_self=True), key=lambda item: item[0]):
        if isinstance(layer, nn.BatchNorm2D):
            c = layer.weight.shape[0]
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype(np.float32))
            layer.bias.set_value(rng.uniform(-0.5, 0.5, c).astype(np.float32))
            layer._mean.set_value(rng.uniform(-0.5, 0.5, c).astype(np.float32))
            layer._variance.set_value(rng.uniform(0.5, 2.0, c).astype(np.float32))
        elif isinstance(layer, nn.Conv2D):
            shape = layer.weight.shape
            fan_in = int(np.prod(shape[1:]))
            layer.weight.set_value((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32))
            if layer.bias is not None:
                layer.bias.set_value(rng.uniform(-0.2, 0.2, shape[0]).astype(np.float32))
        elif isinstance(layer, Affine):
            layer.scale.set_value(rng.uniform(0.5, 1.5, [1]).astype(np.float32))
            layer.bias.set_value(rng.uniform(-0.5, 0.5, [1]).astype(np.float32))
        elif isinstance(layer, RepVggBlock) and layer.alpha is not None:
            layer.alpha.set_value(rng.uniform(0.5, 1.5, [1]).astype(np.float32))
    return net
