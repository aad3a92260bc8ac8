"""Pure numpy algebra of structural re-parameterization.

No onnx import here: every function takes and returns numpy arrays, computes in
float64, and is tested against a direct convolution in tests/test_algebra.py.

Conventions (ONNX/PyTorch): a conv kernel has shape (Cout, Cin/groups, k1, ..., kn);
a bias has shape (Cout,). A "branch" is the affine map x -> conv(x, W) + b written
on a common kernel grid, so a block of parallel branches is their sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def bn_scale_shift(gamma, beta, mean, var, eps) -> tuple[np.ndarray, np.ndarray]:
    """Inference-mode BatchNormalization as y = x*scale + shift, per channel.

    scale = gamma / sqrt(var + eps), shift = beta - mean*scale.
    """
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + np.asarray(eps, dtype=np.float64))  # eps: one, or one per row
    return scale, beta - mean * scale


def _window(kernel_shape, spatial_shape, offsets) -> tuple[slice, ...]:
    """The slices of a kernel placed at `offsets` in a grid of `spatial_shape`; checks it fits."""
    for k, size, off in zip(kernel_shape, spatial_shape, offsets):
        if off < 0 or off + k > size:
            raise ValueError(f"kernel of size {k} at offset {off} does not fit in {size}")
    return tuple(slice(int(o), int(o) + k) for o, k in zip(offsets, kernel_shape))


def dilate_kernel(kernel, rates: Sequence[int]) -> np.ndarray:
    """A kernel of dilation d*r written as one of dilation d: r-1 zeros between taps, so a
    k-tap axis becomes (k-1)*r + 1 taps (UniRepLKNet's dilated branches). Conv with the
    result and the same pads is the same map. Keeps the kernel's dtype (it only moves values)."""
    kernel = np.asarray(kernel)
    rates = tuple(int(r) for r in rates)
    if len(rates) != kernel.ndim - 2 or any(r < 1 for r in rates):
        raise ValueError("one rate >= 1 per spatial axis")
    shape = tuple((k - 1) * r + 1 for k, r in zip(kernel.shape[2:], rates))
    out = np.zeros(kernel.shape[:2] + shape, dtype=kernel.dtype)
    out[(slice(None), slice(None)) + tuple(slice(None, None, r) for r in rates)] = kernel
    return out


def identity_kernel(channels: int, groups: int, spatial_shape: Sequence[int],
                    position: Sequence[int]) -> np.ndarray:
    """The kernel of a grouped conv with Cin == Cout == channels that copies its input.

    Output channel i reads input channel i, which is local channel i % (channels/groups)
    of its group; the 1 sits at `position` of the spatial grid.
    """
    if channels % groups:
        raise ValueError(f"{channels} channels do not split into {groups} groups")
    in_per_group = channels // groups
    spatial_shape = tuple(int(s) for s in spatial_shape)
    kernel = np.zeros((channels, in_per_group) + spatial_shape, dtype=np.float64)
    rows = np.arange(channels)
    kernel[(rows, rows % in_per_group) + tuple(np.full(channels, int(p)) for p in position)] = 1.0
    return kernel


def avgpool_kernel(channels: int, groups: int, spatial_shape: Sequence[int]) -> np.ndarray:
    """AveragePool (count_include_pad=1) as a grouped conv kernel: 1/prod(k) over the window
    of input channel c % (channels/groups), for Cin == Cout == channels."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    kernel = np.zeros((channels, channels // groups) + spatial_shape, dtype=np.float64)
    rows = np.arange(channels)
    kernel[rows, rows % (channels // groups)] = 1.0 / float(np.prod(spatial_shape))
    return kernel


def regroup_kernel(kernel, groups_from: int, groups_to: int) -> np.ndarray:
    """The same grouped conv written with fewer groups (groups_to divides groups_from): the
    kernel gains zero blocks where output channels do not read input channels.

    Output o reads global input channels go*cpg_from + i (go = o // (Cout/groups_from)); with
    groups_to groups its local index is that minus Go*cpg_to (Go = o // (Cout/groups_to)).
    """
    kernel = np.asarray(kernel)
    cout, cpg_from = kernel.shape[:2]
    if groups_from % groups_to:
        raise ValueError(f"{groups_to} groups do not divide {groups_from}")
    cin = cpg_from * groups_from
    cpg_to = cin // groups_to
    out = np.zeros((cout, cpg_to) + kernel.shape[2:], dtype=kernel.dtype)
    o = np.arange(cout)
    start = (o // (cout // groups_from)) * cpg_from - (o // (cout // groups_to)) * cpg_to
    for i in range(cpg_from):
        out[o, start + i] = kernel[o, i]
    return out


def sum_branches(branches: Sequence[tuple], spatial_shape: Sequence[int], out_dtype=None,
                 chunk_bytes: int = 1 << 21) -> tuple[np.ndarray, np.ndarray]:
    """Sum branches on one kernel grid of `spatial_shape`, accumulating in float64.

    Each branch is (kernel, bias, offsets) or (kernel, bias, offsets, scale), where scale
    (per output channel, or None) multiplies both kernel and bias. The sum is computed in
    float64 over blocks of output channels small enough to stay in cache, and each block is
    cast to `out_dtype` (default float64) as it is finished, refusing overflow.
    """
    if not branches:
        raise ValueError("no branches to sum")
    spatial_shape = tuple(int(s) for s in spatial_shape)
    head = np.asarray(branches[0][0])
    cout, cin = head.shape[:2]
    extra = (1,) * (len(spatial_shape) + 1)
    prepared = []
    bias_sum = np.zeros(cout, dtype=np.float64)
    for branch in branches:
        kernel, bias, offsets = branch[:3]
        scale = branch[3] if len(branch) > 3 else None
        kernel = np.asarray(kernel)
        if kernel.shape[:2] != (cout, cin) or kernel.ndim != 2 + len(spatial_shape):
            raise ValueError(f"branch kernel {kernel.shape[:2]} does not match {(cout, cin)}")
        window = (slice(None), slice(None)) + _window(kernel.shape[2:], spatial_shape, offsets)
        bias = np.asarray(bias, dtype=np.float64)
        if scale is not None:
            scale = np.asarray(scale, dtype=np.float64).reshape(-1)
            if scale.shape != (cout,):
                scale = np.broadcast_to(scale, (cout,))
            bias = bias * scale
        bias_sum += bias
        if kernel.size:  # an empty kernel (a bias-only term) adds nothing to the kernel
            prepared.append((kernel, window, None if scale is None else scale.reshape((-1,) + extra)))
    # A full-size branch first: it can initialize each block of rows by itself.
    prepared.sort(key=lambda p: p[0].shape[2:] != spatial_shape)
    out_dtype = np.dtype(np.float64 if out_dtype is None else out_dtype)
    kernel_out = np.empty((cout, cin) + spatial_shape, dtype=out_dtype)
    per_channel = max(1, cin * math.prod(spatial_shape) * 8)
    step = max(1, chunk_bytes // per_channel)
    # One accumulator for all blocks of rows: fresh large arrays would each be page-faulted in.
    buffer = np.empty((min(step, cout), cin) + spatial_shape, dtype=np.float64)
    largest = flushed = 0.0  # over all blocks: the underflow test is relative to the whole kernel
    covers = bool(prepared) and prepared[0][0].shape[2:] == spatial_shape
    for start in range(0, cout, step):
        rows = slice(start, min(cout, start + step))
        acc = buffer[: rows.stop - rows.start]
        if covers:  # one pass (convert, scale, store) instead of zero-fill then add
            first, _, first_scale = prepared[0]
            if first_scale is None:
                np.copyto(acc, first[rows])
            else:
                np.multiply(first[rows], first_scale[rows], out=acc)
        else:
            acc.fill(0.0)
        for kernel, window, scale in prepared[1:] if covers else prepared:
            if scale is None:
                acc[window] += kernel[rows]
            else:
                acc[window] += kernel[rows] * scale[rows]
        block_largest, block_flushed = _cast_into(kernel_out[rows], acc)
        largest, flushed = max(largest, block_largest), max(flushed, block_flushed)
    _refuse_underflow(largest, flushed, out_dtype)
    return kernel_out, cast_like(bias_sum, out_dtype)


class CastError(ArithmeticError):
    """A float64 result that the model's dtype cannot hold; `code` is the skip reason's code."""

    code = "overflow"


class FusedOverflow(CastError, OverflowError):
    code = "overflow"


class FusedUnderflow(CastError):
    code = "underflow"


def _cast_into(out: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """out[...] = values cast to out's dtype. Refuses inf or nan that was not in `values`
    (FusedOverflow); returns the largest finite magnitude and the largest magnitude flushed
    to 0, for the underflow test."""
    if out.dtype.kind == "f" and out.dtype != values.dtype:
        # max |v| from two reductions without a temporary; nan in either leaves the fast path
        high, low = float(values.max(initial=0.0)), float(values.min(initial=0.0))
        largest = max(high, -low)
        if high == high and low == low and largest <= _float_max(out.dtype):  # finite, none rounds past the largest
            np.copyto(out, values, casting="unsafe")
            if not (out == 0).any() or np.count_nonzero(out) == np.count_nonzero(values):
                return largest, 0.0  # nothing flushed to 0 (no zero at all, or as many as before)
            lost = (out == 0) & (values != 0)
            return largest, float(np.abs(values[lost]).max(initial=0.0))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        np.copyto(out, values, casting="unsafe")
    if out.dtype.kind != "f" or out.dtype == values.dtype:  # kind "f": np.issubdtype(., np.floating)
        return 0.0, 0.0
    if np.isfinite(out).all():  # then every value was finite too: inf and nan stay so in any float type
        magnitude = np.abs(values)
        lost = (out == 0) & (values != 0)
        return float(magnitude.max(initial=0.0)), float(magnitude[lost].max(initial=0.0)) if lost.any() else 0.0
    finite_in = np.isfinite(values)
    if not np.all(np.isfinite(out)[finite_in]):
        raise FusedOverflow(f"fused values overflow {out.dtype.name} (largest magnitude "
                            f"{float(np.abs(values[finite_in]).max(initial=0)):.3g})")
    if not finite_in.all():
        raise FusedOverflow(f"fused values are not finite (inf or nan) before the cast to {out.dtype.name}")
    magnitude = np.abs(values)
    lost = (out == 0) & (values != 0)
    return float(magnitude.max(initial=0.0)), float(magnitude[lost].max(initial=0.0))


_FLOAT_MAX: dict[np.dtype, float] = {}


def _float_max(dtype: np.dtype) -> float:
    if dtype not in _FLOAT_MAX:
        _FLOAT_MAX[dtype] = float(np.finfo(dtype).max)
    return _FLOAT_MAX[dtype]


def _refuse_underflow(largest: float, flushed: float, dtype: np.dtype) -> None:
    """A non-zero value flushed to 0 is refused when it is not negligible next to the largest
    value of the same tensor: bigger than that value's rounding step in `dtype` (eps * max)."""
    if flushed and flushed > float(np.finfo(dtype).eps) * largest:
        raise FusedUnderflow(f"fused value {flushed:.3g} underflows {np.dtype(dtype).name} to 0 "
                             f"(largest magnitude {largest:.3g})")


def cast_like(values: np.ndarray, dtype) -> np.ndarray:
    """Cast float64 results back to the model's dtype: the one checked cast of the pass.

    Raises FusedOverflow for inf or nan (not representable, or not finite to begin with) and
    FusedUnderflow for a non-zero value flushed to 0 that is not negligible next to the
    tensor's largest value; the pipeline turns either into a skip with its code."""
    values = np.asarray(values)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":  # not a numpy floating type
        return values.astype(dtype)
    out = np.empty(values.shape, dtype=dtype)
    largest, flushed = _cast_into(out, values)
    _refuse_underflow(largest, flushed, dtype)
    return out


# -- ConvTranspose -------------------------------------------------------------------------
# A ConvTranspose kernel has shape (Cin, Cout/groups, k1, ..., kn): input channel c of group
# g = c // (Cin/groups) scatters into output channels g*(Cout/groups) + o through W[c, o].
# Along each axis, input pixel i adds W[..., t] * x[i] to position i*stride + t*dilation of the
# full output (size stride*(in-1) + dilation*(k-1) + 1, then output_padding zeros at the end),
# which pads_begin / pads_end crop.


def transposed_output_channels(cin: int, cout_per_group: int, groups: int) -> np.ndarray:
    """The output channel each weight slice W[c, o] of a ConvTranspose feeds, shape (Cin, Cout/groups):
    (c // (Cin/groups)) * (Cout/groups) + o."""
    if groups < 1 or cin % groups:
        raise ValueError(f"{cin} input channels do not split into {groups} groups")
    group_of_input = np.arange(cin) // (cin // groups)
    return group_of_input[:, None] * cout_per_group + np.arange(cout_per_group)[None, :]


def scale_transposed_output_channels(weight, bias, scale, shift=None, groups: int = 1
                                     ) -> tuple[np.ndarray, np.ndarray]:
    """The ConvTranspose (W, b) followed by y*scale + shift per output channel (a BN, a Mul,
    an Add): W'[c, o] = W[c, o] * scale[channel(c, o)], b' = b*scale + shift. Exact for any
    strides, pads, output_padding or output_shape: every output element is b plus a sum of
    W[c, o(channel)] * x terms, or b alone where nothing scatters."""
    weight = np.asarray(weight, dtype=np.float64)
    cin, cout_per_group = weight.shape[:2]
    cout = cout_per_group * groups
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), (cout,))
    bias = np.zeros(cout) if bias is None else np.asarray(bias, dtype=np.float64)
    channels = transposed_output_channels(cin, cout_per_group, groups)
    out_w = weight * scale[channels].reshape((cin, cout_per_group) + (1,) * (weight.ndim - 2))
    out_b = bias * scale
    if shift is not None:
        out_b = out_b + np.asarray(shift, dtype=np.float64)
    return out_w, out_b


def scale_transposed_input_channels(weight, scale) -> np.ndarray:
    """ConvTranspose(x * scale, W) with scale per input channel = ConvTranspose(x, W') with
    W'[c] = W[c] * scale[c]: the scale multiplies every term x[c] * W[c] (no padding reads x)."""
    weight = np.asarray(weight, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), (weight.shape[0],))
    return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))


def transposed_reach(kernel: int, dilation: int, pad_begin: int, pad_end: int, output_padding: int) -> int:
    """On one axis a ConvTranspose gives stride*(in-1) + 1 + reach outputs, with
    reach = dilation*(k-1) - pad_begin - pad_end + output_padding; branches of one input give
    the same output size for every input size exactly when their strides and reaches agree."""
    return dilation * (kernel - 1) - pad_begin - pad_end + output_padding


def merge_transposed_axis(branches: Sequence[tuple[int, int, int, int]], dilation: int, stride: int
                          ) -> tuple[int, int, int, int, list[int]]:
    """One axis of parallel ConvTranspose branches of one input, as one ConvTranspose.

    Each branch is (kernel, pad_begin, pad_end, output_padding) with the same stride and
    dilation. Tap t of a branch writes full-output position i*stride + t*dilation, which
    pad_begin shifts to i*stride + t*dilation - pad_begin; in a kernel cropped by the largest
    pad_begin P it is tap t + (P - pad_begin)/dilation. Returns (kernel, pad_begin, pad_end,
    output_padding, offsets) of the merged ConvTranspose: the end crop (pad_end minus
    output_padding) comes from the common reach, written as output_padding where negative.
    Raises ValueError when reaches differ or an offset is not a whole number of taps.
    """
    reaches = {transposed_reach(k, dilation, pb, pe, op) for k, pb, pe, op in branches}
    if len(reaches) != 1:
        raise ValueError(f"branches reach {sorted(reaches)}: output sizes differ")
    reach = reaches.pop()
    begin = max(pb for _, pb, _, _ in branches)
    offsets = []
    for _, pb, _, _ in branches:
        if (begin - pb) % dilation:
            raise ValueError(f"pad_begin {pb} is {begin - pb} pixels from {begin}, not a multiple of dilation {dilation}")
        offsets.append((begin - pb) // dilation)
    size = max(off + k for off, (k, _, _, _) in zip(offsets, branches))
    end_crop = dilation * (size - 1) - begin - reach
    pad_end, output_padding = (end_crop, 0) if end_crop >= 0 else (0, -end_crop)
    if output_padding >= stride:
        raise ValueError(f"output_padding {output_padding} would reach stride {stride}")
    return size, begin, pad_end, output_padding, offsets


def sum_transposed_branches(branches: Sequence[tuple], spatial_shape: Sequence[int], groups: int = 1,
                            out_dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Sum ConvTranspose branches on one kernel grid of `spatial_shape`, in float64.

    Each branch is (kernel, bias, offsets) or (kernel, bias, offsets, scale): kernel
    (Cin, Cout/groups, k...), bias (Cout,) or None, the kernel's first tap at `offsets`, and
    scale (per output channel, or None) multiplying kernel and bias. The result is cast to
    `out_dtype` (default float64), refusing overflow.
    """
    if not branches:
        raise ValueError("no branches to sum")
    spatial_shape = tuple(int(s) for s in spatial_shape)
    cin, cout_per_group = np.asarray(branches[0][0]).shape[:2]
    kernel_sum = np.zeros((cin, cout_per_group) + spatial_shape)
    bias_sum = np.zeros(cout_per_group * groups)
    for branch in branches:
        kernel, bias, offsets = branch[:3]
        scale = branch[3] if len(branch) > 3 and branch[3] is not None else np.ones(1)
        kernel = np.asarray(kernel)
        if kernel.shape[:2] != (cin, cout_per_group) or kernel.ndim != 2 + len(spatial_shape):
            raise ValueError(f"branch kernel {kernel.shape} does not match {(cin, cout_per_group)} on {spatial_shape}")
        weight, bias = scale_transposed_output_channels(kernel, bias, scale, None, groups)
        kernel_sum[(slice(None), slice(None)) + _window(kernel.shape[2:], spatial_shape, offsets)] += weight
        bias_sum += bias
    out_dtype = np.dtype(np.float64 if out_dtype is None else out_dtype)
    return cast_like(kernel_sum, out_dtype), cast_like(bias_sum, out_dtype)


# -- an affine map before a layer ---------------------------------------------------------------
# x -> s*x + t per input channel (or feature), then a conv or a dense layer: the scale goes into
# the weight, the shift into the bias (through the weight). Exact for a conv only where no
# padding reads the shifted input (t = 0, or no padding): a padded border reads 0, not t.


def input_channel_of(cout: int, cin_per_group: int, groups: int) -> np.ndarray:
    """(Cout, Cin/groups) array: the global input channel that weight [o, i] reads."""
    return (np.arange(cout)[:, None] // (cout // groups)) * cin_per_group + np.arange(cin_per_group)[None, :]


def fold_input_affine_conv(weight, bias, groups: int, scale, shift) -> tuple[np.ndarray, np.ndarray]:
    """conv(s*x + t, W, b) = conv(x, W', b') with W'[o, i] = W[o, i] * s[c], b'[o] = b[o] +
    sum over i and taps of W[o, i] * t[c], c the input channel weight [o, i] reads. float64."""
    weight = np.asarray(weight, dtype=np.float64)
    cout, cpg = weight.shape[:2]
    channel = input_channel_of(cout, cpg, groups)
    shape = (cout, cpg) + (1,) * (weight.ndim - 2)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), (cpg * groups,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64).reshape(-1), (cpg * groups,))
    bias = np.zeros(cout) if bias is None else np.asarray(bias, dtype=np.float64)
    folded = weight * scale[channel].reshape(shape)
    return folded, bias + (weight * shift[channel].reshape(shape)).reshape(cout, -1).sum(axis=1)


def fold_input_affine_dense(weight, bias, scale, shift) -> tuple[np.ndarray, np.ndarray]:
    """(s*x + t) @ W + b = x @ W' + b' for W of shape (in, out): W' = diag(s) W,
    b' = b + t @ W. float64."""
    weight = np.asarray(weight, dtype=np.float64)
    features = weight.shape[0]
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), (features,))
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64).reshape(-1), (features,))
    bias = np.zeros(weight.shape[1]) if bias is None else np.asarray(bias, dtype=np.float64)
    return weight * scale[:, None], bias + shift @ weight


# -- many blocks at once ---------------------------------------------------------------------
# A model of many small blocks spends more on numpy's per-call overhead than on arithmetic.
# sum_branches_many sums blocks of one structure (the same branch shapes, offsets, dtypes)
# stacked into one array: every element goes through the same float64 operations, in the same
# order, as in sum_branches, so the results are the same bits; a block whose cast needs a
# refusal (overflow, underflow) is summed again on its own, which raises as sum_branches does.

_BATCH_BYTES = 1 << 25  # float64 accumulator bytes per stacked group


def sum_branches_many(items: Sequence[tuple], chunk_bytes: int = 1 << 21) -> list:
    """sum_branches(branches, spatial_shape, out_dtype) for each (branches, spatial_shape,
    out_dtype) in `items`: a list of (kernel, bias), or the CastError that block raises."""
    results: list = [None] * len(items)
    groups: dict[tuple, list[int]] = {}
    for position, (branches, spatial_shape, out_dtype) in enumerate(items):
        try:  # what blocks summed together share: kernel shapes, offsets, which have scales
            key = (tuple(spatial_shape), np.dtype(np.float64 if out_dtype is None else out_dtype),
                   tuple((b[0].shape, tuple(b[2]), len(b) > 3 and b[3] is not None) for b in branches))
        except AttributeError:  # not arrays: sum_branches converts them
            key = None
        if key is None or not branches:
            results[position] = _summed(branches, spatial_shape, out_dtype, chunk_bytes)
        else:
            groups.setdefault(key, []).append(position)
    for key, members in groups.items():
        per_block = max(1, 8 * sum(math.prod(shape) for shape, _, _ in key[2]))
        step = max(1, _BATCH_BYTES // per_block)
        for start in range(0, len(members), step):
            chunk = members[start:start + step]
            stacked = _stacked_sum([items[p][0] for p in chunk], key) if len(chunk) > 1 else None
            for k, position in enumerate(chunk):
                result = stacked[k] if stacked is not None else None
                if result is None:  # alone: a cast that must refuse raises what sum_branches raises
                    branches, spatial_shape, out_dtype = items[position]
                    result = _summed(branches, spatial_shape, out_dtype, chunk_bytes)
                results[position] = result
    return results


def _summed(branches, spatial_shape, out_dtype, chunk_bytes: int):
    try:
        return sum_branches(branches, spatial_shape, out_dtype=out_dtype, chunk_bytes=chunk_bytes)
    except CastError as err:
        return err


def _stacked_sum(blocks: list, key: tuple) -> list | None:
    """sum_branches of blocks of one structure, stacked: (kernel, bias) per block, or None for
    a block whose cast is refused (overflow, non-finite values, underflow); None for all when
    the structure is not one sum_branches takes as it is (it then checks, or broadcasts)."""
    spatial, dtype, terms = key
    n = len(blocks)
    if dtype.kind != "f" or not terms or len(terms[0][0]) != 2 + len(spatial):
        return None
    cout, cin = terms[0][0][:2]
    extra = (1,) * (len(spatial) + 1)
    bias_sum = np.zeros((n, cout), dtype=np.float64)
    prepared = []
    for t, (shape, offsets, scaled) in enumerate(terms):
        if len(shape) != 2 + len(spatial) or shape[:2] != (cout, cin) or len(offsets) != len(spatial):
            return None
        if math.prod(shape) and any(o < 0 or o + k > size for o, k, size in zip(offsets, shape[2:], spatial)):
            return None
        try:
            bias = np.array([b[t][1] for b in blocks], dtype=np.float64)  # (n, cout)
            scale = np.array([b[t][3] for b in blocks], dtype=np.float64) if scaled else None
        except ValueError:  # shapes that differ between blocks
            return None
        if bias.shape != (n, cout) or (scale is not None and scale.shape != (n, cout)):
            return None
        if scale is not None:
            bias = bias * scale
        bias_sum += bias
        if math.prod(shape):
            window = (slice(None), slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offsets, shape[2:]))
            prepared.append((np.stack([b[t][0] for b in blocks]), window,
                             None if scale is None else scale.reshape((n, cout) + extra), shape[2:] == spatial))
    prepared.sort(key=lambda p: not p[3])  # a full-size branch first, as sum_branches orders them
    acc = np.empty((n, cout, cin) + spatial, dtype=np.float64)
    covers = bool(prepared) and prepared[0][3]
    if covers:
        first, _, first_scale, _ = prepared[0]
        if first_scale is None:
            np.copyto(acc, first)
        else:
            np.multiply(first, first_scale, out=acc)
    else:
        acc.fill(0.0)
    for kernel, window, scale, _ in prepared[1:] if covers else prepared:
        if scale is None:
            acc[window] += kernel
        else:
            acc[window] += kernel * scale
    kernels, kernel_ok = _stacked_cast(acc.reshape(n, -1), dtype)
    biases, bias_ok = _stacked_cast(bias_sum, dtype)
    kernels = kernels.reshape(acc.shape)
    return [(kernels[i], biases[i]) if kernel_ok[i] and bias_ok[i] else None for i in range(n)]


def _stacked_cast(values: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Rows of float64 `values` cast to `dtype` (a float type), and which rows cast_like would
    pass: finite, no value past the type's range, no value flushed to 0 that is not negligible."""
    out = np.empty(values.shape, dtype=dtype)
    if dtype == values.dtype:
        np.copyto(out, values)
        return out, np.ones(len(values), dtype=bool)
    largest = np.abs(values).max(axis=1, initial=0.0)
    ok = largest <= _float_max(dtype)  # False for nan and inf too
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # only in rows not ok
        np.copyto(out, values, casting="unsafe")
    if np.count_nonzero(out) != np.count_nonzero(values):  # some value was flushed to 0
        flushed = np.where((out == 0) & (values != 0), np.abs(values), 0.0).max(axis=1, initial=0.0)
        ok &= ~((flushed != 0) & (flushed > float(np.finfo(dtype).eps) * largest))
    return out, ok
