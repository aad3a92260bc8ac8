"""A direct N-d convolution in numpy, the ground truth for the algebra tests."""

from __future__ import annotations

import itertools

import numpy as np


def conv(x, w, b=None, strides=None, pads=None, dilations=None, group=1):
    """ONNX Conv semantics: x (N, C, *S), w (M, C/group, *K), pads = begins + ends."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n = x.ndim - 2
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    pads = pads or [0] * (2 * n)
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + n]) for i in range(n)])
    kernel = w.shape[2:]
    out_sizes = [(x.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(n)]
    m, cpg = w.shape[:2]
    out = np.zeros((x.shape[0], m, *out_sizes))
    mpg = m // group
    for g in range(group):
        xg = x[:, g * cpg:(g + 1) * cpg]
        wg = w[g * mpg:(g + 1) * mpg]
        for taps in itertools.product(*[range(k) for k in kernel]):
            window = tuple(slice(taps[i] * dilations[i], taps[i] * dilations[i] + strides[i] * (out_sizes[i] - 1) + 1,
                                 strides[i]) for i in range(n))
            patch = xg[(slice(None), slice(None)) + window]
            out[:, g * mpg:(g + 1) * mpg] += np.einsum("nc...,mc->nm...", patch, wg[(slice(None), slice(None)) + taps])
    if b is not None:
        out += np.asarray(b, dtype=np.float64).reshape((1, -1) + (1,) * n)
    return out


def batchnorm(x, gamma, beta, mean, var, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * gamma.reshape(shape) + beta.reshape(shape)


def conv_transpose(x, w, b=None, strides=None, pads=None, dilations=None, group=1, output_padding=None):
    """ONNX ConvTranspose semantics with explicit pads: x (N, C, *S), w (C, M/group, *K).

    Every input pixel i scatters w * x[i] to output positions i*stride + tap*dilation of the
    full output (size stride*(S-1) + dilation*(K-1) + 1, plus output_padding at the end),
    which is then cropped by pads (begins + ends)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n = x.ndim - 2
    strides = strides or [1] * n
    dilations = dilations or [1] * n
    pads = pads or [0] * (2 * n)
    output_padding = output_padding or [0] * n
    kernel = w.shape[2:]
    sizes = x.shape[2:]
    full = [strides[i] * (sizes[i] - 1) + dilations[i] * (kernel[i] - 1) + 1 + output_padding[i] for i in range(n)]
    cpg, mpg = w.shape[0] // group, w.shape[1]
    out = np.zeros((x.shape[0], mpg * group, *full))
    for g in range(group):
        xg = x[:, g * cpg:(g + 1) * cpg]
        wg = w[g * cpg:(g + 1) * cpg]
        for taps in itertools.product(*[range(k) for k in kernel]):
            window = tuple(slice(taps[i] * dilations[i], taps[i] * dilations[i] + strides[i] * (sizes[i] - 1) + 1,
                                 strides[i]) for i in range(n))
            out[(slice(None), slice(g * mpg, (g + 1) * mpg)) + window] += np.einsum(
                "nc...,cm->nm...", xg, wg[(slice(None), slice(None)) + taps])
    crop = tuple(slice(pads[i], full[i] - pads[i + n]) for i in range(n))
    out = out[(slice(None), slice(None)) + crop]
    if b is not None:
        out = out + np.asarray(b, dtype=np.float64).reshape((1, -1) + (1,) * n)
    return out
