"""``combine``: the combination methods of PEFT's ``add_weighted_adapter``, with the same meaning.

Methods (PEFT 0.21 semantics, checked against peft in tests/test_algebra_peft.py):

* ``cat`` — exact: Σ wᵢ·ΔWᵢ by concatenating ranks (this is :func:`~loraformat.algebra.stack`).
* ``svd`` — exact up to truncation: the stack, then the factored best rank-R approximation
  (:mod:`.reduce`); R defaults to the largest input rank, as in PEFT. PEFT builds each dense ΔW
  and runs a full SVD; the result is the same (Eckart–Young) at a fraction of the cost.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` — like PEFT, these
  combine the A stack and the B stack *separately*: A = merge(Aᵢ, sign(wᵢsᵢ)·sqrt(|wᵢsᵢ|)),
  B = merge(Bᵢ, sqrt(|wᵢsᵢ|)), so B·A carries cross terms Bᵢ·Aⱼ and is **not** Σ wᵢ·ΔWᵢ (peft#3004).
  They need equal ranks per layer. The report gives each layer's relative deviation from the
  exact weighted sum, so the cost of choosing them is visible.
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` — the merge is
  applied elementwise to each input's dense ΔWᵢ (as PEFT does), then a truncated SVD to rank R.
  These build dense per-layer matrices by nature.

Pruning follows PEFT: magnitude pruning keeps the ``int(density·numel)`` largest |x|; DARE keeps
each entry with probability ``density`` and rescales by 1/density; the TIES sign election uses the
pruned, unweighted tensors (``total``: sign of the sum; ``frequency``: sign of the sign count) and
the disjoint merge divides by the number of agreeing inputs. ``density ≥ 1`` prunes nothing.
DARE's random draws come from ``numpy.random.default_rng(seed)`` in a fixed order (layers sorted,
then A before B, then inputs in order); ``masks`` may supply them instead (e.g. to replay another
implementation's draws).

Differences from PEFT, on purpose: every input's own scale (``alpha/r`` or rsLoRA's
``alpha/sqrt(r)``) is used and the output always has scale 1 (``alpha/r`` with alpha = rank),
where PEFT copies the first adapter's config (wrong for rsLoRA, peft#3761); lora_bias terms add
linearly (Σ wᵢsᵢ·biasᵢ); layers present in only some inputs combine the inputs that have them (as
PEFT does); DoRA layers are refused. PEFT's ``svd_clamp`` is not offered. As in PEFT, a single
input turns every method except ``svd``/``cat`` into ``linear``; ``svd`` of a single input still
truncates to ``rank`` (PEFT silently keeps the full rank there).

Expert layers (format 1.2) combine expert by expert: expert e of the output is the method applied
to expert e of every input (DARE draws expert after expert); the report's error is over the whole
stack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ._common import (
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
    refuse_nonfinite,
    scale_one_layer,
    stack_error,
    union_paths,
    where,
)
from .ops import adapter_weights, merged_replacements, stack_layers
from .reduce import reduce_layer, relative_error

EXACT_METHODS = ("cat", "svd")
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE_SVD_METHODS = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = EXACT_METHODS + FACTOR_METHODS + DENSE_SVD_METHODS
NEEDS_DENSITY = {m for m in FACTOR_METHODS + DENSE_SVD_METHODS if m not in ("linear",)}

#: ``masks(path, role, input_index, shape)`` → keep-mask (bool or 0/1) for a DARE draw; role is
#: ``"lora_A"``, ``"lora_B"`` or ``"delta"`` (the ``*_svd`` methods).
MaskSource = Callable[[str, str, int, tuple[int, ...]], np.ndarray]


# -- PEFT's elementwise merges, in numpy --------------------------------------------------------


def magnitude_prune_tensor(x: np.ndarray, density: float) -> np.ndarray:
    """Keep the ``int(density·numel)`` entries of largest magnitude, zero the rest."""
    if density >= 1:
        return x
    k = int(density * x.size)
    flat = x.reshape(-1)
    mask = np.zeros(flat.size, dtype=bool)
    if k > 0:
        mask[np.argpartition(-np.abs(flat), k - 1)[:k]] = True
    return (flat * mask).reshape(x.shape)


def random_prune_tensor(x: np.ndarray, density: float, keep: np.ndarray) -> np.ndarray:
    """DARE: keep entries where ``keep`` is set and rescale by 1/density."""
    if density >= 1:
        return x
    return x * np.asarray(keep, dtype=x.dtype) / density


def majority_sign_mask(stacked: np.ndarray, method: str = "total") -> np.ndarray:
    sign = np.sign(stacked)
    if method == "total":
        magnitude = stacked.sum(axis=0)
    elif method == "frequency":
        magnitude = sign.sum(axis=0)
    else:
        raise LoraformatError(
            None, f"majority sign method must be 'total' or 'frequency', got {method!r}"
        )
    majority = np.where(magnitude >= 0, 1.0, -1.0)
    return sign == majority


def disjoint_merge(weighted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    kept = (weighted * mask).sum(axis=0)
    return kept / np.maximum(mask.sum(axis=0), 1.0)


def merge_tensors(
    method: str,
    tensors: Sequence[np.ndarray],
    weights: Sequence[float],
    density: float | None,
    majority_sign: str,
    draw: Callable[[int, tuple[int, ...]], np.ndarray],
) -> np.ndarray:
    """PEFT's task-arithmetic family on equal-shape tensors (``method`` without ``_svd``)."""
    base = method.removesuffix("_svd")
    w = np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * tensors[0].ndim)
    if base == "linear":
        pruned = list(tensors)
    elif base in ("ties", "magnitude_prune"):
        pruned = [magnitude_prune_tensor(t, density) for t in tensors]
    elif base in ("dare_linear", "dare_ties"):
        pruned = [random_prune_tensor(t, density, draw(i, t.shape)) for i, t in enumerate(tensors)]
    else:  # pragma: no cover - checked by the caller
        raise LoraformatError(None, f"unknown method {method!r}")
    stacked = np.stack(pruned, axis=0)
    if base in ("ties", "dare_ties"):
        mask = majority_sign_mask(stacked, majority_sign)
        return disjoint_merge(stacked * w, mask)
    return (stacked * w).sum(axis=0)


# -- the operation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCombination:
    """One layer of a combination: its rank and how far ΔW is from the exact Σ wᵢ·ΔWᵢ."""

    path: str
    inputs: int  # how many inputs have this layer
    rank_out: int
    relative_error: float  # ‖ΔW_out − Σ wᵢΔWᵢ‖_F / ‖Σ wᵢΔWᵢ‖_F (svd: the truncation error)


def _factored_distance(a1: np.ndarray, b1: np.ndarray, a2: np.ndarray, b2: np.ndarray) -> float:
    """‖B₁A₁ − B₂A₂‖_F from the factors: the Gram-matrix trace of [B₁|−B₂]·[A₁;A₂]."""
    a = np.concatenate([a1, a2], axis=0)
    b = np.concatenate([b1, -b2], axis=1)
    value = float(np.sum((a @ a.T) * (b.T @ b)))
    return math.sqrt(max(value, 0.0))


def _norm(a: np.ndarray, b: np.ndarray) -> float:
    return math.sqrt(max(float(np.sum((a @ a.T) * (b.T @ b))), 0.0))


def combine(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None = None,
    method: str = "svd",
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    masks: MaskSource | None = None,
    dtype: str | np.dtype | None = None,
    check_base: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Adapter, list[LayerCombination]]:
    """Combine adapters as PEFT's ``add_weighted_adapter(..., combination_type=method)`` would
    (see the module docstring for the exact meaning and the deliberate differences).

    ``rank`` is the output rank of the svd methods (default: the largest input rank). Returns the
    adapter (scale 1 on every layer) and a per-layer report.
    """
    if method not in METHODS:
        raise LoraformatError(
            None, f"unknown combination method {method!r}; choose one of {', '.join(METHODS)}"
        )
    adapters = list(adapters)
    w = adapter_weights(adapters, weights)
    check_compatible(adapters, check_base)
    requested = method
    if len(adapters) == 1 and method in FACTOR_METHODS + DENSE_SVD_METHODS:
        method = "linear"  # as PEFT: one adapter has nothing to prune against or elect signs with
    if rank is not None and not method.endswith("svd"):
        raise LoraformatError(None, f"rank applies to the svd methods only, not to {method!r}")
    if method in NEEDS_DENSITY:
        if density is None:
            raise LoraformatError(None, f"method {method!r} needs a density in [0, 1]")
        if not 0.0 <= density <= 1.0:
            raise LoraformatError(None, f"density must be in [0, 1], got {density}")
    if majority_sign not in ("total", "frequency"):
        raise LoraformatError(
            None, f"majority sign method must be 'total' or 'frequency', got {majority_sign!r}"
        )
    if rank is not None and rank < 1:
        raise LoraformatError(None, f"rank must be a positive integer, got {rank}")
    svd_rank = rank or max(a.specs[p].rank for a in adapters for p in a.layer_paths)
    out_dtype = output_dtype(adapters, dtype)
    replacements = merged_replacements(adapters, "combine")
    rng = np.random.default_rng(seed)

    layers: dict[str, LoraLayer] = {}
    report: list[LayerCombination] = []
    paths = union_paths(adapters)
    for step, path in enumerate(paths):
        present = [i for i, a in enumerate(adapters) if path in a.specs]
        for i in present:
            refuse_dora(adapters[i], path, f"combine --method {method}")
            refuse_nonfinite(adapters[i], path, f"combine --method {method}")
        experts = expert_indices(adapters, path)
        parts, errors, norms = [], [], []
        for expert in experts:
            # the exact weighted sum, factored (scale folded into B), for svd and for the report
            exact_a, exact_b, target, bias, first = stack_layers(adapters, w, path, "combine",
                                                                 expert)
            norms.append(_norm(exact_a, exact_b))
            if method == "cat":
                a, b = exact_a, exact_b
                if a.shape[0] > min(a.shape[1], b.shape[0]):
                    probe = LoraLayer(a, b, 1.0, first.in_features, first.out_features,
                                      out_rows=target)
                    a, b, _, _ = reduce_layer(probe, 1.0)
                error = 0.0
            elif method == "svd":
                probe = LoraLayer(
                    exact_a, exact_b, 1.0, first.in_features, first.out_features, out_rows=target
                )
                a, b, s, kept = reduce_layer(probe, 1.0, k=svd_rank)
                error = relative_error(s, kept)
            elif method in FACTOR_METHODS:
                a, b = _factor_method(method, adapters, w, present, path, target, density,
                                      majority_sign, rng, masks, expert)
                error = _relative(_factored_distance(a, b, exact_a, exact_b), norms[-1])
            else:
                a, b = _dense_svd_method(method, adapters, w, present, path, target, density,
                                         majority_sign, rng, masks, svd_rank, expert)
                exact = exact_b @ exact_a
                error = _relative(float(np.linalg.norm(b @ a - exact)),
                                  float(np.linalg.norm(exact)))
            errors.append(error)
            parts.append(scale_one_layer(a, b, first, target, bias, out_dtype))
        layers[path] = join_experts(parts, experts)
        report.append(LayerCombination(path, len(present), layers[path].rank,
                                       stack_error(errors, norms)))
        if progress:
            progress(step + 1, len(paths))
    result = Adapter.from_layers(
        adapters[0].architecture,
        layers,
        scaling="alpha/r",
        replacements=replacements or None,
        base_name=common_base_name(adapters),
        fingerprint=common_fingerprint(adapters),
        provenance=provenance(
            "combine",
            {
                "method": method,
                "requested_method": requested if requested != method else None,
                "weights": w,
                "rank": svd_rank if method.endswith("svd") else None,
                "density": density if method in NEEDS_DENSITY else None,
                "majority_sign": majority_sign if "ties" in method else None,
                "seed": seed if "dare" in method and masks is None else None,
                "dtype": str(out_dtype),
            },
            [describe_input(a, weight=wi) for a, wi in zip(adapters, w, strict=True)],
        ),
    )
    return result, report


def _relative(distance: float, norm: float) -> float:
    if norm == 0.0:
        return 0.0 if distance == 0.0 else math.inf
    return distance / norm


def _drawer(
    rng: np.random.Generator, masks: MaskSource | None, path: str, role: str, density: float | None
) -> Callable[[int, tuple[int, ...]], np.ndarray]:
    def draw(index: int, shape: tuple[int, ...]) -> np.ndarray:
        if masks is not None:
            return np.asarray(masks(path, role, index, tuple(shape)))
        return rng.random(shape) < density

    return draw


def _factor_method(
    method: str,
    adapters: Sequence[Adapter],
    w: Sequence[float],
    present: Sequence[int],
    path: str,
    target: list[tuple[int, int]] | None,
    density: float | None,
    majority_sign: str,
    rng: np.random.Generator,
    masks: MaskSource | None,
    expert: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    ranks = {adapters[i].specs[path].rank for i in present}
    if len(ranks) != 1:
        first = adapters[present[0]].specs[path].rank
        odd = next(i for i in present if adapters[i].specs[path].rank != first)
        raise LoraformatError(
            where(adapters[odd]),  # name a file: the first input whose rank differs
            f"layer {path!r} has ranks {sorted(ranks)} in the inputs; method {method!r} combines A "
            f"and B separately and needs equal ranks (use --method svd or cat)",
        )
    a_list, b_list, wa, wb = [], [], [], []
    for i in present:
        layer = layer_of(adapters[i], path, expert)
        ws = w[i] * adapters[i].scale(path)
        root = math.sqrt(abs(ws))
        wa.append(root if ws >= 0 else -root)  # the sign goes on A only, as in PEFT
        wb.append(root)
        a_list.append(f64(layer.A))
        b_list.append(expand_b(f64(layer.B), layer, target))
    a = merge_tensors(
        method, a_list, wa, density, majority_sign, _drawer(rng, masks, path, "lora_A", density)
    )
    b = merge_tensors(
        method, b_list, wb, density, majority_sign, _drawer(rng, masks, path, "lora_B", density)
    )
    return a, b


def _dense_svd_method(
    method: str,
    adapters: Sequence[Adapter],
    w: Sequence[float],
    present: Sequence[int],
    path: str,
    target: list[tuple[int, int]] | None,
    density: float | None,
    majority_sign: str,
    rng: np.random.Generator,
    masks: MaskSource | None,
    svd_rank: int,
    expert: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    deltas = []
    for i in present:
        layer = layer_of(adapters[i], path, expert)
        b = expand_b(f64(layer.B) * adapters[i].scale(path), layer, target)
        deltas.append(b @ f64(layer.A))
    merged = merge_tensors(
        method,
        deltas,
        [w[i] for i in present],
        density,
        majority_sign,
        _drawer(rng, masks, path, "delta", density),
    )
    u, s, vt = np.linalg.svd(merged, full_matrices=False)
    k = max(1, min(svd_rank, s.size))
    return vt[:k], u[:, :k] * s[:k]


def report_json(report: list[LayerCombination]) -> list[dict[str, Any]]:
    return [asdict(row) for row in report]


__all__ = ["METHODS", "LayerCombination", "MaskSource", "combine"]
