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
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer, scale_of
from ..format.safetensors_io import write_safetensors
from ._common import Context, read_safetensors, scaled, torch_load_weights_only

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
        except LoraformatError as exc:
            with open(path, "rb") as handle:
                head = handle.read(4)
            # a torch zip or a pickle (PROTO opcode) that weights_only refused: say so, rather
            # than "not a LoRA adapter in any known format"
            pickled = head == b"PK\x03\x04" or head[:1] == b"\x80"
            if pickled and "refused to unpickle" in exc.message:
                raise
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
    from ._common import alpha_for_scale

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
                # lora.Embedding keeps A r×num_embeddings, B dim×r: the same math orientation.
                kind="embedding" if dense is not None and dense.kind == "embedding" else "linear",
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
        # spec/FORMAT.md §5: alpha/rank of the fused layer (rank k·r) must equal loralib's
        # lora_alpha/r exactly; k·alpha does unless k·alpha rounds.
        fused_alpha = float(alpha) * k
        if scale_of("alpha/r", fused_alpha, k * r) != float(alpha) / r:
            fused_alpha = alpha_for_scale(float(alpha) / r, k * r, "alpha/r")
        layers[layer_path] = LoraLayer(
            A=a, B=block, alpha=fused_alpha, in_features=int(a.shape[1]),
            out_features=out_features, out_rows=rows,
        )
        ctx.note(
            f"{layer_path}: MergedLinear {enable} → out_rows {rows}, block-diagonal B of rank "
            f"{k * r}, alpha {fused_alpha:g} (same scale {float(alpha) / r:g})"
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
    """Plain layers → ``lora.Linear`` / ``lora.Embedding`` tensors; out_rows layers whose B is
    block diagonal over equal parts → ``MergedLinear`` tensors.

    loralib builds every layer with one ``r`` and ``lora_alpha`` and scales by alpha/r. Adapters
    with one rank and alpha are written as they are (bitwise). Otherwise the exact equivalent is
    written and noted: smaller ranks zero-padded to the largest, each layer's scale ratio to the
    most common scale folded into B. DoRA magnitudes, lora_bias and replaced tensors have no
    loralib form (refused unless lossy, which drops them). A ``.safetensors`` output records
    ``lora_alpha``, ``r`` and ``enable_lora`` in its metadata.
    """
    from ._common import alpha_for_scale

    specs = adapter.specs
    dora = [p for p, s in specs.items() if s.dora]
    biased = [p for p, s in specs.items() if s.lora_bias]
    if dora:
        ctx.lossy(f"DoRA magnitudes on {len(dora)} layer(s) (e.g. {dora[0]}): loralib has no "
                  "DoRA ([[lossy]] drops them: outputs change)")
    if biased:
        ctx.lossy(f"lora_bias on {len(biased)} layer(s) (e.g. {biased[0]}): loralib has none "
                  "([[lossy]] drops it)")
    if adapter.replacement_names:
        ctx.lossy(f"{len(adapter.replacement_names)} replaced tensor(s) (e.g. "
                  f"{adapter.replacement_names[0]}): not part of a loralib checkpoint ([[lossy]] "
                  "drops them)")
    ctx.check_lossy(out, "loralib")
    # (path, A, [B blocks], enable or None, scale): the layer as loralib sees it.
    parts: list[tuple[str, np.ndarray, list[np.ndarray], tuple[bool, ...] | None, float]] = []
    for path, layer in adapter.layers():
        scale = adapter.scale(path)
        if layer.out_rows is None:
            parts.append((path, np.asarray(layer.A), [np.asarray(layer.B)], None, scale))
            continue
        split = _split_blocks(layer)
        sizes = {b - a for a, b in layer.out_rows}
        if split is None or len(sizes) != 1 or layer.out_features % next(iter(sizes)):
            raise LoraformatError(
                out, f"{path}: out_rows layer is not a MergedLinear (equal parts, block-diagonal B)"
            )
        part = next(iter(sizes))
        starts = {a for a, _ in layer.out_rows}
        enable = tuple(i * part in starts for i in range(layer.out_features // part))
        parts.append((path, np.asarray(layer.A), split[1], enable, scale))
    enables = {e for *_, e, _ in parts if e is not None}
    if len(enables) > 1:
        raise LoraformatError(out, f"loralib needs one enable_lora for all MergedLinear layers; "
                              f"this adapter has {sorted(enables)}")
    ranks = {blocks[0].shape[1] for _, _, blocks, _, _ in parts}
    r = max(ranks)
    uniform = {(blocks[0].shape[1], adapter.specs[p].alpha / len(blocks))
               for p, _, blocks, _, _ in parts}
    if adapter.scaling == "alpha/r" and len(uniform) == 1:
        alpha = next(iter(uniform))[1]
        scale0 = None
    else:
        scale0 = Counter(s for *_, s in parts).most_common(1)[0][0]
        alpha = alpha_for_scale(scale0, r, "alpha/r")
    tensors: dict[str, np.ndarray] = {}
    folded = padded = 0
    for path, a, blocks, enable, scale in parts:
        block_rank = blocks[0].shape[1]
        factor = 1.0 if scale0 is None else scale / scale0
        if factor != 1.0:
            blocks = [scaled(b, factor) for b in blocks]
            folded += 1
        if block_rank < r:
            if enable is not None:
                raise LoraformatError(out, f"{path}: MergedLinear rank {block_rank} differs from "
                                      f"the other layers' {r}")
            a = np.concatenate([a, np.zeros((r - block_rank, a.shape[1]), a.dtype)])
            blocks = [np.concatenate([blocks[0], np.zeros((blocks[0].shape[0], r - block_rank),
                                                          blocks[0].dtype)], axis=1)]
            padded += 1
        tensors[path + ".lora_A"] = a
        tensors[path + ".lora_B"] = np.concatenate(blocks, axis=0)
    if folded:
        ctx.note(f"loralib has one lora_alpha/r: scale ratios folded into lora_B for {folded} "
                 "layer(s)")
    if padded:
        ctx.note(f"ranks zero-padded to {r} for {padded} layer(s) (same outputs)")
    metadata = {META_ALPHA: repr(float(alpha)), META_RANK: str(r)}
    hint = f"--alpha {alpha:g} --rank {r}"
    if enables:
        enable = next(iter(enables))
        metadata[META_ENABLE] = json.dumps(list(enable))
        hint += " --enable-lora " + ",".join(str(e).lower() for e in enable)
    ctx.note(f"loralib checkpoints do not store them: read back with {hint}")
    ctx.report.layers = len(parts)
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
