"""MLX-LM adapters: ``adapters.safetensors`` + ``adapter_config.json``.

Checked against mlx-lm's ``tuner/utils.py`` (``load_adapters``, ``linear_to_lora_layers``),
``tuner/lora.py`` and ``tuner/dora.py``:

- config: ``fine_tune_type`` (``"lora"`` / ``"dora"``), ``num_layers`` (LoRA goes into the last
  N of ``model.layers``; -1 = all), ``lora_parameters = {rank, scale, dropout, keys}``; ``keys``
  are module names relative to a block (``self_attn.q_proj``) or, for modules outside the blocks,
  full names (``model.embed_tokens``);
- tensors ``<module>.lora_a`` [in, r] and ``<module>.lora_b`` [r, out] (transposed against PEFT),
  y = W x + scale·(x·lora_a·lora_b); DoRA adds ``<module>.m`` (per-output-row magnitude, the same
  rule as PEFT's). Embedding LoRA: ``lora_a`` [num_embeddings, r], ``lora_b`` [r, dim].
- module names come from the plugin (convention ``"mlx"``).

One scale per file: layers whose scale differs from the file's get the ratio folded into
``lora_b`` (noted). Differing ranks are zero-padded to the largest (exact; mlx-lm builds every
layer with one rank). Modules MLX will wrap but the adapter leaves alone get nothing: mlx-lm
initialises ``lora_b`` (LoRA) to zero and DoRA's ``m`` to the weight's norm, so they do nothing.
An extra ``"loraformat"`` member of adapter_config.json (ignored by mlx-lm) records each layer's
rule, alpha and rank, so reading back restores them exactly where nothing was folded.

Older configs carried an ``alpha`` whose meaning changed between mlx-examples versions (a scale in
some, a PEFT-style alpha in others): such a config without ``scale`` is refused, never guessed.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_dir
from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer, scale_of
from ..format.safetensors_io import write_safetensors
from ._common import (
    Context,
    Names,
    adapter_architecture,
    alpha_for_scale,
    fit_rank,
    read_safetensors,
    refuse_escape,
    scaled,
)

NAME = "mlx"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
EXTRA_KEY = "loraformat"
_BLOCK_RE = re.compile(r"^(?P<container>.+?)\.(?P<index>\d+)\.(?P<key>.+)$")


def sniff(path: Path) -> bool:
    if not path.is_dir() or not (path / WEIGHTS_FILE).is_file():
        return False
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "peft_type" not in config and (
        "lora_parameters" in config or "fine_tune_type" in config
    )


# -- reading ------------------------------------------------------------------------------------


def read_mlx(path: Path, ctx: Context) -> Adapter:
    config_path = path / CONFIG_FILE
    refuse_escape(path, config_path, path / WEIGHTS_FILE)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoraformatError(path, f"not an MLX adapter directory: no {CONFIG_FILE}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoraformatError(config_path, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LoraformatError(config_path, "not a JSON object")
    fine_tune = config.get("fine_tune_type", "lora")
    if fine_tune not in ("lora", "dora"):
        raise LoraformatError(config_path, f"fine_tune_type {fine_tune!r} is not LoRA or DoRA")
    params = config.get("lora_parameters") or {}
    if "scale" not in params:
        if "alpha" in params:
            raise LoraformatError(
                config_path,
                "lora_parameters has 'alpha' but no 'scale': older mlx-examples used 'alpha' with "
                "different meanings (a scale, or a PEFT-style alpha), so it cannot be converted "
                "without guessing; add the intended 'scale' to the config",
            )
        raise LoraformatError(config_path, "lora_parameters has no 'scale'")
    file_scale = float(params["scale"])
    if "alpha" in params:
        ctx.note("lora_parameters.alpha ignored: mlx-lm applies 'scale'")
    tensors, _ = read_safetensors(path / WEIGHTS_FILE)
    extra = config.get(EXTRA_KEY) if isinstance(config.get(EXTRA_KEY), dict) else {}
    extra_layers = extra.get("layers", {}) if isinstance(extra.get("layers"), dict) else {}
    modules = sorted(k[: -len(".lora_a")] for k in tensors if k.endswith(".lora_a"))
    if not modules:
        raise LoraformatError(path / WEIGHTS_FILE, "no '<module>.lora_a' tensors")
    architecture = adapter_architecture(
        path, ctx, modules, "an MLX adapter", said=extra.get("architecture")
    )
    names = Names(architecture, ctx.config, "mlx", identity_fallback=False, present=ctx.present)
    rule = extra.get("scaling") if extra.get("scaling") in ("alpha/r", "alpha/sqrt(r)") else (
        "alpha/r"
    )
    layers: dict[str, LoraLayer] = {}
    for module in modules:
        a_t, b_t = tensors[module + ".lora_a"], tensors.get(module + ".lora_b")
        if b_t is None:
            raise LoraformatError(path / WEIGHTS_FILE, f"{module}.lora_a has no .lora_b")
        if a_t.ndim != 2 or b_t.ndim != 2 or a_t.shape[1] != b_t.shape[0]:
            raise LoraformatError(
                path / WEIGHTS_FILE,
                f"{module}: lora_a {list(a_t.shape)} / lora_b {list(b_t.shape)} are not "
                "[in, r] / [r, out]",
            )
        layer_path = names.to_path(module)
        dense = ctx.base.layers.get(layer_path) if ctx.base is not None and layer_path else None
        if layer_path is None or (ctx.base is not None and dense is None):
            raise LoraformatError(path / WEIGHTS_FILE, f"{module}: no layer of the base has this "
                                  "MLX name")
        if ctx.base is None and not _BLOCK_RE.match(module):
            raise LoraformatError(path, f"{module} is outside the blocks (embedding or head): "
                                  "give --base BASE so its kind is known")
        a, b = np.ascontiguousarray(a_t.T), np.ascontiguousarray(b_t.T)
        if dense is not None and (dense.in_features, dense.out_features) != (
            a.shape[1], b.shape[0]
        ):
            raise LoraformatError(
                path / WEIGHTS_FILE, f"{module}: {a.shape[1]}→{b.shape[0]} does not fit "
                f"{layer_path} ({dense.in_features}→{dense.out_features})",
            )
        info = extra_layers.get(layer_path)
        info = info if isinstance(info, dict) else {}
        rank = a.shape[0]
        original_rank = info.get("rank")
        if isinstance(original_rank, int) and 0 < original_rank < rank and not (
            np.any(a[original_rank:]) or np.any(b[:, original_rank:])
        ):
            a, b = a[:original_rank].copy(), b[:, :original_rank].copy()
            rank = original_rank
        alpha = info.get("alpha")
        if not (isinstance(alpha, (int, float)) and not info.get("folded")
                and scale_of(rule, float(alpha), rank) == file_scale):
            alpha = alpha_for_scale(file_scale, rank, rule)
        magnitude = tensors.get(module + ".m")
        if fine_tune == "dora" and magnitude is None:
            raise LoraformatError(path / WEIGHTS_FILE, f"{module}: DoRA adapter without .m")
        layers[layer_path] = fit_rank(LoraLayer(
            A=a, B=b, alpha=float(alpha), in_features=int(a.shape[1]),
            out_features=int(b.shape[0]),
            kind="embedding" if dense is not None and dense.kind == "embedding" else "linear",
            magnitude=magnitude if fine_tune == "dora" else None,
        ), rule, ctx)
    ctx.report.layers = len(layers)
    return Adapter.from_layers(
        architecture, layers, scaling=rule,
        fingerprint=ctx.base.checkpoint.fingerprint() if ctx.base is not None else None,
        provenance={"converted_from": "mlx"},
    )


# -- writing ------------------------------------------------------------------------------------


def write_mlx(adapter: Adapter, out: Path, ctx: Context) -> None:
    names = Names(adapter.architecture, ctx.config, "mlx", identity_fallback=False)
    specs = adapter.specs
    unnamed = [p for p in specs if names.to_foreign(p) is None]
    if len(unnamed) == len(specs):
        raise LoraformatError(out, names.missing("MLX module names"))
    dora = [p for p, s in specs.items() if s.dora]
    biased = [p for p, s in specs.items() if s.lora_bias]
    if unnamed:
        ctx.lossy(f"{len(unnamed)} layer(s) MLX-LM has no module for (e.g. {unnamed[0]}) "
                  "([[lossy]] drops them)")
    if dora and len(dora) != len(specs):
        ctx.lossy("DoRA on some layers only: an MLX adapter is all DoRA or all LoRA ([[lossy]] "
                  "drops the magnitudes)")
    if biased:
        ctx.lossy(f"lora_bias on {len(biased)} layer(s) (e.g. {biased[0]}): MLX LoRA has no "
                  "bias ([[lossy]] drops it)")
    if adapter.replacement_names:
        ctx.lossy(f"{len(adapter.replacement_names)} replaced tensor(s) (e.g. "
                  f"{adapter.replacement_names[0]}): not carried to MLX ([[lossy]] drops them)")
    ctx.check_lossy(out, "MLX-LM")
    use_dora = bool(dora) and len(dora) == len(specs)
    named = [p for p in specs if p not in unnamed]
    scales = {p: adapter.scale(p) for p in named}
    file_scale = Counter(scales.values()).most_common(1)[0][0]
    max_rank = max(specs[p].rank for p in named)
    tensors: dict[str, np.ndarray] = {}
    keys: set[str] = set()
    blocks: set[int] = set()
    extra_layers: dict[str, Any] = {}
    folded = padded = 0
    for path in named:
        layer = adapter.layer(path)
        module = names.to_foreign(path)
        match = _BLOCK_RE.match(module)
        if match:
            keys.add(match["key"])
            blocks.add(int(match["index"]))
        else:
            keys.add(module)
        a, b = np.asarray(layer.A), np.asarray(layer.B)
        if layer.out_rows is not None:
            full = np.zeros((layer.out_features, layer.rank), dtype=b.dtype)
            full[layer.rows()] = b
            b = full
            ctx.note("out_rows layers written with zero B rows for the rows they do not adapt")
        factor = scales[path] / file_scale
        if factor != 1.0:
            b = scaled(b, factor)
            folded += 1
        if layer.rank < max_rank:
            a = np.concatenate([a, np.zeros((max_rank - layer.rank, a.shape[1]), a.dtype)])
            b = np.concatenate([b, np.zeros((b.shape[0], max_rank - layer.rank), b.dtype)], axis=1)
            padded += 1
        tensors[module + ".lora_a"] = np.ascontiguousarray(a.T)
        tensors[module + ".lora_b"] = np.ascontiguousarray(b.T)
        if use_dora:
            tensors[module + ".m"] = np.asarray(layer.magnitude)
        extra_layers[path] = {"alpha": layer.alpha, "rank": layer.rank, "folded": factor != 1.0}
    if folded:
        ctx.note(f"MLX has one scale per file ({file_scale:g}): scale ratios folded into lora_b "
                 f"for {folded} layer(s)")
    if padded:
        ctx.note(f"ranks zero-padded to {max_rank} for {padded} layer(s) (same outputs)")
    num_layers = -1
    if blocks and ctx.base is not None:
        all_blocks = set()
        for p in ctx.base.layers:
            name = names.to_foreign(p)
            m = _BLOCK_RE.match(name) if name else None
            if m:
                all_blocks.add(int(m["index"]))
        if all_blocks and blocks == set(range(min(blocks), max(all_blocks) + 1)):
            num_layers = len(blocks)
    if not blocks:
        num_layers = 0
    config = {
        "fine_tune_type": "dora" if use_dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": int(max_rank),
            "scale": float(file_scale),
            "dropout": 0.0,
            "keys": sorted(keys),
        },
        EXTRA_KEY: {
            "architecture": adapter.architecture,
            "scaling": adapter.scaling,
            "layers": extra_layers,
        },
    }
    ctx.report.layers = len(named)
    with atomic_dir(out) as tmp:
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "mlx"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")


class MlxCodec:
    name = NAME
    description = "MLX-LM adapter directory (adapters.safetensors + adapter_config.json)"
    writes_directory = True
    options = ()

    def sniff(self, path: Path) -> bool:
        return sniff(path)

    def read(self, path: Path, ctx: Context) -> Adapter:
        return read_mlx(path, ctx)

    def write(self, adapter: Adapter, path: Path, ctx: Context) -> None:
        write_mlx(adapter, path, ctx)


CODEC = MlxCodec()
