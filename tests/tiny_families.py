"""Tiny, randomly initialised checkpoints for the decoder families of issue 13 (no downloads).

Each builder saves a ``*ForCausalLM`` with ``save_pretrained`` and returns the directory. Norm
weights and biases are randomised after init: transformers initialises them to constants (Gemma's
``(1 + w)`` norms to w = 0), which would hide a wrong norm or a dropped bias.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

VOCAB = 96
HIDDEN = 32
#: Every projection of each family (PEFT target_modules for "an adapter on every projection").
PROJECTIONS = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}
#: Issue 25's families with the shared decoder description.
FAMILIES_25 = ("olmo2", "olmo3", "smollm3", "granite", "ministral3")
for _family in ("llama", "qwen3", "mistral", "gemma2", "gemma3", *FAMILIES_25):
    PROJECTIONS[_family] = PROJECTIONS["qwen2"]
FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", *FAMILIES_25)
COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)


def _save(model: Any, out: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    return out


def qwen2(
    out: Path,
    *,
    layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    sliding_window: int | None = None,
) -> Path:
    """Qwen2 with q/k/v biases and GQA; tied embeddings as Qwen2.5-0.5B has them. With
    ``sliding_window``, the layers from the second on slide (use_sliding_window,
    max_window_layers=1)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    window = {}
    if sliding_window is not None:
        window = dict(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1)
    config = Qwen2Config(
        num_hidden_layers=layers, tie_word_embeddings=tie_word_embeddings, **window, **COMMON
    )
    return _save(Qwen2ForCausalLM(config), out, seed)


def qwen3(out: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Qwen3 with q/k norms and an explicit head_dim (16) that is not hidden / heads (8)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        num_hidden_layers=layers, head_dim=16, tie_word_embeddings=False, **COMMON
    )
    return _save(Qwen3ForCausalLM(config), out, seed)


def mistral(out: Path, *, layers: int = 2, seed: int = 0, sliding_window: int = 4) -> Path:
    """Mistral with a sliding window (4 tokens by default: tests run longer sequences)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        num_hidden_layers=layers, sliding_window=sliding_window, tie_word_embeddings=False,
        **COMMON,
    )
    return _save(MistralForCausalLM(config), out, seed)


def gemma2(out: Path, *, layers: int = 2, seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """Gemma 2 with sliding (even) and global (odd) layers, a 4-token window, soft-caps small
    enough to change the result, and query_pre_attn_scalar ≠ head_dim; tied like Gemma 2's
    releases unless told otherwise."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(
        num_hidden_layers=layers, head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
        attn_logit_softcapping=0.05, final_logit_softcapping=2.0,
        tie_word_embeddings=tie_word_embeddings, **COMMON,
    )
    return _save(Gemma2ForCausalLM(config), out, seed)


def gemma3(out: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Gemma 3 text with a sliding layer then a global one, each with its own rope (local base
    10k; global base 1M with linear scaling), q/k norms and a 4-token window."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        num_hidden_layers=layers, head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2) + (
            ["sliding_attention"] if layers % 2 else []
        ),
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
        },
        **COMMON,
    )
    return _save(Gemma3ForCausalLM(config), out, seed)


def phi3(out: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Phi-3 with fused projections, GQA, partial rotary (half the head) and LongRoPE whose
    original context is 8 tokens, so tests cross the short→long factor switch."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    rotary_half = HIDDEN // 4 // 2 // 2  # head 8, rotary 4 channels → 2 frequencies
    config = Phi3Config(
        num_hidden_layers=layers, original_max_position_embeddings=8, tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0 + 0.5 * i for i in range(rotary_half)],
            "long_factor": [3.0 + 2.0 * i for i in range(rotary_half)],
            "original_max_position_embeddings": 8,
        },
        **COMMON,
    )
    return _save(Phi3ForCausalLM(config), out, seed)


def olmo2(out: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """OLMo 2: post-sublayer norms, q/k norms over the whole projection, untied head."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(seed)
    config = Olmo2Config(num_hidden_layers=layers, tie_word_embeddings=False, **COMMON)
    return _save(Olmo2ForCausalLM(config), out, seed)


def olmo3(out: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """OLMo 3: a sliding layer (4-token window, default rope) then a full one whose rope is
    YaRN over an original context of 8 tokens."""
    from transformers import Olmo3Config, Olmo3ForCausalLM

    torch.manual_seed(seed)
    config = Olmo3Config(
        num_hidden_layers=layers, sliding_window=4, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2) + (
            ["sliding_attention"] if layers % 2 else []
        ),
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {
                "rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                "original_max_position_embeddings": 8, "attention_factor": 1.2,
                "beta_fast": 32.0, "beta_slow": 1.0,
            },
        },
        **COMMON,
    )
    return _save(Olmo3ForCausalLM(config), out, seed)


def smollm3(out: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """SmolLM3: the second layer attends without rope (no_rope_layers [1, 0]); tied head."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(seed)
    config = SmolLM3Config(
        num_hidden_layers=layers, no_rope_layers=[1, 0] * (layers // 2) + [1] * (layers % 2),
        **COMMON,
    )
    return _save(SmolLM3ForCausalLM(config), out, seed)


def granite(out: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Granite with all four multipliers away from 1 and a tied head, as Granite 3 ties."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    config = GraniteConfig(
        num_hidden_layers=layers, embedding_multiplier=2.0, residual_multiplier=0.7,
        attention_multiplier=0.3, logits_scaling=2.0, tie_word_embeddings=True, **COMMON,
    )
    return _save(GraniteForCausalLM(config), out, seed)


#: Ministral 3's YaRN rope and query temperature over an original context of 8 tokens.
MINISTRAL3_ROPE = {
    "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
    "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
    "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5,
}


def ministral3(out: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Ministral 3: YaRN and the query temperature over an original context of 8 tokens (so
    tests cross it), untied head."""
    from transformers import Ministral3Config, Ministral3ForCausalLM

    torch.manual_seed(seed)
    config = Ministral3Config(
        num_hidden_layers=layers, tie_word_embeddings=False,
        rope_parameters=MINISTRAL3_ROPE,
        **COMMON,
    )
    return _save(Ministral3ForCausalLM(config), out, seed)


BUILDERS = {f: globals()[f] for f in FAMILIES}


def load_transformers(path: Path) -> Any:
    """The transformers model for a checkpoint built above, in eval mode, eager attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def peft_adapter(base: Path, family: str, out: Path, seed: int = 1, **lora: Any) -> Path:
    """A PEFT LoRA adapter on every projection of ``family``, random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    model = load_transformers(base)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("init_lora_weights", False)
    lora.setdefault("target_modules", PROJECTIONS[family])
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    return out


def mistral3_multimodal(out: Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Mistral3ForConditionalGeneration: :func:`ministral3`'s decoder as the language model
    (``model.language_model.``) beside a one-layer Pixtral vision tower and its projector, whose
    attention and MLP projections have the same suffixes as the decoder's."""
    from transformers import (
        Ministral3Config,
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralVisionConfig,
    )

    torch.manual_seed(seed)
    text = Ministral3Config(
        num_hidden_layers=layers, tie_word_embeddings=False,
        rope_parameters=MINISTRAL3_ROPE,
        **COMMON,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16, head_dim=8,
    )
    config = Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=VOCAB - 1,
        spatial_merge_size=1, tie_word_embeddings=False,
    )
    return _save(Mistral3ForConditionalGeneration(config), out, seed)


def opened(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """A saved checkpoint as a plugin sees it (``CheckpointInfo``) and its tensors (torch)."""
    from loraformat.architecture.protocol import CheckpointInfo
    from loraformat.checkpoint import Checkpoint

    with Checkpoint(path) as c:
        tensors = {n: torch.tensor(np.array(a)) for n, a in c.items()}
        return CheckpointInfo(path, c.config, c.shapes()), tensors
