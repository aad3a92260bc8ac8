"""Scaling: pass time and peak memory against the I/O floor, over model size and block count.

    python benchmarks/bench_scale.py [--big] [--plot benchmarks/scale.png]

Generates train-time RepVGG-shaped graphs (benchmarks/make_repvgg_graph.py) of growing
width (size series: ~10 MB up; --big adds a > 2 GB model, written with external data)
and of growing depth at tiny width (block series, up to 5,000 blocks). For each model it
runs the floor (onnx.load + onnx.save) and the pass (--no-check) in fresh processes and
prints a table; with matplotlib installed it also draws the plot.
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
    a = p.parse_args()
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
    print("| series | model | MB | blocks | floor s | pass s | x | floor peak MB | pass peak MB | x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        time_ratio = r["pass_s"] / r["floor_s"]
        mem_ratio = r["pass_mb"] / r["floor_mb"]
        print(f"| {r['series']} | {r['label']} | {r['mb']:.0f} | {r['blocks']} | {r['floor_s']:.2f} | {r['pass_s']:.2f} | "
              f"{time_ratio:.2f} | {r['floor_mb']:.0f} | {r['pass_mb']:.0f} | {mem_ratio:.2f} |")
    if a.plot:
        plot(rows, a.plot)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    size = [r for r in rows if r["series"] == "size"]
    blocks = [r for r in rows if r["series"] == "blocks"]
    ax = axes[0]
    ax.plot([r["mb"] for r in size], [r["floor_s"] for r in size], "o-", label="load+save floor")
    ax.plot([r["mb"] for r in size], [r["pass_s"] for r in size], "o-", label="onnx_repvgg --no-check")
    ax.set(xlabel="model size (MB)", ylabel="seconds", title="time vs model size")
    ax.legend()
    ax = axes[1]
    ax.plot([r["mb"] for r in size], [r["floor_mb"] for r in size], "o-", label="load+save floor")
    ax.plot([r["mb"] for r in size], [r["pass_mb"] for r in size], "o-", label="onnx_repvgg --no-check")
    ax.set(xlabel="model size (MB)", ylabel="peak RSS (MB)", title="memory vs model size")
    ax.legend()
    ax = axes[2]
    ax.plot([r["blocks"] for r in blocks], [r["floor_s"] for r in blocks], "o-", label="load+save floor")
    ax.plot([r["blocks"] for r in blocks], [r["pass_s"] for r in blocks], "o-", label="onnx_repvgg --no-check")
    ax.set(xlabel="blocks", ylabel="seconds", title="time vs block count (tiny width)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
