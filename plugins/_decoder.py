"""One configurable LLaMA-style decoder for the built-in decoder families.

Qwen2/2.5, Qwen3, Mistral, Gemma 2, Gemma 3 and Phi-3 are variations of one block: attention
(GQA, optional q/k/v bias, per-head q/k norm, score soft-cap, sliding window, explicit head size,
a rope per layer kind), a gated MLP (fused or split, any activation), RMSNorm (LLaMA's ``w·x`` or
Gemma's ``(1 + w)·x``, optionally sandwiching attention and MLP), embedding scaling and a final
logit soft-cap. A family is a :class:`DecoderSpec`; this module turns a spec and a checkpoint's
tensors into an export module with the same inputs and outputs as LLaMA's (``causal_lm`` +
``decoder_export_model``), and answers the plugin questions every such family shares (dense
layers, name table, llama.cpp's q/k row order, model shape).

The module is traceable by torch.onnx: windows, rope choices and soft-caps are fixed by the
config; the only data-dependent choice (Phi-3's long-rope switch) is a ``torch.where``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from loraformat.architecture import DenseLayer, ExportModel, ExportOptions, FusedPart
from loraformat.architecture.names import SAME, NameTable
from loraformat.architecture.protocol import (
    ArchitectureBase,
    CheckpointInfo,
    LayerRepeat,
    ModelShape,
)
from loraformat.errors import LoraformatError

from ._common import (
    causal_lm,
    decoder_export_model,
    dense_from_shape,
    encoder_activation,
    find_prefix,
    load_tensors,
)

#: The prefix ``*ForCausalLM`` checkpoints put the decoder under (absent in a bare ``*Model``).
PREFIX = "model."
FULL, SLIDING = "full_attention", "sliding_attention"


def head_path(prefix: str) -> str:
    """The ``lm_head`` path beside a decoder stored under ``prefix``: ``lm_head`` for
    ``model.`` or none, ``language_model.lm_head`` for a multimodal checkpoint's
    ``language_model.model.``."""
    return prefix.removesuffix("model.") + "lm_head"

#: llama.cpp's tensor names for the projections of a block, by checkpoint suffix.
GGUF_PROJECTIONS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: llama.cpp keeps gate and up fused in ffn_up
    "mlp.down_proj": "ffn_down",
}
SPLIT_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
FUSED_ATTENTION = ("self_attn.qkv_proj", "self_attn.o_proj")
SPLIT_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FUSED_MLP = ("mlp.gate_up_proj", "mlp.down_proj")


# -- the name table -------------------------------------------------------------------------------


def decoder_names(projections: Sequence[str], lm_head_in_gguf: bool = True) -> NameTable:
    """The NameTable of a decoder whose blocks have ``projections`` (checkpoint suffixes).

    PEFT and MLX-LM use the checkpoint path (both name modules as transformers does); llama.cpp
    uses :data:`GGUF_PROJECTIONS`. ``lm_head_in_gguf=False`` for families llama.cpp always ties
    (Gemma 2 has no ``output`` tensor).
    """
    block = "model.layers.{bid}."
    rows: list[tuple[str, str | None, str | None, str | None]] = [
        (block + p, SAME, "blk.{bid}." + GGUF_PROJECTIONS[p], SAME) for p in projections
    ]
    rows.append(("model.embed_tokens", SAME, "token_embd", SAME))
    rows.append(("lm_head", SAME, "output" if lm_head_in_gguf else None, SAME))
    return NameTable(("checkpoint", "peft", "gguf", "mlx"), rows, optional_prefix=PREFIX)


# -- questions answered from headers --------------------------------------------------------------


def model_type(
    checkpoint: CheckpointInfo, model_types: Sequence[str], classes: Sequence[str]
) -> bool | None:
    """True/False when the config says which model it is (``model_type``, else ``architectures``);
    None when it says nothing."""
    said = checkpoint.config.get("model_type")
    if said:
        return said in model_types
    archs = checkpoint.config.get("architectures") or []
    if archs:
        return any(str(a) in classes for a in archs)
    return None


def language_model(checkpoint: CheckpointInfo) -> CheckpointInfo:
    """The checkpoint as its language model sees it: a ``...ForConditionalGeneration`` config
    keeps the decoder's sizes in ``text_config``, which replaces the config here (shapes and
    path stay); any other checkpoint is returned as it is."""
    text = checkpoint.config.get("text_config")
    if not isinstance(text, Mapping):
        return checkpoint
    return CheckpointInfo(checkpoint.path, text, checkpoint.shapes)


def has_tensor(checkpoint: CheckpointInfo, suffix: str) -> bool:
    """Whether a block-0 tensor ``layers.0.<suffix>`` exists (with or without a prefix)."""
    return any(n.endswith("layers.0." + suffix) for n in checkpoint.shapes)


_BLOCK = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def dense_layers(
    checkpoint: CheckpointInfo,
    projections: Sequence[str],
    parts: Mapping[str, tuple[FusedPart, ...]],
) -> list[DenseLayer]:
    """Every block projection in ``projections``, the embedding table and an untied ``lm_head``,
    in checkpoint order. ``parts``: the fused parts of a projection suffix (Phi-3's qkv_proj)."""
    shapes = checkpoint.shapes
    # A multimodal checkpoint's decoder sits under its own prefix (the embedding's); its vision
    # tower may have blocks of the same names, which are not the decoder's.
    prefix = find_prefix(list(shapes), r"embed_tokens\.weight$")
    layers = []
    for name, shape in shapes.items():
        if not name.endswith(".weight"):
            continue
        path = name.removesuffix(".weight")
        bias = path + ".bias" if path + ".bias" in shapes else None
        m = _BLOCK.match(path)
        if m and m[2] in projections:
            if prefix is None or path.startswith(prefix + "layers."):
                layers.append(dense_from_shape(path, shape, parts=parts.get(m[2], ()), bias=bias))
        elif path == head_path(prefix or ""):
            layers.append(dense_from_shape(path, shape, bias=bias))
        elif prefix is not None and path == prefix + "embed_tokens":
            layers.append(dense_from_shape(path, shape, layout="in_out", kind="embedding"))
    return layers


def heads(checkpoint: CheckpointInfo, what: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head size) from the config; ``head_dim`` may be explicit."""
    n_head = int(checkpoint.config_value("num_attention_heads", what=what))
    n_kv = int(checkpoint.config_value("num_key_value_heads", default=n_head))
    hidden = int(checkpoint.config_value("hidden_size", what=what))
    return n_head, n_kv, int(checkpoint.config_value("head_dim", default=hidden // n_head))


def shape_of(checkpoint: CheckpointInfo) -> ModelShape | None:
    """The :class:`ModelShape` from a decoder config; None when the config lacks the sizes."""
    c = checkpoint.config
    if not all(c.get(k) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size")):
        return None
    n_head, n_kv, head_dim = heads(checkpoint, "")
    return ModelShape(
        num_layers=int(c["num_hidden_layers"]),
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        hidden_size=int(c["hidden_size"]),
        vocab_size=int(c.get("vocab_size") or 0),
    )


def gguf_permutation(rows: int, n_head: int) -> list[int]:
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py, LlamaModel) as source-row indices: rows
    grouped as (n_head, 2, head_dim/2) have their last two axes swapped, turning HF's half-split
    rotary layout into GGML's interleaved one."""
    half = rows // n_head // 2
    return [
        h * 2 * half + pair * half + j
        for h in range(n_head)
        for j in range(half)
        for pair in (0, 1)
    ]


def llama_cpp_qk_permutation(checkpoint: CheckpointInfo, layer_path: str) -> list[int] | None:
    """The q/k row order of families llama.cpp converts through LlamaModel (which permutes);
    None for any other layer."""
    if not layer_path.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        return None
    n_head, n_kv, head_dim = heads(language_model(checkpoint), "llama.cpp's q/k row permutation")
    if layer_path.endswith("k_proj"):
        # The converter passes n_head_kv, which replaces n_head whenever it differs (GQA).
        n_head = n_kv
    return gguf_permutation(n_head * head_dim, n_head)


# -- rotary embeddings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rope:
    """One rotary embedding: inverse frequencies over the first ``dim`` channels of a head and
    the factor cos/sin are scaled by. With ``long_inv_freq`` (LongRoPE), those replace
    ``inv_freq`` whenever the highest position + 1 exceeds ``threshold``."""

    inv_freq: Any
    dim: int
    scaling: float = 1.0
    long_inv_freq: Any = None
    threshold: int = 0


def rope_from_config(
    params: Mapping[str, Any], config: Mapping[str, Any], head_dim: int, where: CheckpointInfo
) -> Rope:
    """The :class:`Rope` transformers builds for ``params`` (a ``rope_parameters`` dict, or the
    older ``rope_scaling`` + top-level ``rope_theta``): default, linear, llama3, longrope (su)."""
    import torch

    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    dim = int(head_dim * partial)
    kind = params.get("rope_type", params.get("type", "default"))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (theta**exponents)
    if kind == "default":
        return Rope(inv_freq, dim)
    if kind == "linear":
        return Rope(inv_freq / float(params["factor"]), dim)
    if kind == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        return Rope(torch.where(medium, smoothed, scaled), dim)
    if kind in ("longrope", "su"):
        original, factor = context_scaling(params, config, "longrope", where)
        original = int(original)
        attention = params.get("attention_factor")
        if attention is None:
            # LongRoPE's recommended attention scaling, as transformers computes it.
            attention = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            )
        short = torch.tensor(params["short_factor"], dtype=torch.float32)
        long = torch.tensor(params["long_factor"], dtype=torch.float32)
        base = theta**exponents
        return Rope(1.0 / (short * base), dim, float(attention), 1.0 / (long * base), original)
    if kind == "yarn":
        return yarn_rope(params, config, theta, dim, where)
    raise where.config_error(
        f"rope type {kind!r} is not supported by the decoder export module "
        "(supported: default, linear, llama3, longrope, yarn)"
    )


def context_scaling(
    params: Mapping[str, Any], config: Mapping[str, Any], kind: str, where: CheckpointInfo
) -> tuple[Any, Any]:
    """(original context, scaling factor) of a context-extending rope: the factor defaults to
    ``max_position_embeddings / original``, as transformers computes it."""
    original = params.get(
        "original_max_position_embeddings", config.get("original_max_position_embeddings")
    )
    if original is None:
        raise where.config_error(f"{kind} needs 'original_max_position_embeddings'")
    factor = params.get("factor")
    if factor is None:
        factor = float(config.get("max_position_embeddings", original)) / int(original)
    return original, factor


def yarn_rope(
    params: Mapping[str, Any],
    config: Mapping[str, Any],
    theta: float,
    dim: int,
    where: CheckpointInfo,
) -> Rope:
    """YaRN (transformers' ``_compute_yarn_parameters``): interpolated frequencies below the
    correction range, extrapolated above it, a linear ramp between; cos/sin scaled by the
    attention factor (from ``mscale``/``mscale_all_dim`` when the config does not give it)."""
    import torch

    original, factor = context_scaling(params, config, "yarn", where)
    original, factor = float(original), float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    base = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate
    return Rope(inv_freq, dim, float(attention))


def no_rope() -> Rope:
    """The "rope" of a layer without positional rotation (SmolLM3's NoPE layers)."""
    import torch

    return Rope(torch.zeros(0), 0)


def rotate(x: Any, position_ids: Any, rope: Rope, inv_freq: Any, long_inv_freq: Any) -> Any:
    """Rotary embedding of x [b, h, s, d] (HF's half-split layout) over its first ``rope.dim``
    channels; the rest pass through (partial rotary)."""
    import torch

    from loraformat.architecture.modules import apply_rotary

    if rope.dim == 0:
        return x
    if long_inv_freq is not None:
        # LongRoPE picks one frequency set for the whole call from the highest position, like
        # transformers' longrope_frequency_update: a where, not a branch, so it stays traceable.
        longer = position_ids.max() + 1 > rope.threshold
        inv_freq = torch.where(longer, long_inv_freq, inv_freq)
    if rope.dim == x.shape[-1]:
        return apply_rotary(x, position_ids, inv_freq, rope.scaling)
    rotated = apply_rotary(x[..., : rope.dim], position_ids, inv_freq, rope.scaling)
    return torch.cat((rotated, x[..., rope.dim :]), dim=-1)


# -- the family description -----------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderSpec:
    """Everything that distinguishes one decoder family's export module from another's.

    ``windows[i]``: layer i's sliding window (keys with ``query_pos - key_pos < window``), None
    for full attention. ``rope_of[i]``: the key in ``ropes`` layer i uses (a :func:`no_rope`
    entry leaves the layer's q/k unrotated).

    The fields after ``final_softcap`` (:data:`EXTENSIONS`) describe pieces the families of
    issue 25 added; their defaults leave every earlier family's module unchanged, and a consumer
    that knows only the earlier fields (the ONNX emitter) must treat a spec whose
    :meth:`extensions` is non-empty (which also flags a :func:`no_rope` layer) as one it does
    not support:

    ``block_norms``: the RMSNorm module names of a block, placed (before attention, after
    attention, before the MLP, after the MLP); None at a place means no norm there. None as a
    whole derives them from ``sandwich_norm``: LLaMA's pre-norms, or Gemma's four. OLMo 2
    normalises only the sublayer outputs (:data:`POST_NORMS`).
    ``qk_norm_span``: what the q/k norms normalise: ``"head"`` (each head, Qwen3 and Gemma 3)
    or ``"projection"`` (the whole q and k projections before the head split, OLMo 2).
    ``query_scale``: a function of ``position_ids`` [b, s] giving a factor [b, 1, s, 1] the
    rotated queries are multiplied by (Ministral 3's position-dependent attention temperature,
    :func:`llama4_query_scale`).
    ``residual_scale``: sublayer outputs are multiplied by it before the residual add
    (Granite's ``residual_multiplier``).
    ``logits_divisor``: the logits are divided by it (Granite's ``logits_scaling``).
    """

    family: str
    n_layer: int
    n_head: int
    n_kv: int
    head_dim: int
    eps: float
    ropes: Mapping[str, Rope]
    rope_of: tuple[str, ...]
    windows: tuple[int | None, ...]
    activation: str = "silu"
    fused_qkv: bool = False
    fused_gate_up: bool = False
    qk_norm: bool = False
    gemma_norm: bool = False  # RMSNorm scales by (1 + w), computed in fp32 (Gemma)
    sandwich_norm: bool = False  # norms after attention/MLP and before the MLP (Gemma 2/3)
    embed_scale: float | None = None
    attn_scale: float | None = None  # default head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    block_norms: tuple[str | None, str | None, str | None, str | None] | None = None
    qk_norm_span: str = "head"
    query_scale: Callable[[Any], Any] | None = None
    residual_scale: float | None = None
    logits_divisor: float | None = None

    def extensions(self) -> tuple[str, ...]:
        """The :data:`EXTENSIONS` fields this spec sets away from their defaults, and
        ``"no_rope"`` where a layer's rope is :func:`no_rope`."""
        changed = tuple(
            f.name
            for f in fields(self)
            if f.name in EXTENSIONS and getattr(self, f.name) != f.default
        )
        return changed + (("no_rope",) if any(r.dim == 0 for r in self.ropes.values()) else ())

    def norms(self) -> tuple[str | None, str | None, str | None, str | None]:
        """``block_norms``, or the placement ``sandwich_norm`` implies."""
        if self.block_norms is not None:
            return self.block_norms
        return SANDWICH_NORMS if self.sandwich_norm else PRE_NORMS


#: The DecoderSpec fields added for issue 25's families (see DecoderSpec).
EXTENSIONS = ("block_norms", "qk_norm_span", "query_scale", "residual_scale", "logits_divisor")
#: Block norm placements (before attention, after attention, before MLP, after MLP).
PRE_NORMS = ("input_layernorm", None, "post_attention_layernorm", None)
SANDWICH_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
POST_NORMS = (None, "post_attention_layernorm", None, "post_feedforward_layernorm")


def llama4_query_scale(beta: float, original: int) -> Callable[[Any], Any]:
    """Ministral 3's query temperature (transformers' ``get_llama_4_attn_scale``):
    ``1 + beta·log(1 + floor(pos / original))`` per position."""
    return functools.partial(_llama4_query_scale, float(beta), int(original))


def _llama4_query_scale(beta: float, original: int, position_ids: Any) -> Any:
    import torch

    scale = 1 + beta * torch.log(1 + torch.floor(position_ids.to(torch.float32) / original))
    return scale[:, None, :, None]


def layer_windows(
    config: Mapping[str, Any],
    n_layer: int,
    window: int | None,
    default_sliding: Callable[[int], bool],
) -> tuple[int | None, ...]:
    """Per layer, ``window`` where the layer slides, else None. The config's ``layer_types``
    decide; without them ``default_sliding(i)`` does."""
    if window is None:
        return (None,) * n_layer
    types = config.get("layer_types")
    if types:
        return tuple(window if t == SLIDING else None for t in types[:n_layer])
    return tuple(window if default_sliding(i) else None for i in range(n_layer))


def layer_kinds(
    config: Mapping[str, Any], n_layer: int, default_sliding: Callable[[int], bool]
) -> tuple[str, ...]:
    """Per layer, ``sliding_attention`` or ``full_attention`` (config's ``layer_types`` first)."""
    types = config.get("layer_types")
    if types:
        return tuple(types[:n_layer])
    return tuple(SLIDING if default_sliding(i) else FULL for i in range(n_layer))


def base_spec(checkpoint: CheckpointInfo, family: str, **options: Any) -> DecoderSpec:
    """A :class:`DecoderSpec` with sizes, eps and a single rope from the config; ``options``
    set or override the family's fields (``windows`` defaults to none)."""
    config = checkpoint.config
    what = f"building the {family} export module"
    n_layer = int(checkpoint.config_value("num_hidden_layers", what=what))
    n_head, n_kv, head_dim = heads(checkpoint, what)
    if "ropes" not in options:
        params = config.get("rope_parameters") or config.get("rope_scaling") or {}
        options["ropes"] = {"": rope_from_config(params, config, head_dim, checkpoint)}
        options["rope_of"] = ("",) * n_layer
    options.setdefault("windows", (None,) * n_layer)
    return DecoderSpec(
        family=family,
        n_layer=n_layer,
        n_head=n_head,
        n_kv=n_kv,
        head_dim=head_dim,
        eps=float(checkpoint.config_value("rms_norm_eps", default=1e-6)),
        **options,
    )


# -- the export module ----------------------------------------------------------------------------


def build(
    spec: DecoderSpec,
    checkpoint: CheckpointInfo,
    tensors: Mapping[str, Any],
    options: ExportOptions,
) -> ExportModel:
    """The export module for ``spec``, loaded from ``tensors`` (state-dict keys = checkpoint
    names), with LLaMA's inputs and outputs (``options.with_past`` adds the KV cache)."""
    import torch
    from torch import nn

    from loraformat.architecture.modules import (
        Dense,
        RMSNorm,
        additive_mask,
        attend,
        attention_mask_4d,
        mask_and_positions,
    )

    GemmaRMSNorm, FinishedDense, TiedFinishedHead = torch_modules()
    names = list(tensors)
    # The embedding first: a multimodal checkpoint's vision tower has layers.N. blocks too.
    prefix = find_prefix(names, r"embed_tokens\.weight$")
    prefix = prefix if prefix is not None else (find_prefix(names, r"layers\.\d+\.") or "")
    family = spec.family
    if prefix + "embed_tokens.weight" not in tensors:
        raise checkpoint.error(f"{family} checkpoint has no {prefix}embed_tokens.weight")
    embed = tensors[prefix + "embed_tokens.weight"]
    vocab, d = int(embed.shape[0]), int(embed.shape[1])
    n_head, n_kv, head_dim = spec.n_head, spec.n_kv, spec.head_dim
    block0 = prefix + "layers.0."
    up_name = "mlp.gate_up_proj" if spec.fused_gate_up else "mlp.up_proj"
    if block0 + up_name + ".weight" not in tensors:
        raise checkpoint.error(f"{family} checkpoint has no {block0}{up_name}.weight")
    inner = int(tensors[block0 + up_name + ".weight"].shape[0]) // (2 if spec.fused_gate_up else 1)
    first_attn = "self_attn.qkv_proj" if spec.fused_qkv else "self_attn.q_proj"
    qkv_bias = block0 + first_attn + ".bias" in tensors
    o_bias = block0 + "self_attn.o_proj.bias" in tensors
    mlp_bias = block0 + "mlp.down_proj.bias" in tensors
    try:
        act = encoder_activation(
            str(checkpoint.config_value("hidden_activation", "hidden_act", default="silu")),
            f"{family} activation",
        )
    except LoraformatError as e:
        raise checkpoint.config_error(e.message) from None
    if checkpoint.config.get("use_bidirectional_attention"):
        raise checkpoint.config_error(f"{family}: bidirectional attention cannot be exported")
    head = head_path(prefix)
    tied = head + ".weight" not in tensors
    if tied and checkpoint.config.get("tie_word_embeddings") is False:
        raise checkpoint.error(
            f"{family} checkpoint has no {head}.weight and tie_word_embeddings is false"
        )
    scale = spec.attn_scale if spec.attn_scale is not None else head_dim**-0.5
    rope_keys = sorted(spec.ropes)
    windows = sorted({w for w in spec.windows if w is not None})
    norm_names = spec.norms()
    placed = [name for name in norm_names if name is not None]

    def norm(dim: int) -> nn.Module:
        return GemmaRMSNorm(dim, spec.eps) if spec.gemma_norm else RMSNorm(dim, spec.eps)

    class Rotary(nn.Module):
        """The rope tables, not persistent: derived from the config, not checkpoint tensors."""

        def __init__(self) -> None:
            super().__init__()
            for i, key in enumerate(rope_keys):
                rope = spec.ropes[key]
                self.register_buffer(f"inv_freq_{i}", rope.inv_freq.clone(), persistent=False)
                if rope.long_inv_freq is not None:
                    long = rope.long_inv_freq.clone()
                    self.register_buffer(f"long_inv_freq_{i}", long, persistent=False)

        def tables(self, key: str) -> tuple[Any, Any]:
            i = rope_keys.index(key)
            return getattr(self, f"inv_freq_{i}"), getattr(self, f"long_inv_freq_{i}", None)

    class Attention(nn.Module):
        def __init__(self, rope: Rope) -> None:
            super().__init__()
            self.rope = rope
            q, kv = n_head * head_dim, n_kv * head_dim
            if spec.fused_qkv:
                self.qkv_proj = Dense(d, q + 2 * kv, bias=qkv_bias)
            else:
                self.q_proj = Dense(d, q, bias=qkv_bias)
                self.k_proj = Dense(d, kv, bias=qkv_bias)
                self.v_proj = Dense(d, kv, bias=qkv_bias)
            self.o_proj = Dense(q, d, bias=o_bias)
            if spec.qk_norm:
                whole = spec.qk_norm_span == "projection"
                self.q_norm = norm(q if whole else head_dim)
                self.k_norm = norm(kv if whole else head_dim)

        def forward(self, x, mask_bias, position_ids, tables, past):
            b, s, _ = x.shape
            if spec.fused_qkv:
                q, k, v = self.qkv_proj(x).split(
                    (n_head * head_dim, n_kv * head_dim, n_kv * head_dim), dim=-1
                )
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            if spec.qk_norm and spec.qk_norm_span == "projection":
                q, k = self.q_norm(q), self.k_norm(k)
            q = q.reshape(b, s, n_head, head_dim)
            k = k.reshape(b, s, n_kv, head_dim)
            if spec.qk_norm and spec.qk_norm_span == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = v.reshape(b, s, n_kv, head_dim).transpose(1, 2)
            q = rotate(q, position_ids, self.rope, *tables)
            k = rotate(k, position_ids, self.rope, *tables)
            if spec.query_scale is not None:
                q = q * spec.query_scale(position_ids).to(q.dtype)
            if past is not None:
                k = torch.cat((past[0], k), dim=-2)
                v = torch.cat((past[1], v), dim=-2)
            if spec.attn_softcap is None:
                out = attend(q, k, v, mask_bias, scale)
            else:
                out = softcapped_attend(q, k, v, mask_bias, scale, spec.attn_softcap)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, n_head * head_dim)), (k, v)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if spec.fused_gate_up:
                self.gate_up_proj = Dense(d, 2 * inner, bias=mlp_bias)
            else:
                self.gate_proj = Dense(d, inner, bias=mlp_bias)
                self.up_proj = Dense(d, inner, bias=mlp_bias)
            self.down_proj = Dense(inner, d, bias=mlp_bias)

        def forward(self, x):
            if spec.fused_gate_up:
                gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            else:
                gate, up = self.gate_proj(x), self.up_proj(x)
            return self.down_proj(act(gate) * up)

    class Layer(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.rope_key, self.window = spec.rope_of[i], spec.windows[i]
            self.self_attn = Attention(spec.ropes[self.rope_key])
            self.mlp = MLP()
            for name in placed:
                self.add_module(name, norm(d))

        def normed(self, place: int, x):
            name = norm_names[place]
            return x if name is None else getattr(self, name)(x)

        def residual(self, x, out):
            return x + (out if spec.residual_scale is None else out * spec.residual_scale)

        def forward(self, x, mask_bias, position_ids, tables, past):
            a, present = self.self_attn(self.normed(0, x), mask_bias, position_ids, tables, past)
            x = self.residual(x, self.normed(1, a))
            m = self.normed(3, self.mlp(self.normed(2, x)))
            return self.residual(x, m), present

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, d)
            self.layers = nn.ModuleList(Layer(i) for i in range(spec.n_layer))
            self.norm = norm(d)
            self.rotary_emb = Rotary()

        def embedding_weight(self):
            return self.embed_tokens.weight

        def hidden(self, input_ids, attention_mask, position_ids, pairs):
            b, s = input_ids.shape
            past_len = pairs[0][0].shape[2] if pairs[0] is not None else 0
            attention_mask, position_ids = mask_and_positions(
                attention_mask, position_ids, b, s, past_len, input_ids.device
            )
            allowed = attention_mask_4d(attention_mask, b, s, past_len, input_ids.device)
            # One additive mask per distinct window, built once per forward.
            masks = {None: additive_mask(allowed)}
            for w in windows:
                masks[w] = additive_mask(allowed & window_allowed(s, past_len, w, input_ids.device))
            tables = {key: self.rotary_emb.tables(key) for key in rope_keys}
            x = self.embed_tokens(input_ids)
            if spec.embed_scale is not None:
                x = x * torch.tensor(spec.embed_scale, dtype=x.dtype)
            presents = []
            for layer, past in zip(self.layers, pairs, strict=True):
                x, present = layer(
                    x, masks[layer.window], position_ids, tables[layer.rope_key], past
                )
                presents.append(present)
            return self.norm(x), presents

    body = Body()
    finish = logits_finish(spec)
    if finish is None:
        lm_head = None if tied else Dense(d, vocab, bias=head + ".bias" in tensors)
    elif tied:
        lm_head = TiedFinishedHead(body.embed_tokens, finish)
    else:
        lm_head = FinishedDense(d, vocab, finish, bias=head + ".bias" in tensors)
    module = causal_lm(body, prefix, lm_head, options.with_past, spec.n_layer, head)
    try:
        load_tensors(module, tensors, f"{family} checkpoint")
    except LoraformatError as e:
        raise checkpoint.error(e.message) from None  # name the checkpoint file
    dtype = next(module.parameters()).dtype
    return decoder_export_model(
        module, spec.n_layer, n_kv, head_dim, options.with_past, vocab, dtype
    )


def logits_finish(spec: DecoderSpec) -> Callable[[Any], Any] | None:
    """What the logits pass through after the head: Granite's divisor, then Gemma's soft-cap;
    None when neither."""
    if spec.logits_divisor is None and spec.final_softcap is None:
        return None
    return functools.partial(_finish_logits, spec.logits_divisor, spec.final_softcap)


def _finish_logits(divisor: float | None, cap: float | None, logits: Any) -> Any:
    import torch

    if divisor is not None:
        logits = logits / divisor
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def window_allowed(seq: int, past: Any, window: int, device: Any) -> Any:
    """[1, 1, seq, past+seq]: True where key j is within ``window`` of query i (absolute
    position ``past + i``): ``j > past + i - window``, as transformers' sliding-window overlay."""
    import torch

    q_pos = torch.arange(seq, device=device) + past
    k_pos = torch.arange(seq + past, device=device)
    return (k_pos[None, :] > q_pos[:, None] - window)[None, None, :, :]


def softcapped_attend(q: Any, k: Any, v: Any, mask_bias: Any, scale: float, cap: float) -> Any:
    """:func:`attend` with Gemma 2's score soft-cap ``cap·tanh(s/cap)`` before the mask."""
    import torch

    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    probs = torch.softmax(scores + mask_bias, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


@functools.cache
def torch_modules() -> tuple[Any, Any, Any]:
    """(GemmaRMSNorm, FinishedDense, TiedFinishedHead), built on first use so that importing a
    plugin never imports torch."""
    import torch
    from torch import nn

    from loraformat.architecture.modules import Dense

    class GemmaRMSNorm(nn.Module):
        """Gemma's RMSNorm: ``x / rms(x) · (1 + w)``, all in fp32, then cast back (the
        checkpoint stores w around 0)."""

        def __init__(self, dim: int, eps: float) -> None:
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.zeros(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return (h * (1.0 + self.weight.to(torch.float32))).to(x.dtype)

    class FinishedDense(Dense):
        """An untied ``lm_head`` whose logits pass through ``finish`` (a soft-cap, a divisor).
        Still a :class:`Dense`, so it can carry a LoRA slot."""

        def __init__(self, d: int, vocab: int, finish: Callable, bias: bool = False) -> None:
            super().__init__(d, vocab, bias=bias)
            self.finish = finish

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.finish(super().forward(x))

    class TiedFinishedHead(nn.Module):
        """Logits from the embedding table, passed through ``finish``. The embedding is held
        without being registered, so the state dict has no ``lm_head`` key (the checkpoint has
        none)."""

        def __init__(self, embedding: nn.Module, finish: Callable) -> None:
            super().__init__()
            object.__setattr__(self, "embedding", embedding)
            self.finish = finish

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.finish(x @ self.embedding.weight.t())

    return GemmaRMSNorm, FinishedDense, TiedFinishedHead


# -- the family base class ------------------------------------------------------------------------


class DecoderFamily(ArchitectureBase):
    """An :class:`ArchitectureBase` for a family built on :func:`build`: a subclass sets the data
    (``id``, ``description``, ``model_types``, ``classes``, ``projections``, ``names``,
    ``targets``, ``gguf_architecture``, ``ort_model_type``) and writes :meth:`spec` and
    :meth:`detect_tensors`."""

    #: config ``model_type`` values and ``architectures`` class names that are this family.
    model_types: ClassVar[tuple[str, ...]] = ()
    classes: ClassVar[tuple[str, ...]] = ()
    #: Block projection suffixes that can carry an adapter, in checkpoint order.
    projections: ClassVar[tuple[str, ...]] = SPLIT_ATTENTION + SPLIT_MLP
    #: Whether llama.cpp converts the family through LlamaModel, which permutes the q/k rows.
    llama_cpp_permutes: ClassVar[bool] = False

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        said = model_type(checkpoint, self.model_types, self.classes)
        if said is not None:
            return said
        # No config: only the tensors can tell, and only for families whose tensors differ.
        return bool(checkpoint.shapes) and self.detect_tensors(checkpoint)

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        """Whether tensor names alone prove the family (False when they cannot)."""
        return False

    def parts(self, checkpoint: CheckpointInfo) -> dict[str, tuple[FusedPart, ...]]:
        """The fused parts of a projection suffix (none unless the family fuses)."""
        return {}

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        return dense_layers(checkpoint, self.projections, self.parts(checkpoint))

    def row_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        if self.llama_cpp_permutes and convention == "gguf":
            return llama_cpp_qk_permutation(checkpoint, layer_path)
        return None

    def model_shape(self, checkpoint: CheckpointInfo) -> ModelShape | None:
        return shape_of(language_model(checkpoint))

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        """The family's description, from the language model's config (see
        :func:`language_model`: called with that, never with a multimodal config)."""
        raise NotImplementedError

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        text = language_model(checkpoint)
        return build(self.spec(text), text, tensors, options)

    def layer_repeat(self, checkpoint: CheckpointInfo) -> LayerRepeat | None:
        # A layer's graph depends on its index only through its window and its rope.
        spec = self.spec(language_model(checkpoint))
        depth = "num_hidden_layers"
        if language_model(checkpoint) is not checkpoint:
            depth = "text_config." + depth
        return LayerRepeat(tuple(zip(spec.windows, spec.rope_of, strict=True)), depth)
