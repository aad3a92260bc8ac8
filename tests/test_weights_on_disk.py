"""Weights left on disk: the wire-format walk, the model skeleton, and the splicing writer.

The CLI reads an inline model as a skeleton whose large initializers point back into the
file, fuses reading only matched blocks' weights, and writes the output by splicing tensor
bytes between serialized headers. These tests hold that to protobuf's own bytes.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_repvgg import fuse
from onnx_repvgg.cli import main
from onnx_repvgg.storage import skeleton, wire
from onnx_repvgg.storage.sinks import MemorySink
from onnx_repvgg.storage.staging import Payloads, write_inline
from tests.graphs import GraphBuilder, op_counts, random_feed, run

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def chain_model(channels=48, blocks=2, seed=0) -> onnx.ModelProto:
    """`blocks` RepVGG blocks (3x3-BN + 1x1-BN + BN identity, ReLU, scaled down so values stay
    near 1) in a row, then a Mul by a typed-field constant (float_data, not raw_data) and an
    Add of a Constant node."""
    b = GraphBuilder(channels=channels, spatial=(6, 6), seed=seed)
    x = b.x
    for _ in range(blocks):
        c3 = b.bn(b.conv(x, channels, channels, 3, bias=False), channels)
        c1 = b.bn(b.conv(x, channels, channels, 1, pads=[0, 0, 0, 0], bias=False), channels)
        x = b.op("Relu", [b.add(b.add(c3, c1), b.bn(x, channels))])
        x = b.op("Mul", [x, b.constant(np.array(0.1, np.float32), "damp")])
    typed = helper.make_tensor("typed_scale", onnx.TensorProto.FLOAT, [1, channels, 1, 1],
                               list(np.linspace(0.5, 1.5, channels)))
    b.initializers.append(typed)
    shift = b.constant(np.full((1, channels, 1, 1), 0.25, np.float32), "shift", as_node=True)
    y = b.op("Add", [b.op("Mul", [x, "typed_scale"]), shift])
    return b.model([y])


def saved(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def digest(path) -> str:
    return hashlib.sha256(read_bytes(path)).hexdigest()


# --- wire format --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**63 - 1])
def test_varint_round_trip(value):
    encoded = wire.encode_varint(value)
    assert wire.read_varint(encoded, 0, len(encoded)) == (value, len(encoded))


def test_fields_and_split_before_follow_protobuf():
    tensor = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "t")
    tensor.doc_string = "after raw_data"
    data = tensor.SerializeToString()
    found = list(wire.fields(data))
    assert [f.number for f in found] == [1, 1, 2, 8, 9, 12]  # dims (unpacked), type, name, raw, doc
    raw = found[4]
    assert data[raw.value_start:raw.end] == tensor.raw_data
    assert wire.split_before(data, wire.TENSOR_RAW_DATA) == found[5].start
    header = onnx.TensorProto()
    header.CopyFrom(tensor)
    header.ClearField("raw_data")
    serialized = header.SerializeToString()
    cut = wire.split_before(serialized, wire.TENSOR_RAW_DATA)
    spliced = serialized[:cut] + wire.length_delimited(9, len(tensor.raw_data)) + tensor.raw_data + serialized[cut:]
    assert spliced == data


@pytest.mark.parametrize("data", [b"\x08", b"\x0a\x05ab", b"\x0b\x00", b"\x00\x01", b"\x08" + b"\xff" * 11,
                                  b"\x09\x00", b"\x0d\x00"])
def test_malformed_wire_is_refused(data):
    with pytest.raises(wire.WireError):
        list(wire.fields(data))
    with pytest.raises(wire.WireError):
        list(wire.spans(data, 0, len(data), 1, 0))  # the filtered walk checks every field too


def test_filtered_spans_are_spans_filtered():
    """spans(number=, min_length=) (the skeleton's walk) gives the length-delimited fields of one
    number and at least a length, as spans() filtered by hand does: on a graph with every wire
    type beside them."""
    rng = np.random.default_rng(0)
    graph = onnx.GraphProto(name="g" * 200)
    for i, size in enumerate([0, 1, 127, 128, 300, 5000]):
        graph.initializer.append(numpy_helper.from_array(rng.standard_normal(size).astype(np.float32), f"t{i}"))
        graph.node.append(onnx.helper.make_node("Relu", [f"t{i}"], [f"r{i}"]))
    data = graph.SerializeToString() + wire.tag(20, wire.VARINT) + wire.encode_varint(2**40) \
        + wire.tag(21, wire.FIXED64) + bytes(8) + wire.tag(22, wire.FIXED32) + bytes(4)  # unknown fields
    for number in (1, 2, 5):
        for min_length in (0, 1, 128, 600, 1 << 20):
            expected = [span for span in wire.spans(data, 0, len(data))
                        if span[0] == number and span[1] == wire.LENGTH_DELIMITED and span[4] - span[3] >= min_length]
            assert list(wire.spans(data, 0, len(data), number, min_length)) == expected


# --- the skeleton ------------------------------------------------------------------------------

@pytest.mark.parametrize("min_bytes,expected", [(1024, 4), (skeleton.MIN_BYTES, 2), (1 << 30, 0)])
def test_skeleton_leaves_large_raw_initializers_in_the_file(tmp_path, min_bytes, expected):
    model = chain_model(channels=16 if min_bytes == 1024 else 48)
    path = saved(model, tmp_path / "m.onnx")
    skeleton_model, moved = skeleton.read(path, min_bytes)
    original = {t.name: t for t in model.graph.initializer}
    data = read_bytes(path)
    large = {name for name, t in original.items() if len(t.raw_data) >= min_bytes}
    # 16 channels: two 3x3 and two 1x1 kernels of 1 KB and more; 48: the two 3x3 are 81 KB
    assert moved == len(large) == expected
    for tensor in skeleton_model.graph.initializer:
        source = original[tensor.name]
        if tensor.name in large:
            info = {e.key: e.value for e in tensor.external_data}
            assert tensor.data_location == onnx.TensorProto.EXTERNAL and info["location"] == "m.onnx"
            offset, length = int(info["offset"]), int(info["length"])
            assert data[offset:offset + length] == source.raw_data
            assert list(tensor.dims) == list(source.dims) and tensor.data_type == source.data_type
        else:  # small ones, and the typed-field constant, stay parsed as they were
            assert tensor == source
    assert skeleton_model.graph.node == model.graph.node
    assert skeleton_model.opset_import == model.opset_import


def test_writer_splices_protobufs_own_bytes(tmp_path):
    """Skeleton in, inline file out: byte for byte the file onnx.save wrote."""
    path = saved(chain_model(channels=16), tmp_path / "m.onnx")
    skeleton_model, moved = skeleton.read(path, 1024)
    assert moved == 4
    write_inline(skeleton_model, str(tmp_path / "copy.onnx"), Payloads(str(tmp_path), None))
    assert read_bytes(tmp_path / "copy.onnx") == read_bytes(path)


def test_writer_inlines_arrays_kept_in_memory_also_in_subgraphs(tmp_path):
    b = GraphBuilder(channels=16)
    inner_w = np.random.default_rng(1).standard_normal((16, 16, 1, 1)).astype(np.float32)
    outer_w = np.random.default_rng(2).standard_normal((16, 16, 3, 3)).astype(np.float32)
    body = helper.make_graph([helper.make_node("Conv", ["x", "inner_w"], ["y_then"], name="inner_conv")], "then",
                             [], [helper.make_tensor_value_info("y_then", onnx.TensorProto.FLOAT, None)],
                             initializer=[numpy_helper.from_array(inner_w, "inner_w")])
    b.initializers.append(numpy_helper.from_array(np.array(True), "flag"))
    y = b.op("If", ["flag"], then_branch=body, else_branch=body)
    b.initializers.append(numpy_helper.from_array(outer_w, "outer_w"))
    z = b.op("Conv", [y, "outer_w"], pads=[1, 1, 1, 1])
    expected = b.model([z])

    memory = MemorySink()
    lazy = onnx.ModelProto()
    lazy.CopyFrom(expected)
    for tensor in [lazy.graph.initializer[-1], lazy.graph.node[0].attribute[0].g.initializer[0]]:
        array = numpy_helper.to_array(tensor)
        location, offset, length = memory.put(array, tensor.name)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    write_inline(lazy, str(tmp_path / "out.onnx"), Payloads(str(tmp_path), memory))
    assert read_bytes(tmp_path / "out.onnx") == expected.SerializeToString()


# --- through the CLI ---------------------------------------------------------------------------

def test_cli_output_is_the_api_output_byte_for_byte(tmp_path, capsys):
    path = saved(chain_model(blocks=3), tmp_path / "in.onnx")
    assert skeleton.read(path)[1] == 3  # the 3x3 kernels stay on disk
    before = digest(path)
    assert main([path, str(tmp_path / "out.onnx"), "--json", str(tmp_path / "r.json")]) == 0
    assert "validation: passed" in capsys.readouterr().out
    via_api, report = fuse(onnx.load(path))
    assert len(report.fused) == 5  # 3 blocks, and the damping Muls folded into the next block's convs
    assert read_bytes(tmp_path / "out.onnx") == via_api.SerializeToString()
    assert digest(path) == before  # the input is read, never written
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx", "r.json"]


@pytest.mark.parametrize("external", [False, True])
def test_fused_weights_are_read_back_in_a_later_round(tmp_path, capsys, external):
    """BN -> (1x1 + 1x1): round 1 sums the branches, round 2 folds the BN into that new conv,
    reading the weight fused in round 1 from wherever the sink put it (128x128 float32: 64 KiB,
    big enough to be kept out of the model, in the data file or in memory)."""
    b = GraphBuilder(channels=128, spatial=(3, 3))
    x = b.bn(b.x, 128)
    y = b.add(b.conv(x, 128, 128, 1, pads=[0, 0, 0, 0]), b.conv(x, 128, 128, 1, pads=[0, 0, 0, 0]))
    model = b.model([y])
    path = str(tmp_path / "in.onnx")
    if external:
        onnx.save_model(model, path, save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    else:
        onnx.save(model, path)
    assert main([path, str(tmp_path / "out.onnx")]) == 0
    out = capsys.readouterr().out
    assert "blocks: 2 fused, 0 skipped" in out and "validation: passed" in out
    assert op_counts(onnx.load(str(tmp_path / "out.onnx"))) == {"Conv": 1}


def test_overwrite_inline_model_in_place(tmp_path, capsys):
    path = saved(chain_model(), tmp_path / "m.onnx")
    expected = fuse(onnx.load(path))[0].SerializeToString()
    assert main([path, path, "--overwrite"]) == 0
    assert read_bytes(path) == expected
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_model_cut_inside_a_weight_is_refused(tmp_path, capsys):
    path = saved(chain_model(), tmp_path / "m.onnx")
    skeleton_model, _ = skeleton.read(path)
    tensor = next(t for t in skeleton_model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    info = {e.key: int(e.value) for e in tensor.external_data if e.key != "location"}
    data = read_bytes(path)
    (tmp_path / "cut.onnx").write_bytes(data[:info["offset"] + info["length"] // 2])
    assert main([str(tmp_path / "cut.onnx"), str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is truncated" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["cut.onnx", "m.onnx"]


def test_text_format_input_is_parsed_by_onnx(tmp_path, capsys):
    """A .textproto model is parsed and checked by onnx as its extension says, and written as
    binary. onnxruntime reads only binary models, so it is fused with --no-check."""
    model = chain_model(blocks=1)
    onnx.save(model, str(tmp_path / "m.textproto"), format="textproto")
    assert main([str(tmp_path / "m.textproto"), str(tmp_path / "out.onnx"), "--no-check"]) == 0
    fused = onnx.load(str(tmp_path / "out.onnx"))
    assert op_counts(fused) == {"Conv": 1, "Relu": 1, "Mul": 2, "Add": 1, "Constant": 1}
    feed = random_feed(model)
    np.testing.assert_allclose(run(fused, feed)[0], run(model, feed)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_linked_input_files(tmp_path, capsys, link):
    """A model reached through a symlink (as in model caches) or with a second hard link is
    fused: weights left in the file are not held to the checker's rules for data files."""
    (tmp_path / "store").mkdir()
    (tmp_path / "work").mkdir()
    target = saved(chain_model(), tmp_path / "store" / "blob")
    path = str(tmp_path / "work" / "model.onnx")
    (os.symlink if link == "symlink" else os.link)(target, path)
    expected = fuse(onnx.load(path))[0].SerializeToString()
    assert main([path, str(tmp_path / "work" / "out.onnx")]) == 0
    assert "validation: passed" in capsys.readouterr().out
    assert read_bytes(tmp_path / "work" / "out.onnx") == expected


def test_inline_weights_beside_external_data(tmp_path, capsys):
    """Some weights in a data file, some large ones inline: the output is external data, every
    byte copied or fused from the right place."""
    b = GraphBuilder(channels=48, spatial=(5, 5))
    c3 = b.bn(b.conv(b.x, 48, 48, 3, bias=False), 48)  # 81 KB: inline, left in the file
    c1 = b.bn(b.conv(b.x, 48, 48, 1, pads=[0, 0, 0, 0], bias=False), 48)
    y = b.op("Relu", [b.add(c3, c1)])
    z = b.conv(y, 48, 64, 3)  # 108 KB: to the data file
    model = b.model([z])
    path = str(tmp_path / "in.onnx")
    onnx.save_model(model, path, save_as_external_data=True, location="in.onnx.data", size_threshold=100_000)
    lazy = onnx.load(path, load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer) == 1
    assert skeleton.read(path)[1] == 1
    assert main([path, str(tmp_path / "out.onnx")]) == 0
    assert "validation: passed" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "in.onnx.data", "out.onnx", "out.onnx.data"]
    fused = onnx.load(str(tmp_path / "out.onnx"))
    assert op_counts(fused) == {"Conv": 2, "Relu": 1}
    original = onnx.load(path)  # save_model turned `model` into external-data references
    feed = random_feed(original)
    np.testing.assert_allclose(run(fused, feed)[0], run(original, feed)[0], rtol=1e-4, atol=1e-4)


def test_output_grown_past_the_limit_goes_to_external_data(tmp_path, capsys, monkeypatch):
    """--allow-densify can make a model bigger (depthwise 3x3 + dense 1x1 -> dense 3x3): the
    fused weights kept in memory go to the data file when the output crosses the limit."""
    from onnx_repvgg.storage import io as rio

    b = GraphBuilder(channels=48, spatial=(5, 5))
    out = b.add(b.conv(b.x, 48, 48, 3, group=48), b.conv(b.x, 48, 48, 1, pads=[0] * 4))
    path = saved(b.model([out]), tmp_path / "in.onnx")
    monkeypatch.setattr(rio, "EXTERNAL_THRESHOLD", 50_000)  # input ~11 KB of weights, output ~83 KB
    assert main([path, str(tmp_path / "out.onnx"), "--allow-densify"]) == 0
    assert "validation: passed" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx", "out.onnx.data"]
    fused = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    (weight,) = [t for t in fused.graph.initializer if len(t.dims) == 4]
    assert list(weight.dims) == [48, 48, 3, 3] and weight.data_location == onnx.TensorProto.EXTERNAL


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(MODELS) if f.endswith(".onnx")))
def test_sample_models_with_every_weight_of_1_kb_left_on_disk(tmp_path, capsys, monkeypatch, name):
    """The sample models' tensors are small, so the 64 KiB cut leaves most of them parsed:
    with the cut at 1 KB, every weight goes through the wire-format reader and writer."""
    monkeypatch.setattr(skeleton, "MIN_BYTES", 1024)
    monkeypatch.setattr(MemorySink, "threshold", 1024)
    src = os.path.join(MODELS, name)
    external = os.path.exists(src + ".data")
    assert (skeleton.read(src)[1] > 10) is not external  # the dynamo export's weights are external already
    assert main([src, str(tmp_path / "out.onnx"), "--check", "2"]) == 0
    assert "validation: passed" in capsys.readouterr().out
    via_api, report = fuse(onnx.load(src))
    if not external:
        assert read_bytes(tmp_path / "out.onnx") == via_api.SerializeToString()
    else:
        assert op_counts(onnx.load(str(tmp_path / "out.onnx"))) == op_counts(via_api)


def test_damaged_files_never_crash(tmp_path, capsys):
    """Truncations and flipped bytes anywhere in a model whose weights the wire walk leaves in
    the file: every run ends in success (the damage hit only weights) or a one-line error,
    never an internal error, and a failure leaves nothing behind."""
    data = read_bytes(saved(chain_model(), tmp_path / "good.onnx"))
    rng = np.random.default_rng(0)
    damaged = [data[:cut] for cut in np.linspace(1, len(data) - 1, 30).astype(int)]
    for _ in range(30):
        flipped = bytearray(data)
        flipped[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        damaged.append(bytes(flipped))
    codes = set()
    for blob in damaged:
        (tmp_path / "m.onnx").write_bytes(blob)
        code = main([str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "-q"])
        err = capsys.readouterr().err
        codes.add(code)
        assert code in (0, 1, 2), err
        if code:
            assert err.count("\n") == 1 and "Traceback" not in err
        assert sorted(os.listdir(tmp_path)) == sorted(["good.onnx", "m.onnx"] + (["o.onnx"] if code == 0 else []))
        if code == 0:
            os.remove(tmp_path / "o.onnx")
    assert codes >= {0, 2}


def test_byte_ranges_are_copied_by_hand_where_the_kernel_cannot(tmp_path, capsys, monkeypatch):
    """copy_file_range failing (EXDEV across file systems, or unsupported) falls back to reads
    and writes, byte for byte the same."""
    path = saved(chain_model(), tmp_path / "in.onnx")
    assert main([path, str(tmp_path / "fast.onnx"), "--no-check"]) == 0

    def refuse(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    assert main([path, str(tmp_path / "slow.onnx"), "--no-check"]) == 0
    assert read_bytes(tmp_path / "slow.onnx") == read_bytes(tmp_path / "fast.onnx")


def test_weight_left_in_the_file_with_too_few_bytes_is_refused(tmp_path, capsys):
    model = chain_model()
    big = next(t for t in model.graph.initializer if len(t.raw_data) >= skeleton.MIN_BYTES)
    big.dims[0] *= 4  # the shape now needs four times the bytes the tensor holds
    path = saved(model, tmp_path / "m.onnx")
    assert main([path, str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is too small for the declared shape" in err and big.name in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize("channels", [2, 128])
def test_inline_output_is_what_onnx_save_writes_with_an_unknown_graph_field(tmp_path, channels):
    """The output is the bytes onnx.save writes, unknown fields last, also for a graph whose only
    field after the initializers is an unknown one: a model of small tensors (written in one
    protobuf call) and one whose 64 KiB weight stays in the input file and is spliced in (the
    splice goes before the graph's first field that is of a higher number or unknown; it went
    after such an unknown field). Found by review."""
    weight = numpy_helper.from_array(np.ones((channels, channels, 1, 1), np.float32), "W")
    nodes = [helper.make_node("Constant", [], ["c"],
                              value=numpy_helper.from_array(np.ones((1, channels, 3, 3), np.float32))),
             helper.make_node("Conv", ["c", "W"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [], [], [weight]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.graph.ParseFromString(model.graph.SerializeToString() + bytes([0x18, 5]))  # field 3 (reserved): unknown
    onnx.checker.check_model(model, full_check=True)
    path, out = str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx")
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    assert main([path, out, "--no-check", "-q"]) == 0
    written = read_bytes(out)
    assert written == onnx.load(out).SerializeToString()  # what onnx.save writes of the fused model
    parsed = onnx.ModelProto.FromString(written)
    assert parsed.graph.SerializeToString().endswith(bytes([0x18, 5]))  # the unknown field kept, last
    assert op_counts(parsed) == {"Constant": 1, "Conv": 1}
