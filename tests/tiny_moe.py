"""Tiny, randomly initialised mixture-of-experts checkpoints and PEFT adapters on them.

Weights are drawn with ``initializer_range`` 0.2 (transformers' 0.02 would make attention and
routing near-uniform, hiding a wrong expert or a transposed weight); norms are randomised.
Adapters come from real PEFT: ``target_modules`` on attention (and the router where PEFT can wrap
it as a module), ``target_parameters`` on the stacked experts, lora weights scaled up so that the
merged model differs clearly from the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe")
EXPERTS = 4
COMMON = dict(
    vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, initializer_range=0.2, num_hidden_layers=2,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A fresh ``*ForCausalLM`` of ``family`` (eval mode); ``overrides``: config values."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**{
            **dict(intermediate_size=64, moe_intermediate_size=24, num_experts=EXPERTS,
                   num_experts_per_tok=2, head_dim=16, decoder_sparse_step=1,
                   mlp_only_layers=[]),
            **COMMON, **overrides,
        })
        m = tf.Qwen3MoeForCausalLM(config)
    elif family == "qwen2_moe":
        config = tf.Qwen2MoeConfig(**{
            **dict(intermediate_size=64, moe_intermediate_size=24,
                   shared_expert_intermediate_size=40, num_experts=EXPERTS,
                   num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
            **COMMON, **overrides,
        })
        m = tf.Qwen2MoeForCausalLM(config)
    elif family == "mixtral":
        config = tf.MixtralConfig(**{
            **dict(intermediate_size=24, num_local_experts=EXPERTS, num_experts_per_tok=2),
            **COMMON, **overrides,
        })
        m = tf.MixtralForCausalLM(config)
    else:
        config = tf.GptOssConfig(**{
            **dict(intermediate_size=24, num_local_experts=EXPERTS, num_experts_per_tok=2,
                   head_dim=16, sliding_window=4,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            **COMMON, **overrides,
        })
        m = tf.GptOssForCausalLM(config)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith(("bias", "sinks")):
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def checkpoint(family: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model(family, seed, **overrides).save_pretrained(out)
    return out


def peft_adapter(
    family: str, base: Path, out: Path, *, seed: int = 1, **lora: Any
) -> tuple[Path, Any]:
    """A PEFT adapter on ``base`` saved to ``out``; returns (out, the PeftModel)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    modules = ["q_proj", "v_proj", "o_proj"]
    parameters = list(EXPERT_PARAMETERS)
    if family == "gpt_oss":
        parameters.append("mlp.router.weight")  # GptOssTopKRouter is no nn.Linear
    else:
        modules.append("gate")  # the router: PEFT wraps its weight itself
    if family == "qwen2_moe":
        modules += ["shared_expert.up_proj", "shared_expert.down_proj"]
    options: dict[str, Any] = dict(
        r=2, lora_alpha=5, target_modules=modules, target_parameters=parameters,
        init_lora_weights=False,
    )
    options.update(lora)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(**options)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(out)
    return out, peft_model.eval()


def logits(model_or_path: Any, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = model_or_path
    if isinstance(m, (str, Path)):
        m = AutoModelForCausalLM.from_pretrained(m)
    with torch.no_grad():
        return m.eval()(ids).logits


def assert_same_peft_tensors(original: Path, back: Path) -> None:
    """Two PEFT adapter directories hold the same tensor names and bit-identical values."""
    import numpy as np
    from safetensors.numpy import load_file

    first = load_file(original / "adapter_model.safetensors")
    second = load_file(back / "adapter_model.safetensors")
    assert sorted(first) == sorted(second)
    for key, value in first.items():
        np.testing.assert_array_equal(second[key], value, err_msg=key)


def disguise(base: Path, adapter: Path, out: Path) -> tuple[Path, Path]:
    """(checkpoint, PEFT adapter) as if made on a model no installed plugin knows: ``base`` under
    ``model_type`` "toy_moe", and ``adapter`` saying it was trained on that model (PEFT's
    ``auto_mapping``), as a PEFT adapter of such a model would."""
    import json
    import shutil

    toy, toy_adapter = out / "toy", out / "toy_peft"
    toy.mkdir(parents=True)
    shutil.copy(base / "model.safetensors", toy / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="toy_moe", architectures=["ToyMoeForCausalLM"])
    (toy / "config.json").write_text(json.dumps(config))
    shutil.copytree(adapter, toy_adapter)
    settings = json.loads((toy_adapter / "adapter_config.json").read_text())
    settings["auto_mapping"] = {"base_model_class": "ToyMoeForCausalLM",
                                "parent_library": "transformers.models.toy_moe.modeling_toy_moe"}
    (toy_adapter / "adapter_config.json").write_text(json.dumps(settings))
    return toy, toy_adapter

