"""How much of an adapter survives being merged into a quantized weight.

For one weight W, its merged value W' = W + ΔW and a quantizer Q (with its dequantizer), the
stored weight is Q(W'); what the model gains from the adapter is the *stored change*
Q(W') − Q(W) (Q(W) being what it held before: the base as stored, when the base was quantized
with Q). The figures per layer:

- ``delta_norm``   ‖ΔW‖ (Frobenius);
- ``error_norm``   ‖Q(W') − W'‖, the requantization error of the merged weight;
- ``share``        ⟨Q(W') − Q(W), ΔW⟩ / ‖ΔW‖²: the part of ΔW the stored change carries
  (1 = all of it; 0 = none). A ΔW smaller than the quantization step rounds back to the grid
  point W already sits on, so its share is near 0. Rounding can also overshoot ΔW's direction
  (a projection above ‖ΔW‖²): that is all of it, so shares are capped at 1 everywhere (table,
  warning, JSON), never "100.5%".

The overall share weights layers by ‖ΔW‖²: Σ⟨·,·⟩ / Σ‖ΔW‖². :func:`measure` works for any codec
given as a pair of functions, so every quantized merge (GGUF, bitsandbytes, MatMulNBits) reports
the same figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Layers keeping less than this share of their ΔW are named in the warning.
DEFAULT_THRESHOLD = 0.5
_CHUNK = 1 << 16


@dataclass(frozen=True)
class LayerSurvival:
    """The survival figures of one tensor (see the module docstring)."""

    name: str
    qtype: str
    delta_norm: float
    error_norm: float
    carried: float  # ⟨Q(W') − Q(W), ΔW⟩

    @property
    def share(self) -> float:
        sq = self.delta_norm**2
        return min(1.0, self.carried / sq) if sq > 0 else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.name,
            "type": self.qtype,
            "delta_norm": self.delta_norm,
            "requant_error": self.error_norm,
            "share": self.share,
        }


@dataclass
class SurvivalReport:
    """Every quantized tensor a merge wrote, with the threshold the warning uses."""

    layers: list[LayerSurvival] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD
    advice: str = "keep the adapter separate or merge into a finer type"

    def add(self, layer: LayerSurvival) -> None:
        self.layers.append(layer)

    @property
    def share(self) -> float:
        """Overall share, layers weighted by ‖ΔW‖²."""
        total = sum(item.delta_norm**2 for item in self.layers)
        return min(1.0, sum(item.carried for item in self.layers) / total) if total > 0 else 1.0

    def low(self) -> list[LayerSurvival]:
        """Layers whose share is below the threshold (and whose ΔW is not zero)."""
        return [i for i in self.layers if i.delta_norm > 0 and i.share < self.threshold]

    def warning(self) -> str | None:
        """One line naming the layers below the threshold and what to do instead, or None."""
        low = self.low()
        if not low:
            return None
        named = ", ".join(f"{i.name} {i.share:.0%}" for i in low[:5])
        more = f" and {len(low) - 5} more" if len(low) > 5 else ""
        return (
            f"{len(low)} of {len(self.layers)} merged tensor(s) keep less than "
            f"{self.threshold:.0%} of the adapter after requantization ({named}{more}); "
            f"overall {self.share:.0%}: {self.advice}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "threshold": self.threshold,
            "warning": self.warning(),
            "layers": [item.to_json() for item in self.layers],
        }

    def table(self) -> list[str]:
        """Lines of the per-layer table (the CLI prints them)."""
        width = max([len("tensor")] + [len(i.name) for i in self.layers])
        lines = [f"{'tensor':<{width}}  {'type':<6}  {'‖ΔW‖':>10}  {'requant err':>11}  share"]
        for i in self.layers:
            lines.append(
                f"{i.name:<{width}}  {i.qtype:<6}  {i.delta_norm:>10.4g}  {i.error_norm:>11.4g}  "
                f"{i.share:6.1%}"
            )
        lines.append(f"{'overall':<{width}}  {'':<6}  {'':>10}  {'':>11}  {self.share:6.1%}")
        return lines


def measure(
    name: str,
    weight: np.ndarray,
    merged: np.ndarray,
    quantize: Callable[[np.ndarray], Any],
    dequantize: Callable[[Any], np.ndarray],
    *,
    qtype: str = "",
    stored: np.ndarray | None = None,
) -> tuple[LayerSurvival, Any]:
    """Quantize ``merged`` and measure what survived; returns (figures, ``quantize(merged)``).

    ``weight`` is W and ``merged`` W' = W + ΔW (any merge: several adapters, DoRA), both float
    arrays of one shape. ``dequantize(quantize(x))`` must give x's shape back. ``stored`` is
    Q(W) dequantized when the caller has it (a base already stored with this quantizer: then it
    is W itself); otherwise it is computed. The quantized value is returned so the caller writes
    exactly what was measured.
    """
    quantized = quantize(merged)
    back = np.asarray(dequantize(quantized))
    if stored is None:
        stored = np.asarray(dequantize(quantize(weight)))
    delta_sq = error_sq = carried = 0.0
    # Differences in float32 (exact enough: they are what the file stores), each chunk's dot
    # product summed in float64: few passes over memory, and small temporaries at any size.
    flat = [np.asarray(a, dtype=np.float32).reshape(-1) for a in (weight, merged, back, stored)]
    for start in range(0, flat[0].size, _CHUNK):
        w, m, b, s = (a[start : start + _CHUNK] for a in flat)
        delta = m - w
        error = b - m
        delta_sq += float(np.dot(delta, delta))
        error_sq += float(np.dot(error, error))
        carried += float(np.dot(b - s, delta))
    figures = LayerSurvival(name, qtype, delta_sq**0.5, error_sq**0.5, carried)
    return figures, quantized


__all__ = ["DEFAULT_THRESHOLD", "LayerSurvival", "SurvivalReport", "measure"]
