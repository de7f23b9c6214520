"""Regenerate the test vectors in spec/vectors/ (deterministic: same bytes every run).

    .venv/bin/python tools/make_vectors.py [--check]

Each vector is a small adapter plus, under ``expected/``, the dense ΔW of every layer as float64
``.npy`` files computed here in float64 straight from the stored tensors, so an independent reader
can check itself (spec/vectors/README.md). ``--check`` regenerates into a temporary folder and
exits 1 if anything differs from what is committed.
"""

from __future__ import annotations

import argparse
import filecmp
import math
import shutil
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from loraformat.checkpoint import Checkpoint
from loraformat.format.adapter import Adapter, LoraLayer, load
from loraformat.format.safetensors_io import write_safetensors

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
PROVENANCE = {"tool": "tools/make_vectors.py", "purpose": "loraformat v1.0 test vector"}


def _rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    # Values that are exact in every stored dtype (multiples of 1/64 in [-2, 2]).
    return (np.round(rng.standard_normal(shape) * 64) / 64).clip(-2, 2).astype(dtype)


def _layer(rng, rank, in_f, out_f, alpha, dtype=np.float32, **extra) -> LoraLayer:
    rows = extra.pop("b_rows", out_f)
    return LoraLayer(
        A=_rand(rng, (rank, in_f), dtype),
        B=_rand(rng, (rows, rank), dtype),
        alpha=alpha,
        in_features=in_f,
        out_features=out_f,
        **extra,
    )


def basic(out: Path) -> None:
    """Directory form, alpha/r, default rank/alpha with per-layer overrides, a lora_bias."""
    rng = np.random.default_rng(1)
    layers = {
        "model.layers.0.self_attn.q_proj": _layer(rng, 4, 16, 16, 8),
        "model.layers.0.self_attn.v_proj": _layer(
            rng, 2, 16, 8, 8, lora_bias=_rand(rng, (8,))
        ),
        "model.layers.1.self_attn.q_proj": _layer(rng, 4, 16, 16, 16),
    }
    Adapter.from_layers(
        "llama", layers, base_name="tiny-llama", provenance=PROVENANCE
    ).save(out / "basic", overwrite=True)


def rslora(out: Path) -> None:
    """Single-file form, rsLoRA scaling alpha/sqrt(r), BF16 tensors."""
    rng = np.random.default_rng(2)
    layers = {
        "transformer.h.0.mlp.c_fc": _layer(rng, 8, 16, 64, 16, ml_dtypes.bfloat16),
        "transformer.h.0.mlp.c_proj": _layer(rng, 8, 64, 16, 16, ml_dtypes.bfloat16),
    }
    Adapter.from_layers("gpt2", layers, scaling="alpha/sqrt(r)", provenance=PROVENANCE).save(
        out / "rslora.safetensors", overwrite=True
    )


def fused(out: Path) -> dict[str, np.ndarray]:
    """GPT-2 c_attn (q,k,v fused, 3×8 outputs) with loralib enable_lora=[True, False, True].

    loralib: r=2 per enabled part, lora_alpha=4 → scale 4/2 = 2. In the format: A = [A_q; A_v]
    (rank 4), B = blockdiag(B_q, B_v), out_rows = [[0, 8], [16, 24]], alpha = 4·2 = 8 so that
    alpha/rank = 8/4 = 2 equals loralib's scale.
    """
    rng = np.random.default_rng(3)
    r, n_embd, lora_alpha = 2, 8, 4
    a_q, a_v = _rand(rng, (r, n_embd)), _rand(rng, (r, n_embd))
    b_q, b_v = _rand(rng, (n_embd, r)), _rand(rng, (n_embd, r))
    block = np.zeros((2 * n_embd, 2 * r), dtype=np.float32)
    block[:n_embd, :r], block[n_embd:, r:] = b_q, b_v
    layer = LoraLayer(
        A=np.concatenate([a_q, a_v]),
        B=block,
        alpha=lora_alpha * 2,
        in_features=n_embd,
        out_features=3 * n_embd,
        out_rows=[(0, n_embd), (2 * n_embd, 3 * n_embd)],
    )
    Adapter.from_layers(
        "gpt2", {"transformer.h.0.attn.c_attn": layer}, provenance=PROVENANCE
    ).save(out / "fused", overwrite=True)
    # loralib's own tensors (MergedLinear, k=2 enabled parts), for the mapping test.
    return {
        "lora_A": np.concatenate([a_q, a_v]),  # (r·k) × in
        "lora_B": np.concatenate([b_q, b_v]),  # (out/3·k) × r
    }


def embedding(out: Path) -> None:
    """Single-file form: an embedding-layer adapter plus a full replacement tensor."""
    rng = np.random.default_rng(4)
    layers = {"model.embed_tokens": _layer(rng, 4, 32, 8, 4, kind="embedding")}
    Adapter.from_layers(
        "llama",
        layers,
        replacements={"score.weight": _rand(rng, (3, 8))},
        provenance=PROVENANCE,
    ).save(out / "embedding.safetensors", overwrite=True)


def dora(out: Path) -> tuple[np.ndarray, str]:
    """Directory form, DoRA magnitude; bound to a base (base.safetensors) by fingerprint."""
    rng = np.random.default_rng(5)
    path = "model.layers.0.self_attn.q_proj"
    weight = _rand(rng, (16, 16))
    base_file = out / "dora.base.safetensors"
    write_safetensors(base_file, {f"{path}.weight": weight})
    with Checkpoint(base_file) as ckpt:
        fp = ckpt.fingerprint()
    magnitude = (np.abs(_rand(rng, (16,))) + 1).astype(np.float32)
    layers = {path: _layer(rng, 2, 16, 16, 4, magnitude=magnitude)}
    Adapter.from_layers(
        "llama", layers, base_name="tiny-llama", fingerprint=fp, provenance=PROVENANCE
    ).save(out / "dora", overwrite=True)
    return weight, path


def expected_delta(adapter: Adapter, path: str) -> np.ndarray:
    """ΔW in float64, straight from the spec (not via Adapter.delta)."""
    spec = adapter.specs[path]
    layer = adapter.layer(path)
    if adapter.scaling == "alpha/r":
        scale = spec.alpha / spec.rank
    else:
        scale = spec.alpha / math.sqrt(spec.rank)
    low = scale * (layer.B.astype(np.float64) @ layer.A.astype(np.float64))
    full = np.zeros((spec.out_features, spec.in_features))
    rows = layer.rows()
    full[rows] = low
    return full


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    expected = out / "expected"
    expected.mkdir(exist_ok=True)
    basic(out)
    rslora(out)
    loralib = fused(out)
    write_safetensors(expected / "fused.loralib.safetensors", loralib)
    embedding(out)
    weight, dora_path = dora(out)
    for name in ("basic", "rslora.safetensors", "fused", "embedding.safetensors", "dora"):
        stem = name.removesuffix(".safetensors")
        with load(out / name) as adapter:
            for path in adapter.layer_paths:
                np.save(expected / f"{stem}.{path}.npy", expected_delta(adapter, path))
            if stem == "basic":
                p = "model.layers.0.self_attn.v_proj"
                bias = adapter.scale(p) * adapter.layer(p).lora_bias.astype(np.float64)
                np.save(expected / f"basic.{p}.bias.npy", bias)
            if stem == "dora":
                mag = adapter.layer(dora_path).magnitude.astype(np.float64)
                v = weight.astype(np.float64) + expected_delta(adapter, dora_path)
                merged = (mag / np.linalg.norm(v, axis=1))[:, None] * v
                np.save(expected / f"dora.{dora_path}.merged.npy", merged)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    if not args.check:
        for item in VECTORS.iterdir() if VECTORS.exists() else []:
            if item.name != "README.md":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        generate(VECTORS)
        print(f"wrote {VECTORS}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        cmp = filecmp.dircmp(tmp, VECTORS, ignore=["README.md"])
        differ = _diffs(cmp)
        print("\n".join(differ) if differ else "vectors up to date")
        return 1 if differ else 0


def _diffs(cmp: filecmp.dircmp, prefix: str = "") -> list[str]:
    out = [f"{prefix}{n}: only in one tree" for n in cmp.left_only + cmp.right_only]
    _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
    out += [f"{prefix}{n}: differs" for n in mismatch + errors]
    for name, sub in cmp.subdirs.items():
        out += _diffs(sub, f"{prefix}{name}/")
    return out


if __name__ == "__main__":
    sys.exit(main())
