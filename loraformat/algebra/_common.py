"""Shared pieces of the algebra: checks across inputs, row unions, dtypes, provenance.

Conventions of every operation in this package (see ``loraformat.algebra``):

* Inputs are read, never modified; the work is done in float64.
* Each input layer's scale (``alpha/r`` or ``alpha/sqrt(r)``) is folded into its B, so outputs of
  stack/subtract/reduce/combine/extract carry a clean scaling: rule ``alpha/r`` with
  ``alpha = rank`` on every layer, i.e. scale 1 and ΔW = B·A. (``scale`` alone keeps the input's
  scaling rule and alphas and multiplies B.)
* An expert layer (format 1.2, E independent LoRAs) is worked on expert by expert: each operation
  runs its per-layer computation on expert e's slice (:func:`layer_of`) as on a dense layer, and
  :func:`join_experts` stacks the E results back into one expert layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import __version__ as _version
from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer

try:  # bfloat16 is a valid adapter dtype; numpy alone does not know it
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _BF16 = None

DTYPE_CHOICES = ("float32", "float16", "bfloat16", "float64")


def parse_dtype(name: str | np.dtype | type | None) -> np.dtype | None:
    """``None`` (keep the inputs' dtype) or the numpy dtype for a name like ``'bfloat16'``."""
    if name is None:
        return None
    if isinstance(name, str):
        if name == "bfloat16":
            return _BF16
        if name not in DTYPE_CHOICES:
            raise LoraformatError(
                None, f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}"
            )
    return np.dtype(name)


def output_dtype(adapters: Sequence[Adapter], requested: str | np.dtype | None) -> np.dtype:
    """The requested dtype, else the inputs' common A/B dtype (float32 when they disagree)."""
    chosen = parse_dtype(requested)
    if chosen is not None:
        return chosen
    found = set()
    for adapter in adapters:
        for path in adapter.layer_paths:
            found.add(np.dtype(adapter.layer(path).B.dtype))
    if len(found) == 1:
        return found.pop()
    return np.dtype(np.float32)


def where(adapter: Adapter) -> str | None:
    return str(adapter.path) if adapter.path is not None else None


def check_compatible(adapters: Sequence[Adapter], check_base: bool = True) -> None:
    """Refuse inputs made for different architectures or (when both say) different bases."""
    if not adapters:
        raise LoraformatError(None, "no input adapters")
    first = adapters[0]
    for other in adapters[1:]:
        if other.architecture != first.architecture:
            raise LoraformatError(
                where(other),
                f"architecture {other.architecture!r} differs from {first.architecture!r} of "
                f"{where(first) or 'the first input'}",
            )
        if (
            check_base
            and first.fingerprint
            and other.fingerprint
            and first.fingerprint != other.fingerprint
        ):
            raise LoraformatError(
                where(other),
                f"base fingerprint {other.fingerprint[:17]}… differs from "
                f"{first.fingerprint[:17]}… of {where(first) or 'the first input'}: "
                f"the adapters were made for different bases",
            )
    for other in adapters[1:]:
        for path in set(first.layer_paths) & set(other.layer_paths):
            a, b = first.specs[path], other.specs[path]
            if (a.in_features, a.out_features, a.kind, a.experts) != (
                b.in_features, b.out_features, b.kind, b.experts
            ):
                raise LoraformatError(
                    where(other),
                    f"layer {path!r} is {_describe(b)} here but {_describe(a)} in "
                    f"{where(first) or 'the first input'}",
                )


def _describe(spec: Any) -> str:
    experts = f" of {spec.experts} experts" if spec.experts is not None else ""
    return f"{spec.kind} {spec.in_features}→{spec.out_features}{experts}"


def expert_indices(adapters: Sequence[Adapter], path: str) -> list[int | None]:
    """``[None]`` for a dense layer, ``[0 … E−1]`` for an expert layer (the inputs agree on E:
    :func:`check_compatible`)."""
    for adapter in adapters:
        if path in adapter.specs:
            experts = adapter.specs[path].experts
            return [None] if experts is None else list(range(experts))
    raise KeyError(path)


def expert_slice(layer: LoraLayer, expert: int | None) -> LoraLayer:
    """Expert ``expert``'s LoRA of an expert layer as a dense layer (views, no copy); ``None``:
    the layer itself."""
    if expert is None:
        return layer
    return LoraLayer(
        A=layer.A[expert],
        B=layer.B[expert],
        alpha=layer.alpha,
        in_features=layer.in_features,
        out_features=layer.out_features,
        kind=layer.kind,
        out_rows=layer.out_rows,
    )


def layer_of(adapter: Adapter, path: str, expert: int | None = None) -> LoraLayer:
    """The layer at ``path``, or expert ``expert``'s slice of it."""
    return expert_slice(adapter.layer(path), expert)


def join_experts(parts: Sequence[LoraLayer], experts: Sequence[int | None]) -> LoraLayer:
    """One layer from the per-expert results (``experts`` as :func:`expert_indices` gave them):
    the dense layer itself, or the expert layer stacking them. Parts of different ranks (an energy
    threshold met at different ranks) are padded with zero rows of A and zero columns of B, which
    changes no ΔW_e."""
    if experts == [None]:
        return parts[0]
    rank = max(part.rank for part in parts)
    dtype = parts[0].A.dtype
    first = parts[0]
    a = np.zeros((len(parts), rank, first.in_features), dtype=dtype)
    b = np.zeros((len(parts), parts[0].B.shape[0], rank), dtype=dtype)
    for e, part in enumerate(parts):
        a[e, : part.rank] = part.A
        b[e, :, : part.rank] = part.B
    return LoraLayer(
        A=a,
        B=b,
        alpha=first.alpha,
        in_features=first.in_features,
        out_features=first.out_features,
        kind=first.kind,
        out_rows=first.out_rows,
        experts=len(parts),
    )


def stack_error(errors: Sequence[float], norms: Sequence[float]) -> float:
    """The relative error over an expert stack from each expert's relative error and ‖ΔW_e‖:
    sqrt(Σ (errₑ·‖ΔW_e‖)²) / sqrt(Σ ‖ΔW_e‖²) (the one value for a dense layer)."""
    if len(errors) == 1:
        return float(errors[0])
    total = math.fsum(n * n for n in norms)
    if total == 0.0:
        return 0.0
    return math.sqrt(math.fsum((e * n) ** 2 for e, n in zip(errors, norms, strict=True)) / total)


def common_fingerprint(adapters: Sequence[Adapter]) -> str | None:
    prints = {a.fingerprint for a in adapters if a.fingerprint}
    return prints.pop() if len(prints) == 1 else None


def common_base_name(adapters: Sequence[Adapter]) -> str | None:
    names = {a.manifest["base_model"].get("name") for a in adapters}
    return names.pop() if len(names) == 1 else None


def union_paths(adapters: Sequence[Adapter]) -> list[str]:
    paths: set[str] = set()
    for adapter in adapters:
        paths.update(adapter.layer_paths)
    return sorted(paths)


def refuse_dora(adapter: Adapter, path: str, operation: str) -> None:
    if adapter.specs[path].dora:
        raise LoraformatError(
            where(adapter),
            f"layer {path!r} is a DoRA layer: its change is not a pure low-rank delta (the "
            f"magnitude rescales the merged weight), so {operation} cannot be exact; merge or "
            f"convert it first",
        )


def refuse_nonfinite(adapter: Adapter, path: str, operation: str) -> None:
    """Refuse NaN/Inf factors up front: an SVD of them fails inside LAPACK."""
    layer = adapter.layer(path)  # every expert's factors at once
    if not (np.isfinite(layer.A).all() and np.isfinite(layer.B).all()):
        raise LoraformatError(
            where(adapter),
            f"layer {path!r} has non-finite values (NaN/Inf) in lora_A or lora_B; {operation} "
            "cannot approximate them (check the adapter with `loraformat validate`)",
        )


def row_ranges(layer: LoraLayer) -> list[tuple[int, int]]:
    return list(layer.out_rows) if layer.out_rows is not None else [(0, layer.out_features)]


def union_rows(
    ranges: Sequence[Sequence[tuple[int, int]]], out_features: int
) -> list[tuple[int, int]] | None:
    """Merged [start, stop) ranges covering every input's rows; ``None`` when that is all rows."""
    spans = sorted((int(a), int(b)) for group in ranges for a, b in group)
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    if merged == [(0, out_features)]:
        return None
    return merged


def rows_of(ranges: Sequence[tuple[int, int]] | None, out_features: int) -> np.ndarray:
    if ranges is None:
        return np.arange(out_features)
    return np.concatenate([np.arange(a, b) for a, b in ranges])


def expand_b(b: np.ndarray, layer: LoraLayer, target: list[tuple[int, int]] | None) -> np.ndarray:
    """B (rows of ``layer``) placed into the rows of ``target`` (a superset), zeros elsewhere."""
    if layer.out_rows is None and target is None:
        return b
    target_rows = rows_of(target, layer.out_features)
    position = np.full(layer.out_features, -1)
    position[target_rows] = np.arange(target_rows.size)
    out = np.zeros((target_rows.size, b.shape[1]), dtype=b.dtype)
    out[position[layer.rows()]] = b
    return out


def describe_input(adapter: Adapter, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"tensors_sha256": adapter.manifest.get("tensors_sha256")}
    if adapter.path is not None:
        item["name"] = adapter.path.name
    item.update(extra)
    if "provenance" in adapter.manifest:
        item["provenance"] = adapter.manifest["provenance"]
    return item


def provenance(
    operation: str,
    parameters: Mapping[str, Any],
    inputs: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The manifest's ``provenance`` object: what made this adapter from what."""
    return {
        "operation": operation,
        "parameters": {k: v for k, v in parameters.items() if v is not None},
        "inputs": [dict(item) for item in inputs],
        "tool": f"loraformat {_version}",
    }


def cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array).astype(dtype))


def f64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


def scale_one_layer(
    a: np.ndarray,
    b: np.ndarray,
    like: LoraLayer,
    out_rows: list[tuple[int, int]] | None,
    bias: np.ndarray | None,
    dtype: np.dtype,
) -> LoraLayer:
    """An output layer ΔW = b·a at scale 1 (``alpha`` = rank), with ``like``'s features and kind,
    factors and bias cast to ``dtype``."""
    return LoraLayer(
        A=cast(a, dtype),
        B=cast(b, dtype),
        alpha=float(a.shape[0]),
        in_features=like.in_features,
        out_features=like.out_features,
        kind=like.kind,
        out_rows=out_rows,
        lora_bias=None if bias is None else cast(bias, dtype),
    )
