"""Generate a transformer-like ONNX graph with nothing to fuse: many nodes, few bytes.

    python benchmarks/make_transformer_graph.py OUT.onnx --layers 400 [--copies K] [--distinct-weights]

--layers N exports a PyTorch nn.TransformerEncoder of N layers (d_model 64, 4 heads,
feed-forward 128, batch_first) with the TorchScript exporter (dynamo=False), input x of
shape (batch, seq, 64) with both leading axes dynamic, as a user exporting for variable
batch and sequence length would: about 165 nodes a layer (Shape/Gather/Concat index
arithmetic, Reshape, Transpose, MatMul, LayerNormalization, Softmax, ...), so 400 layers
give ~67,000 nodes. The exporter's time grows faster than linearly in N (400 layers take
~40 s on 2 cores), so --copies K reaches larger graphs cheaply: the exported graph is
chained K times with onnx.helper-level copies (every value and node name of copy i gets
the prefix "c{i}/", copy i reads copy i-1's output), which keeps exactly the exporter's
node pattern. Weights: by default each layer is a deepcopy of the first, as
nn.TransformerEncoder makes them, so the exporter deduplicates them (9 initializers read
through Identity nodes) and the chained copies share them; --distinct-weights draws every
parameter afresh (the exporter then writes ~12 initializers a layer, and each copy gets
its own).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import warnings

import onnx

D_MODEL, HEADS, FEED_FORWARD, SEQ = 64, 4, 128, 16


def export(layers: int, path: str, distinct_weights: bool = False, seed: int = 0) -> None:
    """TorchScript export of an N-layer nn.TransformerEncoder (eval mode, dynamic batch and seq)."""
    import torch

    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    if distinct_weights:
        with torch.no_grad():
            for p in encoder.parameters():
                p.normal_(0.0, 0.05)
    example = torch.randn(1, SEQ, D_MODEL)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (example,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}})


def chain(model: onnx.ModelProto, copies: int, distinct_weights: bool = False) -> onnx.ModelProto:
    """The graph repeated `copies` times in sequence (its one input and output have the same type).

    Copy 0 keeps its names; copy i prefixes every value and node name with "c{i}/" and reads
    copy i-1's output where the original read the graph input. Initializers are shared
    unless `distinct_weights`, when each copy gets its own (same values, new names)."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError("chain needs a graph with one input and one output")
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError("chain does not rename inside subgraphs")
    x, y = inputs[0].name, graph.output[0].name
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    previous = y
    for i in range(1, copies):
        prefix = f"c{i}/"

        def rename(name: str, prefix=prefix, previous=previous) -> str:
            if not name:
                return name
            if name == x:
                return previous
            if name in initializers and not distinct_weights:
                return name
            return prefix + name

        for node in graph.node:
            copy = g.node.add()
            copy.CopyFrom(node)
            if node.name:
                copy.name = prefix + node.name
            copy.input[:] = [rename(v) for v in node.input]
            copy.output[:] = [rename(v) for v in node.output]
        for value in graph.value_info:
            copy = g.value_info.add()
            copy.CopyFrom(value)
            copy.name = rename(value.name)
        if distinct_weights:
            for tensor in graph.initializer:
                copy = g.initializer.add()
                copy.CopyFrom(tensor)
                copy.name = rename(tensor.name)
        previous = rename(y)
    g.output[0].name = previous
    return out


def make(path: str, layers: int, copies: int = 1, distinct_weights: bool = False, cache_dir: str | None = None) -> int:
    """Write the model to `path`; return its node count. The torch export of `layers` layers is
    cached in `cache_dir` (it is the slow part) when one is given."""
    base = path if copies == 1 and cache_dir is None else None
    if base is None:
        folder = cache_dir or os.path.dirname(os.path.abspath(path))
        base = os.path.join(folder, f"transformer_export_L{layers}{'_distinct' if distinct_weights else ''}.onnx")
    if not os.path.exists(base):
        export(layers, base + ".partial", distinct_weights)
        os.replace(base + ".partial", base)
    if copies == 1 and base == path:
        return len(onnx.load(path).graph.node)
    model = chain(onnx.load(base), copies, distinct_weights)
    onnx.save(model, path)
    return len(model.graph.node)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("output")
    p.add_argument("--layers", type=int, default=400, help="encoder layers in the torch export (default 400)")
    p.add_argument("--copies", type=int, default=1, help="chain the exported graph this many times (default 1)")
    p.add_argument("--distinct-weights", action="store_true", help="fresh random weights in every layer and copy")
    p.add_argument("--cache-dir", default=None, help="keep the torch export here and reuse it")
    a = p.parse_args()
    nodes = make(a.output, a.layers, a.copies, a.distinct_weights, a.cache_dir)
    print(f"wrote {a.output}: {nodes} nodes, {os.path.getsize(a.output) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
