"""Gemma 4 (issue 25): the text model and the multimodal model's language model, against
transformers, PEFT's merge, gguf-py's tensor map and mlx-lm.

The tiny text checkpoint has every piece the config switches on (tiny_gemma4.text_config):
sliding layers of head size 8 and full layers of head size 16 with one KV head and K=V, the
proportional rope, the last two layers KV-shared (double-wide MLPs), 4-wide per-layer inputs, a
final soft-cap. The PEFT adapter is on every projection, the per-layer ones included.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import tiny_gemma4
import tiny_models
import torch
from cli_harness import run_cli
from tiny_families import opened

from loraformat.architecture import ExportOptions
from loraformat.architecture.protocol import CheckpointInfo

IDS = np.random.default_rng(3).integers(3, 89, (2, 11)).astype(np.int64)
PROMPT = [5, 17, 33, 3, 71, 40, 9]


def families():
    from loraformat_plugins import gemma4

    text, multimodal = gemma4.loraformat_architectures()
    return text, multimodal


def logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def cli(*args) -> str:
    result = run_cli(*args)
    assert result.code == 0, result.err
    return result.out


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """(base, PEFT adapter on every projection, PEFT's merged model, work dir)."""
    root = tmp_path_factory.mktemp("gemma4")
    base = tiny_gemma4.gemma4(root / "base")
    adapter = tiny_gemma4.peft_adapter(base, root / "adapter")
    return base, adapter, tiny_gemma4.peft_merged(base, adapter), root


def test_plugin_contract_and_names():
    import gguf
    from gguf.tensor_mapping import get_tensor_name_map

    for family in families():
        assert family.names.problems() == []
        assert family.gguf_architecture == "gemma4" in gguf.MODEL_ARCH_NAMES.values()
    text, multimodal = families()
    reference = get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, 6)
    for path in ["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj",
                 "model.layers.0.self_attn.v_proj", "model.layers.5.self_attn.o_proj",
                 "model.layers.5.mlp.gate_proj", "model.layers.5.mlp.up_proj",
                 "model.layers.5.mlp.down_proj", "model.layers.2.per_layer_input_gate",
                 "model.layers.2.per_layer_projection", "model.per_layer_model_projection",
                 "model.embed_tokens_per_layer", "model.embed_tokens", "lm_head"]:
        assert text.names.foreign(path, "gguf") == reference.get_name(path), path
        assert text.names.foreign(path, "peft") == path
        assert text.names.foreign(path, "mlx") == path
        # llama.cpp's converter drops the multimodal checkpoint's language_model level.
        stored = path.replace("model.", "model.language_model.", 1) if path != "lm_head" else path
        assert multimodal.names.foreign(stored, "gguf") == reference.get_name(path), stored
        assert multimodal.names.foreign(stored, "peft") == stored
        # mlx-lm's gemma4 sanitize: model.language_model.X -> language_model.model.X
        mlx = ("language_model." + path) if path != "lm_head" else "language_model.lm_head"
        assert multimodal.names.foreign(stored, "mlx") == mlx
        assert multimodal.names.layer_path(mlx, "mlx") == stored


def test_detection():
    text, multimodal = families()
    for config, expected in [
        ({"model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"]}, "text"),
        ({"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"]}, "mm"),
        # PEFT's adapter_config: the class, and the transformers module's name (gemma4)
        ({"model_type": "gemma4", "architectures": ["Gemma4ForCausalLM"]}, "text"),
        ({"model_type": "gemma4_text"}, "text"),
        ({"model_type": "gemma3_text"}, None),
    ]:
        info = CheckpointInfo(config=config)
        found = [n for n, f in (("text", text), ("mm", multimodal)) if f.detect(info)]
        assert found == ([] if expected is None else [expected]), config
    from loraformat_plugins import gemma3

    (g3,) = gemma3.loraformat_architectures()
    assert not g3.detect(CheckpointInfo(config={"model_type": "gemma4_text"}))


def test_spec_reads_per_layer_settings_as_transformers(tmp_path):
    """Per-layer shapes, KV sources, MLP widths and the ropes equal what transformers builds
    from the same config (its per_layer_config, kv_sharing_modes and rope init)."""
    from transformers import Gemma4ForCausalLM

    config = tiny_gemma4.text_config()
    model = Gemma4ForCausalLM(config)
    saved = config.to_dict()
    text, _ = families()
    for cfg in (saved, {**{k: v for k, v in saved.items() if k != "per_layer_config"},
                        "global_head_dim": 16, "num_global_key_value_heads": 1}):
        spec = text.spec(CheckpointInfo(config=cfg))
        extras = spec.extras
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            n_kv = config.per_layer_config[i].num_key_value_heads
            assert spec.shape_of_layer(i) == (4, n_kv, attn.head_dim)
            assert (extras["kv_source"][i] is not None) == attn.is_kv_shared_layer
            assert extras["k_eq_v"][i] == attn.use_alternative_attention
            assert extras["intermediate"][i] == layer.mlp.intermediate_size
        assert extras["kv_source"] == (None, None, None, None, 2, 3)
        rotary = model.model.rotary_emb
        for kind in ("sliding_attention", "full_attention"):
            ours = torch.as_tensor(np.asarray(spec.ropes[kind].inv_freq))
            torch.testing.assert_close(ours, getattr(rotary, f"{kind}_inv_freq"), atol=0,
                                       rtol=1e-6)
            assert spec.ropes[kind].dim == (16 if kind == "full_attention" else 8)


@pytest.mark.parametrize("full", [True, False])
def test_export_module_logits_equal_transformers(tmp_path, full):
    path = tiny_gemma4.gemma4(tmp_path / "base", full=full)
    info, tensors = opened(path)
    text, _ = families()
    em = text.export_model(info, tensors, ExportOptions())
    assert set(em.module.state_dict()) == set(tensors)
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = em.module(input_ids=ids)
        expected = tiny_gemma4.load(path)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


@pytest.mark.slow
def test_merge_to_onnx_equals_peft_merge(text):
    base, adapter, merged, root = text
    _merged_onnx_equals_peft(base, adapter, merged, root / "merged.onnx")


def _merged_onnx_equals_peft(base, adapter, merged, out) -> None:
    """`merge BASE ADAPTER -o out` logits = PEFT's merged model's (1e-4 of their scale), and
    the adapter changes them."""
    cli("merge", base, adapter, "-o", out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], tiny_models.feed(session, IDS))
    expected = logits(merged, IDS)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    assert np.abs(expected - logits(tiny_gemma4.load(base), IDS)).max() > 1e-2


@pytest.mark.slow
def test_lora_slots_with_onnx_adapter_equal_peft_merge(text):
    from loraformat.runtime import Session

    base, adapter, merged, root = text
    slots = root / "slots.onnx"
    cli("export", base, "-o", slots, "--lora-slots")
    converted = root / "adapter.onnx_adapter"
    cli("convert", adapter, "-o", converted, "--to", "onnx_adapter", "--base", base)
    with Session(slots) as session:
        # every adapted projection has a slot, the per-layer ones included
        peft = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in
                _peft_tensors(adapter)}
        assert peft <= set(session.slots)
        session.load("a", converted)
        got = session.run({"input_ids": IDS}, adapter="a")[0]
        plain = session.run({"input_ids": IDS})[0]
    # A slot adds x·A·B beside W·x, as PEFT's unmerged model does: equal to that to rounding.
    # PEFT's merged weights are W + B·A rounded to fp32, which this tiny model amplifies at one
    # token whose last hidden state is small (PEFT's own merged and unmerged models differ by
    # 3e-4 there, 1.6e-4 of the logits' scale): the merge is the reference to 1e-3 of it.
    unmerged = tiny_gemma4.peft_unmerged(base, adapter)
    expected = logits(unmerged, IDS)
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    expected = logits(merged, IDS)
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max(), rtol=0)
    np.testing.assert_allclose(plain, logits(tiny_gemma4.load(base), IDS), atol=1e-4, rtol=0)


def _peft_tensors(adapter) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(adapter / "adapter_model.safetensors")


def _gguf_names_as_llama_cpp(reader_path, adapter, n_layers: int) -> None:
    """The GGUF LoRA says ``gemma4`` and names each PEFT module as gguf-py's map does for the
    path llama.cpp's converter reads (its language_model level dropped), B as stored."""
    import gguf
    from gguf.tensor_mapping import get_tensor_name_map

    reader = gguf.GGUFReader(str(reader_path))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "gemma4"
    names = get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n_layers)
    peft = _peft_tensors(adapter)
    expected = {}
    for key, value in peft.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        name = names.get_name(module.replace("model.language_model.", "model."))
        assert name is not None, module
        expected[f"{name}.weight.{'lora_a' if '.lora_A.' in key else 'lora_b'}"] = value
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(tensors[name].data).reshape(value.shape), value)


@pytest.mark.slow
def test_convert_to_gguf_uses_llama_cpp_names(text):
    base, adapter, _merged, root = text
    out = root / "adapter.gguf"
    cli("convert", adapter, "-o", out, "--to", "gguf", "--base", base)
    _gguf_names_as_llama_cpp(out, adapter, 6)


@pytest.mark.slow
def test_mlx_lm_loads_the_converted_adapter_like_the_merge(text):
    """`convert --to mlx --base`: real mlx-lm (gemma4_text) loads the adapter onto the base and
    equals loraformat's merge loaded by mlx-lm."""
    from test_families_cli import mlx_adapter_equals_merge

    base, adapter, _merged, root = text
    # mlx-lm reads global_head_dim / num_global_key_value_heads, which transformers 5 folds
    # into per_layer_config when it saves.
    mlx_adapter_equals_merge(base, adapter, root, IDS,
                             {"global_head_dim": 16, "num_global_key_value_heads": 1})


@pytest.mark.slow
def test_multimodal_language_model_merges_exports_and_converts(tmp_path_factory):
    """Gemma4ForConditionalGeneration with PEFT's adapter on its language model (attention, MLP
    and per-layer projections; the vision tower has same-named projections): detected as
    gemma4_multimodal only; the vision tower and its embedder are named as left out; `merge -o
    model.onnx` equals PEFT's merge of the multimodal model on text; the GGUF LoRA has
    llama.cpp's gemma4 names; `merge --with-past` + generate gives its greedy tokens."""
    from loraformat.errors import LoraformatError

    root = tmp_path_factory.mktemp("gemma4-mm")
    base = tiny_gemma4.gemma4_multimodal(root / "base")
    info, tensors = opened(base)
    # The decoder core would look for an untied head at language_model.lm_head; Gemma 4's would
    # sit at the top (every release ties it): refused, not silently tied.
    untied = {**tensors, "lm_head.weight": torch.zeros(96, 32)}
    with pytest.raises(LoraformatError, match="untied lm_head"):
        families()[1].export_model(info, untied, ExportOptions())
    text, multimodal = families()
    assert multimodal.detect(info) and not text.detect(info)
    bare = CheckpointInfo(None, {}, info.shapes)
    assert multimodal.detect(bare) and not text.detect(bare)
    left_out = multimodal.left_out(info)
    assert left_out and all(n.startswith(("model.vision_tower.", "model.embed_vision."))
                            for n in left_out)
    layers = {layer.path for layer in multimodal.dense_layers(info)}
    assert all(p.startswith("model.language_model.") for p in layers)
    assert "model.language_model.per_layer_model_projection" in layers
    targets = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
               r"|per_layer_input_gate|per_layer_projection|per_layer_model_projection)")
    adapter = tiny_gemma4.peft_adapter(base, root / "adapter", targets)
    merged = tiny_gemma4.peft_merged(base, adapter)
    _merged_onnx_equals_peft(base, adapter, merged, root / "merged.onnx")
    gguf_out = root / "adapter.gguf"
    cli("convert", adapter, "-o", gguf_out, "--to", "gguf", "--base", base)
    _gguf_names_as_llama_cpp(gguf_out, adapter, 4)
    # The KV-cache export generates the multimodal model's greedy tokens on text, through
    # loraformat's generate and through ORT GenAI (its config's sizes from text_config).
    from test_genai import NEW_TOKENS, genai_tokens
    from test_genai import PROMPT as GENAI_PROMPT

    from loraformat.generate import greedy_generate

    result = run_cli("merge", base, adapter, "-o", root / "past" / "model.onnx", "--with-past")
    assert result.code == 0, result.err
    assert "(model.type gemma4_text)" in result.out

    def greedy(prompt: list[int], new: int) -> list[int]:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = merged.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    past = root / "past" / "model.onnx"
    assert greedy_generate(past, PROMPT, 24).new_ids == [greedy(PROMPT, 24)]
    assert genai_tokens(past.parent) == greedy(GENAI_PROMPT, NEW_TOKENS)


def test_with_past_prefill_and_decode_equal_transformers_cache(tmp_path):
    """The KV-cache module: per-layer caches of each layer's own shape, none for the KV-shared
    layers; prefill 5 tokens then decode 6 (across the 4-token window) equals transformers
    decoding with its own cache, step by step."""
    path = tiny_gemma4.gemma4(tmp_path / "base")
    info, tensors = opened(path)
    text, _ = families()
    em = text.export_model(info, tensors, ExportOptions(with_past=True))
    own = [0, 1, 2, 3]  # layers 4 and 5 read layers 2 and 3's keys and values
    assert em.input_names == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in own for k in ("key", "value")]
    assert em.output_names == ["logits"] + [f"present.{i}.{k}" for i in own
                                            for k in ("key", "value")]
    shapes = {i: (2, 8) if i % 2 == 0 else (1, 16) for i in own}  # (KV heads, head size)
    reference = tiny_gemma4.load(path)
    prompt = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    past = {f"past_key_values_{i}_{k}": torch.zeros(2, shapes[i][0], 0, shapes[i][1])
            for i in own for k in ("key", "value")}
    new, start, cache = prompt, 0, None
    for _ in range(7):
        total = start + new.shape[1]
        with torch.no_grad():
            out = em.module(input_ids=new, attention_mask=torch.ones(2, total, dtype=torch.int64),
                            position_ids=torch.arange(start, total).expand(2, -1), **past)
            ref = reference(input_ids=new, cache=cache, use_cache=True)
        torch.testing.assert_close(out[0], ref.logits, atol=1e-4, rtol=0)
        for (name, _), present in zip(past.items(), out[1:], strict=True):
            layer = int(name.split("_")[3])
            assert present.shape == (2, shapes[layer][0], total, shapes[layer][1])
        cache = ref.past_key_values
        past = dict(zip(past, out[1:], strict=True))
        new, start = out[0][:, -1:].argmax(-1), total


@pytest.mark.slow
def test_with_past_generate_equals_transformers_greedy(text):
    """`merge --with-past` + `generate`: transformers' 24 greedy tokens of PEFT's merge, also
    after ONNX Runtime's fusions (--optimize). The emitter does not take Gemma 4 (its own blocks;
    and its spec's per-layer shapes and caches), so the export is traced."""
    import onnx

    from loraformat.export.emitter import unsupported

    base, adapter, merged, root = text
    info, _ = opened(base)
    reason = unsupported(families()[0].spec(info), info.config)
    assert reason == "layer 1 has its own head shape (4, 1, 16)"
    out = root / "past.onnx"
    cli("merge", base, adapter, "-o", out, "--with-past")
    ops = {n.op_type for n in onnx.load(out, load_external_data=False).graph.node}
    assert "GroupQueryAttention" not in ops
    report = json.loads(cli("generate", out, "--prompt-ids", ",".join(map(str, PROMPT)),
                            "--max-new-tokens", "24", "--json"))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = merged.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=24, eos_token_id=None, pad_token_id=0,
                                   )[0, len(PROMPT):].tolist()
    assert len(set(expected)) >= 6, expected  # varied: a stuck model would hide a broken cache
    assert report["new_ids"] == expected
    # --optimize: ONNX Runtime's fusions fire on the traced graph and the tokens stay the same.
    from loraformat.export.optimize import optimize_file
    from loraformat.generate import greedy_generate

    fused = root / "fused.onnx"
    fusions = optimize_file(out, fused, base).fusions
    assert fusions.get("SimplifiedLayerNormalization", 0) + fusions.get(
        "SkipSimplifiedLayerNormalization", 0) >= 40, fusions
    assert greedy_generate(fused, PROMPT, 24).new_ids == [expected]


@pytest.mark.slow
def test_genai_runs_the_merged_and_slot_folders_like_transformers(text):
    """ONNX Runtime GenAI 0.18 (model.type gemma4_text) runs the traced KV-cache graph: it
    reads each layer's cache shape off the graph, and the KV-shared layers (the last ones) have
    no cache inputs, so the config's cache layers are 0..3. The merged folder, and the slot
    folder with the converted adapter active through og.Adapters, give transformers' greedy
    tokens of PEFT's merge; with no adapter active, the base's."""
    from test_genai import NEW_TOKENS, genai_tokens
    from test_genai import PROMPT as GENAI_PROMPT

    from loraformat.export.genai import GENAI_CONFIG

    base, adapter, merged, root = text

    def reference(model) -> list[int]:
        ids = torch.tensor([GENAI_PROMPT])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
        return out[0, len(GENAI_PROMPT):].tolist()

    expected, plain = reference(merged), reference(tiny_gemma4.load(base))
    assert expected != plain
    folder = root / "genai-merged"
    cli("merge", base, adapter, "-o", folder / "model.onnx", "--with-past")
    config = json.loads((folder / GENAI_CONFIG).read_text())["model"]
    assert config["type"] == "gemma4_text" and config["decoder"]["num_hidden_layers"] == 4
    assert genai_tokens(folder) == expected
    folder = root / "genai-slots"
    cli("export", base, "-o", folder / "model.onnx", "--lora-slots", "--with-past")
    converted = root / "genai.onnx_adapter"
    cli("convert", adapter, "-o", converted, "--base", base)
    assert genai_tokens(folder, converted) == expected
    assert genai_tokens(folder) == plain


@pytest.mark.slow
@pytest.mark.parametrize("multimodal", [False, True])
def test_conformance_kit(tmp_path, multimodal):
    from loraformat.testing import check_plugin

    build = tiny_gemma4.gemma4_multimodal if multimodal else tiny_gemma4.gemma4
    path = build(tmp_path / "base")
    architecture = "gemma4_multimodal" if multimodal else "gemma4"
    report = check_plugin(path, architecture, reference=tiny_gemma4.load(path))
    assert (report.architecture, report.plugin) == (architecture, "gemma4")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert {"peft", "gguf", "mlx"} <= set(report.foreign_names)
    assert not report.unused_layers


def test_left_padded_batch_equals_transformers(tmp_path):
    """attention_mask and position_ids reach the windows, the shared layers' borrowed keys and
    the per-layer inputs together: a left-padded row (3 pads) gives transformers' logits."""
    path = tiny_gemma4.gemma4(tmp_path / "base")
    info, tensors = opened(path)
    em = families()[0].export_model(info, tensors, ExportOptions(with_past=True))
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 10, dtype=torch.int64)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    past = {k: torch.zeros(2, v.shape[1], 0, v.shape[3]) for k, v in em.example_inputs.items()
            if k.startswith("past_")}
    with torch.no_grad():
        ours = em.module(input_ids=ids, attention_mask=mask, position_ids=positions, **past)[0]
        ref = tiny_gemma4.load(path)(input_ids=ids, attention_mask=mask, position_ids=positions,
                                     use_cache=False).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)


def test_moe_block_refused_by_the_export_module():
    """The MoE variant (a router and stacked experts beside the dense MLP) is left out of the
    export module: its spec says so in one line naming the config."""
    from loraformat.errors import LoraformatError

    config = {**tiny_gemma4.text_config().to_dict(), "enable_moe_block": True,
              "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 16}
    with pytest.raises(LoraformatError, match=r"MoE block \(enable_moe_block\) is not supported"):
        families()[0].spec(CheckpointInfo(config=config))


def test_spec_of_an_e2b_shaped_config_follows_transformers():
    """A config shaped like Gemma 4 E2B's (35 layers, four sliding to one full, the last 20
    KV-shared, double-wide MLPs, 256-wide per-layer inputs; no weights built): every shared
    layer reads the layer transformers stores for its kind, shapes and widths as its per-layer
    config says."""
    from transformers import Gemma4TextConfig

    pattern = ["sliding_attention"] * 4 + ["full_attention"]
    config = Gemma4TextConfig(
        hidden_size=1536, num_hidden_layers=35, intermediate_size=6144, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, global_head_dim=512, num_kv_shared_layers=20,
        hidden_size_per_layer_input=256, use_double_wide_mlp=True, sliding_window=512,
        final_logit_softcapping=30.0, layer_types=(pattern * 7)[:35],
    )
    spec = families()[0].spec(CheckpointInfo(config=config.to_dict()))
    modes = config.kv_sharing_modes
    stores = {config.layer_types[i]: i for i, m in enumerate(modes) if m == "store"}
    for i in range(35):
        source = spec.extras["kv_source"][i]
        assert source == (stores[config.layer_types[i]] if modes[i] == "reuse" else None), i
        assert (spec.layer_caches()[i].tensors == ()) == (modes[i] == "reuse")
        assert spec.shape_of_layer(i) == (8, config.per_layer_config[i].num_key_value_heads,
                                          config.per_layer_config[i].head_dim)
        assert spec.extras["intermediate"][i] == 6144 * (2 if modes[i] == "reuse" else 1)
    assert spec.ropes["full_attention"].dim == 512
    assert np.count_nonzero(spec.ropes["full_attention"].inv_freq) == 64  # 0.25 · 512 / 2
