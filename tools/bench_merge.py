"""Benchmark: `loraformat merge` against `cp -r` and PEFT's merge, in one run.

    python tools/bench_merge.py [WORKDIR] [--layers 24] [--keep]

Builds (numpy, no torch) a LLaMA-shaped fp32 checkpoint of ~0.49B parameters — hidden 1024,
24 layers, intermediate 4096, vocabulary 40960, untied LM head — and a PEFT LoRA adapter with
r=16 on all seven projections of every layer, then measures, each in a fresh subprocess with the
input already in the page cache:

  1. ``cp -r`` of the checkpoint directory (the floor: read and write every byte);
  2. ``loraformat merge BASE PEFT_DIR -o OUT`` (reads the PEFT directory itself);
  3. PEFT: ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload`` +
     ``save_pretrained``.

Wall time and peak RSS (the child's ``ru_maxrss``) of each are printed, with the ratios the
project targets: merge ≤ 2× cp, ≥ 4× faster than PEFT, peak RSS < 1/8 of PEFT's. loraformat
fsyncs its output (atomic write); ``cp`` and PEFT do not, so a ``sync`` is timed separately after
each and reported too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loraformat.format.safetensors_io import TensorEntry, write_safetensors

PROJECTIONS = {
    "self_attn.q_proj": ("hidden", "hidden"),
    "self_attn.k_proj": ("hidden", "kv"),  # kv: hidden unless grouped-query attention
    "self_attn.v_proj": ("hidden", "kv"),
    "self_attn.o_proj": ("hidden", "hidden"),
    "mlp.gate_proj": ("hidden", "inter"),
    "mlp.up_proj": ("hidden", "inter"),
    "mlp.down_proj": ("inter", "hidden"),
}
RANK, ALPHA = 16, 32


def _random(shape: tuple[int, ...], seed: int, std: float = 0.02, mean: float = 0.0,
            dtype: str = "F32"):
    def make() -> np.ndarray:
        if std == 0:
            value = np.full(shape, mean, dtype=np.float32)
        else:
            rng = np.random.default_rng(seed)
            value = rng.standard_normal(shape, dtype=np.float32)
            value *= np.float32(std)
        if dtype == "BF16":
            import ml_dtypes

            return value.astype(ml_dtypes.bfloat16)
        return value

    return make


def build_checkpoint(
    out: Path, hidden: int, inter: int, layers: int, vocab: int, *, norm: float = 0.0,
    extra_config: dict | None = None, heads: int = 16, kv_heads: int | None = None,
    dtype: str = "F32",
) -> int:
    """Write config.json + model.safetensors (streamed, one tensor in memory at a time); RMSNorm
    weights all ``norm``, ``extra_config``'s entries added to the config; ``kv_heads`` fewer
    than ``heads`` for grouped-query attention; ``dtype`` F32 or BF16. Returns the parameter
    count."""
    out.mkdir(parents=True, exist_ok=True)
    kv_heads = kv_heads or heads
    dims = {"hidden": hidden, "inter": inter, "kv": hidden // heads * kv_heads}
    entries, seed, params = [], 0, 0

    def add(name: str, shape: tuple[int, ...], std: float = 0.02, mean: float = 0.0) -> None:
        nonlocal seed, params
        seed += 1
        params += int(np.prod(shape))
        entries.append(TensorEntry(name, dtype, shape, _random(shape, seed, std, mean, dtype)))

    add("model.embed_tokens.weight", (vocab, hidden))
    add("lm_head.weight", (vocab, hidden))
    add("model.norm.weight", (hidden,), 0.0, norm)
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", (hidden,), 0.0, norm)
        add(p + "post_attention_layernorm.weight", (hidden,), 0.0, norm)
        for name, (src, dst) in PROJECTIONS.items():
            add(p + name + ".weight", (dims[dst], dims[src]))
    write_safetensors(out / "model.safetensors", entries, {"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": {"F32": "float32", "BF16": "bfloat16"}[dtype],
        **(extra_config or {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return params


def build_peft_adapter(
    out: Path, hidden: int, inter: int, layers: int, kv: int | None = None
) -> None:
    """A PEFT LoRA directory (the files ``save_pretrained`` writes), r=16 on all 7 projections;
    ``kv``: k_proj/v_proj's output width (grouped-query attention), default ``hidden``."""
    out.mkdir(parents=True, exist_ok=True)
    dims = {"hidden": hidden, "inter": inter, "kv": kv or hidden}
    rng = np.random.default_rng(123)
    tensors = {}
    for i in range(layers):
        for name, (src, dst) in PROJECTIONS.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            tensors[key + ".lora_A.weight"] = rng.standard_normal(
                (RANK, dims[src]), dtype=np.float32) * np.float32(0.02)
            tensors[key + ".lora_B.weight"] = rng.standard_normal(
                (dims[dst], RANK), dtype=np.float32) * np.float32(0.02)
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
        "target_modules": sorted(n.split(".")[-1] for n in PROJECTIONS), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "base_model_name_or_path": None, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))


PEFT_SCRIPT = """
import sys, torch
from transformers import LlamaForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

RUSAGE_WRAPPER = """
import os, resource, subprocess, sys, time

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def rss(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


t = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
peak = 0
while True:
    try:
        proc.wait(timeout=0.05)
        break
    except subprocess.TimeoutExpired:
        peak = max(peak, sum(rss(p) for p in tree(proc.pid)))
wall = time.perf_counter() - t
largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(wall, max(largest, peak // 1024), proc.returncode)
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of ``cmd`` run as a child of a fresh wrapper process.

    Peak RSS is that of the whole process tree — ``cmd`` and any process it starts, summed,
    sampled every 50 ms from /proc — or the largest single process's exact peak if higher."""
    result = subprocess.run([sys.executable, "-c", RUSAGE_WRAPPER, *cmd],
                            capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{cmd[0]} failed:\n{result.stderr[-3000:]}")
    wall, rss_kib, code = lines[-1].split()
    if int(code) != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}:\n{result.stderr[-3000:]}")
    return float(wall), int(rss_kib) / 1024


def timed_sync() -> float:
    t = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=None)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=40960)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--repeat", type=int, default=3, help="Interleaved runs per tool.")
    parser.add_argument("--keep", action="store_true", help="Keep the work directory.")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "peft"
    try:
        t = time.perf_counter()
        params = build_checkpoint(base, args.hidden, args.intermediate, args.layers, args.vocab)
        build_peft_adapter(adapter, args.hidden, args.intermediate, args.layers)
        size = sum(f.stat().st_size for f in base.iterdir())
        print(f"checkpoint: {params / 1e9:.3f}B parameters, {size / 2**30:.2f} GiB fp32, "
              f"{args.layers} layers; adapter r={RANK} on 7 projections "
              f"(built in {time.perf_counter() - t:.1f} s)")
        subprocess.run(["cat", str(base / "model.safetensors")], stdout=subprocess.DEVNULL,
                       check=True)  # every run starts with the input in the page cache
        loraformat = str(Path(sys.executable).with_name("loraformat"))
        commands = {
            "cp -r": ["cp", "-r", str(base), str(work / "out")],
            "loraformat merge": [loraformat, "merge", str(base), str(adapter), "-o",
                                 str(work / "out")],
        }
        if not args.skip_peft:
            commands["peft merge_and_unload"] = [sys.executable, "-c", PEFT_SCRIPT, str(base),
                                                 str(adapter), str(work / "out")]
        samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
        for _ in range(args.repeat):  # interleaved, so a busy spell hits every tool alike
            for name, cmd in commands.items():
                shutil.rmtree(work / "out", ignore_errors=True)
                timed_sync()
                wall, rss = measure(cmd)
                samples[name].append((wall, rss, timed_sync()))
                if name == "loraformat merge":
                    shutil.copytree(work / "out", work / "merged", dirs_exist_ok=True)
                elif name.startswith("peft"):
                    shutil.copytree(work / "out", work / "peft-merged", dirs_exist_ok=True)
        rows = {name: tuple(float(np.median([s[i] for s in runs])) for i in range(3))
                for name, runs in samples.items()}
        print(f"\nmedian of {args.repeat} interleaved runs (min in brackets)")
        print(f"{'':24}{'wall s':>16}{'+ sync s':>10}{'peak RSS MiB':>14}")
        for name, (wall, rss, sync) in rows.items():
            best = min(s[0] for s in samples[name])
            print(f"{name:24}{wall:9.2f} [{best:5.2f}]{sync:10.2f}{rss:14.0f}")
        ours, cp = rows["loraformat merge"], rows["cp -r"]
        print(f"\nmerge / cp time:        {ours[0] / cp[0]:.2f}x   (target <= 2x; "
              f"incl. sync {(ours[0] + ours[2]) / (cp[0] + cp[2]):.2f}x)")
        if "peft merge_and_unload" in rows:
            peft = rows["peft merge_and_unload"]
            print(f"PEFT / merge time:      {peft[0] / ours[0]:.2f}x   (target >= 4x)")
            print(f"merge / PEFT peak RSS:  {ours[1] / peft[1]:.3f}   (target < 0.125)")
            _check_same(work / "merged", work / "peft-merged")
        with open("/proc/loadavg") as handle:
            print(f"load average at the end: {handle.read().split()[0]} "
                  "(figures from a busy machine are noisy)")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _check_same(ours: Path, peft: Path) -> None:
    """The two merged checkpoints agree (a benchmark of a wrong merge would be worthless)."""
    from loraformat.checkpoint import Checkpoint

    worst = 0.0
    with Checkpoint(ours) as a, Checkpoint(peft) as b:
        for name in a.names():
            worst = max(worst, float(np.abs(a.numpy(name) - b.numpy(name)).max()))
    print(f"max |loraformat - PEFT| over all tensors: {worst:.2e}")


if __name__ == "__main__":
    sys.exit(main())
