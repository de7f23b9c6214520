"""Benchmark: what the traced export's three accelerations save, one run, interleaved.

    .venv/bin/python tools/bench_traced.py WORKDIR [--layers 24] [--repeat 2]

On tools/bench_export.py's 0.49B LLaMA-shaped checkpoint (WORKDIR/base<layers>, built if absent),
a plain (logits-only, traced) fp32 ``loraformat export`` — the path every model without an
emitted decoder takes — each in a fresh process, cold (graph cache off) unless said:

* as shipped (second writer process on, layer repeat on);
* ``LORAFORMAT_PREWRITE=off`` (weights written after tracing, in-process);
* layer repeat off (every layer traced: ``export_onnx(repeat_layers=False)``);
* graph cache warm (a second export of the same base: no trace at all).

Median wall time and largest peak RSS of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_export import build_checkpoint  # noqa: E402
from bench_merge import measure  # noqa: E402

NO_REPEAT = ("from loraformat.export.onnx import export_onnx; import sys; "
             "export_onnx(sys.argv[1], sys.argv[2], overwrite=True, repeat_layers=False)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.workdir)
    base = work / f"base{args.layers}"
    build_checkpoint(base, args.layers)
    out = work / "traced"
    out.mkdir(parents=True, exist_ok=True)
    lf = str(Path(sys.executable).parent / "loraformat")
    cache = out / "cache"
    rows = {
        "as shipped (prewrite, repeat), cold": ([lf, "export", str(base), "-o",
                                                 str(out / "a.onnx"), "--overwrite"],
                                                {"LORAFORMAT_CACHE": "off"}),
        "LORAFORMAT_PREWRITE=off, cold": ([lf, "export", str(base), "-o", str(out / "b.onnx"),
                                           "--overwrite"],
                                          {"LORAFORMAT_CACHE": "off",
                                           "LORAFORMAT_PREWRITE": "off"}),
        "layer repeat off, cold": ([sys.executable, "-c", NO_REPEAT, str(base),
                                    str(out / "c.onnx")], {"LORAFORMAT_CACHE": "off"}),
        "graph cache warm": ([lf, "export", str(base), "-o", str(out / "d.onnx"), "--overwrite"],
                             {"LORAFORMAT_CACHE": str(cache)}),
    }
    # fill the cache once (not timed)
    env = dict(os.environ, LORAFORMAT_CACHE=str(cache))
    subprocess.run(rows["graph cache warm"][0], env=env, check=True, capture_output=True)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    for round_ in range(args.repeat):
        for label, (cmd, extra) in rows.items():
            saved = {k: os.environ.get(k) for k in extra}
            os.environ.update(extra)
            try:
                wall, peak = measure(cmd)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            results[label].append((wall, peak))
            print(f"round {round_}: {label}: {wall:.1f} s, {peak / 1024:.2f} GiB", flush=True)
    print(f"\nmedian of {args.repeat} interleaved runs; peak RSS: largest")
    for label, values in results.items():
        print(f"{label:<40} {statistics.median(w for w, _ in values):6.1f} s  "
              f"{max(p for _, p in values) / 1024:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
