"""``extract``: an adapter from the weight difference of a fine-tuned checkpoint and its base.

Streamed layer by layer: for each dense layer the architecture plugin reports, ΔW = W_ft − W_base
is formed in math orientation (``in_out`` layouts transposed) in float32 (or float64), and its top
singular triplets are found with a randomized SVD (Halko, Martinsson & Tropp 2011: Gaussian sketch
with oversampling, power iterations with QR re-orthonormalisation, seeded), so a 4096×4096 layer
takes a fraction of a second. The layer becomes B = U·diag(σ), A = Vᵀ with scale 1 (``alpha/r``,
alpha = rank). ``--energy E`` keeps the smallest rank whose Σσ² reaches E·‖ΔW‖²_F (the total is
known exactly from ΔW; the sketch grows until the energy is reached or the SVD is complete).

Tensors that changed but are not dense layers (norms, biases, position tables), and embedding
tables when ``full_embeddings`` is set, become full replacement tensors (stored as the fine-tuned
checkpoint stores them). Unchanged tensors are skipped. The base's fingerprint is recorded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base import open_base
from ..checkpoint import Checkpoint
from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ._common import cast, parse_dtype, provenance
from .reduce import energy_rank


def randomized_svd(
    matrix: np.ndarray,
    k: int,
    *,
    oversample: int = 10,
    power_iterations: int = 2,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Approximate top-``k`` SVD (U m×k, s k, Vt k×n) of ``matrix`` (Halko et al., Alg. 4.4).

    Falls back to the exact SVD when the sketch would cover most of the smaller dimension.
    """
    m, n = matrix.shape
    small = min(m, n)
    k = max(1, min(int(k), small))
    width = k + oversample
    if 2 * width >= small:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vt[:k]
    rng = rng if rng is not None else np.random.default_rng(0)
    omega = rng.standard_normal((n, width)).astype(matrix.dtype, copy=False)
    q, _ = np.linalg.qr(matrix @ omega)
    for _ in range(power_iterations):
        z, _ = np.linalg.qr(matrix.T @ q)
        q, _ = np.linalg.qr(matrix @ z)
    small_b = (q.T @ matrix).astype(np.float64)  # width × n
    ub, s, vt = np.linalg.svd(small_b, full_matrices=False)
    u = q.astype(np.float64) @ ub
    return u[:, :k], s[:k], vt[:k]


@dataclass(frozen=True)
class LayerExtraction:
    """One tensor of the extraction: what it became and how well."""

    path: str  # the layer path for "lora", else the tensor name
    action: str  # "lora", "replacement" or "unchanged"
    rank: int = 0
    relative_error: float = 0.0  # ‖ΔW − B·A‖_F / ‖ΔW‖_F, measured on the dense ΔW


def _math(array: np.ndarray, layout: str, dtype: np.dtype) -> np.ndarray:
    a = np.asarray(array).astype(dtype)
    return a.T if layout == "in_out" else a


def extract_layer(
    delta: np.ndarray,
    rank: int | None,
    energy: float | None,
    *,
    seed: int = 0,
    oversample: int = 10,
    power_iterations: int = 2,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(A, B, relative error) in float64 for one ΔW (math orientation)."""
    rng = np.random.default_rng(seed)
    small = min(delta.shape)
    total = float(np.sum(np.square(delta, dtype=np.float64)))
    if rank is not None:
        u, s, vt = randomized_svd(
            delta, rank, oversample=oversample, power_iterations=power_iterations, rng=rng
        )
        k = s.size
    else:
        assert energy is not None
        k_try = min(small, 32)
        while True:
            u, s, vt = randomized_svd(
                delta, k_try, oversample=oversample, power_iterations=power_iterations, rng=rng
            )
            reached = float(np.sum(s**2)) >= energy * total * (1.0 - 1e-6)
            if reached or k_try >= small:
                break
            k_try = min(small, 4 * k_try)
        # the rank whose captured energy reaches E of the true total
        power = s**2
        cumulative = np.cumsum(power)
        k = int(np.searchsorted(cumulative, energy * total * (1.0 - 1e-12), side="left")) + 1
        k = max(1, min(k, s.size))
        if not reached:  # exact SVD, complete: choose on its own values
            k = energy_rank(s, energy)
    b = u[:, :k] * s[:k]
    a = vt[:k]
    approx = b.astype(delta.dtype) @ a.astype(delta.dtype)
    residual = float(np.sum(np.square(delta - approx, dtype=np.float64)))
    error = math.sqrt(residual / total) if total > 0 else 0.0
    return a, b, error


def extract(
    finetuned: str | os.PathLike[str],
    base: str | os.PathLike[str],
    rank: int | None = None,
    *,
    energy: float | None = None,
    architecture: str | None = None,
    full_embeddings: bool = False,
    seed: int = 0,
    oversample: int = 10,
    power_iterations: int = 2,
    compute_dtype: str = "float32",
    dtype: str | np.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Adapter, list[LayerExtraction]]:
    """The adapter taking ``base`` to (approximately) ``finetuned``; and a per-tensor report.

    Both must be checkpoints of the same architecture with the same tensor names and shapes.
    Exactly one of ``rank`` / ``energy``. Output dtype: ``dtype``, else the fine-tuned dense
    weights' dtype (float32 if they differ).
    """
    if (rank is None) == (energy is None):
        raise LoraformatError(None, "extract needs exactly one of a rank or an energy")
    if rank is not None and rank < 1:
        raise LoraformatError(None, f"rank must be a positive integer, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise LoraformatError(None, f"energy must be in (0, 1], got {energy}")
    work = np.dtype(compute_dtype)
    if work not in (np.float32, np.float64):
        raise LoraformatError(
            None, f"compute dtype must be float32 or float64, got {compute_dtype}"
        )
    with open_base(base, architecture) as base_model, Checkpoint(finetuned) as tuned:
        base_ck = base_model.checkpoint
        _check_same_tensors(base_ck, tuned)
        dense = {layer.weight: layer for layer in base_model.layers.values()}
        out_dtype = parse_dtype(dtype)
        if out_dtype is None:
            found = {tuned.info(name).dtype for name in dense}
            out_dtype = (
                np.dtype(tuned.numpy(next(iter(dense))).dtype)
                if len(found) == 1
                else np.dtype(np.float32)
            )
        layers: dict[str, LoraLayer] = {}
        replacements: dict[str, np.ndarray] = {}
        report: list[LayerExtraction] = []
        names = sorted(base_ck.names())
        for i, name in enumerate(names):
            new, old = tuned.numpy(name), base_ck.numpy(name)
            if np.array_equal(new, old):
                report.append(LayerExtraction(name, "unchanged"))
            elif name in dense and not (full_embeddings and dense[name].kind == "embedding"):
                layer = dense[name]
                delta = _math(new, layer.layout, work) - _math(old, layer.layout, work)
                a, b, error = extract_layer(
                    delta,
                    rank,
                    energy,
                    seed=seed + i,
                    oversample=oversample,
                    power_iterations=power_iterations,
                )
                layers[layer.path] = LoraLayer(
                    A=cast(a, out_dtype),
                    B=cast(b, out_dtype),
                    alpha=float(a.shape[0]),
                    in_features=layer.in_features,
                    out_features=layer.out_features,
                    kind=layer.kind,
                )
                report.append(LayerExtraction(layer.path, "lora", a.shape[0], error))
            else:
                replacements[name] = np.array(new)  # a copy: the memory map closes
                report.append(LayerExtraction(name, "replacement"))
            if progress:
                progress(i + 1, len(names))
        if not layers and not replacements:
            raise LoraformatError(finetuned, "no tensor differs from the base: nothing to extract")
        base_print = base_ck.fingerprint()
        tuned_print = tuned.fingerprint()
        adapter = Adapter.from_layers(
            base_model.architecture,
            layers,
            scaling="alpha/r",
            replacements=replacements or None,
            base_name=Path(base).name or None,
            fingerprint=base_print,
            provenance=provenance(
                "extract",
                {
                    "rank": rank,
                    "energy": energy,
                    "full_embeddings": full_embeddings,
                    "seed": seed,
                    "oversample": oversample,
                    "power_iterations": power_iterations,
                    "compute_dtype": str(work),
                    "dtype": str(out_dtype),
                },
                [
                    {"role": "finetuned", "name": Path(finetuned).name, "fingerprint": tuned_print},
                    {"role": "base", "name": Path(base).name, "fingerprint": base_print},
                ],
            ),
        )
    return adapter, report


def _check_same_tensors(base: Checkpoint, tuned: Checkpoint) -> None:
    base_names, tuned_names = set(base.names()), set(tuned.names())
    missing = sorted(base_names - tuned_names)
    if missing:
        raise LoraformatError(
            tuned.path, f"lacks base tensor {missing[0]!r} ({len(missing)} missing)"
        )
    extra = sorted(tuned_names - base_names)
    if extra:
        raise LoraformatError(
            tuned.path,
            f"has tensor {extra[0]!r} the base lacks ({len(extra)} extra); "
            f"extract needs the same tensors in both checkpoints",
        )
    for name in sorted(base_names):
        a, b = base.info(name).shape, tuned.info(name).shape
        if a != b:
            raise LoraformatError(
                tuned.path, f"tensor {name!r} has shape {list(b)}, base has {list(a)}"
            )


def report_json(report: list[LayerExtraction]) -> list[dict[str, Any]]:
    return [asdict(row) for row in report]
