"""A decoder family as data: :class:`DecoderSpec`, the per-layer kinds, and the state each layer
carries between calls (:class:`LayerCache`).

Torch-free: the emitter, ``generate``, the GenAI config writer and the torch export module
(:mod:`.blocks`) all read the same description.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from loraformat.architecture.protocol import CheckpointInfo

from .config import heads
from .rope import Rope, rope_from_config

#: Layer kinds: attention over every earlier position, over a sliding window, and linear
#: attention (a fixed-size recurrent state). A family may name kinds of its own.
FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"
#: The symbols a :class:`CacheTensor`'s dims may hold besides sizes.
BATCH, PAST = "batch", "past"


@dataclass(frozen=True)
class CacheTensor:
    """One tensor a layer carries from one call to the next: graph input
    ``past_key_values.<layer>.<name>``, output ``present.<layer>.<name>``.

    ``dims`` holds sizes and the symbols ``"batch"`` and ``"past"``. A tensor with a ``"past"``
    axis grows along it by the call's new positions (attention keys and values: the output's
    axis is the past's plus the sequence); one without is a fixed-size state the output replaces
    (a convolution window, a recurrent state).
    """

    name: str
    dims: tuple[int | str, ...]

    @property
    def grows(self) -> bool:
        return PAST in self.dims


@dataclass(frozen=True)
class LayerCache:
    """The state of one layer: its tensors, in the order its mixer takes them as ``past`` and
    returns them as ``present``. ``()`` for a layer that keeps none (one that reads another
    layer's keys and values)."""

    tensors: tuple[CacheTensor, ...]


def kv_cache(n_kv: int, head_dim: int) -> LayerCache:
    """Attention's cache: ``key`` and ``value`` [batch, n_kv, past, head_dim]."""
    dims = (BATCH, n_kv, PAST, head_dim)
    return LayerCache((CacheTensor("key", dims), CacheTensor("value", dims)))


@dataclass(frozen=True)
class DecoderSpec:
    """Everything that distinguishes one decoder family's export module from another's.

    ``windows[i]``: layer i's sliding window (keys with ``query_pos - key_pos < window``), None
    for full attention. ``rope_of[i]``: the key in ``ropes`` layer i uses (a :func:`no_rope`
    entry leaves the layer's q/k unrotated).

    The fields after ``final_softcap`` (:data:`EXTENSIONS`) describe pieces later families added;
    their defaults leave every earlier family's module unchanged, and a consumer that knows only
    the earlier fields (the ONNX emitter) must treat a spec that sets any of them (see
    :meth:`extensions`, which also flags a :func:`no_rope` layer) as one it does not support:

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
    ``layer_kinds``: per layer, the kind of its token mixer (:data:`FULL`, :data:`SLIDING`,
    :data:`LINEAR` or a family's own), which picks the mixer block
    (:class:`~loraformat.architecture.decoder.blocks.Blocks`); None: full or sliding as
    ``windows`` says.
    ``layer_shapes``: per layer, (query heads, KV heads, head size) where it differs from the
    spec-wide ``n_head``, ``n_kv``, ``head_dim`` (None for a layer that does not).
    ``caches``: per layer, the state it carries between calls; None: every layer attention's
    keys and values of its shape (:func:`kv_cache`).
    ``extras``: family-specific settings its own blocks read (sizes of a linear attention,
    per-layer inputs); the core never interprets them.
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
    layer_kinds: tuple[str, ...] | None = None
    layer_shapes: tuple[tuple[int, int, int] | None, ...] | None = None
    caches: tuple[LayerCache, ...] | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    def extensions(self) -> tuple[str, ...]:
        """The :data:`EXTENSIONS` fields this spec sets away from their defaults, and
        ``"no_rope"`` where a layer's rope is :func:`no_rope`."""
        changed = tuple(fields_changed(self, EXTENSIONS.__contains__))
        no_rope_layer = any(r.dim == 0 for r in self.ropes.values())
        return changed + (("no_rope",) if no_rope_layer else ())

    def norms(self) -> tuple[str | None, str | None, str | None, str | None]:
        """``block_norms``, or the placement ``sandwich_norm`` implies."""
        if self.block_norms is not None:
            return self.block_norms
        return SANDWICH_NORMS if self.sandwich_norm else PRE_NORMS

    def kind_of(self, layer: int) -> str:
        """Layer ``layer``'s mixer kind."""
        if self.layer_kinds is not None:
            return self.layer_kinds[layer]
        return FULL if self.windows[layer] is None else SLIDING

    def shape_of_layer(self, layer: int) -> tuple[int, int, int]:
        """(query heads, KV heads, head size) of layer ``layer``."""
        own = self.layer_shapes[layer] if self.layer_shapes is not None else None
        return own if own is not None else (self.n_head, self.n_kv, self.head_dim)

    def layer_caches(self) -> tuple[LayerCache, ...]:
        """Per layer, the state it carries between calls."""
        if self.caches is not None:
            return self.caches
        return tuple(kv_cache(*self.shape_of_layer(i)[1:]) for i in range(self.n_layer))

    def layer_signatures(self) -> tuple[tuple[Any, ...], ...]:
        """Per layer, what its graph depends on besides its index and weights (kind, window,
        rope, shape, cache): two layers of equal signature trace to the same graph (the traced
        path's layer repeat relies on it)."""
        caches = self.layer_caches()
        return tuple(
            (self.kind_of(i), self.windows[i], self.rope_of[i], self.shape_of_layer(i), caches[i])
            for i in range(self.n_layer)
        )


def fields_changed(obj: Any, asked: Callable[[str], bool]) -> list[str]:
    """The fields of the dataclass ``obj`` that ``asked`` names and whose value is not their
    default (a field without a default always counts). Only those are compared: a field may
    hold an array, whose ``!=`` is not a truth value."""
    changed = []
    for f in fields(obj):
        if not asked(f.name):
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            changed.append(f.name)
            continue
        if getattr(obj, f.name) != default:
            changed.append(f.name)
    return changed


#: The DecoderSpec fields added after the first families (see DecoderSpec).
EXTENSIONS = (
    "block_norms", "qk_norm_span", "query_scale", "residual_scale", "logits_divisor",
    "layer_kinds", "layer_shapes", "caches", "extras",
)
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
