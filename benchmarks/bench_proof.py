"""What the proof costs next to the pass, in one run.

    python benchmarks/bench_proof.py MODEL.onnx [--repeat 3]

Runs the CLI on MODEL (interleaved, --repeat times, each in a fresh process) with --no-check
and with validation, and prints the medians: the pass (load, fuse, save), the end-to-end
check (both models run once, with the blocks' edge tensors fetched), the block checks (every
fused block alone, original against fused) and their ratios to the pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run(model: str, out_dir: str, checked: bool) -> dict:
    out = os.path.join(out_dir, "out.onnx")
    report = os.path.join(out_dir, "report.json")
    args = [sys.executable, "-m", "onnx_repvgg", model, out, "-q", "--json", report]
    if not checked:
        args.append("--no-check")
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"onnx_repvgg failed: {proc.stderr.strip()}")
    with open(report) as f:
        data = json.load(f)
    for name in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, name))
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    rows: dict[str, list[float]] = {"pass": [], "end_to_end": [], "blocks": [], "validate": []}
    blocks = 0
    with tempfile.TemporaryDirectory() as out_dir:
        for _ in range(a.repeat):
            plain = run(a.model, out_dir, checked=False)
            rows["pass"].append(sum(plain["timings"][k] for k in ("load", "fuse", "save")))
            checked = run(a.model, out_dir, checked=True)
            v = checked["validation"]
            assert v["passed"], v
            rows["end_to_end"].append(v["timings"]["end_to_end"])
            rows["blocks"].append(v["timings"]["blocks"])
            rows["validate"].append(checked["timings"]["validate"])
            blocks = len(v["blocks"])
    median = {k: statistics.median(v) for k, v in rows.items()}
    size = os.path.getsize(a.model) / 1e6
    print(f"model: {os.path.basename(a.model)} ({size:.0f} MB), {blocks} blocks checked alone; "
          f"median of {a.repeat} interleaved runs")
    print("| step | seconds | x pass |")
    print("|---|---|---|")
    for key, label in (("pass", "pass (load, fuse, save; --no-check)"), ("end_to_end", "end-to-end check"),
                       ("blocks", "block checks"), ("validate", "validation in all")):
        print(f"| {label} | {median[key]:.2f} | {median[key] / median['pass']:.2f} |")


if __name__ == "__main__":
    main()
