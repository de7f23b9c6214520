"""microsoft/LoRA (``loralib``) checkpoints: ``<module>.lora_A`` / ``<module>.lora_B`` tensors.

The checkpoint is a torch pickle (``.pt``/``.pth``/``.bin``, read with
``torch.load(weights_only=True)`` only, which cannot run code from the file) or a safetensors
file. It does not record ``lora_alpha`` or ``r``: give ``alpha`` (and optionally ``rank`` as a
check) — the scale is ``lora_alpha / r``. A safetensors file written by this module records them
in its metadata.

``lora.Linear``: A is r×in, B is out×r, ΔW = scale·B·A (math orientation also with
``fan_in_fan_out=True``: loralib transposes only the product for Conv1D-style weights).

``lora.MergedLinear`` (GPT-2 ``c_attn`` with ``enable_lora=[True, False, True]``): the output is
split into ``len(enable_lora)`` equal parts, k of them enabled; A is (k·r)×in, B is
(out/len·k)×r and part g's update is B_g·A_g (B_g, A_g the g-th row blocks) written into the rows
of the g-th enabled part. In loraformat that is one layer with ``out_rows`` = the enabled parts,
A unchanged, B = blockdiag(B_1..B_k) (rank k·r) and alpha k·lora_alpha, so that alpha/rank is
lora_alpha/r — the same scale, exactly. Writing reverses this when B is block diagonal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ..format.safetensors_io import write_safetensors
from ._common import Context, read_safetensors, torch_load_weights_only

NAME = "loralib"
SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
META_ALPHA, META_RANK, META_ENABLE = "lora_alpha", "r", "enable_lora"


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return torch_load_weights_only(path), {}


def sniff(path: Path) -> bool:
    if not path.is_file() or path.suffix not in SUFFIXES:
        return False
    if path.suffix == ".safetensors":
        from ..format.safetensors_io import read_header_only

        try:
            infos, _ = read_header_only(path)
        except LoraformatError:
            return False
        names = list(infos)
    else:
        try:
            names = list(torch_load_weights_only(path))
        except LoraformatError:
            return False
    return any(n.endswith(".lora_A") for n in names) and all(
        not n.endswith(".lora_A.weight") for n in names
    )


def _parse_enable(value: Any) -> list[bool] | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text.lower())
        else:
            value = [v.strip().lower() in ("1", "true", "t", "yes", "y") for v in text.split(",")]
    return [bool(v) for v in value]


def _find_path(module: str, ctx: Context) -> str:
    if ctx.base is None:
        return module.removeprefix("module.")
    layers = ctx.base.layers
    for candidate in (module, module.removeprefix("module.")):
        if candidate in layers:
            return candidate
    matches = [p for p in layers if p.endswith("." + module) or module.endswith("." + p)]
    if len(matches) == 1:
        return matches[0]
    raise LoraformatError(
        ctx.base.path, f"loralib module {module!r} matches no single layer of the base"
    )


def read_loralib(path: Path, ctx: Context) -> Adapter:
    tensors, metadata = _load(path)
    alpha = ctx.options.get("alpha")
    if alpha is None and META_ALPHA in metadata:
        alpha = float(metadata[META_ALPHA])
    if alpha is None:
        raise LoraformatError(
            path, "loralib checkpoints do not record lora_alpha: give it with --alpha A"
        )
    rank_opt = ctx.options.get("rank")
    if rank_opt is None and META_RANK in metadata:
        rank_opt = int(metadata[META_RANK])
    enable = _parse_enable(ctx.options.get("enable_lora"))
    if enable is None and META_ENABLE in metadata:
        enable = _parse_enable(metadata[META_ENABLE])
    architecture = ctx.options.get("architecture")
    if ctx.base is not None:
        architecture = ctx.base.architecture
    if architecture is None:
        raise LoraformatError(
            path, "a loralib checkpoint does not say its model: give --base BASE (or architecture)"
        )
    modules = sorted(n[: -len(".lora_A")] for n in tensors if n.endswith(".lora_A"))
    if not modules:
        raise LoraformatError(path, "no '<module>.lora_A' tensors: not a loralib checkpoint")
    layers: dict[str, LoraLayer] = {}
    for module in modules:
        a, b = tensors[module + ".lora_A"], tensors.get(module + ".lora_B")
        if b is None:
            raise LoraformatError(path, f"{module}.lora_A has no {module}.lora_B")
        if a.ndim != 2 or b.ndim != 2:
            raise LoraformatError(path, f"{module}: lora_A/lora_B must be 2-D")
        r = int(b.shape[1])
        if rank_opt is not None and int(rank_opt) != r:
            raise LoraformatError(
                path, f"{module}: lora_B has rank {r}, but rank {rank_opt} was given"
            )
        if a.shape[0] % r:
            raise LoraformatError(
                path, f"{module}: lora_A has {a.shape[0]} rows, not a multiple of r={r}"
            )
        k = a.shape[0] // r
        layer_path = _find_path(module, ctx)
        dense = ctx.base.layers[layer_path] if ctx.base is not None else None
        merged = k > 1 or (dense is not None and dense.out_features != b.shape[0])
        if not merged:
            if dense is not None and dense.in_features != a.shape[1]:
                raise LoraformatError(
                    path, f"{module}: lora_A has {a.shape[1]} columns, layer has "
                    f"{dense.in_features} inputs",
                )
            layers[layer_path] = LoraLayer(
                A=a, B=b, alpha=float(alpha), in_features=int(a.shape[1]),
                out_features=int(b.shape[0]),
            )
            continue
        if enable is None:
            raise LoraformatError(
                path,
                f"{module} is a MergedLinear (lora_A has {k}·r rows): give its enable_lora, e.g. "
                "--enable-lora true,false,true for GPT-2 c_attn",
            )
        if sum(enable) != k:
            raise LoraformatError(
                path,
                f"{module}: enable_lora {enable} enables {sum(enable)} parts, tensors have {k}",
            )
        if b.shape[0] % k:
            raise LoraformatError(path, f"{module}: lora_B rows {b.shape[0]} not divisible by {k}")
        part = b.shape[0] // k
        out_features = part * len(enable)
        if dense is not None and dense.out_features != out_features:
            raise LoraformatError(
                path, f"{module}: enable_lora {enable} gives {out_features} outputs, layer has "
                f"{dense.out_features}",
            )
        block = np.zeros((b.shape[0], k * r), dtype=b.dtype)
        for g in range(k):
            block[g * part : (g + 1) * part, g * r : (g + 1) * r] = b[g * part : (g + 1) * part]
        rows = [(i * part, (i + 1) * part) for i, on in enumerate(enable) if on]
        layers[layer_path] = LoraLayer(
            A=a, B=block, alpha=float(alpha) * k, in_features=int(a.shape[1]),
            out_features=out_features, out_rows=rows,
        )
        ctx.note(
            f"{layer_path}: MergedLinear {enable} → out_rows {rows}, block-diagonal B of rank "
            f"{k * r}, alpha {float(alpha) * k:g} (same scale {float(alpha) / r:g})"
        )
    ctx.report.layers = len(layers)
    return Adapter.from_layers(
        architecture, layers, scaling="alpha/r",
        fingerprint=ctx.base.checkpoint.fingerprint() if ctx.base is not None else None,
        provenance={"converted_from": "loralib", "lora_alpha": float(alpha)},
    )


def _split_blocks(layer: LoraLayer) -> tuple[int, list[np.ndarray]] | None:
    """If B is block diagonal over the out_rows ranges with equal rank blocks: (r, [B_g])."""
    ranges = layer.out_rows or []
    k = len(ranges)
    if k == 0 or layer.rank % k:
        return None
    r = layer.rank // k
    blocks, start = [], 0
    for g, (a, b) in enumerate(ranges):
        n = b - a
        rows = layer.B[start : start + n]
        mask = np.ones(layer.rank, dtype=bool)
        mask[g * r : (g + 1) * r] = False
        if np.any(rows[:, mask]):
            return None
        blocks.append(rows[:, g * r : (g + 1) * r])
        start += n
    return r, blocks


def write_loralib(adapter: Adapter, out: Path, ctx: Context) -> None:
    """Plain layers → lora.Linear tensors; out_rows layers whose B is block diagonal over equal
    parts → MergedLinear tensors. loralib has one (r, lora_alpha) for all layers and only the
    alpha/r rule: anything else is refused. A ``.safetensors`` output records them."""
    if adapter.scaling != "alpha/r":
        raise LoraformatError(out, "loralib has only the alpha/r scaling rule (this is rsLoRA)")
    tensors: dict[str, np.ndarray] = {}
    pairs: set[tuple[int, float]] = set()
    enables: set[tuple[bool, ...]] = set()
    for path, layer in adapter.layers():
        spec = adapter.specs[path]
        if spec.dora or spec.lora_bias or spec.kind != "linear":
            what = "DoRA" if spec.dora else "lora_bias" if spec.lora_bias else spec.kind
            raise LoraformatError(out, f"{path}: loralib cannot carry {what}")
        if layer.out_rows is None:
            pairs.add((layer.rank, layer.alpha))
            tensors[path + ".lora_A"], tensors[path + ".lora_B"] = layer.A, layer.B
            continue
        split = _split_blocks(layer)
        sizes = {b - a for a, b in layer.out_rows}
        if split is None or len(sizes) != 1 or layer.out_features % next(iter(sizes)):
            raise LoraformatError(
                out, f"{path}: out_rows layer is not a MergedLinear (equal parts, block-diagonal B)"
            )
        r, blocks = split
        part = next(iter(sizes))
        starts = {a for a, _ in layer.out_rows}
        enable = tuple(i * part in starts for i in range(layer.out_features // part))
        enables.add(enable)
        pairs.add((r, layer.alpha / len(blocks)))
        tensors[path + ".lora_A"] = layer.A
        tensors[path + ".lora_B"] = np.concatenate(blocks, axis=0)
    if len(pairs) > 1 or len(enables) > 1:
        raise LoraformatError(
            out,
            f"loralib needs one r and lora_alpha for all layers; this adapter has {sorted(pairs)}",
        )
    r, alpha = next(iter(pairs))
    metadata = {META_ALPHA: repr(float(alpha)), META_RANK: str(r)}
    if enables:
        metadata[META_ENABLE] = json.dumps(list(next(iter(enables))))
    ctx.note(f"loralib does not store them: read back with --alpha {alpha:g} --rank {r}"
             + (f" --enable-lora {','.join(str(e).lower() for e in next(iter(enables)))}"
                if enables else ""))
    ctx.report.layers = len(adapter.specs)
    if out.suffix == ".safetensors":
        write_safetensors(out, tensors, metadata)
        return
    import torch

    from ..atomic import atomic_file
    from ._common import numpy_to_torch

    with atomic_file(out) as handle:
        torch.save({k: numpy_to_torch(v) for k, v in tensors.items()}, handle)


class LoralibCodec:
    name = NAME
    description = "microsoft/LoRA (loralib) checkpoint: <module>.lora_A / .lora_B tensors"
    writes_directory = False
    options = ("alpha", "rank", "enable_lora")

    def sniff(self, path: Path) -> bool:
        return sniff(path)

    def read(self, path: Path, ctx: Context) -> Adapter:
        return read_loralib(path, ctx)

    def write(self, adapter: Adapter, path: Path, ctx: Context) -> None:
        write_loralib(adapter, path, ctx)


CODEC = LoralibCodec()
__all__: Sequence[str] = ["CODEC", "read_loralib", "write_loralib"]
