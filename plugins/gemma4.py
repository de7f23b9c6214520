"""Gemma 4, text model (Hugging Face ``Gemma4ForCausalLM``, model_type ``gemma4_text``) and the
language model of the multimodal ``Gemma4ForConditionalGeneration`` (model_type ``gemma4``).

Gemma 3's sandwich-normed block with these differences, all read from the config:

- RMSNorm scales by ``w`` (not ``1 + w``); q and k are RMS-normed per head and v by a norm
  without a weight; attention is not scaled (scale 1);
- full-attention layers have their own head size (``per_layer_config`` or the older
  ``global_head_dim``) and, with ``attention_k_eq_v``, their own KV head count and no
  ``v_proj``: values are the key projection's output, normalised without rotation;
- full-attention layers rotate with the "proportional" rope: frequencies over the whole head
  size, those past ``partial_rotary_factor`` zero (channels i and i + head/2 pass through);
- the last ``num_kv_shared_layers`` layers have no k/v projections and attend over the keys
  and values of the last earlier layer of their kind (they keep no cache of their own);
- per-layer inputs (PLE, ``hidden_size_per_layer_input``): a second embedding table and a
  projection of the embedded tokens give each layer a small vector that gates a residual
  branch after the MLP (``per_layer_input_gate`` → ``per_layer_projection``);
- with ``use_double_wide_mlp`` the KV-shared layers' MLPs are twice as wide;
- every layer's output is multiplied by its stored ``layer_scalar``.

The MoE variant (``enable_moe_block``: a router and stacked experts beside the dense MLP) is
refused by the export module; merge, names and GGUF cover its dense layers only.

llama.cpp converts both checkpoint classes as ``gemma4`` (its converter drops the
``language_model.`` level); MLX-LM's gemma4 model holds the multimodal decoder at
``language_model.model.``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from loraformat.architecture import DenseLayer, ExportModel, ExportOptions, hookimpl
from loraformat.architecture.decoder import (
    FULL,
    GGUF_PROJECTIONS,
    SLIDING,
    SPLIT_ATTENTION,
    SPLIT_MLP,
    DecoderFamily,
    DecoderSpec,
    LayerCache,
    Rope,
    base_spec,
    dense_layers,
    has_tensor,
    heads,
    kv_cache,
    layer_kinds,
    model_type,
    rope_from_config,
)
from loraformat.architecture.names import SAME, NameTable
from loraformat.architecture.plugin_tools import dense_from_shape, find_prefix
from loraformat.architecture.protocol import CheckpointInfo, LayerRepeat

LORAFORMAT_PLUGIN_API = 2
#: The per-layer-input projections of a block (PLE), beside attention and MLP.
PER_LAYER = ("per_layer_input_gate", "per_layer_projection")
#: llama.cpp's names (gguf-py's tensor map for gemma4) for every block projection.
GGUF_NAMES = {**GGUF_PROJECTIONS, "per_layer_input_gate": "inp_gate",
              "per_layer_projection": "proj"}
#: Model-level layers of the per-layer inputs: (checkpoint suffix, llama.cpp name, kind).
PER_LAYER_MODEL = (("per_layer_model_projection", "per_layer_model_proj", "linear"),
                   ("embed_tokens_per_layer", "per_layer_token_embd", "embedding"))
TEXT, MULTIMODAL_PREFIX, MLX_MULTIMODAL = "model.", "model.language_model.", "language_model.model."


def gemma4_names(stored: str, mlx: str | None, projections: Sequence[str]) -> NameTable:
    """Names of a Gemma 4 decoder stored under ``stored`` (``model.`` or
    ``model.language_model.``; PEFT names the same path); MLX-LM's path is ``mlx`` (None: the
    stored one); llama.cpp drops any ``language_model.`` level."""

    def mlx_of(path: str) -> str:
        return SAME if mlx is None else mlx + path

    rows: list[tuple[str, str | None, str | None, str | None]] = [
        (stored + "layers.{bid}." + p, SAME, "blk.{bid}." + GGUF_NAMES[p],
         mlx_of("layers.{bid}." + p))
        for p in projections
    ]
    rows.append((stored + "embed_tokens", SAME, "token_embd", mlx_of("embed_tokens")))
    rows += [(stored + name, SAME, gguf, mlx_of(name)) for name, gguf, _ in PER_LAYER_MODEL]
    head_mlx = SAME if mlx is None else mlx.removesuffix("model.") + "lm_head"
    rows.append(("lm_head", SAME, "output", head_mlx))
    return NameTable(("checkpoint", "peft", "gguf", "mlx"), rows,
                     optional_prefix=TEXT if mlx is None else "")


def per_layer_config(config: Mapping[str, Any], kinds: Sequence[str]) -> dict[int, dict]:
    """Per layer index, the settings overriding the config's for that layer (head_dim,
    num_key_value_heads): the saved ``per_layer_config`` (keys are strings in config.json), else
    what transformers derives from ``global_head_dim`` / ``num_global_key_value_heads`` for the
    full-attention layers (the KV heads only with ``attention_k_eq_v``)."""
    saved = config.get("per_layer_config")
    if isinstance(saved, Mapping):
        return {int(k): dict(v) for k, v in saved.items() if str(k).isdigit()}
    override: dict[str, Any] = {"head_dim": int(config.get("global_head_dim") or 512)}
    global_kv = config.get("num_global_key_value_heads")
    if global_kv is not None and config.get("attention_k_eq_v", False):
        override["num_key_value_heads"] = int(global_kv)
    return {i: override for i, kind in enumerate(kinds) if kind == FULL}


def kv_sources(config: Mapping[str, Any], kinds: Sequence[str]) -> tuple[int | None, ...]:
    """Per layer, the layer whose keys and values it attends over (None: its own). The last
    ``num_kv_shared_layers`` layers read the last earlier layer of their kind, as transformers'
    ``kv_sharing_modes``."""
    n = len(kinds)
    first_shared = n - int(config.get("num_kv_shared_layers") or 0)
    sources: list[int | None] = [None] * n
    for i in range(max(first_shared, 0), n):
        earlier = [j for j in range(first_shared) if kinds[j] == kinds[i]]
        if not earlier:
            raise ValueError(f"KV-shared layer {i} ({kinds[i]}) has no earlier layer of its kind")
        sources[i] = earlier[-1]
    return tuple(sources)


def proportional_rope(params: Mapping[str, Any], head_dim: int) -> Rope:
    """transformers' "proportional" rope as a whole-head :class:`Rope`: the first
    ``partial_rotary_factor · head_dim / 2`` frequencies ``theta^(-2i/head_dim)``, the rest
    zero (cos 1, sin 0: those channel pairs pass through), all divided by ``factor``."""
    theta = np.float32(params.get("rope_theta", 10000.0))
    angles = int(float(params.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    exponents = np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / np.float32(
        head_dim)
    inv_freq = np.zeros(head_dim // 2, np.float32)
    inv_freq[:angles] = 1.0 / theta**exponents
    return Rope(inv_freq / np.float32(params.get("factor", 1.0)), head_dim)


class Gemma4(DecoderFamily):
    id = "gemma4"
    description = ("Gemma 4 text decoder (per-layer head sizes, K=V full attention, KV-shared "
                   "layers, per-layer inputs, proportional rope)")
    model_types = ("gemma4_text",)
    classes = ("Gemma4ForCausalLM", "Gemma4TextModel")
    projections = SPLIT_ATTENTION + SPLIT_MLP + PER_LAYER
    names = gemma4_names(TEXT, None, projections)
    # PEFT has no default target_modules for gemma4_text; Gemma 3's (its "gemma4" entry is the
    # same two projections under language_model).
    targets = ("q_proj", "v_proj")
    gguf_architecture = "gemma4"
    ort_model_type = "bert"

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        # The class decides first: PEFT's adapter_config names the model class and the
        # transformers module, whose name (gemma4) is the multimodal model_type for both classes.
        archs = checkpoint.config.get("architectures") or []
        if archs:
            return any(str(a) in self.classes for a in archs)
        said = model_type(checkpoint, self.model_types, self.classes)
        if said is not None:
            return said
        return bool(checkpoint.shapes) and self.detect_tensors(checkpoint)

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        multimodal = any(n.startswith(MULTIMODAL_PREFIX) for n in checkpoint.shapes)
        return (
            multimodal == isinstance(self, Gemma4Multimodal)
            and has_tensor(checkpoint, "layer_scalar")
            and has_tensor(checkpoint, "pre_feedforward_layernorm.weight")
        )

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        layers = dense_layers(checkpoint, self.projections, {})
        prefix = find_prefix(list(checkpoint.shapes), r"embed_tokens\.weight$") or ""
        for name, _, kind in PER_LAYER_MODEL:
            shape = checkpoint.shapes.get(prefix + name + ".weight")
            if shape is not None:
                layout = "in_out" if kind == "embedding" else "out_in"
                layers.append(dense_from_shape(prefix + name, shape, layout=layout, kind=kind))
        return layers

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        c = checkpoint.config
        what = "the Gemma 4 export module"
        n_layer = int(checkpoint.config_value("num_hidden_layers", what=what))
        n_head, n_kv, head_dim = heads(checkpoint, what)
        kinds = layer_kinds(c, n_layer, lambda i: (i + 1) % 6 != 0)
        overrides = per_layer_config(c, kinds)
        shapes = tuple(
            (n_head, int(overrides.get(i, {}).get("num_key_value_heads", n_kv)),
             int(overrides.get(i, {}).get("head_dim", head_dim)))
            for i in range(n_layer)
        )
        params = c.get("rope_parameters") or {}
        ropes = {}
        for kind in sorted(set(kinds)):
            p = params.get(kind) or {}
            dim = next(s[2] for s, k in zip(shapes, kinds, strict=True) if k == kind)
            if p.get("rope_type") == "proportional":
                ropes[kind] = proportional_rope(p, dim)
            else:
                ropes[kind] = rope_from_config(p, {}, dim, checkpoint)
        try:
            sources = kv_sources(c, kinds)
        except ValueError as e:
            raise checkpoint.config_error(str(e)) from None
        if c.get("enable_moe_block"):
            raise checkpoint.config_error(
                "Gemma 4's MoE block (enable_moe_block) is not supported by the export module")
        if c.get("use_bidirectional_attention") == "all":
            raise checkpoint.config_error("Gemma 4: bidirectional attention cannot be exported")
        inner = int(checkpoint.config_value("intermediate_size", what=what))
        wide = bool(c.get("use_double_wide_mlp"))
        hidden = int(checkpoint.config_value("hidden_size", what=what))
        window = c.get("sliding_window")
        per_layer = int(c.get("hidden_size_per_layer_input") or 0)
        return base_spec(
            checkpoint,
            "Gemma 4",
            ropes=ropes,
            rope_of=kinds,
            windows=tuple(window if k == SLIDING else None for k in kinds),
            activation=c.get("hidden_activation") or "gelu_pytorch_tanh",
            qk_norm=True,
            sandwich_norm=True,
            embed_scale=hidden**0.5,
            attn_scale=1.0,
            final_softcap=c.get("final_logit_softcapping"),
            layer_shapes=shapes,
            caches=tuple(
                LayerCache(()) if source is not None else kv_cache(*shape[1:])
                for source, shape in zip(sources, shapes, strict=True)
            ),
            extras={
                "kv_source": sources,
                "k_eq_v": tuple(bool(c.get("attention_k_eq_v")) and k != SLIDING for k in kinds),
                "intermediate": tuple(inner * (2 if wide and s is not None else 1)
                                      for s in sources),
                "per_layer_input": per_layer,
                "per_layer_vocab": int(c.get("vocab_size_per_layer_input") or 0)
                if per_layer else 0,
            },
        )

    def blocks(self, spec: DecoderSpec) -> Any:
        from ._gemma4_blocks import gemma4_blocks

        return gemma4_blocks()

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        if MULTIMODAL_PREFIX + "embed_tokens.weight" in tensors and "lm_head.weight" in tensors:
            # The decoder core places a multimodal head at language_model.lm_head; Gemma 4's
            # sits at the top (and every release ties it).
            raise checkpoint.error("Gemma 4 multimodal checkpoint with an untied lm_head: "
                                   "only the tied head is supported")
        return super().export_model(checkpoint, tensors, options)

    def layer_repeat(self, checkpoint: CheckpointInfo) -> LayerRepeat | None:
        # Layers differ in head size, KV source and MLP width: the exporter traces each one.
        return None


class Gemma4Multimodal(Gemma4):
    id = "gemma4_multimodal"
    description = "Gemma 4 multimodal: its language model (vision and audio towers left out)"
    model_types = ("gemma4",)
    classes = ("Gemma4ForConditionalGeneration",)
    names = gemma4_names(MULTIMODAL_PREFIX, MLX_MULTIMODAL, Gemma4.projections)
    # PEFT's own default for gemma4: q/v of the language model only (not the vision tower's).
    targets = ("q_proj", "v_proj")

    def left_out(self, checkpoint: CheckpointInfo) -> list[str]:
        """The stored tensors outside the language model (vision and audio towers and their
        embedders)."""
        return [n for n in checkpoint.shapes if not n.startswith(MULTIMODAL_PREFIX)
                and n != "lm_head.weight"]


@hookimpl
def loraformat_architectures() -> list[Gemma4]:
    return [Gemma4(), Gemma4Multimodal()]
