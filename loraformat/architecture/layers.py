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

    ``experts`` > 0: a stack of that many expert weights in one tensor named ``path`` as-is (no
    ``.weight``: transformers' ``mlp.experts.gate_up_proj``), [E, out, in] or [E, in, out] by
    ``layout``; each expert maps ``in_features`` → ``out_features``, and ``bias`` is [E, out].
    """

    path: str
    in_features: int
    out_features: int
    layout: Layout = "out_in"
    kind: Literal["linear", "embedding"] = "linear"
    parts: tuple[FusedPart, ...] = ()
    bias: str | None = None  # the bias tensor's name, if the layer has one
    experts: int | None = None

    @property
    def weight(self) -> str:
        return self.path if self.experts else self.path + ".weight"

    @property
    def module_name(self) -> str:
        """The PEFT-style module name: the path's last component (``c_attn``, ``q_proj``)."""
        return self.path.rsplit(".", 1)[-1]

    def stored_shape(self) -> tuple[int, ...]:
        stack = (self.experts,) if self.experts else ()
        if self.layout == "out_in":
            return (*stack, self.out_features, self.in_features)
        return (*stack, self.in_features, self.out_features)


@dataclass(frozen=True)
class ExpertStorage:
    """How a family's checkpoints store one stacked expert parameter of a block.

    transformers holds a block's experts as stacked parameters (``mlp.experts.gate_up_proj``, [E,
    2I, H]), and PEFT's ``target_parameters`` adapts those; checkpoints store them either stacked
    under that same name (gpt-oss: a :class:`DenseLayer` with ``experts``) or one 2-D tensor per
    expert (Qwen3-MoE, Mixtral). ``parameter`` is the block-relative in-memory name; ``per_expert``
    is empty for the first kind, else the block-relative dense-layer paths (``{e}`` = expert
    index) that each expert's output rows split into, in equal consecutive blocks, in order
    (``mlp.experts.{e}.gate_proj``, ``mlp.experts.{e}.up_proj``). A family lists its expert
    parameters in the order its module registers them: PEFT nests a module's wrappers in that
    order (the first registered innermost, under the most ``base_layer.``). ``layout``: how a
    stacked tensor holds each expert ([E, out, in] or [E, in, out]; PEFT's ParamWrapper reads it
    from the experts module's ``is_transposed``). ``gguf``: llama.cpp's stacked tensors the
    parameter's output rows become (``ffn_gate_exps``, ``ffn_up_exps``: block-relative, without
    ``blk.N.`` and ``.weight``), in equal consecutive blocks, or alternating row by row with
    ``interleaved`` (gpt-oss's gate_up: gate rows 0, 2, 4, …, up rows 1, 3, 5, …).
    """

    parameter: str
    per_expert: tuple[str, ...] = ()
    layout: Layout = "out_in"
    gguf: tuple[str, ...] = ()
    interleaved: bool = False


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
