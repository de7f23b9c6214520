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
from ..format.adapter import Adapter
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
    adapter: Adapter, storages: Sequence[ExpertStorage], ctx: Context
) -> tuple[list[Stack], set[str]]:
    """Every expert parameter of ``adapter`` as one stack (per-expert layers joined, see
    :func:`join`), and the layer paths that went into them. How many experts a per-expert
    parameter has comes from the base (``ctx.base``), else from the highest expert adapted."""
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
