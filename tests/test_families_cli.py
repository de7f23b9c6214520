"""Issue 13's end-to-end checks for Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3 and Phi-3 (and issue
25's OLMo 2, OLMo 3, SmolLM3, Granite and Ministral 3), through the CLI as a user runs it, against
PEFT's merge in transformers and gguf-py's tensor tables.

One tiny checkpoint and one PEFT adapter on every projection per family (module-scoped): `merge
-o model.onnx` logits equal PEFT's merge; `merge --with-past` + `generate` gives transformers'
32 greedy tokens; `export --lora-slots` + the adapter as `.onnx_adapter` equals the merged
model; `convert --to gguf --base` writes llama.cpp's names for the family (and its q/k row order).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tiny_families
import tiny_models
import torch
from click.testing import CliRunner

from loraformat.cli import cli

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 33, 3, 71, 40, 9]
N_NEW = 32
IDS = np.random.default_rng(3).integers(3, 96, (2, 11)).astype(np.int64)


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module", params=tiny_families.FAMILIES)
def family(request, tmp_path_factory):
    """(family, base dir, PEFT adapter dir, PEFT-merged transformers model, work dir)."""
    from peft import PeftModel

    name = request.param
    root = tmp_path_factory.mktemp(f"e2e-{name}")
    base = tiny_families.BUILDERS[name](root / "base")
    # lora_alpha large enough that the adapter visibly moves the tiny model's tokens.
    adapter = tiny_families.peft_adapter(base, name, root / "adapter", lora_alpha=16)
    merged = PeftModel.from_pretrained(tiny_families.load_transformers(base), adapter)
    return name, base, adapter, merged.merge_and_unload().eval(), root


def merged_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def test_merge_to_onnx_equals_peft_merge(family):
    _name, base, adapter, merged, root = family
    out = root / "merged.onnx"
    run("merge", base, adapter, "-o", out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], tiny_models.feed(session, IDS))
    expected = merged_logits(merged, IDS)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    base_logits = merged_logits(tiny_families.load_transformers(base), IDS)
    assert np.abs(expected - base_logits).max() > 1e-2  # the adapter really changes the model


def test_with_past_generate_equals_transformers_greedy(family):
    name, base, adapter, merged, root = family
    out = root / "past.onnx"
    run("merge", base, adapter, "-o", out, "--with-past")
    report = json.loads(
        run("generate", out, "--prompt-ids", ",".join(map(str, PROMPT)), "--json")
    )
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = merged.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N_NEW,
            eos_token_id=None, pad_token_id=0,
        )[0, len(PROMPT):].tolist()
    assert len(set(expected)) >= 6, expected  # varied: a stuck model would hide a broken cache
    if name == "phi3":
        # transformers' Phi-3 generate() drops its cache and re-runs the whole sequence once,
        # when it first grows past original_max_position_embeddings (8 here), so every past key
        # is recomputed with the long factors. An ONNX decoder keeps its cache; it equals
        # transformers decoding with a cache, and generate() up to the switch.
        switch = 8 - len(PROMPT) + 1
        assert report["new_ids"][:switch] == expected[:switch]
        expected = cached_greedy(merged, PROMPT, N_NEW)
    assert report["new_ids"] == expected

    # --optimize: ONNX Runtime's fusions fire (attention everywhere but Gemma 2, whose score
    # soft-cap is outside MultiHeadAttention's pattern) and the tokens stay the same.
    from loraformat.export.optimize import optimize_file
    from loraformat.generate import greedy_generate

    fused = root / "fused.onnx"
    fusions = optimize_file(out, fused, base).fusions
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    ops = [n.op_type for n in onnx.load(out, load_external_data=False).graph.node]
    if "GroupQueryAttention" in ops:  # emitted fused (head size 16: Qwen3): nothing to fuse
        assert ops.count("GroupQueryAttention") == layers and not fusions.get("MultiHeadAttention")
    else:
        assert fusions.get("SkipSimplifiedLayerNormalization") == SKIP_NORMS.get(name, 2 * layers)
        assert fusions.get("MultiHeadAttention", 0) == ATTENTION_FUSIONS.get(name, layers)
    assert greedy_generate(fused, PROMPT, N_NEW).new_ids == [expected]


#: Fusions ONNX Runtime's optimizer finds where a family's block differs from LLaMA's (2 layers).
#: OLMo normalises after the residual's operand, not its sum: only the final norm follows an add.
SKIP_NORMS = {"olmo2": 1, "olmo3": 1}
#: Gemma 2's score soft-cap and Ministral 3's query temperature are outside MultiHeadAttention's
#: pattern.
ATTENTION_FUSIONS = {"gemma2": 0, "ministral3": 0}


def cached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' own cache, one forward per token."""
    new, cache, out = torch.tensor([prompt]), None, []
    with torch.no_grad():
        for _ in range(n):
            step = model(input_ids=new, cache=cache, use_cache=True)
            cache, new = step.past_key_values, step.logits[:, -1:].argmax(-1)
            out.append(int(new))
    return out


def test_lora_slots_with_onnx_adapter_equal_peft_merge(family):
    from loraformat.runtime import Session

    _name, base, adapter, merged, root = family
    slots = root / "slots.onnx"
    run("export", base, "-o", slots, "--lora-slots")
    converted = root / "adapter.onnx_adapter"
    run("convert", adapter, "-o", converted, "--to", "onnx_adapter", "--base", base)
    session = Session(slots)
    try:
        session.load("a", converted)
        got = session.run({"input_ids": IDS}, adapter="a")[0]
        plain = session.run({"input_ids": IDS})[0]
    finally:
        session.close()
    np.testing.assert_allclose(got, merged_logits(merged, IDS), atol=1e-4, rtol=0)
    base_logits = merged_logits(tiny_families.load_transformers(base), IDS)
    np.testing.assert_allclose(plain, base_logits, atol=1e-4, rtol=0)


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py ``LlamaModel.permute``, transcribed for numpy."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def test_convert_to_gguf_uses_llama_cpp_names(family):
    import gguf
    from gguf.tensor_mapping import get_tensor_name_map
    from safetensors.numpy import load_file

    name, base, adapter, _merged, root = family
    out = root / "adapter.gguf"
    run("convert", adapter, "-o", out, "--to", "gguf", "--base", base)
    reader = gguf.GGUFReader(str(out))
    field = reader.fields["general.architecture"]
    arch_name = bytes(field.parts[field.data[0]]).decode()
    expected_arch = {"mistral": "llama", "olmo3": "olmo2", "ministral3": "mistral3"}.get(
        name, name
    )
    assert arch_name == expected_arch
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    config = json.loads((base / "config.json").read_text())
    names = get_tensor_name_map(model_arch, config["num_hidden_layers"])
    peft = load_file(adapter / "adapter_model.safetensors")
    expected = set()
    for key in peft:
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        kind = "lora_a" if ".lora_A." in key else "lora_b"
        expected.add(f"{names.get_name(module)}.weight.{kind}")
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected
    # Row order: llama.cpp permutes q/k only for families converted through LlamaModel.
    q_b = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] if name != (
        "phi3") else peft["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    stored = np.asarray(tensors[f"blk.0.attn_{'qkv' if name == 'phi3' else 'q'}.weight.lora_b"]
                        .data).reshape(q_b.shape)
    if name in ("mistral", "smollm3", "granite", "ministral3"):  # through LlamaModel
        q_b = _llama_cpp_permute(q_b, config["num_attention_heads"])
    np.testing.assert_array_equal(stored, q_b)


def test_phi3_adapter_on_one_fused_part(tmp_path_factory):
    """An adapter on only the q rows of Phi-3's qkv_proj and the up rows of gate_up_proj (the
    plugin's fused parts): merged and slot-served results equal the numpy merge of exactly those
    rows in transformers; GGUF (llama.cpp keeps both fused) gets zero B rows for the other
    parts."""
    import gguf

    import loraformat
    from loraformat import LoraLayer
    from loraformat.base import open_base
    from loraformat.runtime import Session

    root = tmp_path_factory.mktemp("phi3-parts")
    base = tiny_families.phi3(root / "base")
    with open_base(base) as opened:
        layers = opened.layers
    qkv, gate_up = "model.layers.1.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"
    parts = {qkv: {p.name: p for p in layers[qkv].parts},
             gate_up: {p.name: p for p in layers[gate_up].parts}}
    rng = np.random.default_rng(5)
    chosen = {qkv: parts[qkv]["q"], gate_up: parts[gate_up]["up"]}
    built = {}
    for path, part in chosen.items():
        rows = part.stop - part.start
        built[path] = LoraLayer(
            A=(rng.standard_normal((4, layers[path].in_features)) * 0.3).astype(np.float32),
            B=(rng.standard_normal((rows, 4)) * 0.3).astype(np.float32),
            alpha=8.0, in_features=layers[path].in_features,
            out_features=layers[path].out_features, out_rows=[(part.start, part.stop)],
        )
    adapter = loraformat.Adapter.from_layers("phi3", built).save(root / "parts")

    reference = tiny_families.load_transformers(base)
    state = reference.state_dict()
    with torch.no_grad():
        for path, lora in built.items():
            part, delta = chosen[path], torch.from_numpy(2.0 * lora.B @ lora.A)  # alpha/r = 2
            state[path + ".weight"][part.start : part.stop] += delta
    expected = merged_logits(reference, IDS)

    merged_dir = root / "merged"
    run("merge", base, adapter, "-o", merged_dir)
    np.testing.assert_allclose(
        merged_logits(tiny_families.load_transformers(merged_dir), IDS), expected, atol=1e-4,
        rtol=0,
    )
    slots = root / "slots.onnx"
    run("export", base, "-o", slots, "--lora-slots", "--targets", "qkv_proj,gate_up_proj")
    session = Session(slots)
    try:
        session.load("parts", adapter)
        np.testing.assert_allclose(
            session.run({"input_ids": IDS}, adapter="parts")[0], expected, atol=1e-4, rtol=0
        )
    finally:
        session.close()

    out = root / "parts.gguf"
    run("convert", adapter, "-o", out, "--to", "gguf", "--base", base)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    b = tensors["blk.1.attn_qkv.weight.lora_b"].reshape(layers[qkv].out_features, 4)
    np.testing.assert_array_equal(b[:32], built[qkv].B)
    assert not b[32:].any()
    b = tensors["blk.0.ffn_up.weight.lora_b"].reshape(layers[gate_up].out_features, 4)
    np.testing.assert_array_equal(b[64:], built[gate_up].B)
    assert not b[:64].any()


def test_mlx_lm_loads_the_converted_adapter_like_the_merge(family):
    """`convert --to mlx --base` gives MLX-LM's module names for the family: real mlx-lm loads it
    onto the base (``load_adapters``) and equals loraformat's merge loaded by mlx-lm."""
    name, base, adapter, _merged, root = family
    config: dict[str, object] = {}
    if name == "gemma3":
        # mlx-lm's Gemma 3 reads the layer pattern from sliding_window_pattern (default 6),
        # not layer_types: copies with the tiny model's pattern.
        config["sliding_window_pattern"] = 2
    if name in ("olmo3", "granite"):
        # mlx-lm's OLMo 3 and Granite read a top-level rope_theta (transformers 5 moved it
        # into rope_parameters); the comparison is mlx-lm against itself, so any theta does.
        config["rope_theta"] = 10000.0
    mlx_adapter_equals_merge(base, adapter, root, IDS, config)


def mlx_adapter_equals_merge(base, adapter, root, ids, config_update) -> None:
    """mlx-lm with ``convert ADAPTER --to mlx --base BASE`` loaded on the base (``load_adapters``)
    gives mlx-lm's logits of loraformat's merge, which the adapter changes. Both are loaded from
    copies whose config.json has ``config_update`` (settings mlx-lm reads differently)."""
    pytest.importorskip("mlx_lm")
    import shutil

    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    run("convert", adapter, "-o", root / "mlx", "--to", "mlx", "--base", base)
    run("merge", base, adapter, "-o", root / "merged-dir")
    loadable = {}
    for what, checkpoint in (("base", base), ("merged", root / "merged-dir")):
        copy = root / f"mlx-{what}"
        shutil.copytree(checkpoint, copy, dirs_exist_ok=True)
        config = {**json.loads((base / "config.json").read_text()), **config_update}
        (copy / "config.json").write_text(json.dumps(config))
        loadable[what] = copy
    merged, _ = load_model(loadable["merged"])
    expected = np.array(merged(mx.array(ids)))
    model, _ = load_model(loadable["base"])
    plain = np.array(model(mx.array(ids)))
    got = np.array(load_adapters(model, str(root / "mlx"))(mx.array(ids)))
    assert np.abs(expected - plain).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_multimodal_mistral3_language_model_merges_exports_and_converts(tmp_path_factory):
    """A Mistral3ForConditionalGeneration checkpoint (Pixtral tower beside a Ministral 3 decoder)
    with a PEFT adapter on the language model: `merge -o model.onnx` takes the language model's
    weights and equals PEFT's merge in transformers; `convert --to gguf` gives llama.cpp's
    mistral3 names (the language_model level dropped, q/k B rows permuted)."""
    import gguf
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.numpy import load_file
    from transformers import Mistral3ForConditionalGeneration

    root = tmp_path_factory.mktemp("mistral3-mm")
    base = tiny_families.mistral3_multimodal(root / "base")

    def load():
        return Mistral3ForConditionalGeneration.from_pretrained(
            base, attn_implementation="eager"
        ).eval()

    torch.manual_seed(1)
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    config = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, target_modules=targets)
    get_peft_model(load(), config).save_pretrained(root / "adapter")
    merged = PeftModel.from_pretrained(load(), root / "adapter").merge_and_unload().eval()

    out = root / "merged.onnx"
    run("merge", base, root / "adapter", "-o", out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], tiny_models.feed(session, IDS))
    expected = merged_logits(merged, IDS)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    assert np.abs(expected - merged_logits(load(), IDS)).max() > 1e-2

    gguf_out = root / "adapter.gguf"
    run("convert", root / "adapter", "-o", gguf_out, "--to", "gguf", "--base", base)
    reader = gguf.GGUFReader(str(gguf_out))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "mistral3"
    names = gguf.tensor_mapping.get_tensor_name_map(gguf.MODEL_ARCH.MISTRAL3, 2)
    peft = load_file(root / "adapter" / "adapter_model.safetensors")
    expected_names = set()
    for key in peft:
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        # llama.cpp's converter reads the stored path and drops its language_model level.
        stored = module.replace("model.language_model.", "model.")
        kind = "lora_a" if ".lora_A." in key else "lora_b"
        expected_names.add(f"{names.get_name(stored)}.weight.{kind}")
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected_names
    q_b = peft["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"]
    stored = np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data).reshape(q_b.shape)
    np.testing.assert_array_equal(stored, _llama_cpp_permute(q_b, 4))
