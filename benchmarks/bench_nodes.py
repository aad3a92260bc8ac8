"""Cost per node: the pass against the read + check + write floor on node-heavy, byte-light models.

    python benchmarks/bench_nodes.py [--repeat 3] [--no-checked]          the two models of issue 13
    python benchmarks/bench_nodes.py --series [--repeat 1] [--plot P.png]  node-count series
    python benchmarks/bench_nodes.py --instructions                       the two models, by callgrind

Models (generated once into --work, default /tmp/onnx_repvgg_bench, and reused):
  transformer: a 400-layer nn.TransformerEncoder (width 64), TorchScript export with dynamic
               batch and sequence, nothing to fuse (~67,000 nodes; make_transformer_graph.py)
  repvgg:      3,000 RepVGG blocks of 8 channels, BNs unfolded, 8 nodes a block (24,000 nodes;
               make_repvgg_blocks.py)
The series: the 100-layer export chained 1, 2, 4, 8, 12 times (16,700 to 200,300 nodes), and
625 to 10,000 RepVGG blocks (5,000 to 80,000 nodes).

Jobs, each in a fresh process (imports before the clock starts), interleaved, median of --repeat:
  floor    onnx.load + onnx.checker.check_model(path) + onnx.save of the same file
  pass     python -m onnx_repvgg IN OUT --no-check -q   (the target: within 2x of floor)
  checked  the same with validation (two onnxruntime sessions; measured, not targeted)
Seconds are wall time; CPU seconds (the process's user + system time) are shown beside them,
as the steadier measure on a shared machine. --instructions counts instructions instead (one run
of each job under valgrind's callgrind, which must be installed; ~10 minutes): the same on every
run, so it shows a change of a few percent that timing on a noisy machine cannot. Each job then
imports both onnx and onnx_repvgg, and the count of a run that only imports is subtracted.
Peak RSS is the process's high-water mark (VmHWM), imports included; "base" is the RSS after
imports, before the clock. The pass's own phase times (load / fuse / save) come from its JSON
report, in one more run per model (writing the report costs ~3% of the pass on the blocks: the
timed runs do not ask for it). PYTHONPATH picks the onnx_repvgg measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

TRANSFORMER_SHAPE = "x:1,16,64"  # the export bakes in sequence length 16 (dims default to 1)
SERIES_COPIES = [1, 2, 4, 8, 12]
SERIES_BLOCKS = [625, 1250, 2500, 5000, 10000]


# -- one job, in this process -------------------------------------------------------------------
def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_job(job: str, src: str, dst: str, extra: list[str], import_all: bool = False) -> dict:
    import onnx

    if import_all:  # (--instructions: every job imports the same, and "imports" does only that)
        import onnx_repvgg.cli  # noqa: F401
    if job == "imports":
        return {"job": job}
    report_path = dst + ".report.json"
    if job == "floor":
        def work():
            model = onnx.load(src)
            onnx.checker.check_model(src)
            onnx.save(model, dst)
    elif job in ("pass", "phases", "checked"):
        from onnx_repvgg.cli import main as cli

        # "pass" is the user's command as it is; "phases" the same with a JSON report, for its phase times
        args = [src, dst, "-q"] + (["--no-check"] if job in ("pass", "phases") else extra)
        if job != "pass":
            args += ["--json", report_path]
        if job == "checked":
            import onnxruntime  # noqa: F401  (its import is not the pass's cost)

        def work():
            code = cli(args)
            if code != 0:
                raise SystemExit(f"onnx_repvgg exited with {code}")
    else:
        raise SystemExit(f"unknown job {job}")
    base = _rss_mb("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    work()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    result = {"job": job, "seconds": seconds, "cpu_s": cpu, "peak_rss_mb": _rss_mb("VmHWM"), "base_rss_mb": base}
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
        result["timings"] = report.get("timings", {})
        result["blocks_fused"] = report.get("summary", {}).get("fused")
        os.remove(report_path)
    return result


# -- the driver -----------------------------------------------------------------------------------
def measure(job: str, model: str, out_dir: str, extra: list[str]) -> dict:
    out = os.path.join(out_dir, f"{job}.onnx")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--job", job, model, out, "--"] + extra,
                          capture_output=True, text=True)
    for f in (out, out + ".data"):
        if os.path.exists(f):
            os.remove(f)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {job} on {os.path.basename(model)} failed: {tail}", file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def instructions(job: str, model: str, out_dir: str, extra: list[str]) -> int:
    """Instructions one run of `job` executes (callgrind's total, imports included)."""
    out = os.path.join(out_dir, f"{job}.onnx")
    counts = os.path.join(out_dir, f"{job}.callgrind")
    proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={counts}", sys.executable,
                           os.path.abspath(__file__), "--job", job, model, out, "--import-all", "--"] + extra,
                          capture_output=True, text=True)
    for f in (out, out + ".data", counts):
        if os.path.exists(f):
            os.remove(f)
    found = [line for line in proc.stderr.splitlines() if "Collected :" in line]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{job} on {os.path.basename(model)} under callgrind failed: "
                         f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return int(found[-1].split(":")[-1].strip())


def count_instructions(models: list[tuple[str, str, list[str]]], work: str) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    out_dir = tempfile.mkdtemp(dir=work, prefix=".out.")
    print("| model | nodes | floor G instr | pass G instr | x |")
    print("|---|---|---|---|---|")
    try:
        for label, path, extra in models:
            counts = {}
            for job in ("imports", "floor", "pass"):
                counts[job] = instructions(job, path, out_dir, extra)
                print(f"  {label} {job}: {counts[job] / 1e9:.3f} G instructions", file=sys.stderr)
            floor, pass_ = counts["floor"] - counts["imports"], counts["pass"] - counts["imports"]
            print(f"| {label} | {node_count(path):,} | {floor / 1e9:.2f} | {pass_ / 1e9:.2f} | {pass_ / floor:.2f} |")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    print("(callgrind, one run a job, the instructions of a run that only imports subtracted)")


def transformer(work: str, layers: int, copies: int = 1) -> str:
    from make_transformer_graph import make

    path = os.path.join(work, f"transformer_L{layers}" + (f"x{copies}" if copies > 1 else "") + ".onnx")
    if not os.path.exists(path):
        make(path, layers, copies, cache_dir=work)
    return path


def repvgg(work: str, blocks: int) -> str:
    import onnx
    from make_repvgg_blocks import build

    path = os.path.join(work, f"repvgg_b{blocks}.onnx")
    if not os.path.exists(path):
        onnx.save(build(blocks), path)
    return path


def node_count(path: str) -> int:
    import onnx

    return len(onnx.load(path, load_external_data=False).graph.node)


def run_models(models: list[tuple[str, str, list[str]]], jobs: list[str], repeat: int, work: str) -> list[dict]:
    out_dir = tempfile.mkdtemp(dir=work, prefix=".out.")
    try:
        return _run_models(models, jobs, repeat, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _run_models(models: list[tuple[str, str, list[str]]], jobs: list[str], repeat: int, out_dir: str) -> list[dict]:
    results: dict[tuple[str, str], list[dict]] = {(label, job): [] for label, _, _ in models for job in jobs}
    for r in range(repeat):
        for label, path, extra in models:
            for job in jobs:
                res = measure(job, path, out_dir, extra)
                if res:
                    results[(label, job)].append(res)
                print(f"  [{r + 1}/{repeat}] {label} {job}: "
                      + (f"{res['seconds']:.2f} s, {res['peak_rss_mb']:.0f} MB" if res else "failed"),
                      file=sys.stderr)
    rows = []
    for label, path, _ in models:
        row = {"model": label, "path": path, "nodes": node_count(path), "mb": os.path.getsize(path) / 1e6}
        for job in jobs:
            runs = results[(label, job)]
            if not runs:
                continue
            row[f"{job}_s"] = statistics.median(x["seconds"] for x in runs)
            row[f"{job}_cpu"] = statistics.median(x["cpu_s"] for x in runs)
            row[f"{job}_mb"] = statistics.median(x["peak_rss_mb"] for x in runs)
            row[f"{job}_base_mb"] = statistics.median(x["base_rss_mb"] for x in runs)
            phases = {}
            for key in ("load", "fuse", "save", "validate"):
                values = [x["timings"][key] for x in runs if key in x.get("timings", {})]
                if values:
                    phases[key] = statistics.median(values)
            row[f"{job}_phases"] = phases
        if "pass" in jobs:  # the pass's phase times, from one more run that writes its JSON report
            timed = measure("phases", path, out_dir, []).get("timings", {})
            row["pass_phases"] = {key: timed[key] for key in ("load", "fuse", "save") if key in timed}
        rows.append(row)
    return rows


def _ratio(row: dict, job: str, unit: str) -> str:
    if f"{job}_{unit}" not in row or f"floor_{unit}" not in row:
        return "-"
    return f"{row[f'{job}_{unit}'] / row[f'floor_{unit}']:.2f}"


def print_table(rows: list[dict], jobs: list[str]) -> None:
    head = "| model | nodes | MB | floor s | pass s | x | floor CPU s | pass CPU s | x | floor peak MB | pass peak MB | x |"
    rule = "|---|---|---|---|---|---|---|---|---|---|---|---|"
    if "checked" in jobs:
        head += " checked s | x | checked peak MB | x |"
        rule += "---|---|---|---|"
    head += " pass phases (load / fuse / save) | pass us/node |"
    rule += "---|---|"
    print(head)
    print(rule)
    for r in rows:
        line = (f"| {r['model']} | {r['nodes']:,} | {r['mb']:.1f} | {r.get('floor_s', float('nan')):.2f} | "
                f"{r.get('pass_s', float('nan')):.2f} | {_ratio(r, 'pass', 's')} | {r.get('floor_cpu', float('nan')):.2f} | "
                f"{r.get('pass_cpu', float('nan')):.2f} | {_ratio(r, 'pass', 'cpu')} | {r.get('floor_mb', float('nan')):.0f} | "
                f"{r.get('pass_mb', float('nan')):.0f} | {_ratio(r, 'pass', 'mb')} |")
        if "checked" in jobs:
            line += (f" {r.get('checked_s', float('nan')):.2f} | {_ratio(r, 'checked', 's')} | "
                     f"{r.get('checked_mb', float('nan')):.0f} | {_ratio(r, 'checked', 'mb')} |")
        phases = r.get("pass_phases", {})
        line += " " + " / ".join(f"{phases[k]:.2f}" for k in ("load", "fuse", "save") if k in phases) + " |"
        line += f" {1e6 * r['pass_s'] / r['nodes']:.0f} |" if "pass_s" in r else " - |"
        print(line)
    base = [r.get("floor_base_mb") for r in rows if r.get("floor_base_mb")]
    pbase = [r.get("pass_base_mb") for r in rows if r.get("pass_base_mb")]
    if base and pbase:
        print(f"(RSS after imports, before the clock: floor ~{statistics.median(base):.0f} MB, "
              f"pass ~{statistics.median(pbase):.0f} MB)")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for series, color in (("transformer", "tab:blue"), ("repvgg", "tab:red")):
        sel = [r for r in rows if r["model"].startswith(series) and "pass_s" in r]
        if not sel:
            continue
        nodes = [r["nodes"] for r in sel]
        for ax, key in zip(axes, ("s", "cpu", "mb")):
            ax.plot(nodes, [r[f"floor_{key}"] for r in sel], "o--", color=color, label=f"{series}: load+check+save")
            ax.plot(nodes, [r[f"pass_{key}"] for r in sel], "o-", color=color, label=f"{series}: --no-check")
    axes[0].set(xlabel="nodes", ylabel="seconds (wall)", title="wall time vs node count")
    axes[1].set(xlabel="nodes", ylabel="CPU seconds", title="CPU time vs node count")
    axes[2].set(xlabel="nodes", ylabel="peak RSS (MB)", title="memory vs node count")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"plot: {path}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--job":  # --job JOB SRC DST [--import-all] -- EXTRA...
        job, src, dst = sys.argv[2:5]
        rest = sys.argv[5:]
        import_all = bool(rest) and rest[0] == "--import-all"
        rest = rest[1:] if import_all else rest
        extra = rest[1:] if rest and rest[0] == "--" else []
        print(json.dumps(run_job(job, src, dst, extra, import_all)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--series", action="store_true", help="the node-count series instead of the two models")
    p.add_argument("--no-checked", action="store_true", help="skip the validated run")
    p.add_argument("--checked", action="store_true", help="with --series: also time validation")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "onnx_repvgg_bench"),
                   help="where generated models are kept (default /tmp/onnx_repvgg_bench)")
    p.add_argument("--plot", default=None, help="with --series: write a PNG plot here")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--instructions", action="store_true",
                   help="count instructions with valgrind's callgrind (one run a job) instead of timing")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if a.instructions:
        count_instructions([("transformer 400 layers", transformer(a.work, 400), [f"--input-shape={TRANSFORMER_SHAPE}"]),
                            ("repvgg 3000 blocks", repvgg(a.work, 3000), [])], a.work)
        return
    if a.series:
        models = [(f"transformer {100 * c} layers (100 x {c})", transformer(a.work, 100, c),
                   [f"--input-shape={TRANSFORMER_SHAPE}"])
                  for c in SERIES_COPIES]
        models += [(f"repvgg {n} blocks", repvgg(a.work, n), []) for n in SERIES_BLOCKS]
        jobs = ["floor", "pass"] + (["checked"] if a.checked else [])
    else:
        models = [("transformer 400 layers", transformer(a.work, 400), [f"--input-shape={TRANSFORMER_SHAPE}"]),
                  ("repvgg 3000 blocks", repvgg(a.work, 3000), [])]
        jobs = ["floor", "pass"] + ([] if a.no_checked else ["checked"])
    rows = run_models(models, jobs, a.repeat, a.work)
    print(f"median of {a.repeat} interleaved runs, fresh process each; {os.cpu_count()} CPUs; "
          f"{sys.version.split()[0]}")
    print_table(rows, jobs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.plot:
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
