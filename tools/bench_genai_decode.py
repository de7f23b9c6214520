"""Benchmark: loraformat's KV-cache decoder against ONNX Runtime GenAI's model builder, both run
by the same ONNX Runtime GenAI runtime, so only the graphs differ.

    .venv/bin/python tools/bench_genai_decode.py [WORKDIR] [--layers 24] [--repeat 5]
        [--processes 2] [--threads 2] [--prompt 128] [--tokens 32] [--optimize] [--reuse]

The checkpoint is ``tools/bench_export.py``'s (0.49B LLaMA-shaped fp32 at 24 layers, RMSNorm
weights 1, a word-level tokenizer), built in WORKDIR if absent. Exported once each, cold
(``LORAFORMAT_CACHE=off``), wall time printed:

* ``loraformat export BASE -o lf_<dtype>/model.onnx --with-past --dtype <dtype>`` for float32 and
  int4 with loraformat's defaults (``--optimize`` adds a fused fp32 row); the folder is used
  exactly as loraformat writes it (its own genai_config.json and tokenizer);
* ``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu`` with the builder's defaults.

Then each pair (loraformat's folder and the builder's, one precision) runs in one process
(``onnxruntime_genai.Model``, greedy, batch 1, ``--threads`` intra-op threads and 1 inter-op
thread through ``og.Config.overlay``), ``--processes`` processes (default 2) alternating which
model loads first. After a warm-up, each round (``--repeat``, default 5) prefills a
``--prompt``-token prompt (random ids, seed 0) on each model — prefill, the time ``append_tokens``
takes — and ``--tokens`` greedy steps, one model after the other, so the two see nearly the same
spell of the shared machine; a round's decode is its median step. The table gives medians
(min-max) over rounds and the node count of each graph; the ratios are loraformat / builder per
round (paired), their median and range. Finally the greedy tokens of the fp32 models must agree
(the same weights, no adapter); the int4 models' agreement with fp32 is printed.
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

threads, prompt_len, tokens, vocab, rounds = map(int, sys.argv[1:6])
folders = sys.argv[6:]
models = []
for folder in folders:
    config = og.Config(folder)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    models.append(og.Model(config))
prompt = np.random.default_rng(0).integers(3, min(vocab, 1000), prompt_len).tolist()

def generator(model, n):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n,
                              do_sample=False)
    return og.Generator(model, params)

def run(order, n):
    # each model in turn runs a whole generation: alternating single steps would leave the idle
    # session's spinning intra-op threads competing with the running one's
    out = {}
    for i in order:
        gen = generator(models[i], n)
        start = time.perf_counter()
        gen.append_tokens([prompt])
        prefill = time.perf_counter() - start
        gen.generate_next_token()  # picks a token from the prefill's logits
        steps = []
        for _ in range(n - 1):
            start = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - start)
        out[i] = {"prefill": prefill, "decode": float(np.median(steps)),
                  "tokens": [int(t) for t in gen.get_sequence(0)][len(prompt):]}
    return [out[i] for i in range(len(models))]

run(list(range(len(models))), 4)  # warm-up: sessions, allocators and kernels
for r in range(rounds):
    order = list(range(len(models)))
    order = order[r % len(order):] + order[:r % len(order)]  # rotate who goes first
    print(json.dumps(run(order, tokens + 1)), flush=True)
"""


def nodes(folder: Path) -> int:
    import onnx

    name = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    return len(onnx.load(str(folder / name), load_external_data=False).graph.node)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=None)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=5,
                        help="Rounds per process (each: a prefill and --tokens steps per model).")
    parser.add_argument("--processes", type=int, default=2,
                        help="Processes per pair, alternating which model loads first.")
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

    pairs = [("loraformat fp32", "builder fp32"), ("loraformat int4", "builder int4")]
    if args.optimize:
        pairs.append(("loraformat fp32 --optimize", "builder fp32"))
    results: dict[str, list[dict]] = {label: [] for label in folders}
    paired: dict[tuple[str, str], list[tuple[float, float]]] = {pair: [] for pair in pairs}
    measured: set[str] = set()
    for pair in pairs:
        for process in range(args.processes):
            labels = list(pair) if process % 2 == 0 else list(pair)[::-1]  # who loads first
            out = subprocess.run(
                [sys.executable, "-c", RUN, str(args.threads), str(args.prompt),
                 str(args.tokens), str(VOCAB), str(args.repeat),
                 *(str(folders[label]) for label in labels)],
                capture_output=True, text=True,
            )
            if out.returncode != 0:
                print(f"{' / '.join(labels)}: failed: {out.stderr[-1500:]}", flush=True)
                continue
            for round_, line in enumerate(out.stdout.strip().splitlines()):
                runs = dict(zip(labels, json.loads(line), strict=True))
                for label, r in runs.items():
                    if label not in measured:  # the builder's fp32 row once, from its first pair
                        results[label].append(r)
                ours, theirs = runs[pair[0]], runs[pair[1]]
                paired[pair].append((ours["prefill"] / theirs["prefill"],
                                     ours["decode"] / theirs["decode"]))
                print(f"process {process + 1} round {round_ + 1} {pair[0]} / {pair[1]}: "
                      f"prefill {ours['prefill'] * 1e3:6.1f} / {theirs['prefill'] * 1e3:6.1f} ms"
                      f", decode {ours['decode'] * 1e3:5.1f} / {theirs['decode'] * 1e3:5.1f} "
                      "ms/token", flush=True)
        measured.update(pair)

    print(f"\nORT GenAI runtime, CPU, {args.threads} threads, {args.prompt}-token prompt, "
          f"{args.tokens} greedy tokens; {args.processes} processes x {args.repeat} rounds, "
          "the two models of a pair in one process, one after the other each round; median "
          "(min-max) over rounds of each round's median step")
    for label, runs in results.items():
        if not runs:
            continue
        pre = sorted(r["prefill"] * 1e3 for r in runs)
        dec = sorted(r["decode"] * 1e3 for r in runs)
        print(f"| {label:<28} | {nodes(folders[label]):5d} nodes | prefill "
              f"{statistics.median(pre):6.0f} ms ({pre[0]:.0f}-{pre[-1]:.0f}) | decode "
              f"{statistics.median(dec):5.1f} ms/token ({dec[0]:.1f}-{dec[-1]:.1f}) |")
    for (ours, theirs), ratios in paired.items():
        if ratios:
            pre = sorted(r[0] for r in ratios)
            dec = sorted(r[1] for r in ratios)
            print(f"{ours} / {theirs}, paired by round: prefill {statistics.median(pre):.3f}x "
                  f"({pre[0]:.3f}-{pre[-1]:.3f}), decode {statistics.median(dec):.3f}x "
                  f"({dec[0]:.3f}-{dec[-1]:.3f})")
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
