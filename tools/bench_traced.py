"""Benchmark: what the traced export's three accelerations save, one run, interleaved.

    .venv/bin/python tools/bench_traced.py WORKDIR [--layers 24] [--repeat 2]

On tools/bench_export.py's 0.49B LLaMA-shaped checkpoint (WORKDIR/base<layers>, built if absent),
a plain (logits-only, traced) fp32 ``loraformat export`` — the path every model without an
emitted decoder takes — each in a fresh process, cold (graph cache off) unless said:

* as shipped (second writer process on, layer repeat on);
* ``LORAFORMAT_PREWRITE=off`` (weights written after tracing, in-process);
* layer repeat off (every layer traced: ``export_onnx(repeat_layers=False)``);
* graph cache warm (a second export of the same base: no trace at all).

Median wall time and largest peak RSS of each. ``--lora-slots`` times ``export --lora-slots``
(the slot graph) instead; ``--baseline PYTHON`` runs every row with another checkout's
interpreter too (its ``loraformat`` script beside it), in the same interleaved rounds.
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
NO_REPEAT_SLOTS = ("from loraformat.export.slots import export_with_slots; import sys; "
                   "export_with_slots(sys.argv[1], sys.argv[2], overwrite=True, "
                   "repeat_layers=False)")


def rows_for(python: str, base: Path, out: Path, slots: bool,
             tag: str = "") -> dict[str, tuple[list[str], dict[str, str]]]:
    """The benchmark's rows run by ``python`` (and the ``loraformat`` script beside it)."""
    lf = str(Path(python).parent / "loraformat")
    flags = ["--lora-slots"] if slots else []

    def export(name: str) -> list[str]:
        return [lf, "export", str(base), "-o", str(out / f"{name}{tag}.onnx"), "--overwrite",
                *flags]

    cache = str(out / f"cache{tag}")
    return {
        f"as shipped (prewrite, repeat), cold{tag}": (export("a"), {"LORAFORMAT_CACHE": "off"}),
        f"LORAFORMAT_PREWRITE=off, cold{tag}": (
            export("b"), {"LORAFORMAT_CACHE": "off", "LORAFORMAT_PREWRITE": "off"}),
        f"layer repeat off, cold{tag}": (
            [python, "-c", NO_REPEAT_SLOTS if slots else NO_REPEAT, str(base),
             str(out / f"c{tag}.onnx")], {"LORAFORMAT_CACHE": "off"}),
        f"graph cache warm{tag}": (export("d"), {"LORAFORMAT_CACHE": cache}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--lora-slots", action="store_true",
                        help="time `export --lora-slots` (the slot graph)")
    parser.add_argument("--baseline", metavar="PYTHON",
                        help="also run every row with this interpreter (another checkout)")
    args = parser.parse_args()
    work = Path(args.workdir)
    base = work / f"base{args.layers}"
    build_checkpoint(base, args.layers)
    out = work / "traced"
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_for(sys.executable, base, out, args.lora_slots)
    if args.baseline:
        rows.update(rows_for(args.baseline, base, out, args.lora_slots, " [baseline]"))
    # fill the caches once (not timed)
    for label, (cmd, extra) in rows.items():
        if label.startswith("graph cache warm"):
            subprocess.run(cmd, env=dict(os.environ, **extra), check=True, capture_output=True)
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
        print(f"{label:<52} {statistics.median(w for w, _ in values):6.1f} s  "
              f"{max(p for _, p in values) / 1024:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
