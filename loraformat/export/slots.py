"""Hot-swappable export: the base graph with a LoRA *slot* on each targeted dense layer.

For every targeted layer ``P`` (by default every linear layer the plugin lists) the graph takes two
extra inputs, ``P.lora_A`` [in, r] and ``P.lora_B`` [r, out], and computes
``y = base(x) + (x·A)·B`` — ONNX Runtime's multi-LoRA convention (A and B transposed against PEFT,
the scaling folded into B). Each slot has its own dynamic rank axis ``rank_<i>``. Each slot input
also gets a same-named zero-rank default initializer (A [in, 0], B [0, out]): with no adapter
active the extra product is an empty sum, the graph computes the plain base, and ONNX Runtime
accepts the run without those inputs. An adapter (``.onnx_adapter``, or a loraformat adapter
through :class:`loraformat.runtime.Session`) supplies the inputs per call.

The graph is made by the plain/merged export's own pipeline, the slots one of its options
(``ExportOptions.lora_slots``): :func:`~.onnx.export_onnx` traces the plugin's module wrapped by
:func:`~.slot_inputs.slotted_export_model`, and a ``with_past`` decoder comes from
:func:`~.decoder.export_decoder` (emitted from the decoder description where the family has one,
slot terms on each layer's part of a packed projection). So initializer names are the
checkpoint's tensor names and the slot graph differs from the merged graph only by the slot
inputs and their MatMul/Add nodes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..architecture import ExportOptions
from ..base import BaseModel, open_base
from ..errors import LoraformatError
from ..onnx_io import SLOT_A, SLOT_B
from .decoder import export_decoder
from .onnx import DEFAULT_OPSET, QUANT_DTYPES, export_onnx
from .quantize import QuantOptions
from .slot_inputs import slotted_export_model, slotted_module

DTYPES = ("float32", "float16", *QUANT_DTYPES)


@dataclass(frozen=True)
class SlotExport:
    """What :func:`export_with_slots` wrote."""

    path: Path
    architecture: str
    slots: list[str]  # layer paths, in graph-input order
    input_names: list[str]  # the model's own inputs (slot inputs not included)
    output_names: list[str]
    opset: int
    dtype: str
    external_data: Path | None = None
    max_abs_diff: float | None = None  # with verify: slot graph (no adapter) vs the torch base
    tolerance: float | None = None
    traced: str = ""  # how the graph was traced (all layers, or a few repeated)
    cosine: float | None = None  # verify of int4/int8: the logits' cosine to fp32 torch
    prewritten: bool = False  # the weights were written by a second process while tracing
    left_out: dict[str, int] = field(default_factory=dict)  # stored tensors left out, by group

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.path),
            "architecture": self.architecture,
            "slots": self.slots,
            "inputs": self.input_names,
            "outputs": self.output_names,
            "opset": self.opset,
            "dtype": self.dtype,
            "external_data": str(self.external_data) if self.external_data else None,
            "max_abs_diff": self.max_abs_diff,
            "traced": self.traced,
            "prewritten": self.prewritten,
            "cosine": self.cosine,
            "left_out": self.left_out,
        }


def resolve_targets(base: BaseModel, targets: Sequence[str] | None) -> list[str]:
    """Layer paths to give slots, in checkpoint order.

    ``None`` → every linear layer the plugin lists. Otherwise each entry is a layer path
    (``transformer.h.0.attn.c_attn``) or a module-name suffix (``q_proj``, ``self_attn.q_proj``)
    that must match at least one linear layer.
    """
    layers = base.layers
    linear = [path for path, layer in layers.items() if layer.kind == "linear"]
    if targets is None:
        if not linear:
            raise LoraformatError(base.path, "the plugin lists no linear layers to give slots")
        return linear
    chosen: set[str] = set()
    for target in targets:
        if target in layers:
            if layers[target].kind != "linear":
                raise LoraformatError(
                    base.path,
                    f"{target} is an {layers[target].kind} layer; slots take linear layers",
                )
            chosen.add(target)
            continue
        found = [p for p in linear if p.endswith("." + target) or p == target]
        if not found:
            names = sorted({layers[p].module_name for p in linear})
            raise LoraformatError(
                base.path,
                f"target {target!r} matches no linear layer (module names: {', '.join(names)})",
            )
        chosen.update(found)
    return [p for p in linear if p in chosen]


def export_with_slots(
    base: str | os.PathLike[str] | BaseModel,
    output: str | os.PathLike[str],
    *,
    targets: Sequence[str] | None = None,
    dtype: str = "float32",
    opset: int = DEFAULT_OPSET,
    with_past: bool = False,
    verify_output: bool = False,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    repeat_layers: bool = True,
    quant: QuantOptions | None = None,
    prewrite: bool | None = None,
) -> SlotExport:
    """Export ``base`` (a checkpoint directory or an open :class:`BaseModel`) with LoRA slots.

    The graph's inputs are the plugin export module's inputs (dynamic axes as it declares them);
    for each slot ``P.lora_A``/``P.lora_B`` are further inputs with defaults (see the module
    docstring). ``with_past`` makes it a KV-cache decoder (:func:`~.decoder.export_decoder`), so
    generation can switch adapters per request. ``verify_output`` runs ONNX Runtime (no adapter
    active) against the plugin's torch module before the file is put in place, with the plain
    export's tolerances (:func:`~.onnx.export_onnx`, :func:`~.decoder.export_decoder`). Writes
    ``output`` atomically; refuses to replace it unless ``overwrite``. ``repeat_layers`` and
    ``prewrite`` are :func:`~.onnx.export_onnx`'s (the traced graph).

    ``dtype`` ``int4``/``int8`` (``quant`` says how) writes the base's dense layers as
    MatMulNBits, as a plain quantized export does, while the slots stay float32: adapters are
    switched on a quantized base (``verify`` then needs the logits' cosine to the fp32 torch base
    to reach :data:`~.onnx.VERIFY_MIN_COSINE`).
    """
    if dtype not in DTYPES:
        raise LoraformatError(output, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    with contextlib.ExitStack() as stack:
        model = base if isinstance(base, BaseModel) else stack.enter_context(open_base(base))
        paths = resolve_targets(model, targets)
        common: dict[str, Any] = dict(
            dtype=dtype, quant=quant, opset=opset, verify_output=verify_output,
            overwrite=overwrite, progress=progress, repeat_layers=repeat_layers,
            prewrite=prewrite,
        )
        if with_past:
            result: Any = export_decoder(model, output, slots=paths, **common)
        else:
            result = export_onnx(model, output, options=ExportOptions(lora_slots=tuple(paths)),
                                 **common)
        return SlotExport(
            result.path, model.architecture, paths,
            [n for n in result.input_names if not n.endswith((SLOT_A, SLOT_B))],
            list(result.output_names), opset, dtype, result.external_data, result.max_abs_diff,
            result.tolerance, result.traced, result.cosine, result.prewritten, result.left_out,
        )


__all__ = [
    "DTYPES",
    "SlotExport",
    "export_with_slots",
    "resolve_targets",
    "slotted_export_model",
    "slotted_module",
]
