"""The mixture-of-experts decoders: the shared decoder's attention with a routed MLP.

A block's MLP is a router (``nn.Linear`` hidden → E logits) and E expert SwiGLU MLPs. transformers
holds the experts as stacked parameters (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I]) and PEFT's ``target_parameters`` adapts those; checkpoints store them per expert
(Qwen3-MoE ``mlp.experts.N.gate_proj.weight``, Mixtral ``block_sparse_moe.experts.N.w1.weight``)
or stacked (gpt-oss). Adapter layers are always checkpoint tensors: per-expert 2-D weights are
ordinary dense layers, stacked ones are dense layers with ``experts``. A family states the
storage as data (:class:`~loraformat.architecture.ExpertStorage`) and its router's names.

llama.cpp stacks every family's experts into ``blk.N.ffn_{gate,up,down}_exps.weight`` and names
the router ``blk.N.ffn_gate_inp.weight`` (gguf-py's tensor_mapping.py); a per-expert layer has no
llama.cpp name of its own.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from loraformat.architecture import (
    SAME,
    CheckpointInfo,
    DenseLayer,
    ExpertStorage,
    ExportModel,
    ExportOptions,
    LayerRepeat,
    NameTable,
)
from loraformat.architecture.decoder import (
    GGUF_PROJECTIONS,
    PREFIX,
    SPLIT_ATTENTION,
    DecoderFamily,
    DecoderSpec,
    dense_layers,
)
from loraformat.architecture.names import CHECKPOINT
from loraformat.architecture.plugin_tools import dense_from_shape

BLOCK = "model.layers.{bid}."


#: llama.cpp's names of Qwen2-MoE's shared expert and its gate (gguf-py: FFN_*_SHEXP).
SHARED_EXPERT_GGUF = {
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}


def moe_names(
    dense: Sequence[str],
    router: str,
    peft_router: str,
    experts: Sequence[ExpertStorage],
) -> NameTable:
    """The name table of a MoE decoder: the block's plain layers ``dense`` as the shared decoder
    names them (and the shared expert's llama.cpp names); the router (checkpoint ``router``, in
    memory — so in PEFT — ``peft_router``; llama.cpp ``ffn_gate_inp``); stacked experts under
    their own name; per-expert layers, which only the checkpoint names. llama.cpp's stacked
    expert tensors are not rows here: they are the storages' ``gguf`` parts (their orientation
    and interleaving are not a renaming)."""
    gguf = {**GGUF_PROJECTIONS, **SHARED_EXPERT_GGUF}
    rows: list[tuple[str, str | None, str | None, str | None]] = [
        (BLOCK + p, SAME, "blk.{bid}." + gguf[p], SAME) for p in dense
    ]
    rows.append((BLOCK + router, BLOCK + peft_router, "blk.{bid}.ffn_gate_inp", SAME))
    for storage in experts:
        if storage.per_expert:
            rows.extend((BLOCK + t, None, None, None)
                        for t in storage.per_expert)
        else:
            rows.append((BLOCK + storage.parameter, SAME, None, None))
    rows.append(("model.embed_tokens", SAME, "token_embd", SAME))
    rows.append(("lm_head", SAME, "output", SAME))
    return NameTable((CHECKPOINT, "peft", "gguf", "mlx"), rows, optional_prefix=PREFIX)


_BLOCK = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class MoeBlock:
    """A decoder's routed MLP as the KV-cache emitter writes it (ONNX Runtime's ``MoE``/``QMoE``).

    Routing is softmax over the router's logits, the ``top_k`` largest kept and, with
    ``normalize``, rescaled to sum to 1 (gpt-oss's softmax over the top-k logits is the same
    thing). Each expert is SwiGLU ``down((clamp(g)·σ(alpha·clamp(g)))·(clamp(u) + beta))``, the
    clamps at ``limit`` (None: none). ``gate_up``/``down``: the storages of the stacked
    parameters (per-expert tensors or one stack). ``routed[i]``: whether layer i routes (the
    others keep the dense MLP); ``shared_expert``/``shared_gate``: Qwen2-MoE's always-on expert
    and the sigmoid gate scaling it."""

    experts: int
    top_k: int
    normalize: bool
    router: str
    gate_up: ExpertStorage
    down: ExpertStorage
    routed: tuple[bool, ...]
    alpha: float = 1.0
    beta: float = 0.0
    limit: float | None = None
    shared_expert: str | None = None
    shared_gate: str | None = None


@dataclass(frozen=True)
class MoeDecoderSpec(DecoderSpec):
    """A :class:`DecoderSpec` with routed MLPs (``moe``) and, gpt-oss, per-head attention sinks
    (``self_attn.sinks``: one more logit per head in the softmax, attending to nothing)."""

    moe: MoeBlock | None = None
    attn_sinks: bool = False


def moe_spec(decoder: DecoderSpec, moe: MoeBlock, attn_sinks: bool = False) -> MoeDecoderSpec:
    """``decoder`` with the routed MLP ``moe`` (and sinks)."""
    fields = {f.name: getattr(decoder, f.name) for f in dataclasses.fields(decoder)}
    return MoeDecoderSpec(**fields, moe=moe, attn_sinks=attn_sinks)


def expert_count(config: Mapping[str, Any]) -> int:
    """Experts per block: ``num_local_experts`` (Mixtral, gpt-oss, and the name transformers 5
    saves Qwen-MoE's count under) or ``num_experts``; 0 when the config says neither."""
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)


def qwen_routed(checkpoint: CheckpointInfo, n_layer: int) -> tuple[bool, ...]:
    """Which layers route in Qwen2/3-MoE: those outside ``mlp_only_layers`` whose index + 1 is a
    multiple of ``decoder_sparse_step``, as transformers builds them."""
    config = checkpoint.config
    dense = set(config.get("mlp_only_layers") or ())
    step = int(config.get("decoder_sparse_step") or 1)
    experts = expert_count(config)
    return tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n_layer))


class MoeFamily(DecoderFamily):
    """A :class:`DecoderFamily` whose MLP is routed experts. A subclass sets ``router`` (the
    router's block-relative checkpoint path) and ``expert_storage``; dense layers are the
    attention projections, the router, every expert weight, the embedding and ``lm_head``."""

    router: ClassVar[str] = "mlp.gate"
    expert_storage: ClassVar[tuple[ExpertStorage, ...]] = ()
    projections = SPLIT_ATTENTION

    def expert_patterns(self) -> list[tuple[re.Pattern[str], ExpertStorage]]:
        out = []
        for storage in self.expert_storage:
            for template in storage.per_expert or (storage.parameter,):
                regex = re.escape(template).replace(re.escape("{e}"), r"\d+")
                out.append((re.compile(regex + r"\.weight" if storage.per_expert else regex),
                            storage))
        return out

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        layers = dense_layers(checkpoint, (*self.projections, self.router), {})
        patterns = self.expert_patterns()
        shapes = checkpoint.shapes
        for name, shape in shapes.items():
            m = _BLOCK.match(name)
            if not m:
                continue
            for pattern, storage in patterns:
                if not pattern.fullmatch(m[2]):
                    continue
                if storage.per_expert:
                    path = name.removesuffix(".weight")
                    layers.append(dense_from_shape(path, shape))
                elif len(shape) == 3:
                    a, b = int(shape[1]), int(shape[2])
                    in_f, out_f = (b, a) if storage.layout == "out_in" else (a, b)
                    bias = name + "_bias" if name + "_bias" in shapes else None
                    layers.append(DenseLayer(name, in_f, out_f, layout=storage.layout,
                                             bias=bias, experts=int(shape[0])))
        return layers

    def moe_block(
        self, checkpoint: CheckpointInfo, routed: Sequence[bool], normalize: bool, **extra: object
    ) -> MoeBlock:
        """This family's :class:`MoeBlock`: expert count and top-k from the config, the
        storages and router from the class; ``extra`` sets the activation and shared expert."""
        what = f"the {self.id} routed experts"
        experts = expert_count(checkpoint.config) or checkpoint.config_value(
            "num_local_experts", what=what)
        gate_up, down = self.expert_storage
        return MoeBlock(
            experts=int(experts),
            top_k=int(checkpoint.config_value("num_experts_per_tok", what=what)),
            normalize=normalize, router=self.router, gate_up=gate_up, down=down,
            routed=tuple(routed), **extra,  # type: ignore[arg-type]
        )

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: object, options: ExportOptions
    ) -> ExportModel:
        # The KV-cache decoder is emitted from spec() (ONNX Runtime's MoE/QMoE ops); no torch
        # module is traced, so neither a plain export nor --verify (which runs one) has one.
        raise checkpoint.error(
            f"the {self.id!r} architecture has no torch export module: a mixture-of-experts "
            "model exports as the KV-cache decoder (--with-past), without --verify"
        )

    def layer_repeat(self, checkpoint: CheckpointInfo) -> LayerRepeat | None:
        return None
