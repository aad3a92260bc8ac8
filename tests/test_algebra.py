"""The fusion algebra against a direct numpy convolution, on random data."""

import numpy as np
import pytest

from onnx_repvgg import algebra
from tests.numpy_conv import batchnorm, conv

rng = np.random.default_rng(1234)


def random_bn(c):
    return (rng.uniform(0.5, 1.5, c), rng.uniform(-1, 1, c), rng.uniform(-1, 1, c), rng.uniform(0.2, 2, c))


def bn_folded(w, b, gamma, beta, mean, var, eps):
    """A conv followed by BN, as the pass writes it: one branch of sum_branches, scaled per
    output channel by BN's scale, its shift in the bias."""
    scale, shift = algebra.bn_scale_shift(gamma, beta, mean, var, eps)
    bias = np.zeros(w.shape[0]) if b is None else b
    kernel, fused_bias = algebra.sum_branches([(w, bias, (0,) * (w.ndim - 2), scale)], w.shape[2:])
    return kernel, fused_bias + shift


@pytest.mark.parametrize("with_bias", [False, True])
def test_bn_fold_equals_bn_after_conv(with_bias):
    x = rng.standard_normal((2, 4, 7, 7))
    w = rng.standard_normal((6, 4, 3, 3))
    b = rng.standard_normal(6) if with_bias else None
    gamma, beta, mean, var = random_bn(6)
    expected = batchnorm(conv(x, w, b, pads=[1, 1, 1, 1]), gamma, beta, mean, var, 1e-3)
    fw, fb = bn_folded(w, b, gamma, beta, mean, var, 1e-3)
    np.testing.assert_allclose(conv(x, fw, fb, pads=[1, 1, 1, 1]), expected, rtol=1e-12, atol=1e-12)


def test_bn_scale_uses_epsilon():
    scale, shift = algebra.bn_scale_shift([1.0], [0.0], [0.0], [0.0], 0.25)
    assert scale.item() == pytest.approx(2.0)
    assert shift.item() == 0.0


def test_sum_branches_places_taps_and_rejects_misfit():
    k = rng.standard_normal((2, 3, 1, 3))
    placed, _ = algebra.sum_branches([(k, np.zeros(2), (1, 0))], (3, 3))
    assert placed.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(placed[:, :, 1, :], k[:, :, 0, :])
    assert np.count_nonzero(placed[:, :, [0, 2], :]) == 0
    with pytest.raises(ValueError):
        algebra.sum_branches([(k, np.zeros(2), (0, 1))], (3, 3))


def test_embedded_1x1_equals_1x1_conv_with_matching_pad():
    x = rng.standard_normal((1, 5, 9, 9))
    w1 = rng.standard_normal((5, 5, 1, 1))
    expected = conv(x, w1, strides=[2, 2])
    w3, _ = algebra.sum_branches([(w1, np.zeros(5), (1, 1))], (3, 3))
    np.testing.assert_allclose(conv(x, w3, strides=[2, 2], pads=[1, 1, 1, 1]), expected, atol=1e-12)


@pytest.mark.parametrize("channels,groups", [(6, 1), (6, 2), (6, 3), (6, 6)])
def test_identity_kernel_copies_input(channels, groups):
    x = rng.standard_normal((2, channels, 5, 5))
    k = algebra.identity_kernel(channels, groups, (3, 3), (1, 1))
    np.testing.assert_allclose(conv(x, k, pads=[1, 1, 1, 1], group=groups), x, atol=1e-12)


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_identity_kernel_any_rank(ndim):
    x = rng.standard_normal((1, 4) + (4,) * ndim)
    k = algebra.identity_kernel(4, 2, (1,) * ndim, (0,) * ndim)
    np.testing.assert_allclose(conv(x, k, group=2), x, atol=1e-12)


def test_identity_kernel_rejects_bad_groups():
    with pytest.raises(ValueError):
        algebra.identity_kernel(6, 4, (3, 3), (1, 1))


def test_repvgg_block_sum_equals_three_branches():
    """BN(conv3(x)) + BN(conv1(x)) + BN(x) == one 3x3 conv, grouped."""
    c, g = 8, 4
    x = rng.standard_normal((2, c, 6, 6))
    w3 = rng.standard_normal((c, c // g, 3, 3))
    w1 = rng.standard_normal((c, c // g, 1, 1))
    bn3, bn1, bni = random_bn(c), random_bn(c), random_bn(c)
    expected = (batchnorm(conv(x, w3, pads=[1] * 4, group=g), *bn3, 1e-5)
                + batchnorm(conv(x, w1, group=g), *bn1, 1e-5)
                + batchnorm(x, *bni, 1e-5))
    s3, h3 = algebra.bn_scale_shift(*bn3, 1e-5)
    s1, h1 = algebra.bn_scale_shift(*bn1, 1e-5)
    si, hi = algebra.bn_scale_shift(*bni, 1e-5)
    identity = algebra.identity_kernel(c, g, (1, 1), (0, 0))
    zero = np.zeros(c)
    kernel, bias = algebra.sum_branches([(w3, zero, (0, 0), s3), (w1, zero, (1, 1), s1), (identity, zero, (1, 1), si)],
                                        (3, 3))
    bias = bias + h3 + h1 + hi
    np.testing.assert_allclose(conv(x, kernel, bias, pads=[1] * 4, group=g), expected, rtol=1e-10, atol=1e-10)


def test_asymmetric_and_dilated_branches():
    """ACNet-style 3x3 + 1x3 + 3x1, dilation 2: the covering kernel reproduces the sum."""
    x = rng.standard_normal((1, 3, 11, 11))
    w33, w13, w31 = (rng.standard_normal((4, 3) + k) for k in [(3, 3), (1, 3), (3, 1)])
    d = [2, 2]
    expected = (conv(x, w33, pads=[2, 2, 2, 2], dilations=d)
                + conv(x, w13, pads=[0, 2, 0, 2], dilations=d)
                + conv(x, w31, pads=[2, 0, 2, 0], dilations=d))
    zero = np.zeros(4)
    kernel, bias = algebra.sum_branches([(w33, zero, (0, 0)), (w13, zero, (1, 0)), (w31, zero, (0, 1))], (3, 3))
    np.testing.assert_allclose(conv(x, kernel, bias, pads=[2, 2, 2, 2], dilations=d), expected, atol=1e-10)


def test_cast_like_refuses_overflow():
    with pytest.raises(OverflowError):
        algebra.cast_like(np.array([1e6]), np.float16)
    out = algebra.cast_like(np.array([1.5]), np.float16)
    assert out.dtype == np.float16 and out[0] == 1.5


def test_sum_branches_rejects_mismatched_channels():
    with pytest.raises(ValueError):
        algebra.sum_branches([(np.ones((2, 2, 1, 1)), np.zeros(2), (0, 0)),
                              (np.ones((3, 2, 1, 1)), np.zeros(3), (0, 0))], (1, 1))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_avgpool_kernel_equals_average_pool_with_padding_counted(groups):
    x = rng.standard_normal((1, 6, 5, 5))
    k = algebra.avgpool_kernel(6, groups, (3, 3))
    padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
    expected = np.zeros_like(x)
    for i in range(5):
        for j in range(5):
            expected[:, :, i, j] = padded[:, :, i:i + 3, j:j + 3].mean(axis=(2, 3))
    np.testing.assert_allclose(conv(x, k, pads=[1, 1, 1, 1], group=groups), expected, atol=1e-12)


@pytest.mark.parametrize("g_from,g_to", [(6, 1), (6, 2), (6, 3), (2, 1), (4, 4)])
def test_regroup_kernel_is_the_same_conv(g_from, g_to):
    cin = 12 if g_from != 4 else 8
    x = rng.standard_normal((1, cin, 5, 5))
    k = rng.standard_normal((cin, cin // g_from, 3, 3))
    regrouped = algebra.regroup_kernel(k, g_from, g_to)
    assert regrouped.shape == (cin, cin // g_to, 3, 3)
    np.testing.assert_allclose(conv(x, regrouped, pads=[1] * 4, group=g_to), conv(x, k, pads=[1] * 4, group=g_from),
                               atol=1e-10)


@pytest.mark.parametrize("rates", [(2, 2), (3, 1), (1, 4)])
def test_dilated_kernel_written_without_dilation(rates):
    """conv(x, w, dilation=d*r) == conv(x, dilate_kernel(w, r), dilation=d) with the same pads."""
    x = rng.standard_normal((2, 3, 17, 17))
    w = rng.standard_normal((5, 3, 3, 3))
    pads = [r * 2 // 2 for r in rates] * 2
    expected = conv(x, w, pads=pads, dilations=list(rates))
    dense = algebra.dilate_kernel(w, rates)
    assert dense.shape[2:] == tuple(2 * r + 1 for r in rates)
    np.testing.assert_allclose(conv(x, dense, pads=pads), expected, rtol=1e-12, atol=1e-12)
    assert np.count_nonzero(dense) == np.count_nonzero(w)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_input_affine_folds_into_a_conv(groups, padded):
    """conv(s*x + t) == conv'(x): exact without padding; with padding only for t = 0."""
    x = rng.standard_normal((2, 4, 6, 6))
    w = rng.standard_normal((8, 4 // groups, 3, 3))
    b = rng.standard_normal(8)
    s, t = rng.uniform(0.5, 1.5, 4), (np.zeros(4) if padded else rng.standard_normal(4))
    pads = [1] * 4 if padded else [0] * 4
    expected = conv(x * s.reshape(1, 4, 1, 1) + t.reshape(1, 4, 1, 1), w, b, pads=pads, group=groups)
    fw, fb = algebra.fold_input_affine_conv(w, b, groups, s, t)
    np.testing.assert_allclose(conv(x, fw, fb, pads=pads, group=groups), expected, rtol=1e-12, atol=1e-12)


def test_input_affine_folds_into_a_dense_layer():
    x = rng.standard_normal((5, 3, 4))
    w, b = rng.standard_normal((4, 6)), rng.standard_normal(6)
    s, t = rng.uniform(0.5, 1.5, 4), rng.standard_normal(4)
    fw, fb = algebra.fold_input_affine_dense(w, b, s, t)
    np.testing.assert_allclose(x @ fw + fb, (x * s + t) @ w + b, rtol=1e-12, atol=1e-12)
