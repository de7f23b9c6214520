"""Tiny, randomly initialised Gemma 4 checkpoints (no downloads): the text model with every
piece its config can switch on, a plain one, and the multimodal class around the text model.

Weights are drawn with ``initializer_range`` 0.1; norm weights and ``layer_scalar`` are moved
away from transformers' constant initialisation (ones), which would hide a dropped norm or a
missing scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 96
#: Every projection PEFT can target in the text model's blocks, and the model-level one.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "per_layer_input_gate", "per_layer_projection", "per_layer_model_projection"]
KINDS = ["sliding_attention", "full_attention"]
ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                       "rope_theta": 1000000.0},
}


def text_config(*, layers: int = 6, full: bool = True, **overrides: Any) -> Any:
    """A Gemma4TextConfig: sliding and full layers alternating (4-token window); with ``full``,
    full-attention layers of head size 16 (sliding: 8) with one KV head and K=V, the last two
    layers KV-shared with double-wide MLPs, 4-wide per-layer inputs, a final soft-cap small
    enough to bend the logits."""
    from transformers import Gemma4TextConfig

    settings: dict[str, Any] = dict(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=32,
        intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, sliding_window=4,
        layer_types=[*(KINDS * layers)[:layers - 1], "full_attention"], rope_parameters=ROPE,
        initializer_range=0.1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, final_logit_softcapping=3.0,
    )
    if full:
        settings.update(num_global_key_value_heads=1, attention_k_eq_v=True,
                        num_kv_shared_layers=2, use_double_wide_mlp=True,
                        hidden_size_per_layer_input=4)
    else:
        settings.update(hidden_size_per_layer_input=0, num_kv_shared_layers=0)
    settings.update(overrides)
    return Gemma4TextConfig(**settings)


def _save(model: Any, out: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if ("norm" in name and p.is_floating_point()) or name.endswith("layer_scalar"):
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    return out


def gemma4(out: Path, *, seed: int = 0, **config: Any) -> Path:
    """Gemma4ForCausalLM of :func:`text_config` (``config`` passed on)."""
    from transformers import Gemma4ForCausalLM

    torch.manual_seed(seed)
    return _save(Gemma4ForCausalLM(text_config(**config)), out, seed)


def gemma4_multimodal(out: Path, *, seed: int = 0) -> Path:
    """Gemma4ForConditionalGeneration: a 4-layer :func:`text_config` decoder (stored under
    ``model.language_model.``) beside a one-layer vision tower whose attention and MLP
    projections have the decoder's suffixes, and its embedder."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4VisionConfig

    torch.manual_seed(seed)
    vision = Gemma4VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, patch_size=4, pooling_kernel_size=1,
        position_embedding_size=64,
    )
    config = Gemma4Config(
        text_config=text_config(layers=4), vision_config=vision, audio_config=None,
        image_token_id=95, boi_token_id=94, eoi_token_id=93, video_token_id=92,
        boa_token_id=91, eoa_token_index=90, audio_token_id=89,
    )
    return _save(Gemma4ForConditionalGeneration(config), out, seed)


def load(path: Path) -> Any:
    """The transformers model of a checkpoint above (either class), eval mode, eager attention."""
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma4ForConditionalGeneration

    if AutoConfig.from_pretrained(path).model_type == "gemma4":
        cls = Gemma4ForConditionalGeneration
    else:
        cls = AutoModelForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def peft_adapter(base: Path, out: Path, targets: Any = tuple(TARGETS), seed: int = 1) -> Path:
    """A PEFT LoRA (rank 4, alpha 16, random A and B) on ``targets`` of ``base``."""
    from peft import LoraConfig, get_peft_model

    model = load(base)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                        target_modules=targets if isinstance(targets, str) else list(targets))
    out.mkdir(parents=True, exist_ok=True)
    get_peft_model(model, config).save_pretrained(out)
    return out


def peft_unmerged(base: Path, adapter: Path) -> Any:
    """PEFT's model of ``adapter`` on ``base`` (each adapted layer adds x·A·B), eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load(base), adapter).eval()


def peft_merged(base: Path, adapter: Path) -> Any:
    """PEFT's own merge of ``adapter`` into ``base`` (``merge_and_unload``), eval mode."""
    return peft_unmerged(base, adapter).merge_and_unload().eval()
