"""Benchmark: tracing the first layer of each kind (k=1 on a uniform decoder) against the second
(k=2, the fallback plan), in one run (``loraformat/export/repeat.py``).

    .venv/bin/python tools/bench_repeat.py BASE ADAPTER [--runs 3] [--workdir DIR]

Runs ``loraformat merge BASE ADAPTER -o m.onnx`` cold (``LORAFORMAT_CACHE=off``: the graph is
traced) in a fresh subprocess per run, the two plans alternating, and reports for each the
median over the runs of the wall time of ``build_graph`` (trace, optimize, repeat) and of the
whole command (the child process, imports included). The k=2 baseline is the same code with the
first-layer plan switched off (``plan_depth`` asked for each kind's second layer), so the two
differ only in the plan. The outputs are deleted after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLANS = ("second", "first")  # the baseline first in each round


def child(plan: str, base: str, adapter: str, out: str) -> None:
    """One cold merge to ONNX; prints {"build_graph_s", "traced"} as JSON on the last line."""
    sys.path.insert(0, str(ROOT))
    import loraformat.export.onnx as onnx_export
    import loraformat.export.repeat as repeat

    if plan == "second":
        first_or_second = repeat.plan_depth
        repeat.plan_depth = lambda kinds, occurrence=1: first_or_second(kinds, 2)
    timed = onnx_export.build_graph
    seen: dict[str, object] = {}

    def build_graph(*args, **kwargs):
        start = time.perf_counter()
        graph, how = timed(*args, **kwargs)
        seen["build_graph_s"], seen["traced"] = time.perf_counter() - start, how
        return graph, how

    onnx_export.build_graph = build_graph
    from loraformat.cli import main

    try:
        main(["merge", base, adapter, "-o", out])
    except SystemExit as done:
        if done.code not in (0, None):
            raise
    print(json.dumps(seen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("adapter")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_repeat"))
    parser.add_argument("--child", choices=PLANS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.base, args.adapter, args.out)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LORAFORMAT_CACHE="off")
    results: dict[str, list[dict]] = {p: [] for p in PLANS}
    for run in range(args.runs):
        for plan in PLANS:
            out = args.workdir / f"{plan}{run}.onnx"
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, __file__, args.base, args.adapter, "--child", plan,
                 "--out", str(out)],
                env=env, capture_output=True, text=True, check=True,
            )
            wall = time.perf_counter() - start
            seen = json.loads(done.stdout.strip().splitlines()[-1])
            seen["wall_s"] = wall
            results[plan].append(seen)
            print(f"run {run} {plan}: build_graph {seen['build_graph_s']:.2f} s, "
                  f"command {wall:.2f} s ({seen['traced']})", flush=True)
            for path in args.workdir.glob(f"{plan}{run}.onnx*"):
                path.unlink()
    shutil.rmtree(args.workdir, ignore_errors=True)
    summary = {
        plan: {
            "build_graph_s": statistics.median(r["build_graph_s"] for r in rs),
            "command_s": statistics.median(r["wall_s"] for r in rs),
            "traced": rs[0]["traced"],
        }
        for plan, rs in results.items()
    }
    base, new = summary["second"], summary["first"]
    summary["build_graph_saved_s"] = base["build_graph_s"] - new["build_graph_s"]
    summary["command_saved_s"] = base["command_s"] - new["command_s"]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
