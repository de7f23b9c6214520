"""Stacked expert parameters (mixture-of-experts) across the codecs that hold them stacked.

PEFT (``target_parameters``) and llama.cpp (``blk.N.ffn_*_exps``) both carry one LoRA per stacked
expert parameter — A [E, r, in], B [E, out, r] in math orientation, one rank for all experts —
while a loraformat adapter holds the checkpoint's tensors: an expert layer where the checkpoint
stores the stack, one ordinary layer per expert and part where it stores each expert apart (the
family's :class:`~loraformat.architecture.ExpertStorage`). This module turns an adapter's layers
into those stacks; each codec then lays them out its own way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..architecture import ExpertStorage
from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ._common import Context


def storage_of(name: str, storages: Sequence[ExpertStorage]) -> tuple[str, ExpertStorage] | None:
    """(block prefix, storage) for a full in-memory parameter name, or None."""
    for storage in storages:
        if name == storage.parameter or name.endswith("." + storage.parameter):
            return name[: len(name) - len(storage.parameter)], storage
    return None


def architecture_of(arch: str) -> Any:
    """The installed architecture with id ``arch``; None for a generic checkpoint's id."""
    from ..architecture import registry

    return registry().architectures().get(arch)


def expert_storage(arch: str) -> tuple[ExpertStorage, ...]:
    """How ``arch``'s checkpoints store its expert parameters (none known: ``()``)."""
    found = architecture_of(arch)
    return tuple(getattr(found, "expert_storage", ())) if found is not None else ()


def _template_regex(template: str) -> re.Pattern[str]:
    expert = re.escape(template).replace(re.escape("{e}"), r"(?P<e>\d+)")
    return re.compile(r"^(?P<prefix>(?:.*\.)?)" + expert + "$")


@dataclass
class Stack:
    """The LoRA of one stacked expert parameter as transformers holds it: ``name`` its full
    in-memory name, ``storage`` how the checkpoint stores it (None: no plugin says, stacked
    as-is), A [E, r, in], B [E, out, r], one rank and alpha for all experts."""

    name: str
    storage: ExpertStorage | None
    A: np.ndarray
    B: np.ndarray
    rank: int
    alpha: float


def collect_stacks(
    adapter: Adapter, storages: Sequence[ExpertStorage], ctx: Context | None = None
) -> tuple[list[Stack], set[str]]:
    """Every expert parameter of ``adapter`` as one stack (per-expert layers joined, see
    :func:`join`), and the layer paths that went into them. How many experts a per-expert
    parameter has comes from the base (``ctx.base``), else from the highest expert adapted.
    ``ctx`` (optional) also receives the notes."""
    ctx = ctx or Context()
    stacks: list[Stack] = []
    used: set[str] = set()
    groups: dict[tuple[str, str], dict[int, dict[int, str]]] = {}
    patterns = [
        (_template_regex(t), storage, i)
        for storage in storages for i, t in enumerate(storage.per_expert)
    ]
    for path, spec in adapter.specs.items():
        if spec.experts is not None:
            layer = adapter.layer(path)
            found = storage_of(path, storages)
            stacks.append(Stack(path, found[1] if found else None, layer.A, layer.B, layer.rank,
                                layer.alpha))
            used.add(path)
            continue
        for regex, storage, part in patterns:
            m = regex.match(path)
            if m:
                groups.setdefault((m["prefix"], storage.parameter), {}).setdefault(
                    int(m["e"]), {}
                )[part] = path
                used.add(path)
                break
    by_parameter = {s.parameter: s for s in storages}
    for (prefix, parameter), experts in sorted(groups.items()):
        storage = by_parameter[parameter]
        name = prefix + parameter
        count = expert_count(ctx, prefix, storage) or max(experts) + 1
        stacks.append(join(adapter, name, storage, experts, count, ctx))
    return stacks, used


def join(
    adapter: Adapter,
    name: str,
    storage: ExpertStorage,
    experts: Mapping[int, Mapping[int, str]],
    count: int,
    ctx: Context,
) -> Stack:
    """One stacked parameter from its per-expert, per-part layers (``experts``: expert → part
    index → layer path). Parts sharing one A (bit for bit), rank and alpha are joined as they
    were split; anything else exactly along the rank, scales folded into B, zero-padded to one
    rank, alpha = r (√r for rsLoRA) so that the scale is 1 — a note says so."""
    n_parts = len(storage.per_expert)
    any_path = next(iter(next(iter(experts.values())).values()))
    first = adapter.layer(any_path)
    in_features, rows = first.in_features, first.out_features
    layers = {e: {i: adapter.layer(p) for i, p in parts.items()} for e, parts in experts.items()}
    shared = (
        len(experts) == count
        and all(len(parts) == n_parts for parts in layers.values())
        and len({(lay.rank, lay.alpha) for parts in layers.values() for lay in parts.values()}) == 1
        and all(np.array_equal(parts[0].A, lay.A) for parts in layers.values()
                for lay in parts.values())
    )
    if shared:
        a3 = np.stack([layers[e][0].A for e in range(count)])
        b3 = np.stack(
            [np.concatenate([layers[e][i].B for i in range(n_parts)]) for e in range(count)]
        )
        return Stack(name, storage, a3, b3, first.rank, first.alpha)
    ranks = [sum(lay.rank for lay in layers.get(e, {}).values()) for e in range(count)]
    rank = max(max(ranks), 1)
    dtype = np.result_type(*(lay.A.dtype for parts in layers.values() for lay in parts.values()))
    a3 = np.zeros((count, rank, in_features), dtype=dtype)
    b3 = np.zeros((count, rows * n_parts, rank), dtype=dtype)
    for e, parts in layers.items():
        k = 0
        for i, lay in sorted(parts.items()):
            scale = adapter.scale(experts[e][i])
            a3[e, k:k + lay.rank] = lay.A
            b3[e, i * rows:(i + 1) * rows, k:k + lay.rank] = lay.B * scale
            k += lay.rank
    alpha = math.sqrt(rank) if adapter.scaling == "alpha/sqrt(r)" else float(rank)
    ctx.note(
        f"{name}: experts' parts do not share one LoRA A (or alpha/rank); joined along the rank "
        f"(rank {rank}, scales folded into B, absent experts/parts as zeros)"
    )
    return Stack(name, storage, a3, b3, rank, alpha)


def expert_count(ctx: Context, prefix: str, storage: ExpertStorage) -> int | None:
    """How many experts the base has for a per-expert stored parameter of the block at
    ``prefix`` (None without a base)."""
    if ctx.base is None:
        return None
    template = prefix + storage.per_expert[0]
    count = 0
    while template.replace("{e}", str(count)) in ctx.base.layers:
        count += 1
    return count or None


_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def expert_parts(stack: Stack) -> list[tuple[str, Any]]:
    """llama.cpp's tensor name and the rows of B (a slice) for each part of an expert stack, as
    the family's storage gives them (``[]`` when it gives no llama.cpp names)."""
    storage = stack.storage
    if storage is None or not storage.gguf:
        return []
    block = _BLOCK.search(stack.name)
    if block is None:
        raise LoraformatError(None, f"{stack.name}: no block index for llama.cpp's name")
    parts = len(storage.gguf)
    rows = stack.B.shape[1] // parts
    return [
        (f"blk.{block[1]}.{name}.weight",
         slice(i, None, parts) if storage.interleaved else slice(i * rows, (i + 1) * rows))
        for i, name in enumerate(storage.gguf)
    ]


def split_expert_tensors(
    pairs: Mapping[str, Mapping[str, np.ndarray]],
    base_layers: Mapping[str, Any],
    storages: Sequence[ExpertStorage],
    alpha: float | None,
    where: Any,
) -> dict[str, LoraLayer]:
    """The inverse of :func:`expert_parts`: llama.cpp's stacked expert LoRA (``pairs``: tensor
    name → {"a": [E, r, in], "b": [E, out, r]}, scale ``alpha``/r, None: 1) as the base's layers.
    Per-expert storage: each part is one layer per expert. A stack: the parts' B rows go back to
    their rows (interleaved or in blocks) under one A when the parts share it, else along the
    rank (scales folded into B)."""
    prefixes: dict[tuple[str, str], str] = {}  # (block index, parameter) → checkpoint prefix
    for path in base_layers:
        for storage in storages:
            for template in storage.per_expert or (storage.parameter,):
                m = _template_regex(template).match(path)
                block = _BLOCK.search(m["prefix"]) if m else None
                if block:
                    prefixes[(block[1], storage.parameter)] = m["prefix"]
    layers: dict[str, LoraLayer] = {}
    done: set[str] = set()
    for (block, parameter), prefix in sorted(prefixes.items()):
        storage = next(s for s in storages if s.parameter == parameter)
        names = [f"blk.{block}.{g}.weight" for g in storage.gguf]
        found = {i: pairs[n] for i, n in enumerate(names) if n in pairs}
        if not found:
            continue
        done.update(n for n in names if n in pairs)
        ranks = {i: int(p["b"].shape[-1]) for i, p in found.items()}
        if storage.per_expert:
            for i, pair in found.items():
                a, b = pair["a"], pair["b"]
                for e in range(a.shape[0]):
                    path = prefix + storage.per_expert[i].replace("{e}", str(e))
                    layers[path] = LoraLayer(
                        A=np.ascontiguousarray(a[e]), B=np.ascontiguousarray(b[e]),
                        alpha=alpha if alpha else float(ranks[i]),
                        in_features=a.shape[2], out_features=b.shape[1],
                    )
            continue
        path = prefix + parameter
        dense = base_layers[path]
        first = next(iter(found.values()))
        experts, in_features = first["a"].shape[0], first["a"].shape[2]
        shared = len(found) == len(names) and all(
            np.array_equal(p["a"], first["a"]) for p in found.values()
        )
        rank = int(first["a"].shape[1]) if shared else sum(ranks.values())
        a = first["a"] if shared else np.concatenate([p["a"] for p in found.values()], axis=1)
        b = np.zeros((experts, dense.out_features, rank), dtype=first["b"].dtype)
        parts, height = len(names), dense.out_features // len(names)
        offset = 0
        for i, pair in found.items():
            rows = slice(i, None, parts) if storage.interleaved else slice(
                i * height, (i + 1) * height
            )
            cols = slice(0, rank) if shared else slice(offset, offset + ranks[i])
            # llama.cpp scales part i by alpha/r_i (1 without alpha); the layer: alpha/rank
            b[:, rows, cols] = pair["b"] * (rank / ranks[i] if alpha else 1.0)
            offset += 0 if shared else ranks[i]
        layers[path] = LoraLayer(
            A=np.ascontiguousarray(a), B=b, alpha=alpha if alpha else float(rank),
            in_features=in_features, out_features=dense.out_features, experts=experts,
        )
    left = sorted(set(pairs) - done)
    if left:
        raise LoraformatError(where, f"{left[0]}: no expert parameter of the base has this "
                                     "llama.cpp name")
    return layers
