"""Write a tiny toymlp checkpoint, and compute its output independently of the plugin (numpy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def write_checkpoint(
    out: str | os.PathLike[str],
    *,
    vocab_size: int = 50,
    hidden_size: int = 16,
    intermediate_size: int = 24,
    num_layers: int = 2,
    num_labels: int = 3,
    seed: int = 0,
) -> Path:
    """A random toymlp checkpoint (``config.json`` + ``model.safetensors``) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, i = hidden_size, intermediate_size

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {"embed.weight": rand(vocab_size, h)}
    for n in range(num_layers):
        tensors[f"blocks.{n}.up.weight"] = rand(h, 2 * i)  # [in, out]: gate rows 0..i, up i..2i
        tensors[f"blocks.{n}.up.bias"] = rand(2 * i)
        tensors[f"blocks.{n}.down.weight"] = rand(h, i)  # [out, in]
        tensors[f"blocks.{n}.down.bias"] = rand(h)
    tensors["head.weight"] = rand(num_labels, h)
    tensors["head.bias"] = rand(num_labels)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model_type": "toymlp",
        "architectures": ["ToyMLPForTokenClassification"],
        "vocab_size": vocab_size,
        "hidden_size": h,
        "intermediate_size": i,
        "num_layers": num_layers,
        "num_labels": num_labels,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def reference_logits(checkpoint: str | os.PathLike[str], input_ids: np.ndarray) -> np.ndarray:
    """toymlp's per-token logits [batch, sequence, num_labels], written from the definition."""
    t = load_file(str(Path(checkpoint) / "model.safetensors"))
    x = t["embed.weight"][np.asarray(input_ids)].astype(np.float64)
    n = 0
    while f"blocks.{n}.up.weight" in t:
        a = x @ t[f"blocks.{n}.up.weight"] + t[f"blocks.{n}.up.bias"]
        gate, up = np.split(a, 2, axis=-1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[f"blocks.{n}.down.weight"].T
        x = x + t[f"blocks.{n}.down.bias"]
        n += 1
    return x @ t["head.weight"].T + t["head.bias"]
