"""Keras re-parameterization blocks exported with tf2onnx: the training form and its deploy form.

    python tests/data/tf2onnx/make_exports.py      # in a venv with tensorflow-cpu and tf2onnx

Tested with tensorflow-cpu 2.15.1 (Keras 2.15.0), tf2onnx 1.16.1, opset 13. tf2onnx pins an
older onnx and TensorFlow is large, so the exports are checked in (tests/test_tf2onnx.py reads
them) and CI does not regenerate them.

Keras writes NHWC; tf2onnx moves the body to NCHW (one Transpose after the input, one before the
output), folds each conv's BN into the conv, writes `layers.Add` as a chain of Adds, and, for
`padding='same'`, writes each conv's own pads: a stride-2 3x3 on an even size gets pads (0, 1),
and the 1x1 beside it pads (0, 0), so the 1x1 lines up with tap (0, 0) of the 3x3, not its
centre, and only at even sizes. With a dynamic input it writes auto_pad=SAME_UPPER instead.

Each deploy form is one conv per block whose kernel and bias are fused here in numpy, in float64,
from the training form's weights: the reference the pass's output is compared with.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tf2onnx
from tensorflow.keras import layers

HERE = os.path.dirname(os.path.abspath(__file__))
EPS = 1e-3
OPSET = 13


class UnfusedBatchNormalization(layers.BatchNormalization):
    """Keras' BN with fused=False: tf2onnx writes it as Mul and Add, in NHWC where it reads an input."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, fused=False, **kwargs)


def same_pad_begin(size: int, k: int, stride: int) -> int:
    out = -(-size // stride)
    return max((out - 1) * stride + k - size, 0) // 2


def block(cout, stride, branches, main=(3, 3), pad="same", depthwise=False, add_n=True, relu=True):
    """branches: ("conv", (kh, kw)) or ("identity",)."""
    return dict(cout=cout, stride=stride, branches=branches, main=main, pad=pad, depthwise=depthwise,
                add_n=add_n, relu=relu)


def repvgg(cin, cout, stride, pad="same", add_n=True):
    branches = [("conv", (3, 3)), ("conv", (1, 1))] + ([("identity",)] if stride == 1 and cin == cout else [])
    return block(cout, stride, branches, pad=pad, add_n=add_n)


def acnet(cout, stride=1, add_n=False):
    return block(cout, stride, [("conv", (3, 3)), ("conv", (1, 3)), ("conv", (3, 1))], add_n=add_n)


def mobileone(channels, k):
    depthwise = block(channels, 1, [("conv", (3, 3))] * k + [("conv", (1, 1)), ("identity",)], depthwise=True)
    pointwise = block(channels, 1, [("conv", (1, 1))] * k + [("identity",)], main=(1, 1))
    return [depthwise, pointwise]


MODELS = {
    # name: (input NHWC, blocks, BN class, dynamic too)
    "repvgg_same_even": ((1, 16, 16, 8), [repvgg(8, 16, 2), repvgg(16, 16, 1), repvgg(16, 24, 2)],
                         layers.BatchNormalization, True),
    "repvgg_same_odd": ((1, 17, 17, 8), [repvgg(8, 16, 2), repvgg(16, 16, 1), repvgg(16, 24, 2)],
                        layers.BatchNormalization, False),
    "repvgg_zeropad": ((1, 16, 16, 8), [repvgg(8, 16, 2, "zeropad"), repvgg(16, 16, 1, "zeropad", add_n=False)],
                       layers.BatchNormalization, False),
    "acnet_same_even": ((1, 16, 16, 8), [acnet(16), acnet(16, add_n=True), acnet(24, stride=2)],
                        layers.BatchNormalization, True),
    "mobileone_dw": ((1, 8, 8, 16), mobileone(16, 2), layers.BatchNormalization, False),
    "mobileone_dw_unfused_bn": ((1, 8, 8, 16), mobileone(16, 2), UnfusedBatchNormalization, False),
}


def build_train(shape, blocks, bn_class):
    x = inputs = tf.keras.Input(shape=shape[1:], batch_size=shape[0])
    for i, b in enumerate(blocks):
        outs = []
        for j, branch in enumerate(b["branches"]):
            name = f"b{i}_r{j}"
            if branch[0] == "identity":
                outs.append(bn_class(epsilon=EPS, name=f"{name}_bn")(x))
                continue
            kh, kw = branch[1]
            h, padding = x, "same"
            if b["pad"] == "zeropad":
                h = layers.ZeroPadding2D(((kh - 1) // 2, (kw - 1) // 2))(h) if kh > 1 or kw > 1 else h
                padding = "valid"
            conv = (layers.DepthwiseConv2D((kh, kw), b["stride"], padding=padding, use_bias=False, name=f"{name}_conv")
                    if b["depthwise"] else
                    layers.Conv2D(b["cout"], (kh, kw), b["stride"], padding=padding, use_bias=False, name=f"{name}_conv"))
            outs.append(bn_class(epsilon=EPS, name=f"{name}_bn")(conv(h)))
        if b["add_n"]:
            y = layers.Add()(outs)
        else:
            y = outs[0]
            for o in outs[1:]:
                y = y + o
        x = layers.ReLU()(y) if b["relu"] else y
    return tf.keras.Model(inputs, x)


def randomize(model, rng):
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, layers.BatchNormalization):
            c = weights[0].shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c), rng.normal(0, 0.3, c),
                               rng.uniform(0.3, 2.0, c)])
        elif weights:
            layer.set_weights([rng.normal(0, 0.3, w.shape) for w in weights])


def pad_begin(b, h, w, kh, kw):
    """A branch's top and left pad in a block reading an h x w input."""
    if b["pad"] == "same":
        return same_pad_begin(h, kh, b["stride"]), same_pad_begin(w, kw, b["stride"])
    return (kh - 1) // 2, (kw - 1) // 2


def fused(model, shape, blocks):
    """Each block's one kernel (Keras layout) and bias, summed in float64."""
    out = []
    h, w, c = shape[1:]
    for i, b in enumerate(blocks):
        kh_main, kw_main = b["main"]
        s = b["stride"]
        cout = c if b["depthwise"] else b["cout"]

        top, left = pad_begin(b, h, w, kh_main, kw_main)
        kernel = np.zeros((kh_main, kw_main, c, 1 if b["depthwise"] else cout))
        bias = np.zeros(cout)
        for j, branch in enumerate(b["branches"]):
            gamma, beta, mean, var = (a.astype(np.float64) for a in model.get_layer(f"b{i}_r{j}_bn").get_weights())
            scale = gamma / np.sqrt(var + EPS)
            bias += beta - mean * scale
            if branch[0] == "identity":
                if b["depthwise"]:
                    kernel[top, left, :, 0] += scale
                else:
                    kernel[top, left, np.arange(c), np.arange(c)] += scale
                continue
            kh, kw = branch[1]
            weight = model.get_layer(f"b{i}_r{j}_conv").get_weights()[0].astype(np.float64)
            branch_top, branch_left = pad_begin(b, h, w, kh, kw)
            dt, dl = top - branch_top, left - branch_left
            kernel[dt:dt + kh, dl:dl + kw] += weight * (scale if not b["depthwise"] else scale[:, None])
        out.append((kernel.astype(np.float32), bias.astype(np.float32)))
        h, w, c = -(-h // s), -(-w // s), cout
    return out


def build_deploy(shape, blocks, params):
    x = inputs = tf.keras.Input(shape=shape[1:], batch_size=shape[0])
    convs = []
    for i, b in enumerate(blocks):
        kh, kw = b["main"]
        padding = "same"
        if b["pad"] == "zeropad":
            x = layers.ZeroPadding2D(((kh - 1) // 2, (kw - 1) // 2))(x)
            padding = "valid"
        conv = (layers.DepthwiseConv2D((kh, kw), b["stride"], padding=padding, name=f"d{i}") if b["depthwise"] else
                layers.Conv2D(b["cout"], (kh, kw), b["stride"], padding=padding, name=f"d{i}"))
        x = conv(x)
        convs.append(conv)
        if b["relu"]:
            x = layers.ReLU()(x)
    model = tf.keras.Model(inputs, x)
    for conv, (kernel, bias) in zip(convs, params):
        conv.set_weights([kernel, bias])
    return model


def main():
    rng = np.random.default_rng(0)
    for name, (shape, blocks, bn_class, dynamic_too) in MODELS.items():
        train = build_train(shape, blocks, bn_class)
        randomize(train, rng)
        deploy = build_deploy(shape, blocks, fused(train, shape, blocks))
        x = rng.normal(size=shape).astype(np.float32)
        a, b = train(x, training=False).numpy(), deploy(x).numpy()
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), name
        for dynamic in (False, True) if dynamic_too else (False,):
            spec = (tf.TensorSpec((None, None, None, shape[3]) if dynamic else shape, tf.float32, name="input"),)
            for form, model in (("train", train), ("deploy", deploy)):
                path = os.path.join(HERE, f"{name}{'_dyn' if dynamic else ''}_{form}.onnx")
                tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET, output_path=path)
                print(path)


if __name__ == "__main__":
    main()
