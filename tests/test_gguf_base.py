"""A GGUF model as the base adapters are read through (no llama.cpp needed; the same flows run
against real llama.cpp in test_llama_cpp_families.py).

- the GGUF base tells the architecture: a PEFT adapter that does not say its model (Gemma 3)
  merges into a GGUF ``gemma3`` model;
- llama.cpp writes Mistral as ``llama``: a Mistral adapter merges into it (the plugin says which
  llama.cpp architecture it is written as);
- a llama.cpp-only user: ``merge base.gguf adapter.gguf`` and ``convert adapter.gguf --base
  base.gguf`` work from the GGUF model alone.

GGUF models here are written with gguf-py under the plugin's llama.cpp names (and LLaMA's q/k row
order, test_merge_gguf.write_model); expected values are PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import tiny_families
from cli_harness import run_cli
from test_merge_gguf import hf_tensors, llama_cpp_order, read_model, write_model

from loraformat.architecture import registry

pytestmark = pytest.mark.slow  # PEFT references


def _plugin_model(family: str, hf: Path, out: Path) -> Path:
    """A GGUF model of the plugin's llama.cpp architecture holding the weights the plugin names
    (F32), with the metadata llama.cpp's converter writes for heads and layers."""
    import json

    arch = registry().architectures()[family]
    config = json.loads((hf / "config.json").read_text())
    name = arch.gguf_architecture
    writer = gguf.GGUFWriter(str(out), name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
    for key, array in hf_tensors(hf).items():
        foreign = arch.names.foreign(key.removesuffix(".weight"), "gguf")
        if foreign is not None and array.ndim == 2:
            writer.add_tensor(foreign.removesuffix(".weight") + ".weight",
                              array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _peft_merged(hf: Path, adapter: Path) -> dict[str, np.ndarray]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_families.load_transformers(hf), adapter)
    return {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}


def test_gguf_base_tells_the_architecture_of_a_peft_adapter(tmp_path):
    hf = tiny_families.gemma3(tmp_path / "hf")
    adapter = tiny_families.peft_adapter(hf, "gemma3", tmp_path / "peft")
    model = _plugin_model("gemma3", hf, tmp_path / "base.gguf")
    result = run_cli("merge", model, adapter, "-o", tmp_path / "m.gguf")
    assert result.code == 0, result.err
    merged, expected = read_model(tmp_path / "m.gguf"), _peft_merged(hf, adapter)
    arch = registry().architectures()["gemma3"]
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        name = arch.names.foreign(key.removesuffix(".weight"), "gguf") + ".weight"
        np.testing.assert_allclose(merged[name][1], expected[key], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    import json
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("mistral")
    hf = tiny_families.mistral(root / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["max_position_embeddings"] = 64
    adapter = tiny_families.peft_adapter(hf, "mistral", root / "peft")
    model = write_model(hf_tensors(hf), config, root / "base.gguf", "F32")  # as "llama"
    return SimpleNamespace(hf=hf, config=config, adapter=adapter, model=model,
                           expected=_peft_merged(hf, adapter))


def _check_merged(mistral, path: Path) -> None:
    from test_merge_gguf import gguf_name

    merged = read_model(path)
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                "model.layers.1.mlp.up_proj.weight"):
        want = llama_cpp_order(key, mistral.expected[key], mistral.config)
        np.testing.assert_allclose(merged[gguf_name(key)][1], want, atol=1e-6, rtol=0)


def test_mistral_adapter_merges_into_gguf_written_as_llama(mistral, tmp_path):
    native = tmp_path / "lf"
    assert run_cli("convert", mistral.adapter, "-o", native, "--base", mistral.hf).code == 0
    result = run_cli("merge", mistral.model, native, "-o", tmp_path / "m.gguf")  # 'mistral'
    assert result.code == 0, result.err
    _check_merged(mistral, tmp_path / "m.gguf")


def test_llama_cpp_only_user_merges_and_converts_gguf_lora(mistral, tmp_path):
    lora = tmp_path / "a.gguf"
    assert run_cli("convert", mistral.adapter, "-o", lora, "--base", mistral.hf).code == 0
    result = run_cli("merge", mistral.model, lora, "-o", tmp_path / "m.gguf")
    assert result.code == 0, result.err
    _check_merged(mistral, tmp_path / "m.gguf")
    # convert accepts the GGUF model as --base, and the adapter comes back with PEFT's ΔW
    back = tmp_path / "back.gguf"
    result = run_cli("convert", lora, "--base", mistral.model, "-o", tmp_path / "lf")
    assert result.code == 0, result.err
    assert run_cli("convert", tmp_path / "lf", "--base", mistral.model, "-o", back).code == 0
    assert _same_tensors(lora, back)


def _same_tensors(a: Path, b: Path) -> bool:
    first, second = read_model(a), read_model(b)
    return sorted(first) == sorted(second) and all(
        np.array_equal(first[k][1], second[k][1]) for k in first)

