"""Random graphs of blocks and near-misses of blocks, for property-based soundness checks.

`graph_spec(draw)` is a hypothesis composite: it draws a list of branches of one input X
(Conv, Conv->BN, BN(X), X, scaled, shared, subtracted), random geometry, BN statistics,
dtypes and extra consumers; `build(spec)` turns it into an ONNX model. Branches whose
output shape would not match the first branch are dropped, so every model is valid.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import helper

from tests.graphs import GraphBuilder


def conv_out(size, k, s, d, pb, pe):
    return (size + pb + pe - d * (k - 1) - 1) // s + 1


@st.composite
def graph_spec(draw):
    ndim = draw(st.sampled_from([1, 2, 2, 2]))
    channels = draw(st.sampled_from([1, 2, 4, 6]))
    spatial = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    group_choices = [g for g in (1, 2, channels) if channels % g == 0]
    common_stride = draw(st.sampled_from([1, 1, 2]))
    common_group = draw(st.sampled_from(group_choices))
    n_branches = draw(st.integers(1, 4))
    branches = []
    for _ in range(n_branches):
        kind = draw(st.sampled_from(["conv", "conv", "conv_bn", "bn", "identity", "scaled_conv", "pool", "padded_conv"]))
        k = tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(ndim))
        dil = tuple(draw(st.sampled_from([1, 1, 2, 4])) for _ in range(ndim))
        centred = draw(st.booleans())
        pads_b = tuple((d * (kk - 1)) // 2 if centred else draw(st.integers(0, 2)) for kk, d in zip(k, dil))
        pads_e = tuple((d * (kk - 1)) - pb if centred and d * (kk - 1) >= pb else draw(st.integers(0, 2))
                       for kk, d, pb in zip(k, dil, pads_b))
        branches.append(dict(
            kind=kind, k=k, dil=dil, pads=pads_b + pads_e,
            stride=common_stride if draw(st.integers(0, 4)) else draw(st.sampled_from([1, 2])),
            group=common_group if draw(st.integers(0, 4)) else draw(st.sampled_from(group_choices)),
            cout=channels if draw(st.integers(0, 3)) else draw(st.sampled_from([1, 2, 4])),
            bias=draw(st.booleans()),
            bn_var=draw(st.sampled_from(["normal", "tiny", "large_mean"])),
            training=draw(st.integers(0, 20)) == 0,
            weight_as_input=draw(st.integers(0, 20)) == 0,
            scale=draw(st.sampled_from(["scalar", "channel", "spatial"])),
            extra_consumer=draw(st.integers(0, 12)) == 0,
            output_too=draw(st.integers(0, 12)) == 0,
            negate=draw(st.integers(0, 5)) == 0,
            include_pad=draw(st.integers(0, 3)) > 0,
            pad_mode=draw(st.sampled_from(["constant", "constant", "constant", "reflect"])),
            pad_value=draw(st.sampled_from([None, 0.0, 0.0, 0.5])),
        ))
    return dict(
        ndim=ndim, channels=channels, spatial=spatial, branches=branches,
        dtype=draw(st.sampled_from(["float32", "float32", "float32", "float16"])),
        constant_addend=draw(st.sampled_from([None, "scalar", "channel"])),
        # issue 15's kinds: BN training mode by each opset's rule, a factor kept on another
        # addend (large ones overflow float16), a scale computed from a Slice's shape
        opset=draw(st.sampled_from([9, 13, 17, 17, 17])),
        kept_addend=draw(st.sampled_from([None, None, None, "small", "large"])),
        shape_scale=draw(st.sampled_from([None, None, None, None, (-100, -200, -1), (100, -200, -1), (-1, -100, -2),
                                          (-100, 100, 1), (1, 1, 1), (0, 2**62, 3)])),
        trailing_bn=draw(st.integers(0, 4)) == 0,
        tree_seed=draw(st.integers(0, 2**16)),
        subtract=draw(st.integers(0, 3)) == 0,
        shared_weight=draw(st.integers(0, 8)) == 0,
        seed=draw(st.integers(0, 2**16)),
    )


def build(spec) -> onnx.ModelProto | None:
    """The model of a spec, or None if no two branches agree on an output shape."""
    c = spec["channels"]
    dtype = np.float16 if spec["dtype"] == "float16" else np.float32
    b = GraphBuilder(channels=c, spatial=spec["spatial"], dtype=dtype, seed=spec["seed"], batch=1,
                     opset=spec.get("opset", 17))
    x = b.x
    n = spec["ndim"]
    terms, extra_outputs = [], []
    shape_scaled = False
    target = None
    shared = None
    for br in spec["branches"]:
        kind = br["kind"]
        if kind in ("bn", "identity"):
            shape = (c,) + spec["spatial"]
        elif kind == "pool":
            if any(pb >= k or pe >= k for k, pb, pe in zip(br["k"], br["pads"][:n], br["pads"][n:])):
                continue  # ONNX wants pads smaller than the pooling window
            shape = (c,) + tuple(conv_out(size, k, br["stride"], 1, pb, pe) for size, k, pb, pe in
                                 zip(spec["spatial"], br["k"], br["pads"][:n], br["pads"][n:]))
            if min(shape[1:]) < 1:
                continue
        else:
            if c % br["group"] or br["cout"] % br["group"]:
                continue
            shape = (br["cout"],) + tuple(conv_out(size, k, br["stride"], d, pb, pe) for size, k, d, pb, pe in
                                          zip(spec["spatial"], br["k"], br["dil"], br["pads"][:n], br["pads"][n:]))
            if min(shape[1:]) < 1:
                continue
        if target is None:
            target = shape
        if shape != target:
            continue
        if kind == "identity":
            t = x
        elif kind == "pool":
            t = b.op("AveragePool", [x], kernel_shape=list(br["k"]), strides=[br["stride"]] * n,
                     pads=list(br["pads"]), count_include_pad=int(br["include_pad"]))
        elif kind == "bn":
            t = _bn(b, x, c, br["training"], _bn_params(b, c, br, dtype))
        else:
            weight_name = None
            if br["weight_as_input"]:
                weight_name = f"w_input_{len(b.extra_inputs)}"
                b.extra_inputs.append(helper.make_tensor_value_info(
                    weight_name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                    [br["cout"], c // br["group"], *br["k"]]))
            elif spec["shared_weight"]:
                key = (br["cout"], c // br["group"], *br["k"])
                if shared is None or shared[0] != key:
                    shared = (key, b.constant((b.rng.standard_normal(key) * 0.3).astype(dtype), "shared"))
                weight_name = shared[1]
            source, conv_pads = x, list(br["pads"])
            if kind == "padded_conv":  # the same geometry, with the padding done by a Pad node
                if br["pad_mode"] == "reflect" and any(p >= s for p, s in zip(br["pads"], spec["spatial"] * 2)):
                    continue  # reflect needs pads smaller than the axis
                all_pads = [0, 0, *br["pads"][:n], 0, 0, *br["pads"][n:]]
                if b.opset < 11:  # Pad-2: pads and value are attributes
                    value = 0.0 if br["pad_value"] is None else float(br["pad_value"])
                    source = b.op("Pad", [x], mode=br["pad_mode"], pads=all_pads, value=value)
                else:
                    inputs = [x, b.constant(np.array(all_pads, np.int64), "pads")]
                    if br["pad_value"] is not None:
                        inputs.append(b.constant(np.array(br["pad_value"], dtype), "pad_value"))
                    source = b.op("Pad", inputs, mode=br["pad_mode"])
                conv_pads = [0] * (2 * n)
            t = b.conv(source, c, br["cout"], br["k"], stride=br["stride"], pads=conv_pads, group=br["group"],
                       dilation=list(br["dil"]), bias=br["bias"], weight_name=weight_name)
            if kind == "conv_bn":
                t = _bn(b, t, br["cout"], br["training"], _bn_params(b, br["cout"], br, dtype))
            elif kind == "scaled_conv":
                shape_of = {"scalar": (), "channel": (br["cout"], *(1,) * n), "spatial": (1, *target[1:])}
                s = b.constant(b.rng.uniform(0.5, 1.5, shape_of[br["scale"]]).astype(dtype), "scale")
                t = b.op("Mul", [t, s])
            if spec.get("shape_scale") and b.opset >= 10 and not shape_scaled:
                t = b.op("Mul", [t, _shape_scale(b, x, spec["shape_scale"], n + 1, dtype)])
                shape_scaled = True
        if br["extra_consumer"] and t != x:
            extra_outputs.append(b.op("Relu", [t]))
        if br["output_too"] and t != x:
            extra_outputs.append(t)
        if br["negate"]:
            t = b.op("Neg", [t])
        terms.append(t)
    if not terms:
        return None
    if spec.get("kept_addend"):  # another tensor, scaled inside the sum: its factor is kept
        y = f"y_{len(b.extra_inputs)}"
        b.extra_inputs.append(helper.make_tensor_value_info(y, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                            [1, *target]))
        f = b.constant(np.array(300.0 if spec["kept_addend"] == "large" else 1.5, dtype), "f")
        terms.append(b.op("Mul", [b.op("Mul", [y, f]), f]))
    if spec["constant_addend"] == "scalar":
        terms.append(b.constant(np.array(0.5, dtype), "addend"))
    elif spec["constant_addend"] == "channel":
        terms.append(b.constant(b.rng.standard_normal((target[0],) + (1,) * n).astype(dtype), "addend"))
    # A random binary tree over the terms: pick two, combine (Add, sometimes Sub), repeat.
    tree_rng = np.random.default_rng(spec["tree_seed"])
    pool = list(terms)
    while len(pool) > 1:
        i, j = sorted(tree_rng.choice(len(pool), 2, replace=False))
        right, left = pool.pop(j), pool.pop(i)
        op = "Sub" if spec["subtract"] and tree_rng.integers(0, 3) == 0 else "Add"
        pool.insert(int(tree_rng.integers(0, len(pool) + 1)), b.op(op, [left, right]))
    out = pool[0]
    if out == x or len(terms) == 1 and terms[0] == x:
        out = b.op("Identity", [out])
    if spec["trailing_bn"]:
        out = b.bn(out, target[0], params=_bn_params(b, target[0], spec["branches"][0], dtype))
    outputs = [out] + [o for o in dict.fromkeys(extra_outputs) if o != out]
    try:
        return b.model(outputs, input_shape=[1, c, *spec["spatial"]])
    except Exception:
        return None  # e.g. a broadcast shape inference rejects; not a model to test


def _bn(b: GraphBuilder, x: str, c: int, training: bool, params: list[str]) -> str:
    """A BN; in training mode the way its opset spells it: declared statistics outputs up to
    opset 13 (read or not), training_mode=1 from 14 on."""
    if not training or b.opset >= 14:
        return b.bn(x, c, training_mode=1 if training else None, params=params)
    out = b.fresh("bn")
    extra = [b.fresh(s) for s in ("mean", "var", "saved_mean", "saved_var")]
    b.nodes.append(helper.make_node("BatchNormalization", [x, *params], [out, *extra], name=b.fresh("BN")))
    return out


def _shape_scale(b: GraphBuilder, x: str, bounds: tuple[int, int, int], axis: int, dtype) -> str:
    """float(the length of x sliced along `axis` by (start, end, step)), bounds hidden from shape
    inference (Neg of Neg), so the pass must get ONNX's clamping right itself."""
    start, end, step = bounds

    def hidden(v):
        return b.op("Neg", [b.constant(np.array([-v], np.int64), "p")])

    sliced = b.op("Slice", [x, hidden(start), hidden(end), hidden(axis), hidden(step)])
    dim = b.op("Gather", [b.op("Shape", [sliced]), b.constant(np.array(axis, np.int64), "i")], axis=0)
    return b.op("Cast", [dim], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def _bn_params(b: GraphBuilder, c: int, br: dict, dtype):
    r = b.rng
    var = {"normal": r.uniform(0.25, 2, c), "tiny": r.uniform(1e-6, 1e-4, c), "large_mean": r.uniform(0.5, 2, c)}
    mean = r.uniform(-50, 50, c) if br["bn_var"] == "large_mean" else r.uniform(-1, 1, c)
    if dtype == np.float16:
        var = np.maximum(var["normal"] if br["bn_var"] == "tiny" else var[br["bn_var"]], 1e-3)
    else:
        var = var[br["bn_var"]]
    return [b.constant(v.astype(dtype), s) for v, s in zip(
        [r.uniform(0.5, 1.5, c), r.uniform(-1, 1, c), mean, var], ["gamma", "beta", "mean", "var"])]
