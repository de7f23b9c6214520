"""Tiny, randomly initialised Hugging Face checkpoints built locally (no downloads).

Every builder saves with ``save_pretrained`` (safetensors) and returns the directory. Sizes are
chosen so every test model builds in well under a second; seeds make them reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

HIDDEN = 32


def _save(model: Any, out: Path, max_shard_size: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out


def gpt2(out: Path, *, layers: int = 2, seed: int = 0, max_shard_size: str | None = None) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=96, n_positions=64, n_embd=HIDDEN, n_layer=layers, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=95, eos_token_id=95,
    )
    return _save(GPT2LMHeadModel(config), out, max_shard_size)


def bert(out: Path, *, layers: int = 2, seed: int = 0, num_labels: int = 3) -> Path:
    """BERT with a sequence-classification head."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=96, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return _save(BertForSequenceClassification(config), out)


def llama(
    out: Path,
    *,
    layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    rope_scaling: bool = True,
    max_shard_size: str | None = None,
) -> Path:
    """LLaMA with GQA (4 query heads, 2 KV heads) and llama3-style rope scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {}
    if rope_scaling:
        kwargs["rope_scaling"] = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
        }
    config = LlamaConfig(
        vocab_size=96, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings, **kwargs,
    )
    return _save(LlamaForCausalLM(config), out, max_shard_size)


def vit(out: Path, *, layers: int = 2, seed: int = 0, num_labels: int = 3) -> Path:
    """ViT with an image-classification head (16×16 images, 8×8 patches)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, image_size=16, patch_size=8, num_channels=3, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return _save(ViTForImageClassification(config), out)


BUILDERS = {"gpt2": gpt2, "bert": bert, "llama": llama, "vit": vit}


def load_transformers(path: Path, architecture: str) -> Any:
    """The transformers model for a checkpoint built above, in eval mode."""
    import transformers

    cls = {
        "gpt2": transformers.GPT2LMHeadModel,
        "bert": transformers.BertForSequenceClassification,
        "llama": transformers.LlamaForCausalLM,
        "vit": transformers.ViTForImageClassification,
    }[architecture]
    return cls.from_pretrained(path).eval()


def example_inputs(
    architecture: str, batch: int = 2, seq: int = 7, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if architecture == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 96, (batch, seq), generator=g)}


def peft_adapter(base: Path, architecture: str, out: Path, seed: int = 1, **lora: Any) -> Path:
    """A PEFT LoRA adapter with non-zero random A and B, saved with ``save_pretrained``.

    Note: with transformers 5.x, PEFT sees in-memory module names, which differ from checkpoint
    names for ViT (``vit.layers.N.attention.q_proj`` in memory, ``...attention.attention.query``
    on disk): target ViT with ``["q_proj", "v_proj"]``.
    """
    from peft import LoraConfig, get_peft_model

    model = load_transformers(base, architecture)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("init_lora_weights", False)  # random B: a zero B would test nothing
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    return out


def feed(runner: Any, ids: Any) -> dict[str, Any]:
    """``{"input_ids": ids}`` for an ONNX Runtime session (or onnx ReferenceEvaluator), with an
    all-ones ``attention_mask`` where the graph takes one (a plain decoder export)."""
    import numpy as np

    ids = ids.numpy() if hasattr(ids, "numpy") else np.asarray(ids)
    names = ([i.name for i in runner.get_inputs()] if hasattr(runner, "get_inputs")
             else list(runner.input_names))
    inputs = {"input_ids": ids}
    if "attention_mask" in names:
        inputs["attention_mask"] = np.ones(ids.shape, dtype=np.int64)
    return inputs
