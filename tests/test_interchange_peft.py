"""PEFT interchange against real peft: adapters made by peft with rsLoRA, rank/alpha patterns,
fan_in_fan_out (GPT-2 Conv1D), modules_to_save (classifier heads), bias="all"/"lora_only",
lora_bias, DoRA and embedding LoRA are converted and merged by loraformat; the merged model's
outputs equal PeftModel's (1e-4). And PEFT → loraformat → PEFT gives a directory that
``PeftModel.from_pretrained`` loads to the same outputs, with every LoRA tensor bit-identical."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from safetensors.torch import load_file

from loraformat import interchange
from loraformat.base import open_base
from loraformat.interchange.peft import read_peft
from loraformat.merge import merge_checkpoint

pytestmark = pytest.mark.slow

CASES = {
    "gpt2-rslora-fifo-bias": ("gpt2", dict(
        target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, use_rslora=True,
        r=4, lora_alpha=6, bias="lora_only",
    )),
    "bert-patterns-classifier-bias-all": ("bert", dict(
        target_modules=["query", "value", "dense"], rank_pattern={"value": 2, "output.dense": 3},
        alpha_pattern={"layer.1.attention.self.query": 3, "value": 5},
        modules_to_save=["classifier"], bias="all",
    )),
    "llama-dora": ("llama", dict(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True,
    )),
    "llama-embedding": ("llama", dict(target_modules=["embed_tokens", "gate_proj", "down_proj"])),
    # LLaMA's projections have no bias to merge a lora_bias into: BERT's do.
    "bert-lora-bias": ("bert", dict(target_modules=["key", "intermediate.dense"], lora_bias=True)),
    "vit-classifier": ("vit", dict(
        target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"],
        layers_to_transform=[1],
    )),
}


def make_peft_adapter(base_path, arch, out, seed=3, **lora):
    """A PEFT adapter whose every trainable tensor (LoRA, DoRA magnitude, modules_to_save copies,
    trained biases) is perturbed, so that nothing the conversion drops can go unnoticed."""
    from peft import LoraConfig, get_peft_model

    model = tiny_models.load_transformers(base_path, arch)
    torch.manual_seed(seed)
    lora.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
                if "magnitude" in name:
                    param.abs_()
    peft_model.save_pretrained(out)
    return out


def reference_outputs(base_path, arch, adapter_dir, inputs):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_models.load_transformers(base_path, arch), adapter_dir)
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def model_outputs(path, arch, inputs):
    with torch.no_grad():
        return tiny_models.load_transformers(path, arch)(**inputs).logits


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tiny_checkpoint, tmp_path_factory):
    arch, lora = CASES[request.param]
    base_path = tiny_checkpoint(arch)
    root = tmp_path_factory.mktemp(request.param)
    adapter_dir = make_peft_adapter(base_path, arch, root / "peft", **lora)
    inputs = tiny_models.example_inputs(arch)
    return arch, base_path, root, adapter_dir, inputs, reference_outputs(
        base_path, arch, adapter_dir, inputs
    )


def test_converted_and_merged_equals_peft(case):
    arch, base_path, root, adapter_dir, inputs, expected = case
    with open_base(base_path) as base:
        adapter = read_peft(adapter_dir, base=base)
        adapter.save(root / "converted")
        merge_checkpoint(base, [root / "converted"], root / "merged")
    base_out = model_outputs(base_path, arch, inputs)
    assert (expected - base_out).abs().max() > 1e-3  # the adapter does change the outputs
    torch.testing.assert_close(model_outputs(root / "merged", arch, inputs), expected,
                               rtol=1e-4, atol=1e-4)


def test_peft_to_loraformat_to_peft_loads_in_peft(case):
    arch, base_path, root, adapter_dir, inputs, expected = case
    interchange.convert(adapter_dir, root / "lf", to="loraformat", base=base_path)
    interchange.convert(root / "lf", root / "peft_again", to="peft", base=base_path)
    torch.testing.assert_close(
        reference_outputs(base_path, arch, root / "peft_again", inputs), expected,
        rtol=1e-5, atol=1e-5,
    )
    original = load_file(adapter_dir / "adapter_model.safetensors")
    again = load_file(root / "peft_again" / "adapter_model.safetensors")
    lora_keys = [k for k in original if ".lora_" in k]
    assert lora_keys and all(k in again for k in lora_keys)
    for key in lora_keys:
        assert torch.equal(original[key], again[key]), key  # bitwise, same dtype
    # Full tensors survive under PEFT's own key (wrapper copies aside).
    for key, value in original.items():
        if ".lora_" in key or ".original_module." in key or ".modules_to_save." in key:
            continue
        if key.endswith("embed_tokens.base_layer.weight"):
            continue  # PEFT's copy of an adapted embedding table, equal to the base: dropped
        assert torch.equal(again[key], value), key


def test_peft_without_base_detects_architecture(case):
    arch, _, _, adapter_dir, _, _ = case
    assert read_peft(adapter_dir).architecture == arch
