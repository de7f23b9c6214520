"""Build the bundled example: a tiny GPT-2-shaped base checkpoint and a LoRA adapter for it.

    python tools/build_example.py build/example

writes ``build/example/base`` (config.json + model.safetensors, random weights under the tensor
names Hugging Face's GPT2LMHeadModel saves) and ``build/example/adapter`` (a loraformat adapter on
every ``attn.c_attn``, ``attn.c_proj`` and ``mlp.c_proj``, bound to the base by fingerprint).
Needs numpy and loraformat only — no transformers, no downloads — and is deterministic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from loraformat import LoraLayer
from loraformat.atomic import atomic_dir
from loraformat.checkpoint import Checkpoint
from loraformat.format.adapter import Adapter
from loraformat.format.safetensors_io import write_safetensors

N_EMBD, N_LAYER, N_HEAD, VOCAB, N_POSITIONS = 64, 2, 4, 256, 128
RANK, ALPHA = 4, 8.0
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_proj")


def config() -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": VOCAB,
        "n_positions": N_POSITIONS,
        "n_embd": N_EMBD,
        "n_layer": N_LAYER,
        "n_head": N_HEAD,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": VOCAB - 1,
        "eos_token_id": VOCAB - 1,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def base_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """GPT-2 weights as GPT2LMHeadModel saves them: Conv1D weights [in, out], LM head tied."""
    d = N_EMBD

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    tensors = {
        "transformer.wte.weight": normal(VOCAB, d),
        "transformer.wpe.weight": normal(N_POSITIONS, d, std=0.01),
        "transformer.ln_f.weight": 1 + normal(d, std=0.1),
        "transformer.ln_f.bias": normal(d),
    }
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            tensors[p + ln + ".weight"] = 1 + normal(d, std=0.1)
            tensors[p + ln + ".bias"] = normal(d)
        for name, fan_in, fan_out in (
            ("attn.c_attn", d, 3 * d),
            ("attn.c_proj", d, d),
            ("mlp.c_fc", d, 4 * d),
            ("mlp.c_proj", 4 * d, d),
        ):
            tensors[p + name + ".weight"] = normal(fan_in, fan_out)
            tensors[p + name + ".bias"] = normal(fan_out)
    return tensors


def adapter_layers(
    tensors: dict[str, np.ndarray], rng: np.random.Generator
) -> dict[str, LoraLayer]:
    layers = {}
    for i in range(N_LAYER):
        for target in TARGETS:
            path = f"transformer.h.{i}.{target}"
            fan_in, fan_out = tensors[path + ".weight"].shape  # Conv1D stores [in, out]
            layers[path] = LoraLayer(
                A=(rng.standard_normal((RANK, fan_in)) / np.sqrt(fan_in)).astype(np.float32),
                B=(rng.standard_normal((fan_out, RANK)) * 0.05).astype(np.float32),
                alpha=ALPHA,
                in_features=fan_in,
                out_features=fan_out,
            )
    return layers


def build(root: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    base, adapter_dir = root / "base", root / "adapter"
    tensors = base_tensors(rng)
    with atomic_dir(base) as tmp:
        (tmp / "config.json").write_text(json.dumps(config(), indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": VOCAB - 1, "eos_token_id": VOCAB - 1}, indent=2) + "\n",
            encoding="utf-8",
        )
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
    with Checkpoint(base) as checkpoint:
        fingerprint = checkpoint.fingerprint()
    adapter = Adapter.from_layers(
        "gpt2",
        adapter_layers(tensors, rng),
        base_name="loraformat example (tiny GPT-2, random)",
        fingerprint=fingerprint,
        provenance={"tool": "tools/build_example.py", "seed": 0},
    )
    adapter.save(adapter_dir, overwrite=True)
    return base, adapter_dir


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUTPUT_DIR", file=sys.stderr)
        return 2
    base, adapter = build(Path(argv[1]))
    params = sum(t.size for t in base_tensors(np.random.default_rng(0)).values())
    print(f"base     {base}  (GPT-2 shaped: {N_LAYER} layers, n_embd {N_EMBD}, {params:,} params)")
    print(f"adapter  {adapter}  (rank {RANK}, alpha {ALPHA:g}, on {', '.join(TARGETS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
