"""Benchmark: the emitted KV-cache decoder against ONNX Runtime GenAI's model builder, same
artefact, one run: export wall time / peak RSS / node count, and prefill / decode latency of the
two graphs in plain ONNX Runtime with identical inputs.

    .venv/bin/python tools/bench_emit.py [WORKDIR] [--layers 24] [--repeat 3] [--threads 2]
        [--precisions fp32,int4] [--skip-export] [--skip-latency]

The checkpoint is tools/bench_export.py's (LLaMA-shaped, hidden 1024, intermediate 4096,
vocabulary 40960, untied head, 0.49B parameters at 24 layers, fp32) and its r=16 PEFT adapter.

1. **Export** (each in a fresh subprocess, input in the page cache, rows interleaved round by
   round, ``--repeat`` rounds, cold: nothing cached): ``loraformat export BASE --with-past``
   and ``loraformat merge BASE ADAPTER --with-past`` (fp32 and ``--dtype int4`` with its
   defaults) against ``python -m onnxruntime_genai.models.builder -p fp32/int4 -e cpu`` (no
   adapter: it cannot merge one). Median wall time, largest peak RSS of the process tree, nodes.
2. **Latency**: the ``export`` outputs and the builder's ``model.onnx`` in
   ``onnxruntime.InferenceSession`` (CPU, ``--threads`` intra-op threads, sequential), a
   128-token prompt then 32 one-token steps through the KV cache (past fed back, attention mask
   of ones; ``position_ids`` where the graph has it); prefill ms (median of 3) and decode
   ms/token (median over steps and rounds), the two graphs alternating. Logits' cosine of each
   int4 graph to its own fp32 graph on the prompt is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_export import HIDDEN, INTER, add_tokenizer, build_checkpoint  # noqa: E402
from bench_merge import build_peft_adapter, measure  # noqa: E402

PROMPT, STEPS = 128, 32


def nodes(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


class Graph:
    """One decoder graph in ONNX Runtime, fed by its own input names and types."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.pasts = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        first = self.inputs[self.pasts[0]]
        self.kv = first.shape[1]
        self.head = first.shape[3] if isinstance(first.shape[3], int) else HIDDEN // 16
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.dtype = types[first.type]

    def step(self, ids: np.ndarray, past: dict, start: int) -> tuple[np.ndarray, dict, float]:
        import onnxruntime as ort

        s = ids.shape[1]
        feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids),
                "attention_mask": ort.OrtValue.ortvalue_from_numpy(
                    np.ones((1, start + s), np.int64))}
        if "position_ids" in self.inputs:
            feed["position_ids"] = ort.OrtValue.ortvalue_from_numpy(
                np.arange(start, start + s, dtype=np.int64)[None])
        feed.update(past)
        t = time.perf_counter()
        out = self.session.run_with_ort_values(self.outputs, feed)
        elapsed = time.perf_counter() - t
        presents = dict(zip(self.outputs, out, strict=True))
        nxt = {p: presents[p.replace("past_key_values.", "present.")] for p in self.pasts}
        return presents["logits"].numpy(), nxt, elapsed

    def empty(self) -> dict:
        import onnxruntime as ort

        return {p: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, self.kv, 0, self.head),
                                                             self.dtype)) for p in self.pasts}

    def generate(self, ids: np.ndarray) -> tuple[float, list[float], np.ndarray]:
        """(prefill seconds, decode seconds per step, prompt logits)."""
        logits, past, prefill = self.step(ids, self.empty(), 0)
        first = logits
        token = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
        steps = []
        for i in range(STEPS):
            logits, past, t = self.step(token, past, ids.shape[1] + i)
            steps.append(t)
            token = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
        return prefill, steps, first


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=None)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,int4")
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--extra", default="", help="extra loraformat export flags (int4 rows)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-emit-"))
    work.mkdir(parents=True, exist_ok=True)
    base, adapter, out = work / f"base{args.layers}", work / f"peft{args.layers}", work / "out"
    out.mkdir(exist_ok=True)
    build_checkpoint(base, args.layers)
    add_tokenizer(base)
    if not (adapter / "adapter_model.safetensors").is_file():
        build_peft_adapter(adapter, HIDDEN, INTER, args.layers)
    subprocess.run(["cat", str(base / "model.safetensors")], stdout=subprocess.DEVNULL,
                   check=True)
    precisions = args.precisions.split(",")
    dtype_of = {"fp32": "float32", "int4": "int4"}
    lf = [str(Path(sys.executable).parent / "loraformat")]
    extra = args.extra.split()

    if not args.skip_export:
        rows: dict[str, list[tuple[float, float]]] = {}
        counts: dict[str, int] = {}
        for round_ in range(args.repeat):
            for p in precisions:
                flags = ["--dtype", dtype_of[p], *(extra if p == "int4" else [])]
                jobs = {
                    f"loraformat export --with-past {p}": (
                        [*lf, "export", str(base), "-o", str(out / f"lf_{p}.onnx"),
                         "--with-past", "--overwrite", *flags], out / f"lf_{p}.onnx"),
                    f"loraformat merge --with-past {p} (r=16 adapter)": (
                        [*lf, "merge", str(base), str(adapter), "-o",
                         str(out / f"lfm_{p}.onnx"), "--with-past", "--overwrite", *flags],
                        out / f"lfm_{p}.onnx"),
                    f"ORT GenAI builder {p}": (
                        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                         str(base), "-o", str(out / f"builder_{p}"), "-p", p, "-e", "cpu",
                         "-c", str(out / f"cache_{p}_{round_}")],
                        out / f"builder_{p}" / "model.onnx"),
                }
                for label, (cmd, path) in jobs.items():
                    wall, peak = measure(cmd)
                    rows.setdefault(label, []).append((wall, peak))
                    counts[label] = nodes(path)
                    print(f"round {round_}: {label}: {wall:.1f} s, {peak / 1024:.2f} GiB",
                          flush=True)
                    subprocess.run(["rm", "-rf", str(out / f"cache_{p}_{round_}")])
        print(f"\nexport: median (min-max) of {args.repeat} interleaved cold runs; peak RSS: "
              "largest")
        median = {}
        for label, values in rows.items():
            walls = sorted(w for w, _ in values)
            median[label] = statistics.median(walls)
            print(f"{label:<48} {median[label]:6.1f} s ({walls[0]:.1f}-{walls[-1]:.1f})  "
                  f"{max(m for _, m in values) / 1024:.2f} GiB  {counts[label]} nodes")
        for p in precisions:
            b = median[f"ORT GenAI builder {p}"]
            print(f"{p}: export {median[f'loraformat export --with-past {p}'] / b:.2f}x, merge "
                  f"{median[f'loraformat merge --with-past {p} (r=16 adapter)'] / b:.2f}x "
                  "the builder's wall time")

    if not args.skip_latency:
        rng = np.random.default_rng(0)
        ids = rng.integers(3, 1000, (1, PROMPT)).astype(np.int64)
        print(f"\nlatency: onnxruntime {args.threads} threads, {PROMPT}-token prompt, {STEPS} "
              "decode steps")
        firsts = {}
        for p in precisions:
            graphs = {"loraformat": Graph(out / f"lf_{p}.onnx", args.threads),
                      "builder": Graph(out / f"builder_{p}" / "model.onnx", args.threads)}
            prefill: dict[str, list[float]] = {k: [] for k in graphs}
            decode: dict[str, list[float]] = {k: [] for k in graphs}
            for _ in range(args.repeat):
                for name, graph in graphs.items():
                    pre, steps, first = graph.generate(ids)
                    prefill[name].append(pre)
                    decode[name] += steps
                    firsts[(p, name)] = first
            med = {k: (statistics.median(prefill[k]) * 1e3, statistics.median(decode[k]) * 1e3)
                   for k in graphs}
            for k, (pre, dec) in med.items():
                print(f"{p} {k:<11} prefill {pre:7.1f} ms   decode {dec:6.2f} ms/token")
            print(f"{p} loraformat / builder: prefill "
                  f"{med['loraformat'][0] / med['builder'][0]:.2f}x, decode "
                  f"{med['loraformat'][1] / med['builder'][1]:.2f}x")
        if "fp32" in precisions and "int4" in precisions:
            for name in ("loraformat", "builder"):
                print(f"{name} int4 vs its fp32, prompt logits cosine: "
                      f"{cosine(firsts[('int4', name)], firsts[('fp32', name)]):.5f}")
            print(f"loraformat fp32 vs builder fp32 logits cosine: "
                  f"{cosine(firsts[('fp32', 'loraformat')], firsts[('fp32', 'builder')]):.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
