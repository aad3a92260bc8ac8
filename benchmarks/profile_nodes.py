"""Where the pass spends time and memory on a node-heavy model: a phase breakdown.

    python benchmarks/profile_nodes.py MODEL.onnx [--cprofile OUT.prof] [--top 30] [--breakdown]

Runs `onnx_repvgg MODEL OUT --no-check` in this process with timers wrapped around the
pass's phases (by patching module attributes at run time; nothing in onnx_repvgg is
changed): parse, check, shape inference (each call), GraphView indexing (each round),
LinearIndex (each build), each rule's find (its generator's own time), materialize per
rule, rewrite, save. A sampling thread reads VmRSS every 2 ms and charges the high-water
mark to the innermost phase running. Wall and CPU seconds (this thread's) are both shown (the machine may
be shared). With --cprofile the same run is also written as a cProfile dump and its top
functions printed (the timers then include cProfile's overhead; compare within a run).
Set PYTHONPATH to profile another copy of onnx_repvgg.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict


class Phases:
    def __init__(self):
        self.stack: list[str] = []
        self.wall = defaultdict(float)
        self.cpu = defaultdict(float)
        self.calls = defaultdict(int)
        self.each: dict[str, list[float]] = defaultdict(list)
        self.child_cpu: list[float] = []     # per open phase: CPU seconds spent in phases inside it
        self.self_cpu = defaultdict(float)
        self.peak_rss = defaultdict(float)   # MB, high-water VmRSS while the phase was innermost
        self.rss_in = {}                     # MB at first entry
        self.order: list[str] = []
        self.lock = threading.Lock()

    def enter(self, name: str) -> tuple[float, float]:
        with self.lock:
            self.stack.append(name)
            self.child_cpu.append(0.0)
        if name not in self.rss_in:
            self.rss_in[name] = rss_mb()
            self.order.append(name)
        return time.perf_counter(), time.thread_time()

    def leave(self, name: str, start: tuple[float, float]) -> None:
        wall, cpu = time.perf_counter() - start[0], time.thread_time() - start[1]
        with self.lock:
            self.stack.pop()
            inner = self.child_cpu.pop()
            if self.child_cpu:
                self.child_cpu[-1] += cpu
        self.self_cpu[name] += cpu - inner
        self.wall[name] += wall
        self.cpu[name] += cpu
        self.calls[name] += 1
        self.each[name].append(wall)

    def sample(self, stop: threading.Event) -> None:
        while not stop.is_set():
            value = rss_mb()
            with self.lock:
                for name in set(self.stack):  # charge every open phase: a parent's peak covers its children
                    if value > self.peak_rss[name]:
                        self.peak_rss[name] = value
            stop.wait(0.002)


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


PHASES = Phases()


def timed(name: str, fn):
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            it = fn(*args, **kwargs)
            while True:
                start = PHASES.enter(name)
                try:
                    item = next(it)
                except StopIteration:
                    PHASES.leave(name, start)
                    return
                PHASES.leave(name, start)
                yield item
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = PHASES.enter(name)
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES.leave(name, start)
    return wrapper


def patch(owner, attr: str, name: str) -> bool:
    fn = getattr(owner, attr, None)
    if fn is None:
        return False
    setattr(owner, attr, timed(name, fn))
    return True


def install() -> None:
    from onnx_repvgg import evaluate, pipeline, rewrite
    from onnx_repvgg import graph as graph_mod
    from onnx_repvgg import report as report_mod
    from onnx_repvgg.rules import RULES, bn_audit
    from onnx_repvgg.storage import external, io, staging

    patch(io, "load", "load")
    patch(io, "_parse", "load/parse")
    patch(io, "_run_checker", "load/check")
    patch(io, "survey", "load/survey (tensors)")
    patch(io, "_with_weights_as_inputs", "load/check: weights as inputs copy")
    from onnx_repvgg import cli

    patch(cli, "fuse", "fuse")  # cli imported it by name
    patch(report_mod.ModelStats, "of", "fuse/ModelStats.of")
    patch(pipeline, "model_names", "fuse/names (NameRegistry)")
    patch(pipeline, "_view_with_shapes", "fuse/round: shapes (inference + views with shapes)")
    patch(pipeline, "infer_static_shapes", "fuse/round/shapes: infer_static_shapes")
    view_cls = graph_mod.GraphView
    view_cls._index = timed("fuse/round: index (GraphView producers, consumers)", view_cls._index)
    view_cls._find_constants = timed("fuse/round: constants (GraphView)", view_cls._find_constants)
    evaluate.Memo.output_shape = timed("evaluate.output_shape (per node, memoized)", evaluate.Memo.output_shape)
    evaluate.Memo.fold = timed("evaluate.fold (per node, memoized)", evaluate.Memo.fold)
    from onnx_repvgg.rules import linear_tree
    linear_tree.LinearIndex.roots = timed("fuse/round/find: LinearIndex roots (expansions)", linear_tree.LinearIndex.roots)
    linear_tree.LinearIndex.tree = timed("fuse/round/find: LinearIndex trees", linear_tree.LinearIndex.tree)
    from onnx_repvgg.cheap_shapes import CheapShapes
    CheapShapes._get = timed("fuse/round/find: cheap shapes (ranks read from the graph)", CheapShapes._get)
    for rule_name, module in RULES.items():
        patch(module, "find", f"fuse/round/find: {rule_name}")
        patch(module, "materialize", f"fuse/round/materialize: {rule_name}")
        patch(module, "materialize_many", f"fuse/round/materialize: {rule_name} (batches)")
    patch(bn_audit, "unrecorded", "fuse: bn_audit")
    patch(rewrite, "spill", "fuse/round: rewrite.spill")
    patch(rewrite, "apply", "fuse/round: rewrite.apply")
    patch(cli.io, "tensor_bytes", "tensor_bytes (after fuse)")
    patch(staging.Staging, "write", "save")
    patch(staging.Staging, "commit", "commit")
    del external  # (survey is patched where io looks it up)


# --breakdown: the phases above gathered into the steps of the breakdown (own CPU seconds)
CATEGORIES = [
    ("parse", ("load/parse", "load/survey (tensors)", "load", "load/check: weights as inputs copy")),
    ("check", ("load/check",)),
    ("shape inference", ("fuse/round/shapes: infer_static_shapes",  # onnx's, and the cheap reading
                         "fuse/round/find: cheap shapes (ranks read from the graph)")),
    ("indexing", ("fuse/round: index (GraphView producers, consumers)", "fuse/round: constants (GraphView)",
                  "evaluate.output_shape (per node, memoized)", "evaluate.fold (per node, memoized)",
                  "fuse/round/find: LinearIndex roots (expansions)", "fuse/round/find: LinearIndex trees",
                  "fuse/round: shapes (inference + views with shapes)", "fuse/names (NameRegistry)",
                  "fuse/ModelStats.of")),
    ("matching", ("fuse: bn_audit",)),  # and every rule's find
    ("fusing", ()),  # every rule's materialize
    ("rewriting", ("fuse/round: rewrite.apply", "fuse/round: rewrite.spill", "tensor_bytes (after fuse)")),
    ("writing", ("save", "commit")),
]


def breakdown(total_cpu: float) -> None:
    """The README table: own CPU seconds per step of the pass."""
    seen = set()
    rows = []
    for category, names in CATEGORIES:
        chosen = [n for n in PHASES.order if n in names or (category == "matching" and n.startswith("fuse/round/find: ")
                                                            and "LinearIndex" not in n and "cheap shapes" not in n)
                  or (category == "fusing" and n.startswith("fuse/round/materialize: "))]
        seen.update(chosen)
        rows.append((category, sum(PHASES.self_cpu[n] for n in chosen)))
    rest = sum(PHASES.self_cpu[n] for n in PHASES.order if n not in seen)
    print("| " + " | ".join(c for c, _ in rows) + " | other | total |")
    print("|" + "---|" * (len(rows) + 2))
    print("| " + " | ".join(f"{v:.2f}" for _, v in rows) + f" | {rest:.2f} | {total_cpu:.2f} |")


def run(model: str, cprofile: str | None, top: int, table: bool = False) -> None:
    install()
    from onnx_repvgg.cli import main as cli

    out_dir = tempfile.mkdtemp(prefix="onnx_repvgg_profile.")
    out = os.path.join(out_dir, "out.onnx")
    stop = threading.Event()
    sampler = threading.Thread(target=PHASES.sample, args=(stop,), daemon=True)
    base = rss_mb()
    if not table:  # the RSS sampler costs the pass some time: the breakdown is measured without it
        sampler.start()
    start = time.perf_counter(), time.thread_time()
    profiler = None
    if cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    code = cli([model, out, "--no-check", "-q"])
    if profiler is not None:
        profiler.disable()
    total_wall, total_cpu = time.perf_counter() - start[0], time.thread_time() - start[1]
    stop.set()
    if not table:
        sampler.join()
    for f in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, f))
    os.rmdir(out_dir)
    assert code == 0, code
    import onnx

    nodes = len(onnx.load(model, load_external_data=False).graph.node)
    print(f"model: {model} ({nodes:,} nodes); onnx_repvgg from {os.path.dirname(sys.modules['onnx_repvgg'].__file__)}")
    print(f"total: {total_wall:.2f} s wall, {total_cpu:.2f} s CPU; RSS after imports {base:.0f} MB, "
          f"peak (VmHWM) {rss_mb('VmHWM'):.0f} MB")
    if table:
        breakdown(total_cpu)
        return
    print("| phase | calls | wall s | CPU s | own CPU s (less the phases inside) | % of CPU | each call (wall s) "
          "| RSS in MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in PHASES.order:
        each = PHASES.each[name]
        shown = ", ".join(f"{v:.2f}" for v in each[:6]) + (", ..." if len(each) > 6 else "")
        if len(each) > 6:
            shown = f"{len(each)} calls, max {max(each):.3f}"
        print(f"| {name} | {PHASES.calls[name]} | {PHASES.wall[name]:.2f} | {PHASES.cpu[name]:.2f} | "
              f"{PHASES.self_cpu[name]:.2f} | {100 * PHASES.cpu[name] / total_cpu:.0f}% | {shown} | {PHASES.rss_in[name]:.0f} | "
              f"{PHASES.peak_rss.get(name, PHASES.rss_in[name]):.0f} |")
    if profiler is not None:
        import pstats

        profiler.dump_stats(cprofile)
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--cprofile", default=None, help="also write a cProfile dump here and print its top functions")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--breakdown", action="store_true",
                   help="print only the README's table: parse, check, shape inference, indexing, matching, fusing, "
                        "rewriting, writing (own CPU seconds; no RSS sampling)")
    a = p.parse_args()
    run(a.model, a.cprofile, a.top, a.breakdown)


if __name__ == "__main__":
    main()
