"""What a plugin tells the core about a checkpoint's dense layers. Plain data, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Layout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class FusedPart:
    """A named block of output rows inside a fused layer (``q``/``k``/``v`` inside GPT-2 c_attn)."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class DenseLayer:
    """A layer that can carry an adapter.

    ``path`` is the weight's tensor name without ``.weight``. ``layout`` is how the checkpoint
    stores the weight: ``out_in`` (nn.Linear, [out, in]) or ``in_out`` (GPT-2 Conv1D and embedding
    tables, [in, out]). In math orientation the layer maps ``in_features`` → ``out_features``; for
    an embedding, ``in_features`` is the vocabulary size.
    """

    path: str
    in_features: int
    out_features: int
    layout: Layout = "out_in"
    kind: Literal["linear", "embedding"] = "linear"
    parts: tuple[FusedPart, ...] = ()
    bias: str | None = None  # the bias tensor's name, if the layer has one

    @property
    def weight(self) -> str:
        return self.path + ".weight"

    @property
    def module_name(self) -> str:
        """The PEFT-style module name: the path's last component (``c_attn``, ``q_proj``)."""
        return self.path.rsplit(".", 1)[-1]

    def stored_shape(self) -> tuple[int, int]:
        if self.layout == "out_in":
            return (self.out_features, self.in_features)
        return (self.in_features, self.out_features)


@dataclass
class ExportOptions:
    """What the caller asks of an export module."""

    with_past: bool = False  # decoder KV-cache inputs/outputs
    lora_slots: tuple[str, ...] = ()  # layer paths that get LoRA A/B graph inputs
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportModel:
    """An export-ready module plus how to call it.

    ``module``'s ``state_dict()`` keys MUST equal the checkpoint's tensor names for every weight it
    uses. ``example_inputs`` are keyword arguments for ``module(**example_inputs)``; ``input_names``
    are the graph's input names in the same order (a graph name may contain dots where the Python
    keyword cannot: ``past_key_values.0.key`` ↔ ``past_key_values_0_key``). ``dynamic_axes`` maps an
    input/output graph name to {axis: axis name}.
    """

    module: Any
    example_inputs: dict[str, Any]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
