"""The ConvTranspose algebra against a direct transposed convolution in numpy (tests/numpy_conv.py),
which is itself checked against PyTorch and onnxruntime."""

import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_repvgg import algebra
from tests.numpy_conv import batchnorm, conv_transpose

rng = np.random.default_rng(2024)

# (channels in, out per group, groups, kernel, stride, dilation, pads, output_padding)
GEOMETRIES = [
    (4, 3, 1, (2, 2), (2, 2), (1, 1), (0, 0, 0, 0), (0, 0)),
    (4, 3, 1, (4, 4), (2, 2), (1, 1), (1, 1, 1, 1), (0, 0)),
    (4, 2, 2, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), (1, 1)),
    (6, 1, 6, (4, 3), (2, 1), (1, 2), (1, 2, 1, 0), (1, 0)),
    (6, 2, 3, (3, 2), (3, 2), (2, 1), (0, 1, 2, 0), (2, 1)),
]


def random_bn(c):
    return rng.uniform(0.5, 1.5, c), rng.uniform(-1, 1, c), rng.uniform(-1, 1, c), rng.uniform(0.2, 2, c)


def _ort_conv_transpose(x, w, b, strides, pads, dilations, group, output_padding):
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=list(strides), pads=list(pads),
                            dilations=list(dilations), group=group, output_padding=list(output_padding))
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w.astype(np.float32), "w"),
                               numpy_helper.from_array(b.astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_reference_matches_torch_and_onnxruntime(geometry):
    cin, opg, group, k, s, d, pads, op = geometry
    x = rng.standard_normal((2, cin, 5, 4))
    w = rng.standard_normal((cin, opg) + k)
    b = rng.standard_normal(opg * group)
    ours = conv_transpose(x, w, b, list(s), list(pads), list(d), group, list(op))
    # torch pads symmetrically: crop the asymmetric rest by hand from a torch run with pads=min
    sym = [min(pads[0], pads[2]), min(pads[1], pads[3])]
    full = torch.nn.functional.conv_transpose2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), stride=s,
                                                padding=sym, output_padding=op, groups=group, dilation=d).numpy()
    extra = [(pads[0] - sym[0], pads[2] - sym[0]), (pads[1] - sym[1], pads[3] - sym[1])]
    crop = tuple(slice(a, full.shape[2 + i] - e) for i, (a, e) in enumerate(extra))
    np.testing.assert_allclose(ours, full[(slice(None), slice(None)) + crop], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours, _ort_conv_transpose(x, w, b, s, pads, d, group, op), rtol=1e-4, atol=1e-4)


def test_output_channel_layout():
    channels = algebra.transposed_output_channels(6, 2, 3)
    assert channels.shape == (6, 2)
    # input channels 0,1 (group 0) feed outputs 0,1; 2,3 feed 2,3; 4,5 feed 4,5
    np.testing.assert_array_equal(channels, [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]])
    np.testing.assert_array_equal(algebra.transposed_output_channels(4, 3, 1), np.tile(np.arange(3), (4, 1)))
    with pytest.raises(ValueError):
        algebra.transposed_output_channels(5, 2, 2)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_bn_after_conv_transpose_folds_into_weight_and_bias(geometry, with_bias):
    cin, opg, group, k, s, d, pads, op = geometry
    cout = opg * group
    x = rng.standard_normal((2, cin, 4, 5))
    w = rng.standard_normal((cin, opg) + k)
    b = rng.standard_normal(cout) if with_bias else None
    gamma, beta, mean, var = random_bn(cout)
    expected = batchnorm(conv_transpose(x, w, b, list(s), list(pads), list(d), group, list(op)), gamma, beta, mean, var, 1e-3)
    scale, shift = algebra.bn_scale_shift(gamma, beta, mean, var, 1e-3)
    fw, fb = algebra.scale_transposed_output_channels(w, b, scale, shift, group)
    got = conv_transpose(x, fw, fb, list(s), list(pads), list(d), group, list(op))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_output_scale_broadcasts_a_scalar():
    w = rng.standard_normal((4, 2, 3, 3))
    fw, fb = algebra.scale_transposed_output_channels(w, np.ones(4), np.array([2.0]), np.array(0.5), groups=2)
    np.testing.assert_allclose(fw, 2 * w)
    np.testing.assert_allclose(fb, np.full(4, 2.5))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_input_scale_folds_into_weight(geometry):
    cin, opg, group, k, s, d, pads, op = geometry
    x = rng.standard_normal((1, cin, 4, 4))
    w = rng.standard_normal((cin, opg) + k)
    b = rng.standard_normal(opg * group)
    scale = rng.uniform(-2, 2, cin)
    expected = conv_transpose(x * scale.reshape(1, -1, 1, 1), w, b, list(s), list(pads), list(d), group, list(op))
    got = conv_transpose(x, algebra.scale_transposed_input_channels(w, scale), b, list(s), list(pads), list(d),
                         group, list(op))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_shift_before_conv_transpose_is_not_a_bias():
    """Why a BN *before* a ConvTranspose is a near miss: a constant input does not give a
    constant output (border pixels and stride phases receive different numbers of taps), so
    the BN's shift cannot become a per-channel bias."""
    w = rng.standard_normal((2, 2, 3, 3))
    out = conv_transpose(np.ones((1, 2, 4, 4)), w, strides=[2, 2], pads=[1, 1, 1, 1])
    spread = out.max(axis=(2, 3)) - out.min(axis=(2, 3))
    assert np.all(spread > 1e-3)
    # ... and not even with kernel == stride, no pads: each output reads one tap, by phase
    out = conv_transpose(np.ones((1, 2, 3, 3)), rng.standard_normal((2, 2, 2, 2)), strides=[2, 2])
    assert np.all(out.max(axis=(2, 3)) - out.min(axis=(2, 3)) > 1e-3)


def _branches_and_merge(branches, stride, dilation, group=1, cin=4, opg=3, size=(5, 4)):
    """Sum of 2-D ConvTranspose branches (k, pads, output_padding per axis) vs the merged one."""
    x = rng.standard_normal((2, cin) + size)
    total = None
    weights = []
    for k, pads, op in branches:
        w = rng.standard_normal((cin, opg) + k)
        b = rng.standard_normal(opg * group)
        weights.append((w, b))
        y = conv_transpose(x, w, b, list(stride), list(pads), list(dilation), group, list(op))
        total = y if total is None else total + y
    axes = [algebra.merge_transposed_axis([(k[a], pads[a], pads[a + 2], op[a]) for k, pads, op in branches],
                                          dilation[a], stride[a]) for a in range(2)]
    kernel = tuple(ax[0] for ax in axes)
    merged_pads = [ax[1] for ax in axes] + [ax[2] for ax in axes]
    merged_op = [ax[3] for ax in axes]
    parts = [(w, b, tuple(ax[4][i] for ax in axes)) for i, (w, b) in enumerate(weights)]
    fw, fb = algebra.sum_transposed_branches(parts, kernel, group)
    got = conv_transpose(x, fw, fb, list(stride), merged_pads, list(dilation), group, merged_op)
    assert got.shape == total.shape
    np.testing.assert_allclose(got, total, rtol=1e-10, atol=1e-10)
    return kernel, merged_pads, merged_op


def test_merge_2x2_stride2_with_4x4_pad1():
    """A pixel-shuffle-like 2x2 / stride 2 upsampler beside a 4x4 / pad 1 one: both double the size."""
    kernel, pads, op = _branches_and_merge([((4, 4), (1, 1, 1, 1), (0, 0)), ((2, 2), (0, 0, 0, 0), (0, 0))],
                                           (2, 2), (1, 1))
    assert kernel == (4, 4) and pads == [1, 1, 1, 1] and op == [0, 0]


def test_merge_with_output_padding_and_dilation_and_groups():
    _branches_and_merge([((3, 3), (2, 2, 2, 2), (1, 1)), ((1, 1), (0, 0, 0, 0), (1, 1))], (2, 2), (2, 2), group=2,
                        cin=4, opg=2)
    # a branch whose end crop is negative: merged with output_padding
    kernel, pads, op = _branches_and_merge([((1, 1), (0, 0, 0, 0), (2, 2)), ((3, 3), (1, 1, 0, 0), (1, 1))],
                                           (3, 3), (1, 1))
    assert kernel == (3, 3) and pads == [1, 1, 0, 0] and op == [1, 1]


def test_merge_every_small_geometry():
    """Every pair of 1-axis branches with equal reach and whole-tap offsets, strides 1-3,
    dilations 1-2, merges exactly (the second axis is a fixed 1x1)."""
    checked = 0
    for s, d in itertools.product((1, 2, 3), (1, 2)):
        shapes = [(k, pb, pe, op) for k, pb, pe, op in itertools.product((1, 2, 3, 4), (0, 1, 2, 3), (0, 1, 2), (0, 1, 2))
                  if op < s and pb + pe < d * (k - 1) + 1 + op]
        for a, b in itertools.combinations(shapes, 2):
            reach_a = algebra.transposed_reach(a[0], d, *a[1:])
            if reach_a != algebra.transposed_reach(b[0], d, *b[1:]) or (a[1] - b[1]) % d:
                with pytest.raises(ValueError):
                    algebra.merge_transposed_axis([a, b], d, s)
                continue
            branches = [((k, 1), (pb, 0, pe, 0), (op, 0)) for k, pb, pe, op in (a, b)]
            _branches_and_merge(branches, (s, 1), (d, 1), size=(3, 2))
            checked += 1
    assert checked > 50


def test_merge_refuses_different_output_sizes_and_off_grid_offsets():
    with pytest.raises(ValueError, match="output sizes differ"):
        algebra.merge_transposed_axis([(3, 1, 1, 0), (2, 0, 0, 0)], 1, 2)
    with pytest.raises(ValueError, match="multiple of dilation"):
        algebra.merge_transposed_axis([(3, 2, 2, 0), (2, 1, 1, 0)], 2, 1)


def test_sum_transposed_branches_scales_per_output_channel_and_casts():
    x = rng.standard_normal((1, 4, 3, 3))
    w1, w2 = rng.standard_normal((4, 1, 3, 3)), rng.standard_normal((4, 1, 1, 1))
    b1 = rng.standard_normal(4)
    s1, s2 = rng.uniform(-2, 2, 4), rng.uniform(-2, 2, 4)
    expected = (conv_transpose(x, w1, b1, [1, 1], [1, 1, 1, 1], group=4) * s1.reshape(1, -1, 1, 1)
                + conv_transpose(x, w2, None, [1, 1], group=4) * s2.reshape(1, -1, 1, 1))
    fw, fb = algebra.sum_transposed_branches([(w1, b1, (0, 0), s1), (w2, None, (1, 1), s2)], (3, 3), groups=4,
                                             out_dtype=np.float32)
    assert fw.dtype == np.float32 and fb.dtype == np.float32
    np.testing.assert_allclose(conv_transpose(x, fw, fb, [1, 1], [1, 1, 1, 1], group=4), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        algebra.sum_transposed_branches([(w1, b1, (1, 1))], (3, 3), groups=4)
    with pytest.raises(OverflowError):
        algebra.sum_transposed_branches([(w1 * 1e6, b1, (0, 0))], (3, 3), groups=4, out_dtype=np.float16)
