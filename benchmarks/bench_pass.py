"""Pass cost against the I/O floor (onnx.load + onnx.save), side by side in one run.

    python benchmarks/bench_pass.py MODEL.onnx [--repeat 3] [--peers]

Each job runs in a fresh process (benchmarks/measure.py), interleaved, `--repeat` times;
the table shows medians and the ratio to the floor. --peers adds onnx-graphsurgeon's
round trip, onnxsim and onnxslim (pip install onnxsim onnxslim; not dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_job(job: str, model: str, out_dir: str) -> dict | None:
    out = os.path.join(out_dir, f"{job}.onnx")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "measure.py"), job, model, out],
                          capture_output=True, text=True)
    for f in (out, out + ".data"):
        if os.path.exists(f):
            os.remove(f)
    if proc.returncode != 0:
        print(f"  {job}: failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--peers", action="store_true")
    p.add_argument("--checked", action="store_true", help="also time the pass with validation")
    a = p.parse_args()
    jobs = ["floor", "pass"] + (["pass_checked"] if a.checked else [])
    if a.peers:
        jobs += ["graphsurgeon", "onnxsim", "onnxslim"]
    results: dict[str, list[dict]] = {j: [] for j in jobs}
    out_dir = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(a.model)), prefix=".bench.")
    try:
        for _ in range(a.repeat):
            for job in jobs:
                r = run_job(job, a.model, out_dir)
                if r:
                    results[job].append(r)
    finally:
        os.rmdir(out_dir)
    size = os.path.getsize(a.model) + (os.path.getsize(a.model + ".data") if os.path.exists(a.model + ".data") else 0)
    floor_t = statistics.median(r["seconds"] for r in results["floor"])
    floor_m = statistics.median(r["peak_rss_mb"] for r in results["floor"])
    print(f"model: {os.path.basename(a.model)} ({size / 1e6:.0f} MB), median of {a.repeat} interleaved runs")
    print("| job | seconds | x floor | peak RSS MB | x floor |")
    print("|---|---|---|---|---|")
    for job in jobs:
        if not results[job]:
            print(f"| {job} | failed | | | |")
            continue
        t = statistics.median(r["seconds"] for r in results[job])
        m = statistics.median(r["peak_rss_mb"] for r in results[job])
        print(f"| {job} | {t:.2f} | {t / floor_t:.2f} | {m:.0f} | {m / floor_m:.2f} |")


if __name__ == "__main__":
    main()
