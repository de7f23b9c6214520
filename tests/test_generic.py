"""Checkpoints no plugin covers (OPT, GPT-NeoX, T5) with real PEFT adapters: the generic path.

Merge (directory and single file), unmerge and PEFT ↔ loraformat conversion need no
architecture plugin; what does (ONNX export, llama.cpp and MLX names) refuses with one line naming
the missing plugin. The reference is PEFT itself: ``merge_and_unload`` and ``PeftModel``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_harness import run_cli
from safetensors.numpy import load_file

from loraformat import load
from loraformat.architecture import registry
from loraformat.base import open_base

pytestmark = pytest.mark.slow

# architecture → (model class, config class, config, PEFT LoRA options). Each adapter exercises
# what the generic path must read from shapes alone: a fused [3d, d] layer (GPT-NeoX), an
# embedding LoRA (OPT), ``modules_to_save`` (GPT-NeoX's untied head), an
# encoder-decoder (T5).
MODELS = {
    "opt": (
        "OPTForCausalLM", "OPTConfig",
        dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
             num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
             dropout=0.0, attention_dropout=0.0),
        dict(target_modules=["q_proj", "v_proj", "fc1", "embed_tokens"]),
    ),
    "gpt_neox": (
        "GPTNeoXForCausalLM", "GPTNeoXConfig",
        dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False),
        dict(target_modules=["query_key_value", "dense_4h_to_h"], modules_to_save=["embed_out"]),
    ),
    "t5": (
        "T5ForConditionalGeneration", "T5Config",
        dict(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
             decoder_start_token_id=0, dropout_rate=0.0),
        dict(target_modules=["q", "v", "wo"]),
    ),
}


def load_model(path: Path, arch: str):
    import transformers

    return getattr(transformers, MODELS[arch][0]).from_pretrained(path).eval()


def run(model, arch: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (2, 7), generator=g)
    with torch.no_grad():
        if arch == "t5":
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, tmp_path_factory):
    """(arch, base dir, PEFT adapter dir) for one tiny checkpoint and a real PEFT adapter."""
    import transformers
    from peft import LoraConfig, get_peft_model

    arch = request.param
    model_cls, config_cls, config, lora = MODELS[arch]
    root = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    model.save_pretrained(root / "base")
    torch.manual_seed(1)
    peft_model = get_peft_model(
        load_model(root / "base", arch),
        LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora),
    )
    if lora.get("modules_to_save"):  # a trained head: make the saved copy differ from the base
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.data += 0.01 * torch.randn_like(param)
    peft_model.save_pretrained(root / "peft")
    return arch, root / "base", root / "peft"


def cli_run(*args: object) -> tuple[int, str]:
    result = run_cli(*args)
    return result.code, result.out + result.err


def peft_merged_logits(arch: str, base: Path, peft_dir: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, arch), peft_dir).merge_and_unload()
    return run(model.eval(), arch)


def test_no_plugin_recognises_these_checkpoints(case):
    arch, base, _ = case
    assert arch not in registry().architectures()
    with open_base(base) as model:
        assert model.generic and model.architecture == arch
        assert all(layer.layout == "out_in" for layer in model.layers.values())
    code, out = cli_run("plugins", "--checkpoint", base)
    assert code == 0, out
    assert out.strip() == (  # the answer alone, not the plugin table before it
        f"{base}: no installed plugin recognises it; handled generically as {arch!r} "
        "(merge, unmerge and PEFT conversion work; ONNX export, GGUF and MLX need a plugin)"
    )


def test_merge_equals_peft_merge_and_unload(case, tmp_path):
    arch, base, peft_dir = case
    code, out = cli_run("merge", base, peft_dir, "-o", tmp_path / "merged")
    assert code == 0, out
    ours = run(load_model(tmp_path / "merged", arch), arch)
    want = peft_merged_logits(arch, base, peft_dir)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)
    assert not torch.allclose(run(load_model(base, arch), arch), want, atol=1e-3)

    # The same through a converted loraformat adapter, into the single-file checkpoint.
    code, out = cli_run("convert", peft_dir, "-o", tmp_path / "adapter", "--base", base)
    assert code == 0, out
    adapter = load(tmp_path / "adapter")
    assert adapter.architecture == arch
    with open_base(base) as model:
        assert adapter.fingerprint == model.checkpoint.fingerprint()
    one = tmp_path / "one.safetensors"
    code, out = cli_run("merge", base / "model.safetensors", tmp_path / "adapter", "-o", one)
    assert code == 0, out
    single = load_file(one)
    directory = load_file(tmp_path / "merged" / "model.safetensors")
    assert single.keys() == directory.keys()
    for name, value in directory.items():
        np.testing.assert_array_equal(single[name], value, err_msg=name)

    # unmerge gives the base back (the modules_to_save replacement cannot be undone: refused)
    code, out = cli_run("unmerge", tmp_path / "merged", tmp_path / "adapter", "-o", tmp_path / "u")
    if adapter.replacement_names:
        assert code == 1 and "a replaced tensor cannot be unmerged" in out
    else:
        assert code == 0, out
        back, original = load_file(tmp_path / "u" / "model.safetensors"), load_file(
            base / "model.safetensors"
        )
        for name, value in original.items():
            np.testing.assert_allclose(back[name], value, atol=1e-5, err_msg=name)


def test_peft_loraformat_peft_round_trip_loads_in_peft(case, tmp_path):
    from peft import PeftModel

    arch, base, peft_dir = case
    code, out = cli_run("convert", peft_dir, "-o", tmp_path / "adapter", "--base", base)
    assert code == 0, out
    code, out = cli_run(
        "convert", tmp_path / "adapter", "-o", tmp_path / "back", "--to", "peft", "--base", base
    )
    assert code == 0, out
    original = PeftModel.from_pretrained(load_model(base, arch), peft_dir).eval()
    again = PeftModel.from_pretrained(load_model(base, arch), tmp_path / "back").eval()
    torch.testing.assert_close(run(again, arch), run(original, arch), atol=1e-5, rtol=0)
    saved = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    suffixes = {module.rsplit(".", 1)[-1] for module in saved["target_modules"]}
    assert suffixes == set(MODELS[arch][3]["target_modules"])


def test_what_needs_a_plugin_refuses_in_one_line(case, tmp_path):
    arch, base, peft_dir = case
    code, out = cli_run("merge", base, peft_dir, "-o", tmp_path / "model.onnx")
    assert code == 1
    assert out.strip().splitlines() == [
        f"error: {base}: ONNX export needs an architecture plugin for {arch!r}, and none is "
        "installed (this checkpoint is handled generically: merge, unmerge and PEFT conversion "
        "work)"
    ]
    assert not (tmp_path / "model.onnx").exists()
    code, out = cli_run("convert", peft_dir, "-o", tmp_path / "adapter", "--base", base)
    assert code == 0, out
    code, out = cli_run("inspect", "--no-norms", tmp_path / "adapter")
    assert code == 0
    (line,) = [line for line in out.splitlines() if line.startswith("base ")]
    assert line.startswith(f"base          {arch} (")  # the PEFT config's base name follows
    assert line.endswith(" — no installed plugin: bases are handled generically")
    code, out = cli_run("inspect", "--no-norms", "--json", tmp_path / "adapter")
    assert json.loads(out)["architecture_plugin"] is None
    code, out = cli_run("convert", tmp_path / "adapter", "-o", tmp_path / "a.gguf", "--base", base)
    assert code == 1
    assert out.strip() == (
        f"error: {tmp_path / 'a.gguf'}: llama.cpp (gguf) tensor names needs an architecture "
        f"plugin for {arch!r}, and none is installed: llama.cpp cannot load this architecture's "
        "adapters"
    )
    # Without --base the adapter alone cannot say which checkpoint names apply.
    code, out = cli_run("convert", peft_dir, "-o", tmp_path / "nobase")
    assert code == 1 and "pass the base model (--base BASE)" in out
