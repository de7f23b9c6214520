"""Tiny, randomly initialised Qwen3.5 checkpoints (no downloads): the text model
(``Qwen3_5ForCausalLM``) and the multimodal ``Qwen3_5ForConditionalGeneration``.

Three Gated DeltaNet layers to one gated full-attention layer, twice the value heads of the
key heads in the linear layers (as the published models have: llama.cpp reorders value heads
then), initializer_range 0.2 so that attention is not near-uniform. Norm weights are randomised
after init (transformers sets them to constants, which would hide a wrong ``(1 + w)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_families import _save

VOCAB = 96
TEXT = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
    linear_value_head_dim=8, linear_conv_kernel_dim=4, max_position_embeddings=128,
    initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
    # A quarter of the 16 head channels rotate (2 frequencies); llama.cpp needs the mrope
    # sections to fit them (its default [11, 11, 10] is the 256-channel heads').
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                     "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0],
                     "mrope_interleaved": True},
)
#: Every projection PEFT's "all-linear" adapts in a text model (the module suffixes).
LINEAR_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def text_config(**overrides: Any) -> Any:
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(**{**TEXT, **overrides})


def qwen3_5(out: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Qwen3_5ForCausalLM: layers linear, linear, linear, full (``full_attention_interval`` 4)."""
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(seed)
    return _save(Qwen3_5ForCausalLM(text_config(**overrides)), out, seed)


def qwen3_5_multimodal(out: Path, *, seed: int = 0) -> Path:
    """Qwen3_5ForConditionalGeneration: :func:`qwen3_5`'s decoder as the language model beside a
    one-block vision tower and its merger (whose ``attn.qkv``/``mlp`` are linear layers too)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
        temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=32,
        num_position_embeddings=16,
    )
    config = Qwen3_5Config(
        text_config=TEXT, vision_config=vision, image_token_id=VOCAB - 1,
        video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4,
        tie_word_embeddings=False,
    )
    return _save(Qwen3_5ForConditionalGeneration(config), out, seed)


def load(path: Path) -> Any:
    """The transformers model saved at ``path`` (text or multimodal), eval, eager attention."""
    import json

    from transformers import AutoModelForCausalLM, Qwen3_5ForConditionalGeneration

    config = json.loads((path / "config.json").read_text())
    cls = Qwen3_5ForConditionalGeneration if "text_config" in config else AutoModelForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def peft_adapter(base: Path, out: Path, seed: int = 1, **lora: Any) -> Path:
    """A PEFT LoRA adapter with ``target_modules="all-linear"`` (every projection of the
    decoder, the head excepted), random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    model = load(base)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("init_lora_weights", False)
    lora.setdefault("target_modules", "all-linear")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path) -> Any:
    """transformers' model of ``base`` with PEFT's merge of ``adapter`` (the reference)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load(base), adapter).merge_and_unload().eval()
