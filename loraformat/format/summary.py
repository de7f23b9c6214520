"""What ``loraformat inspect`` reports, as data."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from . import manifest as mf
from .adapter import Adapter


def _size_on_disk(path: Path | None) -> int | None:
    if path is None:
        return None
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return os.path.getsize(path)


def summarize(adapter: Adapter, *, norms: bool = True) -> dict[str, Any]:
    """A JSON-ready summary. ``norms`` reads the tensors to compute each layer's ‖ΔW‖_F."""
    m = adapter.manifest
    layers = []
    dtypes: Counter[str] = Counter()
    for path, spec in adapter.specs.items():
        dtype = adapter.tensors.dtype(mf.tensor_key(path, mf.ROLE_A))
        dtypes[dtype] += 1
        row: dict[str, Any] = {
            "path": path,
            "rank": spec.rank,
            "alpha": spec.alpha,
            "scale": adapter.scale(path),
            "in_features": spec.in_features,
            "out_features": spec.out_features,
            "kind": spec.kind,
            "dtype": dtype,
        }
        if spec.out_rows:
            row["out_rows"] = [list(r) for r in spec.out_rows]
        if spec.dora:
            row["dora"] = True
        if spec.lora_bias:
            row["lora_bias"] = True
        if spec.experts is not None:
            row["experts"] = spec.experts
        if norms:
            # an expert layer: the norm of the whole stack, sqrt(Σ_e ‖ΔW_e‖²), and each expert's
            row["delta_norm"] = adapter.delta_norm(path)
            if spec.experts is not None:
                row["expert_delta_norms"] = adapter.expert_delta_norms(path).tolist()
        layers.append(row)
    ranks = Counter(spec.rank for spec in adapter.specs.values())
    return {
        "path": str(adapter.path) if adapter.path else None,
        "format_version": m["format_version"],
        "architecture": adapter.architecture,
        "base_name": m["base_model"].get("name"),
        "base_fingerprint": adapter.fingerprint,
        "scaling": adapter.scaling,
        "layer_count": len(layers),
        "expert_layer_count": sum(spec.experts is not None for spec in adapter.specs.values()),
        "ranks": {str(r): n for r, n in sorted(ranks.items())},
        "dtypes": dict(dtypes),
        "parameters": adapter.parameter_count(),
        "size_bytes": _size_on_disk(adapter.path),
        "replacements": adapter.replacement_names,
        "provenance": m.get("provenance", {}),
        "layers": layers,
    }
