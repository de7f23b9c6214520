"""Benchmark: loraformat's KV-cache decoder against ONNX Runtime GenAI's model builder, both run
by the same ONNX Runtime GenAI runtime, so only the graphs differ.

    .venv/bin/python tools/bench_genai_decode.py [WORKDIR] [--layers 24] [--repeat 3]
        [--threads 2] [--prompt 128] [--tokens 32] [--optimize] [--reuse]

The checkpoint is ``tools/bench_export.py``'s (0.49B LLaMA-shaped fp32 at 24 layers, RMSNorm
weights 1, a word-level tokenizer), built in WORKDIR if absent. Exported once each, cold
(``LORAFORMAT_CACHE=off``), wall time printed:

* ``loraformat export BASE -o lf_<dtype>/model.onnx --with-past --dtype <dtype>`` for float32 and
  int4 with loraformat's defaults (``--optimize`` adds a fused fp32 row); the folder is used
  exactly as loraformat writes it (its own genai_config.json and tokenizer);
* ``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu`` with the builder's defaults.

Then each folder runs in a fresh process (``onnxruntime_genai.Model``, greedy, batch 1,
``--threads`` intra-op threads and 1 inter-op thread through ``og.Config.overlay``): a warm-up
generation, then a ``--prompt``-token prompt (random ids, seed 0) — prefill, the time
``append_tokens`` takes — and ``--tokens`` greedy tokens — decode, the time of the steps that
each run the model on one token, per token. The models are interleaved round by round
(``--repeat``, default 3) so a slow spell of the shared machine does not fall on one of them; the
table gives medians (min-max), the node count of each graph, and loraformat / builder ratios per
precision. Finally the greedy tokens of the fp32 models must agree (the same weights, no adapter);
the int4 models' agreement with fp32 is printed.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from bench_export import VOCAB, add_tokenizer, build_checkpoint  # noqa: E402

RUN = """
import json, sys, time
import numpy as np
import onnxruntime  # noqa: F401  (loads the ORT library onnxruntime_genai uses)
import onnxruntime_genai as og

folder, threads, prompt_len, tokens, vocab = sys.argv[1], *map(int, sys.argv[2:6])
config = og.Config(folder)
config.overlay(json.dumps({"model": {"decoder": {"session_options": {
    "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
model = og.Model(config)
prompt = np.random.default_rng(0).integers(3, min(vocab, 1000), prompt_len).tolist()

def generate(prompt, n):
    params = og.GeneratorParams(model)
    total = len(prompt) + n
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens([prompt])
    prefill = time.perf_counter() - start
    steps = []
    for _ in range(n):
        start = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - start)
    out = [int(t) for t in generator.get_sequence(0)][len(prompt):]
    # the first call picks a token from the prefill's logits; each later one runs the model
    return prefill, sum(steps[1:]) / max(1, n - 1), out

generate(prompt[:16], 4)  # warm-up: session, allocator and kernels
prefill, decode, out = generate(prompt, tokens + 1)
print(json.dumps({"prefill": prefill, "decode": decode, "tokens": out}))
"""


def nodes(folder: Path) -> int:
    import onnx

    name = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    return len(onnx.load(str(folder / name), load_external_data=False).graph.node)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=None)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--optimize", action="store_true",
                        help="Also export and run loraformat's fused (--optimize) fp32 decoder.")
    parser.add_argument("--reuse", action="store_true",
                        help="Keep folders already exported in WORKDIR (no export timing).")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_genai_decode-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / f"base{args.layers}"
    build_checkpoint(base, args.layers)
    add_tokenizer(base)
    lf = str(Path(sys.executable).parent / "loraformat")
    exports = {
        "loraformat fp32": [lf, "export", str(base), "--with-past", "--dtype", "float32"],
        "builder fp32": ["fp32"],
        "loraformat int4": [lf, "export", str(base), "--with-past", "--dtype", "int4"],
        "builder int4": ["int4"],
    }
    if args.optimize:
        exports["loraformat fp32 --optimize"] = [
            lf, "export", str(base), "--with-past", "--dtype", "float32", "--optimize"]
    folders: dict[str, Path] = {}
    subprocess.run(["cat", str(base / "model.safetensors")], stdout=subprocess.DEVNULL,
                   check=True)  # page cache warm for every export
    for label, cmd in exports.items():
        folder = work / label.replace(" ", "_").replace("--", "")
        folders[label] = folder
        if args.reuse and (folder / "genai_config.json").is_file():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        if label.startswith("builder"):
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(base),
                   "-o", str(folder), "-p", cmd[0], "-e", "cpu", "-c", str(work / "cache")]
        else:
            cmd = [*cmd, "-o", str(folder / "model.onnx")]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "LORAFORMAT_CACHE": "off"})
        if done.returncode != 0:
            raise SystemExit(f"{label} export failed:\n{done.stderr[-3000:]}")
        print(f"export {label:<28} {time.perf_counter() - start:7.1f} s (cold, once)", flush=True)

    results: dict[str, list[dict]] = {label: [] for label in folders}
    for round_ in range(args.repeat):
        order = list(folders)
        order = order[round_ % len(order):] + order[:round_ % len(order)]  # rotate the order
        for label in order:
            out = subprocess.run(
                [sys.executable, "-c", RUN, str(folders[label]), str(args.threads),
                 str(args.prompt), str(args.tokens), str(VOCAB)],
                capture_output=True, text=True,
            )
            if out.returncode != 0:
                print(f"{label}: failed: {out.stderr[-1500:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[label].append(r)
            print(f"round {round_ + 1} {label:<28} prefill {r['prefill'] * 1e3:7.1f} ms  "
                  f"decode {r['decode'] * 1e3:6.1f} ms/token", flush=True)

    print(f"\nORT GenAI runtime, CPU, {args.threads} threads, {args.prompt}-token prompt, "
          f"{args.tokens} greedy tokens; median (min-max) of {args.repeat} interleaved runs")
    median: dict[str, tuple[float, float]] = {}
    for label, runs in results.items():
        if not runs:
            continue
        pre = sorted(r["prefill"] * 1e3 for r in runs)
        dec = sorted(r["decode"] * 1e3 for r in runs)
        median[label] = (statistics.median(pre), statistics.median(dec))
        print(f"| {label:<28} | {nodes(folders[label]):5d} nodes | prefill "
              f"{median[label][0]:6.0f} ms ({pre[0]:.0f}-{pre[-1]:.0f}) | decode "
              f"{median[label][1]:5.1f} ms/token ({dec[0]:.1f}-{dec[-1]:.1f}) |")
    for ours, theirs in (("loraformat fp32", "builder fp32"),
                         ("loraformat fp32 --optimize", "builder fp32"),
                         ("loraformat int4", "builder int4")):
        if ours in median and theirs in median:
            a, b = median[ours], median[theirs]
            print(f"{ours} / {theirs}: prefill {a[0] / b[0]:.2f}x, decode {a[1] / b[1]:.2f}x")
    tokens = {label: runs[0]["tokens"] for label, runs in results.items() if runs}
    reference = tokens.get("builder fp32")
    status = 0
    for label, seq in tokens.items():
        if reference is None or label == "builder fp32":
            continue
        same = next((i for i, (a, b) in enumerate(zip(seq, reference, strict=True)) if a != b),
                    len(seq))
        print(f"greedy tokens {label} vs builder fp32: {same} of {len(seq)} agree before the "
              "first difference")
        if "fp32" in label and same != len(seq):
            status = 1  # the same fp32 weights must give the same tokens
    return status


if __name__ == "__main__":
    sys.exit(main())
