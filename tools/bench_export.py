"""Benchmark: streamed ONNX export at real-model scale, against ``torch.onnx.export`` and ONNX
Runtime GenAI's model builder, in one run.

    .venv/bin/python tools/bench_export.py [WORKDIR] [--layers 24] [--builder-path DIR]
        [--dtypes float32,float16,bfloat16,int4] [--skip-torch] [--skip-builder] [--repeat 3]
        [--logits-only]

Builds (numpy, streamed) the LLaMA-shaped fp32 checkpoint of ``tools/bench_merge.py`` — hidden
1024, intermediate 4096, vocabulary 40960, untied head, 0.49B parameters at 24 layers (1.81 GiB)
— with RMSNorm weights of 1 (bench_merge's are 0, which makes every logit 0 and a logits
comparison meaningless), its 12-layer sibling, and PEFT adapters with r=16 on all seven
projections. Then, each in a fresh subprocess with the input already in the page cache, wall time
and peak RSS (of the process tree: loraformat's weight-writing child counts, summed), every
tool's Python sources compiled to bytecode first, as installed packages ship them, of:

  1. ``loraformat merge BASE ADAPTER -o DIR/model.onnx --with-past`` — the KV-cache decoder
     with its genai_config.json and tokenizer, the artefact the model builder writes
     (``--logits-only``: the plain logits graph instead, which is not) — with ``--dtype float32``,
     ``float16``,
     ``bfloat16``, ``int4`` (24 layers; ``--dtypes`` picks) and ``float32`` (12 layers: peak RSS
     must be flat with depth; run when float32 is picked), each *cold* (``LORAFORMAT_CACHE=off``:
     the graph is traced), and float32 and int4 once more *warm* (the graph cache holds this
     base's trace, as after any earlier export of it); float32 cold once more with
     ``LORAFORMAT_PREWRITE=off`` (the weights written after tracing, not by a second process
     while it runs: what the overlap saves);
  2. a plain ``torch.onnx.export`` (dynamo, external data) of transformers' LlamaForCausalLM
     loaded from the same checkpoint, no adapter;
  3. ONNX Runtime GenAI's model builder (``-p fp32/int4 -e cpu``, no adapter) when
     ``onnxruntime_genai`` is installed (the ``test`` extra) or importable with
     ``--builder-path`` on ``PYTHONPATH``; skipped when absent.

Every row but the torch export runs ``--repeat`` times (default 3), the rows interleaved round by
round so a slow spell of the (shared) machine does not fall on one tool; the summary gives each
row's median wall time (min-max) and largest peak RSS, and the ratios of loraformat's medians to
the model builder's.

Finally the exports' logits on a 32-token prompt (empty KV cache) are compared with the fp32
export's (the fp16 one's when fp32 was not picked) in ONNX Runtime (CPU): cosine similarity and
max abs difference.
ONNX Runtime's CPU provider has no bfloat16 kernels, so the bf16 export's logits come from
``onnx.reference.ReferenceEvaluator`` (numpy), timed.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_merge  # noqa: E402
from bench_merge import build_peft_adapter, measure  # noqa: E402

HIDDEN, INTER, VOCAB = 1024, 4096, 40960


def build_checkpoint(out: Path, layers: int) -> None:
    """bench_merge's checkpoint at this benchmark's sizes, RMSNorm weights 1 (see the module
    docstring), with the token ids the model builder needs; kept if already there."""
    if not (out / "model.safetensors").is_file():
        bench_merge.build_checkpoint(
            out, HIDDEN, INTER, layers, VOCAB, norm=1.0,
            extra_config={"bos_token_id": 1, "eos_token_id": 2},
        )


def add_tokenizer(checkpoint: Path) -> None:
    """A word-level tokenizer.json: the model builder saves the checkpoint's tokenizer next to
    its model and fails without one (the export itself does not use it)."""
    if (checkpoint / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 1000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>",
    }))


TORCH_EXPORT = """
import sys, torch
from transformers import LlamaForCausalLM
base, out = sys.argv[1:3]
model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
model.config.use_cache = False
ids = torch.randint(0, 1000, (1, 8))
with torch.no_grad():
    dims = {0: torch.export.Dim("b"), 1: torch.export.Dim("s")}
    program = torch.onnx.export(model, (ids,), dynamo=True, dynamic_shapes=(dims,))
program.save(out, external_data=True)
"""


def logits(path: Path, ids: np.ndarray) -> np.ndarray | None:
    """The logits of the model at ``path`` on ``ids`` (an empty KV cache where the graph has one),
    or None if no model was written there. ONNX Runtime's CPU provider has no bfloat16 kernels:
    a bf16 graph runs in onnx's reference evaluator."""
    import onnx
    import onnxruntime as ort

    if not path.is_file():
        return None
    if "bfloat16" in path.parent.name or path.name.startswith("bfloat16"):
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(str(path))
        inputs = [(i.name, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type),
                   [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim])
                  for i in model.graph.input]
        feed = empty_cache_feed(inputs, ids)
        return np.asarray(ReferenceEvaluator(model).run(["logits"], feed)[0]).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}
    feed = empty_cache_feed([(i.name, types[i.type], i.shape) for i in session.get_inputs()], ids)
    return np.asarray(session.run(["logits"], feed)[0], dtype=np.float32)


def empty_cache_feed(inputs: list[tuple[str, Any, list]], ids: np.ndarray) -> dict:
    """A feed for ``inputs`` (name, numpy dtype, shape): ``ids``, a full attention mask, their
    positions and an empty KV cache (past_key_values.N.key/value: [1, kv heads, 0, head size])."""
    feed: dict[str, np.ndarray] = {}
    for name, dtype, shape in inputs:
        if name == "input_ids":
            feed[name] = ids.astype(dtype)
        elif name == "attention_mask":
            feed[name] = np.ones(ids.shape, dtype=dtype)
        elif name == "position_ids":
            feed[name] = np.arange(ids.shape[1], dtype=dtype)[None]
        elif name.startswith("past_key_values."):
            head = shape[3] if isinstance(shape[3], int) else HIDDEN // shape[1]
            feed[name] = np.zeros([1, shape[1], 0, head], dtype=dtype)
    return feed


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=None)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--builder-path", default=str(ROOT / ".bench-genai"),
                        help="Directory holding onnxruntime_genai (put on PYTHONPATH).")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-builder", action="store_true")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16,int4",
                        help="loraformat export dtypes to measure, comma-separated.")
    parser.add_argument("--keep", action="store_true", help="Keep the exported models.")
    parser.add_argument("--repeat", type=int, default=3,
                        help="Interleaved rounds of every row (the torch export runs once).")
    parser.add_argument("--core", action="store_true",
                        help="Only the rows compared with the builder: loraformat cold per dtype "
                        "and the builder (no PREWRITE=off, half-depth or warm rows).")
    parser.add_argument("--logits-only", action="store_true",
                        help="loraformat's rows export the plain logits graph, not the KV-cache "
                        "decoder the builder writes (not the same artefact).")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_export-"))
    work.mkdir(parents=True, exist_ok=True)
    half = args.layers // 2
    dtypes = args.dtypes.split(",")
    bases = {args.layers: work / f"base{args.layers}"}
    if "float32" in dtypes and not args.core:  # the depth comparison
        bases[half] = work / f"base{half}"
    for layers, path in bases.items():
        build_checkpoint(path, layers)
        if not (work / f"peft{layers}" / "adapter_config.json").is_file():
            build_peft_adapter(work / f"peft{layers}", HIDDEN, INTER, layers)
    size = (bases[args.layers] / "model.safetensors").stat().st_size
    print(f"checkpoint: {args.layers} layers, {size / 2**30:.2f} GiB fp32; adapter r=16 on all 7 "
          "projections", flush=True)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    # Every tool runs from bytecode, as an installed package does: an editable install of
    # loraformat has none, and PYTHONDONTWRITEBYTECODE (set on some machines) keeps it that way,
    # which would add the sources' compile time (about 0.25 s) to each of loraformat's runs.
    for package in (ROOT / "loraformat", ROOT / "plugins", Path(args.builder_path)):
        if package.is_dir():
            compileall.compile_dir(package, quiet=1)
    subprocess.run(["cat", str(bases[args.layers] / "model.safetensors")],
                   stdout=subprocess.DEVNULL, check=True)  # page cache warm for everyone
    lf = [str(Path(sys.executable).parent / "loraformat")]
    rows: dict[str, list[tuple[float, float]]] = {}

    def run(label: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        if "-o" in cmd and cmd[cmd.index("-o") + 1].endswith(".onnx"):
            folder = Path(cmd[cmd.index("-o") + 1]).parent  # the last round's: gone, untimed
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        old = dict(os.environ)
        if env:
            os.environ.update(env)
        try:
            wall, rss = measure(cmd)
        except SystemExit as exc:  # a comparison tool failing must not lose the other rows
            print(f"{label}: failed: {str(exc)[-500:]}", flush=True)
            return
        finally:
            os.environ.clear()
            os.environ.update(old)
        rows.setdefault(label, []).append((wall, rss))
        print(f"{label:<58} {wall:7.1f} s {rss / 1024:7.2f} GiB", flush=True)

    big = bases[args.layers]
    cold = {"LORAFORMAT_CACHE": "off"}
    warm = {"LORAFORMAT_CACHE": str(out / "cache-loraformat")}
    builder = Path(args.builder_path)
    has_builder = not args.skip_builder and (
        (builder / "onnxruntime_genai").is_dir() or importlib.util.find_spec("onnxruntime_genai"))
    kv = [] if args.logits_only else ["--with-past"]
    artefact = "x.onnx" if args.logits_only else "x/model.onnx --with-past"

    def model(name: str) -> str:
        """Each loraformat row's output: a folder of its own, like the builder's."""
        return str(out / name / "model.onnx")

    if has_builder:
        add_tokenizer(big)
    elif not args.skip_builder:
        print(f"ORT GenAI builder: skipped (no onnxruntime_genai under {builder})")
    for round_ in range(args.repeat):  # interleaved: a slow spell of the machine hits all rows
        print(f"-- round {round_ + 1} of {args.repeat}", flush=True)
        for dtype in dtypes:
            run(f"loraformat merge -o {artefact} --dtype {dtype} ({args.layers} layers)",
                [*lf, "merge", str(big), str(work / f"peft{args.layers}"), "-o",
                 model(dtype), "--dtype", dtype, *kv], cold)
        if "float32" in dtypes and not args.core:
            run(f"loraformat merge -o {artefact} --dtype float32 ({args.layers} layers), "
                "LORAFORMAT_PREWRITE=off",
                [*lf, "merge", str(big), str(work / f"peft{args.layers}"), "-o",
                 model("f32_sequential"), *kv],
                {**cold, "LORAFORMAT_PREWRITE": "off"})
            run(f"loraformat merge -o {artefact} --dtype float32 ({half} layers)",
                [*lf, "merge", str(bases[half]), str(work / f"peft{half}"), "-o",
                 model(f"f32_{half}"), *kv], cold)
        if round_ == 0 and not args.core:  # an earlier export of this base fills the cache
            (out / "prime").mkdir()
            subprocess.run([*lf, "merge", str(big), str(work / f"peft{args.layers}"), "-o",
                            model("prime"), *kv], env={**os.environ, **warm}, check=True,
                           stdout=subprocess.DEVNULL)
        for dtype in [d for d in dtypes if d in ("float32", "int4") and not args.core]:
            run(f"loraformat merge -o {artefact} --dtype {dtype} ({args.layers} layers), warm",
                [*lf, "merge", str(big), str(work / f"peft{args.layers}"), "-o",
                 model(f"{dtype}_warm"), "--dtype", dtype, *kv], warm)
        if has_builder:
            env = {"PYTHONPATH": f"{builder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            for precision in ("fp32", "int4"):
                target = out / f"builder_{precision}"
                shutil.rmtree(target, ignore_errors=True)
                run(f"ORT GenAI builder -p {precision} -e cpu ({args.layers} layers, no adapter)",
                    [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(big),
                     "-o", str(target), "-p", precision, "-e", "cpu", "-c", str(out / "cache")],
                    env)
        if round_ == 0 and not args.skip_torch:  # far slower than the rest: once
            run(f"torch.onnx.export of transformers' model, fp32 ({args.layers} layers, no "
                "adapter)", [sys.executable, "-c", TORCH_EXPORT, str(big), str(out / "torch.onnx")])

    print(f"\nmedian (min-max) of {args.repeat} interleaved run(s); peak RSS: the largest")
    for label, values in rows.items():
        walls = sorted(w for w, _ in values)
        print(f"{label:<58} {statistics.median(walls):7.1f} s ({walls[0]:.1f}-{walls[-1]:.1f})"
              f" {max(r for _, r in values) / 1024:7.2f} GiB")
    median = {label: statistics.median(w for w, _ in v) for label, v in rows.items()}
    for ours, theirs in (("float32", "fp32"), ("int4", "int4")):
        for how, suffix in (("cold", ""), ("warm", ", warm")):
            a = median.get(f"loraformat merge -o {artefact} --dtype {ours} ({args.layers} "
                           f"layers){suffix}")
            b = median.get(f"ORT GenAI builder -p {theirs} -e cpu ({args.layers} layers, no "
                           "adapter)")
            if a and b:
                print(f"loraformat {ours} {how} / builder {theirs}: {a / b:.2f}x (median wall)")

    ids = np.random.default_rng(0).integers(0, VOCAB, (1, 32), dtype=np.int64)
    base_dtype = "float32" if "float32" in dtypes else "float16"
    ref = logits(Path(model(base_dtype)), ids)
    for dtype in dtypes:
        if dtype == base_dtype:
            continue
        start = time.perf_counter()
        got = logits(Path(model(dtype)), ids)
        runner = "onnx reference evaluator" if dtype == "bfloat16" else "ONNX Runtime CPU"
        print(f"{dtype} vs {base_dtype} logits (32-token prompt, {runner}, "
              f"{time.perf_counter() - start:.1f} s): cosine {cosine(got, ref):.5f}, max abs "
              f"diff {float(np.max(np.abs(got - ref))):.4g} "
              f"(|logits| max {float(np.max(np.abs(ref))):.3g})", flush=True)
    # The same comparison for the model builder's own int4 against its fp32: the quality a
    # round-to-nearest int4 quantizer reaches on this (random-weight) model.
    ref_b = logits(out / "builder_fp32" / "model.onnx", ids)
    got_b = logits(out / "builder_int4" / "model.onnx", ids)
    if ref_b is not None and got_b is not None:
        print(f"ORT GenAI builder int4 vs its fp32 logits (same prompt, no adapter): cosine "
              f"{cosine(got_b, ref_b):.5f}")
    sizes = {f"{p.parent.name}/{p.name}": p.stat().st_size for p in out.glob("*/*")
             if p.is_file() and p.stat().st_size > 2**20}
    print("output sizes (MiB):", {k: round(v / 2**20) for k, v in sorted(sizes.items())})
    by = {label: (0.0, max(r for _, r in v)) for label, v in rows.items()}
    deep = by.get(f"loraformat merge -o {artefact} --dtype float32 ({args.layers} layers)")
    shallow = by.get(f"loraformat merge -o {artefact} --dtype float32 ({half} layers)")
    if deep and shallow:
        print(f"peak RSS {args.layers} vs {half} layers (fp32): {deep[1] / shallow[1]:.3f}x "
              f"(target within 1.15x); fp32 peak {deep[1] / 1024:.2f} GiB (target <= 1.5 GiB)")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
