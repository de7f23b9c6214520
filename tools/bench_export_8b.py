"""Benchmark: the ONNX export's peak memory at Llama-3-8B's tensor sizes, on a machine that
cannot hold the model.

    .venv/bin/python tools/bench_export_8b.py [WORKDIR] [--layers 2 4] [--dtypes float16 int4]

A full 8B checkpoint (16 GB in bf16) and its export do not fit this machine's disk and time, but
what bounds a streamed export's memory is not the depth — every layer is written the same way,
one tensor at a time — it is the largest tensors: Llama-3-8B's 128256×4096 embedding table and
LM head (1 GiB each in bf16, 2 GiB as the fp32 an int4 export keeps them in) and its 14336×4096
MLP weights. So this builds (numpy, streamed) bf16 checkpoints with exactly Llama-3-8B's shapes —
hidden 4096, intermediate 14336, 32 heads, 8 KV heads (grouped-query), vocabulary 128256, untied
head, rope theta 500000 — but ``--layers`` decoder layers (default 2 and 4), and a PEFT adapter
with r=16 on all seven projections. Then, each in a fresh process with the input in the page
cache, wall time and peak RSS (process tree) of

    loraformat merge BASE ADAPTER -o m.onnx --dtype D      (D in --dtypes)

and, per dtype, the ratio of peak RSS between the deepest and the shallowest checkpoint: flat
with depth means the 32-layer model costs what these do. Outputs are deleted after each run
(the 4-layer int4 export alone is 4.5 GB).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_merge  # noqa: E402
from bench_merge import build_peft_adapter, measure  # noqa: E402

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 4096, 14336, 128256, 32, 8


def build(work: Path, layers: int) -> tuple[Path, Path]:
    """(checkpoint, adapter) with ``layers`` layers, built once and kept in ``work``."""
    base, adapter = work / f"base{layers}", work / f"peft{layers}"
    if not (base / "model.safetensors").is_file():
        bench_merge.build_checkpoint(
            base, HIDDEN, INTER, layers, VOCAB, norm=1.0, heads=HEADS, kv_heads=KV_HEADS,
            dtype="BF16", extra_config={"rope_theta": 500000.0, "bos_token_id": 128000,
                                        "eos_token_id": 128001},
        )
    if not (adapter / "adapter_config.json").is_file():
        build_peft_adapter(adapter, HIDDEN, INTER, layers, kv=HIDDEN // HEADS * KV_HEADS)
    return base, adapter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "int4"])
    parser.add_argument("--keep", action="store_true", help="Keep the work directory.")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export_8b-"))
    work.mkdir(parents=True, exist_ok=True)
    loraformat = str(Path(sys.executable).with_name("loraformat"))
    peaks: dict[str, dict[int, float]] = {d: {} for d in args.dtypes}
    try:
        for layers in args.layers:
            base, adapter = build(work, layers)
            size = (base / "model.safetensors").stat().st_size
            print(f"checkpoint: Llama-3-8B shapes, {layers} layers, {size / 2**30:.2f} GiB bf16; "
                  "adapter r=16 on all 7 projections", flush=True)
            subprocess.run(["cat", str(base / "model.safetensors")], stdout=subprocess.DEVNULL,
                           check=True)  # the input in the page cache
            for dtype in args.dtypes:
                out = work / "out.onnx"
                wall, rss = measure([loraformat, "merge", str(base), str(adapter), "-o", str(out),
                                     "--dtype", dtype, "--overwrite"])
                written = sum(f.stat().st_size for f in work.glob("out.onnx*"))
                peaks[dtype][layers] = rss
                print(f"  --dtype {dtype:<8} {wall:7.1f} s   peak RSS {rss / 1024:5.2f} GiB   "
                      f"output {written / 2**30:.2f} GiB", flush=True)
                for f in work.glob("out.onnx*"):
                    f.unlink()
        if len(args.layers) > 1:
            low, high = min(args.layers), max(args.layers)
            for dtype, by_depth in peaks.items():
                print(f"peak RSS {high} vs {low} layers, {dtype}: "
                      f"{by_depth[high] / by_depth[low]:.3f}x")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
