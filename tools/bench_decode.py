"""Prefill and per-token decode latency: the exported GPT-2-small-shaped decoder in ONNX Runtime
(CPU) against transformers' PyTorch on the same weights, in one run.

The model is built locally with random weights (hidden 768, 12 layers, 12 heads, vocab 50257,
no downloads), saved as a checkpoint, exported once with a KV cache (``export_decoder``) and fused
for ONNX Runtime (``optimize_file``). Batch 1, a 128-token prompt:

* prefill: one forward over the prompt with an empty cache, logits for every position (the same
  work in both: transformers' forward returns all logits by default);
* decode: one forward of one token against the cache, ``--decode-tokens`` steps after the
  prefill, greedy; the per-token figure is the median step of a run.

PyTorch runs with transformers' default attention (``sdpa``: torch's
scaled_dot_product_attention), what a user gets from ``from_pretrained``; ``--attention eager``
measures the slower reference implementation instead.

Both engines use the same number of intra-op threads (``--threads``, default 2: torch's
``set_num_threads`` and ONNX Runtime's ``intra_op_num_threads``; ORT inter-op 1). Runs are
interleaved (torch, fused, plain, then rotated) and repeated; the table shows medians over
repeats, the spread (min–max), and the best-of ratios (min over min), since other processes
share the CPU: under contention the medians move by tens of percent between runs.

    .venv/bin/python tools/bench_decode.py [--threads 2] [--repeats 7] [--workdir DIR]

With ``--int4 CHECKPOINT [--adapter ADAPTER]`` it instead compares two fused KV-cache exports of
that checkpoint (adapter merged) in ONNX Runtime CPU: fp32 against int4 (MatMulNBits, block 32,
asymmetric, accuracy level 4; lm_head kept fp32), same prompt and threads, interleaved repeats:
prefill, decode per token, the fp32/int4 ratios, how many greedy tokens agree, and the logits'
cosine to fp32's position by position (``--text``: a text prompt for a byte-level model such as
``tools/build_trained_lm.py`` trains).

    .venv/bin/python tools/bench_decode.py --int4 /tmp/bench/base24 --adapter /tmp/bench/peft24
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraformat.export.decoder import export_decoder
from loraformat.export.optimize import optimize_file
from loraformat.generate import DecoderSession


def build_checkpoint(out: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(out)
    return out


class Torch:
    def __init__(self, checkpoint: Path, threads: int, attention: str = "sdpa") -> None:
        from transformers import GPT2LMHeadModel

        self.name, self.threads = f"torch {attention}", threads
        self.model = GPT2LMHeadModel.from_pretrained(checkpoint, attn_implementation=attention)
        self.model.eval()

    def run(self, ids: np.ndarray, steps: int) -> tuple[float, list[float], list[int]]:
        torch.set_num_threads(self.threads)
        tokens, decode = [], []
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model(torch.from_numpy(ids), use_cache=True)
            prefill = time.perf_counter() - start
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out.cache
            for _ in range(steps):
                tokens.append(int(token))
                start = time.perf_counter()
                out = self.model(token, cache=cache, use_cache=True)
                decode.append(time.perf_counter() - start)
                cache = out.cache
                token = out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, decode, tokens


class Ort:
    def __init__(self, name: str, path: Path, threads: int) -> None:
        self.name, self.threads = name, threads
        self.session = DecoderSession(path, intra_op_threads=threads, inter_op_threads=1)

    def run(self, ids: np.ndarray, steps: int) -> tuple[float, list[float], list[int]]:
        s = self.session
        tokens, decode = [], []
        start = time.perf_counter()
        logits, past = s.step(ids, s.empty_past(1), 0)
        prefill = time.perf_counter() - start
        for n in range(steps):
            token = logits.argmax(-1)[:, None]
            tokens.append(int(token[0, 0]))
            start = time.perf_counter()
            logits, past = s.step(token, past, ids.shape[1] + n)
            decode.append(time.perf_counter() - start)
        return prefill, decode, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="Intra-op thread counts to measure, each for both engines.")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                        help="transformers' attention implementation (default: its default, "
                        "sdpa).")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Keep the checkpoint and exports here (reused when present).")
    parser.add_argument("--int4", type=Path, default=None, metavar="CHECKPOINT",
                        help="Compare fp32 and int4 exports of this decoder checkpoint instead.")
    parser.add_argument("--adapter", type=Path, default=None, help="With --int4: merge this.")
    parser.add_argument("--text", default=None,
                        help="With --int4: the prompt as text, for a byte-level model (ids = its "
                             "UTF-8 bytes; tools/build_trained_lm.py builds one).")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore", FutureWarning)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_decode-")
        args.workdir = Path(tmp.name)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.int4 is not None:
        try:
            compare_int4(args.int4, work, args)
        finally:
            if tmp is not None:
                tmp.cleanup()
        return
    checkpoint = build_checkpoint(work / "gpt2-small")
    plain, fused = work / "decoder.onnx", work / "decoder.fused.onnx"
    if not plain.exists():
        start = time.perf_counter()
        export_decoder(checkpoint, plain)
        print(f"export (with past): {time.perf_counter() - start:.1f} s")
    if not fused.exists():
        report = optimize_file(plain, fused, checkpoint)
        print(f"fused: {report.fusions} ({report.nodes_before} -> {report.nodes_after} nodes)")
    try:
        run_all(checkpoint, plain, fused, args)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run_all(checkpoint: Path, plain: Path, fused: Path, args: argparse.Namespace) -> None:
    ids = np.random.default_rng(0).integers(0, 50257, (1, args.prompt), dtype=np.int64)
    reference = Torch(checkpoint, args.threads[0], args.attention)
    for threads in args.threads:
        reference.threads = threads
        engines = [reference, Ort("ORT fused", fused, threads), Ort("ORT plain", plain, threads)]
        measure(engines, ids, args)


def measure(engines: list, ids: np.ndarray, args: argparse.Namespace) -> None:
    threads = engines[0].threads
    prefill: dict[str, list[float]] = {e.name: [] for e in engines}
    decode: dict[str, list[float]] = {e.name: [] for e in engines}
    tokens: dict[str, list[int]] = {}
    for e in engines:  # warm-up (ORT's first run plans memory; torch's allocates)
        e.run(ids, 2)
    for r in range(args.repeats):
        order = engines[r % len(engines):] + engines[: r % len(engines)]
        for e in order:
            p, d, t = e.run(ids, args.decode_tokens)
            prefill[e.name].append(p)
            decode[e.name].append(statistics.median(d))
            tokens[e.name] = t

    print(
        f"\nGPT-2-small shape (768 hidden, 12 layers, 12 heads, vocab 50257), batch 1, "
        f"{args.prompt}-token prompt, {args.decode_tokens} decode steps, {threads} intra-op "
        f"thread(s) for both, {args.repeats} interleaved repeats; median (min-max) in ms"
    )
    torch_name = engines[0].name
    base_p = statistics.median(prefill[torch_name])
    base_d = statistics.median(decode[torch_name])
    best_p, best_d = min(prefill[torch_name]), min(decode[torch_name])
    print(
        f"{'engine':<12} {'prefill':>24} {'decode/token':>22} {'prefill x':>10} {'decode x':>9}"
        f"   {'(best-of ratios: prefill, decode)'}"
    )
    for e in engines:
        p, d = prefill[e.name], decode[e.name]
        mp, md = statistics.median(p), statistics.median(d)
        print(
            f"{e.name:<12} {1e3 * mp:>9.1f} ({1e3 * min(p):.1f}-{1e3 * max(p):.1f})"
            f"{'':>3}{1e3 * md:>7.2f} ({1e3 * min(d):.2f}-{1e3 * max(d):.2f})"
            f" {base_p / mp:>9.2f}x {base_d / md:>8.2f}x"
            f"   ({best_p / min(p):.2f}x, {best_d / min(d):.2f}x)"
        )
    same = sum(a == b for a, b in zip(tokens[torch_name], tokens["ORT fused"], strict=True))
    print(
        f"greedy tokens, fused ORT vs {torch_name}: {same}/{len(tokens['ORT fused'])} equal "
        "(random weights: near-ties may flip)", flush=True,
    )




def compare_int4(checkpoint: Path, work: Path, args: argparse.Namespace) -> None:
    import json

    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    if args.text is not None:  # a byte-level model's prompt: its UTF-8 bytes are the ids
        ids = np.frombuffer(args.text.encode(), dtype=np.uint8).astype(np.int64)[None]
        if vocab < 256:
            sys.exit(f"--text needs a byte-level vocabulary (256 ids); {checkpoint} has {vocab}")
    else:
        ids = np.random.default_rng(0).integers(0, vocab, (1, args.prompt), dtype=np.int64)
    adapters = [args.adapter] if args.adapter else []
    paths = {}
    for dtype in ("float32", "int4"):
        paths[dtype] = work / f"decoder.{dtype}.onnx"
        if not paths[dtype].exists():
            start = time.perf_counter()
            export_decoder(checkpoint, paths[dtype], adapters=adapters, dtype=dtype,
                           optimize=True)
            print(f"export {dtype} (with past, fused): {time.perf_counter() - start:.1f} s",
                  flush=True)
    logits_agreement(paths, ids, args.decode_tokens)
    for threads in args.threads:
        engines = [Ort("ORT fp32", paths["float32"], threads),
                   Ort("ORT int4", paths["int4"], threads)]
        prefill: dict[str, list[float]] = {e.name: [] for e in engines}
        decode: dict[str, list[float]] = {e.name: [] for e in engines}
        tokens: dict[str, list[int]] = {}
        for e in engines:
            e.run(ids, 2)
        for r in range(args.repeats):
            for e in engines[r % 2:] + engines[: r % 2]:
                p, d, t = e.run(ids, args.decode_tokens)
                prefill[e.name].append(p)
                decode[e.name].append(statistics.median(d))
                tokens[e.name] = t
        print(f"\n{checkpoint.name}: batch 1, {args.prompt}-token prompt, {args.decode_tokens} "
              f"decode steps, {threads} intra-op thread(s), {args.repeats} interleaved repeats; "
              "median (min-max) in ms")
        for e in engines:
            p, d = prefill[e.name], decode[e.name]
            print(f"{e.name:<9} prefill {1e3 * statistics.median(p):8.1f} ({1e3 * min(p):.1f}-"
                  f"{1e3 * max(p):.1f})   decode/token {1e3 * statistics.median(d):7.2f} "
                  f"({1e3 * min(d):.2f}-{1e3 * max(d):.2f})")
        f32, i4 = "ORT fp32", "ORT int4"
        print(f"int4 speed-up: prefill "
              f"{statistics.median(prefill[f32]) / statistics.median(prefill[i4]):.2f}x, "
              f"decode {statistics.median(decode[f32]) / statistics.median(decode[i4]):.2f}x "
              f"(best-of: {min(decode[f32]) / min(decode[i4]):.2f}x)")
        same = sum(a == b for a, b in zip(tokens[f32], tokens[i4], strict=True))
        first = next((i for i, (a, b) in enumerate(zip(tokens[f32], tokens[i4], strict=True))
                      if a != b), len(tokens[f32]))
        print(f"greedy tokens, int4 vs fp32: {same}/{len(tokens[f32])} equal, identical prefix "
              f"{first} (random weights: near-ties flip)", flush=True)


def logits_agreement(paths: dict[str, Path], ids: np.ndarray, steps: int) -> None:
    """How close int4's logits are to fp32's: the prompt, then ``steps`` tokens fed to both
    (fp32's greedy choices, so both see the same text); cosine of each position's logits and
    whether the top token agrees."""
    from loraformat.export.onnx import cosine

    f32, i4 = (DecoderSession(paths[d], intra_op_threads=2) for d in ("float32", "int4"))
    logits = {}
    for name, session in (("fp32", f32), ("int4", i4)):
        rows, past = [], session.empty_past(1)
        step_ids, fed = ids, 0
        for n in range(steps + 1):
            out, past = session.step(step_ids, past, fed)
            fed += step_ids.shape[1]
            rows.append(out[0])
            token = logits["fp32"][n].argmax() if name == "int4" else out[0].argmax()
            step_ids = np.array([[token]], dtype=np.int64)
        logits[name] = rows
    cos = [cosine(a, b) for a, b in zip(logits["fp32"], logits["int4"], strict=True)]
    top = sum(int(a.argmax() == b.argmax())
              for a, b in zip(logits["fp32"], logits["int4"], strict=True))
    print(f"logits, int4 vs fp32 at the prompt's last position and {steps} fed tokens: cosine "
          f"{cos[0]:.5f} after the prompt, median {statistics.median(cos):.5f}, "
          f"min {min(cos):.5f}; top token equal at {top}/{len(cos)} positions", flush=True)


if __name__ == "__main__":
    main()
