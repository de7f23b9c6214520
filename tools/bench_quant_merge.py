"""Benchmark: merging a LoRA into a quantized GGUF model, against copying the file and against the
in-memory gguf-py recipe, in one run; plus how much of the adapter survives per type.

    python tools/bench_quant_merge.py [WORKDIR] [--layers 4] [--hidden 1024] [--keep]

Builds with gguf-py a LLaMA-shaped GGUF model (hidden 1024, intermediate 2816, vocabulary 32000,
untied output, llama.cpp names) in Q4_0 and in Q8_0 (1-D norms F32), and a PEFT LoRA with r=16,
alpha 32 on all seven projections, then measures, each in a fresh subprocess:

  1. ``cp`` of the model file (the floor: read and write every byte);
  2. ``loraformat merge base.gguf PEFT_DIR -o out.gguf --json`` (streamed, one tensor at a time);
  3. the recipe by hand with gguf-py, streamed the way gguf-py's writer streams: tensor infos
     first (``add_tensor_info``), then each tensor written when it is ready
     (``write_tensor_data``): an adapted one dequantized, merged and requantized, the others
     straight from the reader's memory map (what a careful script built on gguf-py does).

Wall time and peak RSS (the child's ``ru_maxrss``) are printed with their ratios, and the
survival report's overall share for each type. The two outputs are checked to hold the same
adapted tensors (byte-equal up to rounding-boundary ties).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from loraformat.format.safetensors_io import write_safetensors

PROJ = {"attn_q": ("q_proj", "h", "h"), "attn_k": ("k_proj", "h", "h"),
        "attn_v": ("v_proj", "h", "h"), "attn_output": ("o_proj", "h", "h"),
        "ffn_gate": ("gate_proj", "h", "i"), "ffn_up": ("up_proj", "h", "i"),
        "ffn_down": ("down_proj", "i", "h")}
HF = {"attn_q": "self_attn", "attn_k": "self_attn", "attn_v": "self_attn",
      "attn_output": "self_attn", "ffn_gate": "mlp", "ffn_up": "mlp", "ffn_down": "mlp"}
RANK, ALPHA, HEADS = 16, 32, 16


def build_model(out: Path, kind: str, hidden: int, inter: int, layers: int, vocab: int) -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_layer_norm_rms_eps(1e-5)

    def add(name: str, shape: tuple[int, ...]) -> None:
        values = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if len(shape) == 2:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ones(shape, np.float32))

    add("token_embd.weight", (vocab, hidden))
    dims = {"h": hidden, "i": inter}
    for n in range(layers):
        add(f"blk.{n}.attn_norm.weight", (hidden,))
        for g, (_, src, dst) in PROJ.items():
            add(f"blk.{n}.{g}.weight", (dims[dst], dims[src]))
        add(f"blk.{n}.ffn_norm.weight", (hidden,))
    add("output_norm.weight", (hidden,))
    add("output.weight", (vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_peft(out: Path, hidden: int, inter: int, layers: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    dims = {"h": hidden, "i": inter}
    tensors = {}
    for n in range(layers):
        for g, (hf, src, dst) in PROJ.items():
            key = f"base_model.model.model.layers.{n}.{HF[g]}.{hf}"
            tensors[key + ".lora_A.weight"] = rng.standard_normal(
                (RANK, dims[src]), dtype=np.float32) * np.float32(0.02)
            tensors[key + ".lora_B.weight"] = rng.standard_normal(
                (dims[dst], RANK), dtype=np.float32) * np.float32(0.02)
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
              "target_modules": sorted(v[0] for v in PROJ.values()), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "base_model_name_or_path": None, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(config))


#: The recipe with gguf-py alone, streamed as gguf-py streams (tensor infos first, then each
#: tensor's data written when it is ready: ``add_tensor_info`` / ``write_tensor_data``), with
#: llama.cpp's q/k permutation applied to ΔW's rows.
BY_HAND = """
import sys, numpy as np, gguf
from safetensors.numpy import load_file
base, adapter, out, heads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
PROJ = {PROJ!r}
HF = {HF!r}
lora = load_file(adapter + "/adapter_model.safetensors")
scale = {ALPHA} / {RANK}
reader = gguf.GGUFReader(base)

def merged(t):
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    parts = t.name.split(".")
    if not (len(parts) == 4 and parts[2] in PROJ):
        return np.asarray(t.data)  # a view of the reader's map: nothing copied
    w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
    key = f"base_model.model.model.layers.{{parts[1]}}.{{HF[parts[2]]}}.{{PROJ[parts[2]][0]}}"
    delta = scale * (lora[key + ".lora_B.weight"] @ lora[key + ".lora_A.weight"])
    if parts[2] in ("attn_q", "attn_k"):
        rows = delta.shape[0]
        delta = delta.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(rows, -1)
    return gguf.quants.quantize(w + delta, t.tensor_type)

writer = gguf.GGUFWriter(out, "llama")
for key, field in reader.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
        continue
    writer.add_key_value(key, field.contents(), field.types[0],
                         field.types[-1] if len(field.types) > 1 else None)
for t in reader.tensors:
    data = np.asarray(t.data)
    writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, raw_dtype=t.tensor_type)
writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_ti_data_to_file()
for t in reader.tensors:
    writer.write_tensor_data(merged(t))
writer.close()
"""

RUSAGE_WRAPPER = """
import resource, subprocess, sys, time
t = time.perf_counter()
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
sys.stderr.write(result.stderr[-3000:])
print(result.stdout)
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, result.returncode)
"""


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of ``cmd`` run under a fresh wrapper process."""
    result = subprocess.run([sys.executable, "-c", RUSAGE_WRAPPER, *cmd], capture_output=True,
                            text=True)
    lines = result.stdout.strip().splitlines()
    wall, rss, code = lines[-1].split()
    if result.returncode or int(code):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return float(wall), int(rss) / 1024, "\n".join(lines[:-1])


def _compare(ours: Path, theirs: Path) -> int:
    import gguf

    a = {t.name: bytes(t.data) for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(theirs)).tensors}
    return sum(int(np.count_nonzero(np.frombuffer(a[n], np.uint8) != b[n].reshape(-1).view(
        np.uint8))) for n in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", nargs="?")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        build_peft(work / "peft", args.hidden, args.inter, args.layers)
        script = BY_HAND.format(PROJ=PROJ, HF=HF, ALPHA=ALPHA, RANK=RANK)
        for kind in ("Q4_0", "Q8_0"):
            base = work / f"base-{kind}.gguf"
            build_model(base, kind, args.hidden, args.inter, args.layers, args.vocab)
            size = base.stat().st_size / 2**20
            cp_s, cp_rss, _ = measure(["cp", str(base), str(work / "copy.gguf")])
            ours_s, ours_rss, out = measure([str(Path(sys.executable).with_name("loraformat")),
                                             "merge",
                                             str(base), str(work / "peft"), "-o",
                                             str(work / "ours.gguf"), "--json", "--overwrite"])
            survival = json.loads(out)["survival"]
            hand_s, hand_rss, _ = measure([sys.executable, "-c", script, str(base),
                                           str(work / "peft"), str(work / "hand.gguf"),
                                           str(HEADS)])
            diff = _compare(work / "ours.gguf", work / "hand.gguf")
            print(f"{kind}: model {size:.0f} MiB, {args.layers} layers, hidden {args.hidden}; "
                  f"r={RANK} on 7 projections")
            print(f"  cp                {cp_s:7.2f} s  {cp_rss:7.0f} MiB")
            print(f"  loraformat merge  {ours_s:7.2f} s  {ours_rss:7.0f} MiB  "
                  f"(×{ours_s / cp_s:.1f} cp time)")
            print(f"  gguf-py by hand   {hand_s:7.2f} s  {hand_rss:7.0f} MiB  "
                  f"(loraformat: ×{hand_s / ours_s:.2f} faster, RSS ×{ours_rss / hand_rss:.2f})")
            print(f"  survival: overall share {survival['share']:.1%}, "
                  f"{len(survival['layers'])} tensors, warning: {bool(survival['warning'])}; "
                  f"outputs differ in {diff} byte(s)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
