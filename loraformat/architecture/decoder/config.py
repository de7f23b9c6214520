"""What a decoder's config and tensor names say: its sizes, whether it is a given family, where
its language model sits. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loraformat.architecture.protocol import CheckpointInfo, ModelShape

#: The prefix ``*ForCausalLM`` checkpoints put the decoder under (absent in a bare ``*Model``).
PREFIX = "model."


def head_path(prefix: str) -> str:
    """The ``lm_head`` path beside a decoder stored under ``prefix``: ``lm_head`` for
    ``model.`` or none, ``language_model.lm_head`` for a multimodal checkpoint's
    ``language_model.model.``, ``lm_head`` for transformers 5's ``model.language_model.`` (the
    head beside the whole multimodal model, as Qwen3.5 stores it)."""
    if prefix.startswith("model.language_model."):
        return "lm_head"
    return prefix.removesuffix("model.") + "lm_head"


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
