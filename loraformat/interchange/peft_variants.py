"""PEFT's LoRA variants — LoHa, LoKr, AdaLoRA, VeRA — as exact low-rank loraformat layers.

Each variant's ΔW has an exact factorisation ΔW = s·B·A, built here from the variant's own
factors without ever forming the dense ΔW (checked against peft 0.21's ``get_delta_weight``):

- LoHa (``hada_w1_a`` out×r, ``hada_w1_b`` r×in, ``hada_w2_*``): ΔW = s·(B₁A₁) ⊙ (B₂A₂), s = α/r.
  Row-wise Khatri–Rao: B[i, (p,q)] = B₁[i,p]·B₂[i,q], A[(p,q), j] = A₁[p,j]·A₂[q,j], rank r².
- LoKr (``lokr_w1`` or ``lokr_w1_a``·``lokr_w1_b``, same for w2): ΔW = s·kron(W₁, W₂), s = α/r.
  kron(B₁A₁, B₂A₂) = kron(B₁, B₂)·kron(A₁, A₂); a full factor W is written W·I or I·W,
  whichever is narrower; rank rank₁·rank₂.
- AdaLoRA (``lora_A`` r×in, ``lora_E`` r×1, ``lora_B`` out×r): ΔW = B·diag(E)·A·α/(ranknum+1e-5)
  with ranknum = ``init_r`` (PEFT restores it so; it is not saved), α = ``lora_alpha`` (or the
  layer's r when ``lora_alpha`` ≤ 0).
- VeRA (shared ``vera_A`` r×in_max, ``vera_B`` out_max×r; per layer ``vera_lambda_d`` [r],
  ``vera_lambda_b`` [out]): ΔW = diag(λ_b)·B[:out]·diag(λ_d)·A[:, :in].

A factorisation whose rank exceeds min(in, out) (the format's rank rule) is refactored losslessly
by :func:`loraformat.algebra.reduce.reduce_layer` (QR of the factors + SVD of the small core);
``rank``/``energy`` options reduce in the same pass, with the error ``reduce`` reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..algebra.reduce import LayerReduction, reduce_layer, relative_error
from ..errors import LoraformatError
from ..format.adapter import Adapter, LoraLayer
from ._common import Context, Names
from .peft_keys import PREFIX, get_pattern_key

_ROLES = {
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
}
_UNSUPPORTED_ROLES = {"hada_t1": "LoHa CP convolution (use_effective_conv2d)",
                      "hada_t2": "LoHa CP convolution (use_effective_conv2d)",
                      "lokr_t2": "LoKr CP convolution (use_effective_conv2d)"}


@dataclass(frozen=True)
class Factors:
    """ΔW = scale·B·A exactly (B rows×R, A R×in, float64)."""

    B: np.ndarray
    A: np.ndarray
    scale: float


# -- the exact factorisations ------------------------------------------------------------------


def khatri_rao_rows(b1: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """Row-wise Khatri–Rao product: row i is kron(b1[i], b2[i]) (m×p, m×q → m×pq)."""
    return (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], -1)


def khatri_rao_cols(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """Column-wise Khatri–Rao product: column j is kron(a1[:, j], a2[:, j]) (p×n, q×n → pq×n)."""
    return (a1[:, None, :] * a2[None, :, :]).reshape(-1, a1.shape[1])


def loha_factors(w1a, w1b, w2a, w2b, scale: float) -> Factors:
    """(w1a·w1b) ⊙ (w2a·w2b) = KR_rows(w1a, w2a)·KR_cols(w1b, w2b)."""
    return Factors(khatri_rao_rows(_f64(w1a), _f64(w2a)), khatri_rao_cols(_f64(w1b), _f64(w2b)),
                   scale)


def _pair(full: np.ndarray | None, b: np.ndarray | None, a: np.ndarray | None):
    """(B, A) with B·A = the factor: a full matrix is W·I or I·W, whichever has fewer columns."""
    if full is None:
        return _f64(b), _f64(a)
    full = _f64(full)
    rows, cols = full.shape
    return (full, np.eye(cols)) if cols <= rows else (np.eye(rows), full)


def lokr_factors(w1, w1a, w1b, w2, w2a, w2b, scale: float) -> Factors:
    """kron(B₁A₁, B₂A₂) = kron(B₁, B₂)·kron(A₁, A₂)."""
    b1, a1 = _pair(w1, w1a, w1b)
    b2, a2 = _pair(w2, w2a, w2b)
    return Factors(np.kron(b1, b2), np.kron(a1, a2), scale)


def adalora_factors(a, b, e, scale: float) -> Factors:
    """B·diag(E)·A: E (r×1) folded into B's columns."""
    return Factors(_f64(b) * _f64(e).reshape(1, -1), _f64(a), scale)


def vera_factors(shared_a, shared_b, lambda_d, lambda_b, in_features: int, out_features: int):
    """diag(λ_b)·B[:out]·diag(λ_d)·A[:, :in]."""
    b = _f64(lambda_b).reshape(-1, 1) * _f64(shared_b)[:out_features]
    a = _f64(lambda_d).reshape(-1, 1) * _f64(shared_a)[:, :in_features]
    return Factors(b, a, 1.0)


def _f64(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


# -- reading ------------------------------------------------------------------------------------


def _number(config: Mapping[str, Any], key: str, config_path: Path) -> float:
    value = config.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise LoraformatError(config_path, f"{key} must be a number, got {value!r}")
    return float(value)


def _pattern(config: Mapping[str, Any], name: str, module: str, default: Any) -> Any:
    pattern = dict(config.get(name) or {})
    return pattern.get(get_pattern_key(list(pattern), module), default)


def check_config(config: Mapping[str, Any], config_path: Path) -> None:
    """Refuse what a variant's config asks for that has no exact loraformat form."""
    peft_type = config["peft_type"]
    if config.get("use_effective_conv2d"):
        raise LoraformatError(config_path, "use_effective_conv2d (CP convolution) has no "
                                           "loraformat form")
    if config.get("bias") not in (None, "none"):
        raise LoraformatError(config_path, f"{peft_type} bias={config['bias']!r} (trained base "
                                           "biases) is not converted; only bias='none'")
    if config.get("modules_to_save"):
        raise LoraformatError(config_path, f"modules_to_save is not converted for {peft_type} "
                                           "adapters")
    if peft_type == "VERA" and config.get("save_projection") is False:
        raise LoraformatError(
            config_path,
            "VeRA adapter saved without its shared projections (save_projection: false): PEFT "
            "regenerates them with torch's random generator, which loraformat does not replay; "
            "re-save the adapter with save_projection=True",
        )
    for key in {"LOHA": ("r", "alpha"), "LOKR": ("r", "alpha"), "ADALORA": ("init_r",),
                "VERA": ("r",)}[peft_type]:
        _number(config, key, config_path)


def _group(raw: Mapping[str, np.ndarray], peft_type: str, weights_path: Path):
    """module name → role → array; the shared VeRA projections separately."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    shared: dict[str, np.ndarray] = {}
    roles = _ROLES[peft_type]
    for key, array in raw.items():
        if peft_type == "VERA" and key in ("base_model.vera_A", "base_model.vera_B"):
            shared[key.rpartition(".")[2]] = array
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        module, _, role = name.rpartition(".")
        if role in _UNSUPPORTED_ROLES:
            raise LoraformatError(weights_path, f"tensor {key!r}: {_UNSUPPORTED_ROLES[role]} has "
                                                "no loraformat form")
        if role not in roles:
            raise LoraformatError(weights_path, f"tensor {key!r} is not a {peft_type} tensor "
                                                f"({', '.join(roles)})")
        if array.ndim > 2:
            raise LoraformatError(weights_path, f"tensor {key!r} is {array.ndim}-D: convolution "
                                                f"{peft_type} layers have no loraformat form")
        grouped.setdefault(module, {})[role] = array
    return grouped, shared


def _need(parts: Mapping[str, np.ndarray], role: str, module: str, where: Path) -> np.ndarray:
    if role not in parts:
        raise LoraformatError(where, f"module {module!r}: tensor {role!r} is missing")
    return parts[role]


def _factors(peft_type: str, config: Mapping[str, Any], module: str,
             parts: Mapping[str, np.ndarray], shared: Mapping[str, np.ndarray],
             shape: tuple[int, int] | None, where: Path) -> Factors:
    """The module's exact factors; ``shape`` (in, out) is needed by VeRA only."""
    if peft_type in ("LOHA", "LOKR"):
        r = float(_pattern(config, "rank_pattern", module, config["r"]))
        alpha = float(_pattern(config, "alpha_pattern", module, config["alpha"]))
        scale = alpha / r
        if peft_type == "LOHA":
            return loha_factors(*(_need(parts, k, module, where) for k in _ROLES["LOHA"]), scale)
        sides = []
        for side in ("w1", "w2"):
            full = parts.get(f"lokr_{side}")
            b, a = parts.get(f"lokr_{side}_a"), parts.get(f"lokr_{side}_b")
            if full is None and (a is None or b is None):
                raise LoraformatError(where, f"module {module!r}: has neither lokr_{side} nor "
                                             f"both lokr_{side}_a and lokr_{side}_b")
            sides += [full, b, a]
        return lokr_factors(*sides, scale)
    if peft_type == "ADALORA":
        a, b, e = (_need(parts, k, module, where) for k in ("lora_A", "lora_B", "lora_E"))
        if a.shape[0] != b.shape[1] or e.size != a.shape[0]:
            raise LoraformatError(where, f"module {module!r}: lora_A {list(a.shape)}, lora_B "
                                         f"{list(b.shape)} and lora_E {list(e.shape)} disagree")
        lora_alpha = float(config.get("lora_alpha") or 0)
        # PEFT: scaling = lora_alpha (or r), divided by ranknum + 1e-5 computed in float32.
        ranknum = float(np.float32(config["init_r"]) + np.float32(1e-5))
        return adalora_factors(a, b, e, (lora_alpha if lora_alpha > 0 else a.shape[0]) / ranknum)
    if "vera_A" not in shared or "vera_B" not in shared:
        raise LoraformatError(where, "VeRA adapter without base_model.vera_A / vera_B "
                                     "(the shared projections)")
    lambda_d = _need(parts, "vera_lambda_d", module, where)
    lambda_b = _need(parts, "vera_lambda_b", module, where)
    a, b = shared["vera_A"], shared["vera_B"]
    if shape is None:  # A is sliced to the layer's inputs, which only the base tells
        raise LoraformatError(where, "VeRA conversion needs the base model (--base BASE): the "
                                     "shared vera_A is cut to each layer's input size")
    in_features = shape[0]
    if (lambda_d.size != a.shape[0] or b.shape[1] != a.shape[0] or lambda_b.size > b.shape[0]
            or in_features > a.shape[1]):
        raise LoraformatError(where, f"module {module!r}: vera_lambda_d [{lambda_d.size}], "
                                     f"vera_lambda_b [{lambda_b.size}] do not fit vera_A "
                                     f"{list(a.shape)} / vera_B {list(b.shape)}")
    return vera_factors(a, b, lambda_d, lambda_b, in_features, lambda_b.size)


@dataclass(frozen=True)
class VariantLayer:
    """What the conversion did to one layer: the exact rank, and the rank written."""

    path: str
    variant: str
    exact_rank: int  # rank of the exact factorisation (r² for LoHa, rank₁·rank₂ for LoKr...)
    rank: int  # rank written
    relative_error: float  # ‖ΔW − ΔW_written‖_F / ‖ΔW‖_F: 0 unless reduced by rank/energy


def to_layer(factors: Factors, *, rank: int | None = None, energy: float | None = None,
             dtype: np.dtype | type = np.float32) -> tuple[LoraLayer, LayerReduction]:
    """A loraformat layer for ΔW = s·B·A: the factors themselves when their rank fits the format
    (≤ min(in, out)) and no reduction is asked, else reduce's QR+SVD of the factors."""
    b, a, s = factors.B, factors.A, factors.scale
    exact = a.shape[0]
    out_f, in_f = b.shape[0], a.shape[1]
    layer = LoraLayer(A=a, B=b, alpha=1.0, in_features=in_f, out_features=out_f)
    if rank is None and energy is None and exact <= min(in_f, out_f):
        result = LoraLayer(A=a.astype(dtype), B=b.astype(dtype), alpha=s * exact,
                           in_features=in_f, out_features=out_f)
        return result, LayerReduction("", exact, exact, 0.0, 1.0)
    a2, b2, sv, kept = reduce_layer(layer, s, rank, energy)
    power = sv**2
    total = float(power.sum())
    result = LoraLayer(A=a2.astype(dtype), B=b2.astype(dtype), alpha=float(kept),
                       in_features=in_f, out_features=out_f)
    return result, LayerReduction("", exact, kept, relative_error(sv, kept),
                                  float(power[:kept].sum()) / total if total else 1.0)


def read_variant(
    path: Path,
    config: Mapping[str, Any],
    raw: Mapping[str, np.ndarray],
    weights_path: Path,
    ctx: Context,
    architecture: Callable[[list[str]], str],
) -> tuple[Adapter, list[VariantLayer]]:
    """A PEFT LoHa/LoKr/AdaLoRA/VeRA adapter (config and tensors already read) as an Adapter.

    ``architecture(modules)`` resolves the architecture (the PEFT reader's rule). Options from
    ``ctx``: ``rank`` / ``energy`` reduce every layer in the same pass.
    """
    peft_type = str(config["peft_type"])
    config_path = path / "adapter_config.json"
    check_config(config, config_path)
    rank, energy = ctx.options.get("rank"), ctx.options.get("energy")
    if rank is not None and energy is not None:
        raise LoraformatError(None, "give either a rank or an energy, not both")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise LoraformatError(None, f"rank must be a positive integer, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise LoraformatError(None, f"energy must be in (0, 1], got {energy}")
    grouped, shared = _group(raw, peft_type, weights_path)
    arch = architecture(sorted(grouped))
    names = Names(arch, ctx.config, "peft", identity_fallback=True)
    base_layers = ctx.base.layers if ctx.base is not None else None
    dtypes = {np.dtype(v.dtype) for v in raw.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)
    layers: dict[str, LoraLayer] = {}
    report: list[VariantLayer] = []
    for done, (module, parts) in enumerate(sorted(grouped.items()), 1):
        layer_path = names.to_path(module)
        if layer_path is None or (base_layers is not None and layer_path not in base_layers):
            raise LoraformatError(weights_path, f"PEFT module {module!r} is not an adaptable "
                                                f"layer of the base ({arch})")
        dense = base_layers[layer_path] if base_layers is not None else None
        shape = (dense.in_features, dense.out_features) if dense is not None else None
        factors = _factors(peft_type, config, module, parts, shared, shape, weights_path)
        in_f, out_f = factors.A.shape[1], factors.B.shape[0]
        if dense is not None and (dense.kind != "linear" or (in_f, out_f) != shape):
            raise LoraformatError(weights_path, f"module {module!r}: {peft_type} maps "
                                                f"{in_f}→{out_f} but base layer {layer_path} is "
                                                f"{dense.kind} {shape[0]}→{shape[1]}")
        if factors.A.shape[0] == 0:
            ctx.note(f"{layer_path}: {peft_type} rank 0 (pruned by AdaLoRA): ΔW = 0, not written")
            continue
        layer, red = to_layer(factors, rank=rank, energy=energy, dtype=dtype)
        layers[layer_path] = layer
        report.append(VariantLayer(layer_path, peft_type, red.rank_in, red.rank_out,
                                   red.relative_error))
        ctx.tick(done, len(grouped))
    for row in report:
        text = f"{row.path}: {peft_type} exact rank {row.exact_rank} → rank {row.rank}"
        if rank is not None or energy is not None:
            text += f" (relative error {row.relative_error:.3e})"
        elif row.rank >= min(layers[row.path].in_features, layers[row.path].out_features):
            text += (" (full rank: as large as the weight itself; a rank or energy — --rank N or "
                     "--energy E, rank=/energy= in Python — makes it low-rank, as `reduce` does)")
        ctx.note(text)
    ctx.report.layers = len(layers)
    provenance = {
        "converted_from": f"peft {peft_type}",
        "peft_config": {k: config[k] for k in ("base_model_name_or_path", "peft_type", "r",
                                                "alpha", "lora_alpha", "init_r", "target_modules",
                                                "peft_version") if config.get(k) is not None},
        "variant_ranks": {row.path: {"exact": row.exact_rank, "written": row.rank,
                                     "relative_error": row.relative_error} for row in report},
    }
    if rank is not None or energy is not None:
        provenance["reduced"] = {"rank": rank, "energy": energy}
    base_name = config.get("base_model_name_or_path")
    adapter = Adapter.from_layers(
        arch, layers, scaling="alpha/r",
        base_name=base_name if isinstance(base_name, str) and base_name else None,
        fingerprint=ctx.base.checkpoint.fingerprint() if ctx.base is not None else None,
        provenance=provenance,
    )
    return adapter, report
