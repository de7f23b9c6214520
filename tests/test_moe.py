"""Mixture-of-experts adapters end to end, against real PEFT and transformers (issue 24).

Qwen3-MoE and Mixtral checkpoints store one tensor per expert and projection; gpt-oss stores the
expert stacks as transformers holds them. PEFT adapts the stacks (``target_parameters``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_harness import run_cli
from safetensors.numpy import load_file, save_file
from tiny_moe import (
    EXPERTS,
    FAMILIES,
    assert_same_peft_tensors,
    checkpoint,
    disguise,
    logits,
    peft_adapter,
)

from loraformat.interchange import open_adapter

pytestmark = pytest.mark.slow

IDS = torch.tensor([[5, 17, 33, 8, 90, 41, 12, 66, 3, 27, 54, 71]])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family → (base dir, PEFT adapter dir, PEFT merge_and_unload logits, PEFT logits)."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            base = checkpoint(family, root / "base")
            # rank_pattern on one expert parameter, as PEFT resolves it (full parameter name)
            adapter, peft_model = peft_adapter(
                family, base, root / "peft",
                rank_pattern={"model.layers.1.mlp.experts.down_proj": 3},
            )
            unmerged = logits(peft_model, IDS)
            merged = logits(peft_model.merge_and_unload(), IDS)
            cache[family] = (base, adapter, merged, unmerged)
        return cache[family]

    return get


def close(actual: torch.Tensor, reference: torch.Tensor) -> None:
    scale = float(reference.abs().max())
    assert float((actual - reference).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_peft_merge_and_unload(built, family, tmp_path):
    base, adapter, merged, _ = built(family)
    assert float((merged - logits(base, IDS)).abs().max()) > 0.5  # the adapter matters
    result = run_cli("merge", base, adapter, "-o", tmp_path / "merged")
    assert result.code == 0, result.err
    close(logits(tmp_path / "merged", IDS), merged)
    # and back: unmerging the same adapter gives the base's outputs
    result = run_cli("unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "unmerged")
    assert result.code == 0, result.err
    close(logits(tmp_path / "unmerged", IDS), logits(base, IDS))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loraformat_peft_is_exact(built, family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, _, unmerged = built(family)
    assert run_cli("convert", adapter, "-o", tmp_path / "lf", "--base", base).code == 0
    result = run_cli("convert", tmp_path / "lf", "-o", tmp_path / "back", "--to", "peft",
                     "--base", base)
    assert result.code == 0, result.err
    assert_same_peft_tensors(adapter, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"model.layers.1.mlp.experts.down_proj": 3}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                           tmp_path / "back")
    torch.testing.assert_close(logits(peft_model, IDS), unmerged, rtol=0, atol=0)


def test_expert_layers_are_checkpoint_tensors(built):
    """Per-expert checkpoints get one layer per expert and part (PEFT's expert-major A rows,
    rank-major B columns); stacked ones one expert layer at the tensor's name."""
    base, adapter, _, _ = built("mixtral")
    raw = load_file(adapter / "adapter_model.safetensors")
    converted = open_adapter(adapter, base=base)
    a = raw["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"]  # [E·r, H]
    b = raw["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"]  # [2I, E·r]
    r, inner = a.shape[0] // EXPERTS, b.shape[0] // 2
    for e in range(EXPERTS):
        w1 = converted.layer(f"model.layers.0.block_sparse_moe.experts.{e}.w1")
        w3 = converted.layer(f"model.layers.0.block_sparse_moe.experts.{e}.w3")
        np.testing.assert_array_equal(w1.A, a[e * r:(e + 1) * r])
        np.testing.assert_array_equal(w3.A, a[e * r:(e + 1) * r])
        np.testing.assert_array_equal(w1.B, b[:inner, e::EXPERTS])
        np.testing.assert_array_equal(w3.B, b[inner:, e::EXPERTS])
    base, adapter, _, _ = built("gpt_oss")
    converted = open_adapter(adapter, base=base)
    spec = converted.specs["model.layers.0.mlp.experts.gate_up_proj"]
    assert (spec.experts, spec.in_features, spec.out_features) == (EXPERTS, 32, 48)
    result = run_cli("inspect", converted.save(base.parent / "lf"))
    assert result.code == 0 and "gate_up_proj" in result.out


def test_single_file_merge(built, tmp_path):
    base, adapter, merged, _ = built("qwen3_moe")
    # a bare .safetensors file: the family is told by its tensor names alone
    result = run_cli("merge", base / "model.safetensors", adapter, "-o",
                     tmp_path / "merged.safetensors")
    assert result.code == 0, result.err
    ours = load_file(tmp_path / "merged.safetensors")
    (tmp_path / "dir").mkdir()
    save_file(ours, tmp_path / "dir" / "model.safetensors", {"format": "pt"})
    (tmp_path / "dir" / "config.json").write_text((base / "config.json").read_text())
    close(logits(tmp_path / "dir", IDS), merged)


def test_rslora_and_parts_that_no_longer_share_a(tmp_path):
    """rsLoRA carries over; per-expert parts changed apart (A of one part rescaled, as algebra
    may leave them) are joined along the rank for PEFT, which then computes the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraformat.format.adapter import Adapter, LoraLayer

    base = checkpoint("mixtral", tmp_path / "base")
    adapter, peft_model = peft_adapter("mixtral", base, tmp_path / "peft", use_rslora=True)
    merged = logits(peft_model.merge_and_unload(), IDS)
    assert run_cli("merge", base, adapter, "-o", tmp_path / "merged").code == 0
    close(logits(tmp_path / "merged", IDS), merged)

    converted = open_adapter(adapter, base=base)
    assert converted.scaling == "alpha/sqrt(r)"
    layers = dict(converted.layers())
    w3 = "model.layers.0.block_sparse_moe.experts.1.w3"
    old = layers[w3]
    layers[w3] = LoraLayer(A=old.A * 0.5, B=old.B * 2.0, alpha=old.alpha,
                           in_features=old.in_features, out_features=old.out_features)
    changed = Adapter.from_layers(converted.architecture, layers, scaling=converted.scaling)
    changed.save(tmp_path / "changed")
    result = run_cli("convert", tmp_path / "changed", "-o", tmp_path / "back", "--to", "peft",
                     "--base", base)
    assert result.code == 0, result.err
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    # layer 0's gate_up stack now has rank 2r (the parts stacked), layer 1's is untouched
    assert back["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape[0] \
        == 2 * 2 * EXPERTS
    assert back["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"].shape[0] \
        == 2 * EXPERTS
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                         tmp_path / "back")
    close(logits(reloaded.merge_and_unload(), IDS), merged)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_expert_lora_round_trip(built, family, tmp_path):
    """loraformat → llama.cpp's stacked expert LoRA → loraformat gives the same tensors (the
    GGUF side is checked against llama.cpp's converter in test_moe_gguf.py)."""
    from loraformat import load

    base, adapter, _, _ = built(family)
    assert run_cli("convert", adapter, "-o", tmp_path / "lf", "--base", base).code == 0
    result = run_cli("convert", tmp_path / "lf", "-o", tmp_path / "lora.gguf", "--base", base)
    assert result.code == 0, result.err
    result = run_cli("convert", tmp_path / "lora.gguf", "-o", tmp_path / "back", "--base", base)
    assert result.code == 0, result.err
    original, back = load(tmp_path / "lf"), load(tmp_path / "back")
    assert sorted(original.specs) == sorted(back.specs)
    for path in original.specs:
        np.testing.assert_array_equal(back.layer(path).A, original.layer(path).A)
        np.testing.assert_array_equal(back.layer(path).B, original.layer(path).B)
        assert back.scale(path) == original.scale(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_conformance_kit_without_export(built, family):
    """Every contract question but the export module (MoE ONNX export is not written yet)."""
    from loraformat.testing import check_plugin

    base, _, _, _ = built(family)
    report = check_plugin(base, family, export=False)
    assert {"peft", "gguf"} <= set(report.foreign_names)
    layers = {layer.path: layer for layer in report.layers}
    if family == "gpt_oss":
        stack = layers["model.layers.0.mlp.experts.gate_up_proj"]
        assert (stack.experts, stack.layout, stack.in_features, stack.out_features) == (
            EXPERTS, "in_out", 32, 48)
    else:
        assert sum(".experts." in p for p in layers) == 2 * 3 * EXPERTS  # 2 blocks × 3 parts


def test_checkpoint_no_plugin_covers_with_per_expert_tensors_is_refused(built, tmp_path):
    """PEFT's stacked parameter has no tensor in a per-expert checkpoint no plugin describes:
    refused in one line naming what is missing."""
    base, adapter, _, _ = built("qwen3_moe")
    toy, adapter = disguise(base, adapter, tmp_path)
    result = run_cli("merge", toy, adapter, "-o", tmp_path / "merged")
    assert result.code == 1
    assert "the base has no 3-D tensor model.layers.0.mlp.experts." in result.error
    assert "per expert needs a plugin" in result.error
