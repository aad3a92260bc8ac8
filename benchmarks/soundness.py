"""A large soundness run: random block graphs, fused and compared under onnxruntime.

    python benchmarks/soundness.py [--examples 5000] [--seed 0]

Prints the tally: graphs tried, models built, blocks fused, blocks skipped by reason,
and wrong outputs (must be 0). Needs the test extra (hypothesis).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.soundness_graphs import build, graph_spec  # noqa: E402
from tests.test_soundness import check_sound  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    tally = Counter()
    reasons = Counter()
    failures = []

    @seed(a.seed)
    @settings(max_examples=a.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(graph_spec())
    def run(spec):
        tally["graphs tried"] += 1
        model = build(spec)
        if model is None:
            return
        tally["models built"] += 1
        try:
            result = check_sound(model, allow_densify=spec["seed"] % 2 == 0)
        except AssertionError as err:
            tally["wrong outputs"] += 1
            failures.append((spec, str(err)[:300]))
            return
        except Exception as err:  # an invalid fused model or a crash is a failure too
            tally["errors"] += 1
            failures.append((spec, f"{type(err).__name__}: {str(err)[:300]}"))
            return
        tally["blocks fused"] += result["fused"]
        tally["blocks skipped"] += len(result["skipped"])
        reasons.update(result["skipped"])

    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    tally.setdefault("wrong outputs", 0)
    tally.setdefault("errors", 0)
    for key in ("graphs tried", "models built", "blocks fused", "blocks skipped", "wrong outputs", "errors"):
        print(f"{key:>16}: {tally[key]}")
    for code, count in reasons.most_common():
        print(f"{'skipped: ' + code:>34}: {count}")
    print(f"{'seconds':>16}: {elapsed:.0f}")
    for spec, err in failures[:5]:
        print("FAILURE:", err, "\n  spec:", spec)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
