"""Scaling: pass time and peak memory against the I/O floor, over model size, block count and
node count.

    python benchmarks/bench_scale.py [--big] [--nodes] [--repeat N] [--plot benchmarks/scale.png]

Generates train-time RepVGG-shaped graphs (benchmarks/make_repvgg_graph.py) of growing
width (size series: ~10 MB up; --big adds a > 2 GB model, written with external data)
and of growing depth at tiny width (block series, up to 5,000 blocks). For each model it
runs the floor (onnx.load + onnx.save) and the pass (--no-check) in fresh processes and
prints a table; with matplotlib installed it also draws the plot.

--nodes adds the node series of issue 13 (benchmarks/bench_nodes.py): a TorchScript
TransformerEncoder export with nothing to fuse, chained to 16,700 ... 200,300 nodes, and
unfolded RepVGG blocks of 8 channels (8 nodes a block) from 625 to 10,000 blocks. Their floor
is onnx.load + onnx.checker.check_model + onnx.save (the pass reads, checks and writes too);
each figure is the median of --repeat runs (interleaved, a fresh process each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from make_repvgg_graph import build, save  # noqa: E402

SIZE_SERIES = [  # (label, blocks, widths)
    ("w1", (2, 4, 14, 1), (32, 48, 96, 192, 512)),
    ("w2", (2, 4, 14, 1), (64, 96, 192, 384, 1024)),
    ("w3", (4, 6, 16, 1), (64, 128, 256, 512, 2048)),
    ("w4", (4, 6, 16, 1), (96, 192, 384, 768, 3072)),
]
BIG = ("w5 (>2 GB)", (4, 6, 16, 1), (64, 256, 512, 1700, 4096))
BLOCK_SERIES = [625, 1250, 2500, 5000]


def measure(job: str, model: str, out: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(HERE, "measure.py"), job, model, out],
                          capture_output=True, text=True, check=True)
    for f in (out, out + ".data"):
        if os.path.exists(f):
            os.remove(f)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(kind, label, path, blocks):
    size = os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)
    out = path.replace(".onnx", "_out.onnx")
    floor = measure("floor", path, out)
    fused = measure("pass", path, out)
    return dict(series=kind, label=label, mb=size / 1e6, blocks=blocks, floor_s=floor["seconds"],
                pass_s=fused["seconds"], floor_mb=floor["peak_rss_mb"], pass_mb=fused["peak_rss_mb"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--big", action="store_true", help="add a > 2 GB model (needs ~8 GB of disk and RAM)")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--nodes", action="store_true", help="add the node series (bench_nodes.py)")
    p.add_argument("--repeat", type=int, default=1, help="runs per node-series model (median)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "onnx_repvgg_bench"),
                   help="where the node-series models are kept (generated once)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--from-json", default=None, help="no run: the table and plot of the rows a --json run wrote")
    a = p.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            report(json.load(f), a)
        return
    work = tempfile.mkdtemp(prefix="onnx_repvgg_scale.")
    rows = []
    try:
        for label, blocks, widths in SIZE_SERIES + ([BIG] if a.big else []):
            path = os.path.join(work, f"{label}.onnx")
            model = build(blocks, widths, groups=1)
            n_blocks = sum(blocks) + 1
            save(model, path)
            del model
            rows.append(row("size", label, path, n_blocks))
            os.remove(path)
            if os.path.exists(path + ".data"):
                os.remove(path + ".data")
        for n in BLOCK_SERIES:
            path = os.path.join(work, f"b{n}.onnx")
            save(build((n - 1, 0, 0, 0), (8, 8, 8, 8, 8), image=8), path)
            rows.append(row("blocks", f"{n} blocks", path, n))
            os.remove(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if a.nodes:
        rows += node_rows(a.work, a.repeat)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    report(rows, a)


def report(rows: list[dict], a) -> None:
    print("| series | model | MB | blocks | nodes | floor s | pass s | x | floor peak MB | pass peak MB | x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        time_ratio = r["pass_s"] / r["floor_s"]
        mem_ratio = r["pass_mb"] / r["floor_mb"]
        count = f"{r['nodes']:,}" if r.get("nodes") else "-"
        print(f"| {r['series']} | {r['label']} | {r['mb']:.0f} | {r['blocks'] or '-'} | {count} | "
              f"{r['floor_s']:.2f} | {r['pass_s']:.2f} | {time_ratio:.2f} | {r['floor_mb']:.0f} | {r['pass_mb']:.0f} | "
              f"{mem_ratio:.2f} |")
    print("(size and block series: floor = load + save; node series: floor = load + check + save)")
    if a.plot:
        plot(rows, a.plot)


def node_rows(work: str, repeat: int) -> list[dict]:
    """The node series of bench_nodes.py, as rows of this table."""
    import bench_nodes

    os.makedirs(work, exist_ok=True)
    models = [(f"transformer {100 * c} layers", bench_nodes.transformer(work, 100, c),
               [f"--input-shape={bench_nodes.TRANSFORMER_SHAPE}"]) for c in bench_nodes.SERIES_COPIES]
    models += [(f"{n} unfolded blocks", bench_nodes.repvgg(work, n), []) for n in bench_nodes.SERIES_BLOCKS]
    rows = []
    for r in bench_nodes.run_models(models, ["floor", "pass"], repeat, work):
        series = "nodes: transformer" if r["model"].startswith("transformer") else "nodes: repvgg"
        blocks = int(r["model"].split()[0]) if series == "nodes: repvgg" else None
        rows.append(dict(series=series, label=r["model"], mb=r["mb"], blocks=blocks, nodes=r["nodes"],
                         floor_s=r["floor_s"], pass_s=r["pass_s"], floor_mb=r["floor_mb"], pass_mb=r["pass_mb"],
                         floor_cpu=r["floor_cpu"], pass_cpu=r["pass_cpu"]))
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [r for r in rows if r["series"].startswith("nodes")]
    fig, axes = plt.subplots(2 if nodes else 1, 3, figsize=(15, 8 if nodes else 4), squeeze=False)
    size = [r for r in rows if r["series"] == "size"]
    blocks = [r for r in rows if r["series"] == "blocks"]
    ax = axes[0][0]
    ax.plot([r["mb"] for r in size], [r["floor_s"] for r in size], "o-", label="load+save floor")
    ax.plot([r["mb"] for r in size], [r["pass_s"] for r in size], "o-", label="onnx_repvgg --no-check")
    ax.set(xlabel="model size (MB)", ylabel="seconds", title="time vs model size")
    ax.legend()
    ax = axes[0][1]
    ax.plot([r["mb"] for r in size], [r["floor_mb"] for r in size], "o-", label="load+save floor")
    ax.plot([r["mb"] for r in size], [r["pass_mb"] for r in size], "o-", label="onnx_repvgg --no-check")
    ax.set(xlabel="model size (MB)", ylabel="peak RSS (MB)", title="memory vs model size")
    ax.legend()
    ax = axes[0][2]
    ax.plot([r["blocks"] for r in blocks], [r["floor_s"] for r in blocks], "o-", label="load+save floor")
    ax.plot([r["blocks"] for r in blocks], [r["pass_s"] for r in blocks], "o-", label="onnx_repvgg --no-check")
    ax.set(xlabel="blocks", ylabel="seconds", title="time vs block count (tiny width)")
    ax.legend()
    if nodes:
        for series, color in (("nodes: transformer", "tab:blue"), ("nodes: repvgg", "tab:red")):
            sel = [r for r in nodes if r["series"] == series]
            name = series.split(": ")[1] + (" (nothing to fuse)" if series.endswith("transformer") else " (unfolded)")
            x = [r["nodes"] for r in sel]
            for ax, key, unit in ((axes[1][0], "s", "seconds"), (axes[1][1], "mb", "peak RSS (MB)")):
                ax.plot(x, [r[f"floor_{key}"] for r in sel], "o--", color=color, label=f"{name}: load+check+save")
                ax.plot(x, [r[f"pass_{key}"] for r in sel], "o-", color=color, label=f"{name}: --no-check")
                ax.set(xlabel="nodes", ylabel=unit)
            axes[1][2].plot(x, [r["pass_s"] / r["floor_s"] for r in sel], "o-", color=color, label=f"{name}: time")
            axes[1][2].plot(x, [r["pass_mb"] / r["floor_mb"] for r in sel], "o--", color=color, label=f"{name}: memory")
        axes[1][0].set_title("time vs node count")
        axes[1][1].set_title("memory vs node count")
        axes[1][2].axhline(2.0, color="gray", linewidth=0.8)
        axes[1][2].set(xlabel="nodes", ylabel="pass / floor", title="ratio to the floor (line: 2x)")
        top = max(max(r["pass_s"], r["floor_s"]) for r in nodes)
        axes[1][0].set_ylim(0, top * 1.5)  # room for the legend above the lines
        axes[1][0].legend(fontsize=7, loc="upper left")  # the middle panel has the same lines
        axes[1][2].legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
