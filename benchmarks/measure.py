"""Run ONE measured job in this process and print a JSON line: seconds and peak RSS.

    python benchmarks/measure.py JOB INPUT OUTPUT

JOB is one of: floor (onnx.load + onnx.save), pass (onnx_repvgg with --no-check),
pass_checked (onnx_repvgg with validation), graphsurgeon (import/export round trip),
onnxsim, onnxslim. Imports happen before the clock starts; peak RSS is the whole
process's (ru_maxrss), so each job runs in a fresh process (see bench_pass.py).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def _peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM). ru_maxrss would include a forking parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _external(path: str) -> bool:
    return os.path.exists(path + ".data")


def main() -> None:
    job, src, dst = sys.argv[1:4]
    import onnx

    if job == "floor":
        def work():
            model = onnx.load(src)
            if _external(src):
                onnx.save_model(model, dst, save_as_external_data=True, location=os.path.basename(dst) + ".data")
            else:
                onnx.save(model, dst)
    elif job in ("pass", "pass_checked"):
        from onnx_repvgg.cli import main as cli

        args = [src, dst, "-q"] + (["--no-check"] if job == "pass" else [])
        if job == "pass_checked":
            import onnxruntime  # noqa: F401  (import cost is not the pass's)

        def work():
            assert cli(args) == 0
    elif job == "graphsurgeon":
        import onnx_graphsurgeon as gs

        def work():
            graph = gs.import_onnx(onnx.load(src))
            graph.cleanup().toposort()
            model = gs.export_onnx(graph)
            if _external(src):
                onnx.save_model(model, dst, save_as_external_data=True, location=os.path.basename(dst) + ".data")
            else:
                onnx.save(model, dst)
    elif job == "onnxsim":
        import onnxsim

        def work():
            model, ok = onnxsim.simplify(onnx.load(src))
            onnx.save(model, dst)
    elif job == "onnxslim":
        import onnxslim

        def work():
            onnxslim.slim(src, dst)
    else:
        raise SystemExit(f"unknown job {job}")
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    peak_mb = _peak_rss_mb()
    print(json.dumps({"job": job, "seconds": seconds, "peak_rss_mb": peak_mb}))


if __name__ == "__main__":
    main()
