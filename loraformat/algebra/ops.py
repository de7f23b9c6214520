"""Exact linear operations: stack (weighted sum), subtract, scale.

``stack`` concatenates ranks: B = [w₁s₁B₁ | w₂s₂B₂ | …] and A = [A₁; A₂; …], so the output's
ΔW = Σ wᵢ·ΔWᵢ exactly, with scale 1 (``alpha/r``, alpha = rank). Fused layers whose inputs adapt
different row blocks (``out_rows``) get B expanded to the union of those rows. When the summed rank
exceeds the layer's smaller dimension, the layer is refactored losslessly (factored QR/SVD at full
rank) so the output always validates. Expert layers are stacked expert by expert.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ._common import (
    cast,
    check_compatible,
    common_base_name,
    common_fingerprint,
    describe_input,
    expand_b,
    expert_indices,
    f64,
    join_experts,
    layer_of,
    output_dtype,
    provenance,
    refuse_dora,
    row_ranges,
    scale_one_layer,
    union_paths,
    union_rows,
    where,
)
from .reduce import reduce_layer


def adapter_weights(adapters: Sequence[Adapter], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise LoraformatError(
            None,
            f"got {len(weights)} weight(s) for {len(adapters)} adapter(s); give one per adapter",
        )
    return [float(w) for w in weights]


def merged_replacements(adapters: Sequence[Adapter], operation: str) -> dict[str, np.ndarray]:
    """The union of the inputs' replacement tensors; the same name twice must hold equal tensors."""
    found: dict[str, tuple[np.ndarray, Adapter]] = {}
    for adapter in adapters:
        for name in adapter.replacement_names:
            array = np.array(adapter.replacement(name))  # a copy: inputs may be closed
            if name in found:
                other, source = found[name]
                if (
                    other.dtype != array.dtype
                    or other.shape != array.shape
                    or not np.array_equal(other, array)
                ):
                    raise LoraformatError(
                        where(adapter),
                        f"replacement {name!r} differs from the one in "
                        f"{where(source) or 'another input'}; "
                        f"{operation} cannot choose between two full replacements",
                    )
            else:
                found[name] = (array, adapter)
    return {name: array for name, (array, _) in found.items()}


def stack_layers(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    path: str,
    operation: str = "stack",
    expert: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]] | None, np.ndarray | None, LoraLayer]:
    """(A, B, out_rows, lora_bias) in float64 with scale 1 for one layer (of an expert layer:
    for expert ``expert``): Σ wᵢ·ΔWᵢ, exact.

    The last item is one input layer (for in/out features and kind).
    """
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if path in a.specs]
    for adapter, _ in present:
        refuse_dora(adapter, path, operation)
    layers = [(layer_of(adapter, path, expert), adapter.scale(path), w) for adapter, w in present]
    first = layers[0][0]
    target = union_rows([row_ranges(layer) for layer, _, _ in layers], first.out_features)
    rows = sum(b - a for a, b in target) if target is not None else first.out_features
    total = sum(layer.rank for layer, _, _ in layers)
    # filled in place: one float64 copy of each factor, no temporaries
    a_out = np.empty((total, first.in_features))
    b_out = np.empty((rows, total))
    bias = None
    at = 0
    for layer, scale, w in layers:
        r = layer.rank
        a_out[at : at + r] = layer.A
        if layer.out_rows is None and target is None:
            np.multiply(layer.B, w * scale, out=b_out[:, at : at + r], dtype=np.float64)
        else:
            b_out[:, at : at + r] = expand_b(f64(layer.B) * (w * scale), layer, target)
        at += r
        if layer.lora_bias is not None:
            term = f64(layer.lora_bias) * (w * scale)
            bias = term if bias is None else bias + term
    return a_out, b_out, target, bias, first


def stack(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    *,
    dtype: str | np.dtype | None = None,
    check_base: bool = True,
    progress: Callable[[int, int], None] | None = None,
    _operation: str = "stack",
    _parameters: dict | None = None,
) -> Adapter:
    """One adapter whose ΔW is exactly Σ wᵢ·ΔWᵢ (weights default to 1).

    Layers present in only some inputs are kept. lora_bias terms add with the same weights.
    Replacement tensors are copied (weights do not apply to them); two different replacements of
    the same tensor are refused. DoRA layers are refused (not a pure low-rank delta).
    """
    adapters = list(adapters)
    w = adapter_weights(adapters, weights)
    check_compatible(adapters, check_base)
    out_dtype = output_dtype(adapters, dtype)
    replacements = merged_replacements(adapters, _operation)
    layers: dict[str, LoraLayer] = {}
    paths = union_paths(adapters)
    for i, path in enumerate(paths):
        experts = expert_indices(adapters, path)
        parts = []
        for expert in experts:
            a, b, target, bias, first = stack_layers(adapters, w, path, _operation, expert)
            if a.shape[0] > min(a.shape[1], b.shape[0]):
                # The summed rank would break the format's rank ≤ min(in, rows) rule: refactor at
                # full rank, which is exact because rank(B·A) ≤ min(in, rows).
                probe = LoraLayer(a, b, 1.0, first.in_features, first.out_features,
                                  out_rows=target)
                a, b, _, _ = reduce_layer(probe, 1.0)
            parts.append(scale_one_layer(a, b, first, target, bias, out_dtype))
        layers[path] = join_experts(parts, experts)
        if progress:
            progress(i + 1, len(paths))
    parameters = {"weights": w, "dtype": str(out_dtype)}
    if _parameters:
        parameters.update(_parameters)
    return Adapter.from_layers(
        adapters[0].architecture,
        layers,
        scaling="alpha/r",
        replacements=replacements or None,
        base_name=common_base_name(adapters),
        fingerprint=common_fingerprint(adapters),
        provenance=provenance(
            _operation,
            parameters,
            [describe_input(a, weight=wi) for a, wi in zip(adapters, w, strict=True)],
        ),
    )


def subtract(
    a: Adapter,
    b: Adapter,
    *,
    dtype: str | np.dtype | None = None,
    check_base: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Adapter:
    """ΔW_a − ΔW_b, exactly (a stack with weights 1 and −1). Replacements are refused."""
    for adapter in (a, b):
        if adapter.replacement_names:
            raise LoraformatError(
                where(adapter),
                f"has replacement tensor(s) ({', '.join(adapter.replacement_names[:3])}); the "
                f"difference of full replacements is undefined, so subtract refuses them",
            )
    return stack(
        [a, b],
        [1.0, -1.0],
        dtype=dtype,
        check_base=check_base,
        progress=progress,
        _operation="subtract",
        _parameters={},
    )


def scale(
    adapter: Adapter,
    weight: float,
    *,
    dtype: str | np.dtype | None = None,
) -> Adapter:
    """ΔW ↦ weight·ΔW: B and lora_bias are multiplied; ranks, alphas and the scaling rule are kept.

    Replacement tensors are copied unchanged (a full replacement has no delta to scale). DoRA
    layers are refused.
    """
    out_dtype = output_dtype([adapter], dtype)
    layers: dict[str, LoraLayer] = {}
    for path in adapter.layer_paths:
        refuse_dora(adapter, path, "scale")
        layer = adapter.layer(path)
        layers[path] = LoraLayer(
            A=cast(layer.A, out_dtype),
            B=cast(f64(layer.B) * float(weight), out_dtype),
            alpha=layer.alpha,
            in_features=layer.in_features,
            out_features=layer.out_features,
            kind=layer.kind,
            out_rows=layer.out_rows,
            lora_bias=None
            if layer.lora_bias is None
            else cast(f64(layer.lora_bias) * float(weight), out_dtype),
            experts=layer.experts,  # B·weight scales every expert's B alike
        )
    return Adapter.from_layers(
        adapter.architecture,
        layers,
        scaling=adapter.scaling,
        replacements={n: np.array(adapter.replacement(n)) for n in adapter.replacement_names}
        or None,
        base_name=adapter.manifest["base_model"].get("name"),
        fingerprint=adapter.fingerprint,
        provenance=provenance(
            "scale", {"weight": float(weight), "dtype": str(out_dtype)}, [describe_input(adapter)]
        ),
    )
