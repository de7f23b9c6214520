"""Benchmark: peak memory of ``loraformat merge BASE ADAPTER -o m.onnx --verify`` against the same
export without ``--verify``, in one run.

    .venv/bin/python tools/bench_export_verify.py [WORKDIR] [--layers 24] [--dtypes float32 int4]

The checkpoint and adapter are ``tools/bench_export.py``'s (LLaMA-shaped fp32, hidden 1024,
intermediate 4096, vocabulary 40960, untied head; 0.49B parameters / 1.81 GiB at 24 layers;
PEFT r=16 on all seven projections). Each command runs in a fresh subprocess with the checkpoint
in the page cache; wall time and peak RSS (the child's ``ru_maxrss``) are reported, and the ratio
of each ``--verify`` run to its plain twin. ``--verify`` runs ONNX Runtime on the written model
(which holds its weights: about the model's size) and then the torch reference, whose weights
are read from the checkpoint one op at a time (``loraformat.export.stream.weights_on_demand``):
so its peak is about ONNX Runtime's session, not the session plus a second in-memory model.

Measured once (24 layers, 2-core machine, busy): fp32 0.71 GiB plain, 2.40 GiB --verify (the
in-memory reference of the previous commit: 4.21 GiB); int4 0.71 GiB plain, 1.23 GiB --verify
(previously 3.05 GiB). bfloat16 (no ONNX Runtime CPU kernels: onnx's reference evaluator runs
the graph) 0.76 GiB plain, 2.65 GiB --verify in 36.5 s; float16 in the same run 0.76 / 3.05 GiB,
37.4 s.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_export import HIDDEN, INTER, build_checkpoint  # noqa: E402
from bench_merge import build_peft_adapter, measure  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=None)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export_verify-"))
    work.mkdir(parents=True, exist_ok=True)
    base, peft = work / f"base{args.layers}", work / f"peft{args.layers}"
    build_checkpoint(base, args.layers)
    if not (peft / "adapter_config.json").is_file():
        build_peft_adapter(peft, HIDDEN, INTER, args.layers)
    size = (base / "model.safetensors").stat().st_size
    print(f"checkpoint: {args.layers} layers, {size / 2**30:.2f} GiB fp32; adapter r=16 on all 7 "
          "projections", flush=True)
    subprocess.run(["cat", str(base / "model.safetensors")], stdout=subprocess.DEVNULL,
                   check=True)  # page cache warm for every run
    out = work / "out"
    lf = str(Path(sys.executable).parent / "loraformat")
    for dtype in args.dtypes:
        figures = {}
        for verify in (False, True):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            cmd = [lf, "merge", str(base), str(peft), "-o", str(out / "m.onnx"), "--dtype", dtype]
            wall, rss = measure([*cmd, "--verify"] if verify else cmd)
            figures[verify] = (wall, rss)
            label = f"merge -o m.onnx --dtype {dtype}{' --verify' if verify else ''}"
            print(f"{label:<48} {wall:7.1f} s {rss / 1024:7.2f} GiB", flush=True)
        ratio = figures[True][1] / figures[False][1]
        print(f"  --verify / plain peak RSS ({dtype}): {ratio:.2f}x; checkpoint "
              f"{size / 2**30:.2f} GiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
