"""The decoder families of issue 13 (Qwen2, Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3) and issue 25
(OLMo 2, OLMo 3, SmolLM3, Granite, Ministral 3) against transformers and gguf-py's tables, through
the plugin objects directly (no registry)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import tiny_families
import torch

from loraformat.architecture import ExportOptions
from loraformat.architecture.protocol import Architecture, CheckpointInfo
from loraformat.checkpoint import Checkpoint
from loraformat.errors import LoraformatError

FAMILIES = tiny_families.FAMILIES
#: Families whose tensors are another's (only the config tells them apart): what a bare
#: checkpoint of theirs is detected as (None: nothing claims it, the registry says LLaMA).
SAME_TENSORS = {"mistral": None, "llama": None, "olmo3": "olmo2", "smollm3": None,
                "granite": None, "ministral3": None}
#: Families llama.cpp converts through LlamaModel (q/k rows permuted).
PERMUTED = ("mistral", "smollm3", "granite", "ministral3")


def plugin(family: str):
    return importlib.import_module(f"loraformat_plugins.{family}")


def arch(family: str) -> Architecture:
    (found,) = plugin(family).loraformat_architectures()
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(family, **kwargs)`` → (CheckpointInfo, tensors) of a tiny checkpoint (cached)."""
    cache: dict[tuple, tuple[CheckpointInfo, dict]] = {}

    def get(family: str, **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = tiny_families.opened(
                tiny_families.BUILDERS[family](tmp_path_factory.mktemp(family), **kwargs))
        return cache[key]

    return get


def test_plugin_modules_declare_the_v2_contract():
    ids = set()
    for family in FAMILIES:
        assert plugin(family).LORAFORMAT_PLUGIN_API == 2
        a = arch(family)
        assert isinstance(a, Architecture) and a.id == family
        assert a.names.problems() == []
        ids.add(a.id)
    assert len(ids) == len(FAMILIES)


@pytest.mark.slow
def test_detection_matrix(built, tiny_checkpoint):
    """Every family's checkpoint is detected as itself and only itself (LLaMA included), from
    its config; and from tensor names alone wherever they differ from LLaMA's."""
    from loraformat_plugins import llama

    from loraformat.architecture import registry

    def llama_detects(info: CheckpointInfo) -> bool:
        return llama.Llama().detect(info)

    checkpoints = {f: built(f)[0] for f in FAMILIES}
    with Checkpoint(tiny_checkpoint("llama")) as c:
        checkpoints["llama"] = CheckpointInfo(c.path, c.config, c.shapes())
    for name, info in checkpoints.items():
        found = [f for f in FAMILIES if arch(f).detect(info)]
        found += ["llama"] if llama_detects(info) else []
        assert found == [name], name
        bare = CheckpointInfo(None, {}, info.shapes)
        found = [f for f in FAMILIES if arch(f).detect(bare)]
        # Mistral's tensors are LLaMA's (and OLMo 3's OLMo 2's): only the config tells them apart.
        as_bare = SAME_TENSORS.get(name, name)
        assert found == ([] if as_bare is None else [as_bare]), name
        # Through the registry (LLaMA's tensor test also accepts bare Gemma 2 tensors; plugin
        # order puts gemma2 first), a bare checkpoint is still its own family.
        detected = registry().detect(bare)
        assert detected is not None and detected.id == (as_bare or "llama"), name
    for family in FAMILIES:
        assert not arch(family).detect(CheckpointInfo())
    # architectures alone (a partial config, as PEFT's adapter_config carries)
    assert arch("gemma3").detect(CheckpointInfo(config={"architectures": ["Gemma3ForCausalLM"]}))
    assert not arch("gemma3").detect(CheckpointInfo(config={"model_type": "gemma3"}))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_layers_names_and_shape(built, family):
    """Dense layers agree with the stored shapes; each gets llama.cpp's name for that family
    exactly as gguf-py's own tensor map gives it; model_shape matches the config."""
    import gguf
    from gguf.tensor_mapping import get_tensor_name_map

    info, _ = built(family)
    a = arch(family)
    layers = a.dense_layers(info)
    n = info.config["num_hidden_layers"]
    per_block = len(tiny_families.PROJECTIONS[family])
    tied = "lm_head.weight" not in info.shapes
    assert len(layers) == per_block * n + 1 + (0 if tied else 1)
    for layer in layers:
        assert layer.stored_shape() == info.shapes[layer.weight]
        assert (layer.bias is not None) == (family == "qwen2" and layer.path.endswith(("q_proj",
                                            "k_proj", "v_proj")))
    assert a.gguf_architecture in gguf.MODEL_ARCH_NAMES.values()
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == a.gguf_architecture)
    reference = get_tensor_name_map(model_arch, n)
    for layer in layers:
        ours = a.names.foreign(layer.path, "gguf")
        assert ours == reference.get_name(layer.path), layer.path
        if ours is not None:
            assert a.names.layer_path(ours, "gguf") == layer.path
        for convention in ("peft", "mlx"):
            assert a.names.foreign(layer.path, convention) == layer.path
    shape = a.model_shape(info)
    c = info.config
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.vocab_size) == (
        n, c["num_attention_heads"], c["num_key_value_heads"], c["vocab_size"]
    )
    assert shape.head_dim == (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    assert a.default_targets(info) == (["qkv_proj"] if family == "phi3" else ["q_proj", "v_proj"])


def test_peft_default_targets_are_peft_own():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft

    for family, model_type in [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("mistral", "mistral"),
                               ("gemma2", "gemma2"), ("gemma3", "gemma3_text")]:
        assert list(arch(family).targets) == peft[model_type], family
    # PEFT has no phi3 entry; Phi-3 takes PEFT's default for the same fused projection (codegen)
    assert "phi3" not in peft
    assert list(arch("phi3").targets) == peft["codegen"] == ["qkv_proj"]
    # PEFT has no entry for issue 25's families either; they take LLaMA's (same projections).
    for family in tiny_families.FAMILIES_25:
        assert family not in peft
        assert list(arch(family).targets) == peft["llama"], family


@pytest.mark.slow
def test_phi3_fused_parts(built):
    info, _ = built("phi3")
    by_path = {layer.path: layer for layer in arch("phi3").dense_layers(info)}
    qkv = by_path["model.layers.0.self_attn.qkv_proj"]
    # 4 query heads and 2 KV heads of 8: q 32 rows, k 16, v 16
    assert [(p.name, p.start, p.stop) for p in qkv.parts] == [
        ("q", 0, 32), ("k", 32, 48), ("v", 48, 64)
    ]
    gate_up = by_path["model.layers.1.mlp.gate_up_proj"]
    assert [(p.name, p.start, p.stop) for p in gate_up.parts] == [("gate", 0, 64), ("up", 64, 128)]
    assert by_path["model.layers.0.mlp.down_proj"].parts == ()


@pytest.mark.slow
def test_row_permutation_only_for_families_llama_cpp_permutes(built, tiny_checkpoint):
    """llama.cpp permutes q/k rows only for what LlamaModel converts (Mistral among them)."""
    from loraformat_plugins import llama

    for family in PERMUTED:
        info, _ = built(family)
        for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"):
            ours = arch(family).row_permutation(info, path, "gguf")
            assert ours == llama.Llama().row_permutation(info, path, "gguf")
            assert sorted(ours) == list(range(len(ours))) and ours != sorted(ours)
        v = "model.layers.0.self_attn.v_proj"
        assert arch(family).row_permutation(info, v, "gguf") is None
        q = "model.layers.0.self_attn.q_proj"
        assert arch(family).row_permutation(info, q, "mlx") is None
    for family in set(FAMILIES) - set(PERMUTED):
        info, _ = built(family)
        for layer in arch(family).dense_layers(info):
            assert arch(family).row_permutation(info, layer.path, "gguf") is None


def _logits(family, built, seq=13, **kwargs):
    info, tensors = built(family, **kwargs)
    em = arch(family).export_model(info, tensors, ExportOptions())
    ids = torch.randint(0, 96, (2, seq), generator=torch.Generator().manual_seed(0))
    reference = tiny_families.load_transformers(info.path)
    with torch.no_grad():
        return em.module(input_ids=ids), reference(input_ids=ids, use_cache=False).logits


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, kwargs",
    [
        ("qwen2", {}),
        ("qwen2", {"tie_word_embeddings": False}),
        ("qwen2", {"sliding_window": 4}),  # layer 0 full, layer 1 slides (max_window_layers)
        ("qwen3", {}),
        ("mistral", {}),  # window 4 < 13 tokens
        ("mistral", {"sliding_window": 32}),  # window > sequence
        ("gemma2", {}),  # sliding then global layer, window 4
        ("gemma2", {"tie_word_embeddings": False}),  # soft-capped lm_head of its own
        ("gemma3", {}),  # sliding (local rope) then global (scaled rope) layer
        ("phi3", {}),  # 13 tokens > 8: LongRoPE's long factors
        ("olmo2", {}),  # post-norms, q/k norms over the projection
        ("olmo3", {}),  # sliding (default rope) then full (YaRN) layer
        ("smollm3", {}),  # rope layer then NoPE layer
        ("granite", {}),  # four multipliers, tied head divided by logits_scaling
        ("ministral3", {}),  # YaRN; 13 tokens > 8: the query temperature grows
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_export_module_logits_equal_transformers(built, family, kwargs):
    windows = arch(family).spec(built(family, **kwargs)[0]).windows
    assert windows == {
        "mistral": (kwargs.get("sliding_window", 4),) * 2,
        "gemma2": (4, None),
        "gemma3": (4, None),
        "olmo3": (4, None),
        "qwen2": (None, 4) if kwargs.get("sliding_window") else (None, None),
    }.get(family, (None, None))
    ours, expected = _logits(family, built, **kwargs)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_phi3_short_rope_below_threshold(built):
    ours, expected = _logits("phi3", built, seq=6)  # 6 ≤ 8: short factors
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def _decode_against_transformers_cache(em, reference, prompt, steps):
    """Prefill then greedy decode through the export module and through transformers with its
    own cache, step by step: logits equal at every step (1e-4)."""
    past_args = [k for k in em.example_inputs if k.startswith("past_key_values_")]
    batch, (_, kv_heads, _, head_dim) = prompt.shape[0], em.example_inputs[past_args[0]].shape
    past = {k: torch.zeros(batch, kv_heads, 0, head_dim) for k in past_args}
    new, start, cache = prompt, 0, None
    for _ in range(steps + 1):
        total = start + new.shape[1]
        with torch.no_grad():
            out = em.module(
                input_ids=new,
                attention_mask=torch.ones(batch, total, dtype=torch.int64),
                position_ids=torch.arange(start, total).expand(batch, -1),
                **past,
            )
            ref = reference(input_ids=new, cache=cache, use_cache=True)
        torch.testing.assert_close(out[0], ref.logits, atol=1e-4, rtol=0)
        for present in out[1:]:
            assert present.shape == (batch, kv_heads, total, head_dim)
        cache = ref.past_key_values
        past = dict(zip(past_args, out[1:], strict=True))
        new, start = out[0][:, -1:].argmax(-1), total


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_with_past_prefill_and_decode_equal_transformers_cache(built, family):
    """Prefill 5 tokens, decode 6: crosses Mistral's and Gemma's 4-token window and Phi-3's
    8-token long-rope threshold inside the decode."""
    info, tensors = built(family)
    em = arch(family).export_model(info, tensors, ExportOptions(with_past=True))
    n = info.config["num_hidden_layers"]
    assert em.input_names == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(n) for kind in ("key", "value")
    ]
    assert em.output_names == ["logits"] + [
        f"present.{i}.{k}" for i in range(n) for k in ("key", "value")
    ]
    prompt = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    _decode_against_transformers_cache(em, tiny_families.load_transformers(info.path), prompt, 6)


@pytest.mark.slow
def test_state_dict_keys_are_checkpoint_names(built):
    for family in FAMILIES:
        info, tensors = built(family)
        em = arch(family).export_model(info, tensors, ExportOptions())
        assert set(em.module.state_dict()) == set(tensors), family


@pytest.mark.slow
def test_export_errors_name_the_checkpoint(built):
    info, tensors = built("qwen3")
    partial = {k: v for k, v in tensors.items() if "layers.1.self_attn.q_norm" not in k}
    missing = r"lacks 1 tensor.*layers\.1\.self_attn\.q_norm\.weight"
    with pytest.raises(LoraformatError, match=missing) as e:
        arch("qwen3").export_model(info, partial, ExportOptions())
    assert e.value.path == str(info.path)
    info, tensors = built("phi3")
    config = {**info.config, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}
    broken = CheckpointInfo(info.path, config, info.shapes)
    with pytest.raises(LoraformatError, match="rope type 'dynamic' is not supported") as e:
        arch("phi3").export_model(broken, tensors, ExportOptions())
    assert e.value.path == str(info.path / "config.json")
    no_heads = CheckpointInfo(info.path, {"model_type": "phi3"}, info.shapes)
    with pytest.raises(LoraformatError, match="needs 'num_hidden_layers'"):
        arch("phi3").export_model(no_heads, tensors, ExportOptions())


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_conformance_kit(built, family):
    from loraformat.testing import check_plugin

    info, _ = built(family)
    report = check_plugin(info.path, family, reference=tiny_families.load_transformers(info.path))
    assert report.plugin == family
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert {"peft", "gguf", "mlx"} <= set(report.foreign_names)
    assert not report.unused_layers


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_transformers(built, family):
    """attention_mask and position_ids are honoured together with windows, soft-caps and
    per-layer ropes: a left-padded row (3 pads, 10 tokens) gives transformers' logits."""
    info, tensors = built(family)
    em = arch(family).export_model(info, tensors, ExportOptions(with_past=True))
    reference = tiny_families.load_transformers(info.path)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 10, dtype=torch.int64)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    example = em.example_inputs["past_key_values_0_key"]
    past = {
        k: torch.zeros(2, example.shape[1], 0, example.shape[3])
        for k in em.example_inputs
        if k.startswith("past_")
    }
    with torch.no_grad():
        ours = em.module(input_ids=ids, attention_mask=mask, position_ids=positions, **past)[0]
        ref = reference(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_soft_capped_lm_head_carries_a_lora_slot(built):
    """Gemma 2's untied lm_head is still a Dense (the slot exporter wraps it by path): a slot
    filled with A·B gives the same logits as A·B merged into its weight, soft-cap after both."""
    from loraformat.architecture.modules import Dense

    info, tensors = built("gemma2", tie_word_embeddings=False)
    em = arch("gemma2").export_model(info, tensors, ExportOptions())
    head = em.module.get_submodule("lm_head")
    assert isinstance(head, Dense)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(32, 3, generator=g), torch.randn(3, 96, generator=g)
    ids = torch.randint(3, 96, (2, 6), generator=g)
    with torch.no_grad():
        plain = em.module(input_ids=ids)
        head.lora_A, head.lora_B = a, b
        slotted = em.module(input_ids=ids)
        # merged: a second module, so the cached checkpoint tensors stay untouched
        changed = {**tensors, "lm_head.weight": tensors["lm_head.weight"] + (a @ b).t()}
        merged = arch("gemma2").export_model(info, changed, ExportOptions()).module(input_ids=ids)
    torch.testing.assert_close(slotted, merged, atol=1e-5, rtol=0)
    assert (slotted - plain).abs().max() > 1e-2
    assert merged.abs().max() <= 2.0  # final_logit_softcapping


SIZES = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2}
LEGACY = {  # config.json as transformers 4 wrote them (no layer_types / rope_parameters)
    "qwen2": {"num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 4,
              "max_window_layers": 2, "rope_theta": 1000000.0},
    "gemma2": {"num_hidden_layers": 4, "sliding_window": 4, "head_dim": 8,
               "query_pre_attn_scalar": 12},
    "gemma3": {"num_hidden_layers": 6, "sliding_window": 4, "head_dim": 8,
               "sliding_window_pattern": 3, "rope_theta": 1000000.0,
               "rope_local_base_freq": 10000.0,
               "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    "phi3": {"num_hidden_layers": 2, "original_max_position_embeddings": 8,
             "max_position_embeddings": 32, "rope_theta": 10000.0,
             "rope_scaling": {"type": "su", "short_factor": [1.0, 1.2, 1.5, 2.0],
                              "long_factor": [2.0, 3.0, 5.0, 8.0]}},
    "mistral": {"num_hidden_layers": 2, "sliding_window": 4, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("family", sorted(LEGACY))
def test_legacy_configs_read_as_transformers_reads_them(family):
    """A transformers-4 config.json gives the same windows and ropes as the same config after
    transformers 5 normalised it (layer_types, rope_parameters) — transformers is the judge."""
    from transformers import AutoConfig

    model_type = {"gemma3": "gemma3_text"}.get(family, family)
    legacy = {"model_type": model_type, **SIZES, **LEGACY[family]}
    fed = dict(legacy)
    if family == "phi3":
        # transformers 5 wants original_max_position_embeddings inside the rope dict as well;
        # ours reads the top-level one too.
        fed["rope_scaling"] = {**legacy["rope_scaling"], "original_max_position_embeddings": 8}
    normalised = AutoConfig.for_model(**fed).to_dict()
    ours = arch(family).spec(CheckpointInfo(config=legacy))
    theirs = arch(family).spec(CheckpointInfo(config=normalised))
    assert ours.windows == theirs.windows
    assert ours.rope_of == theirs.rope_of
    for key in set(ours.rope_of):
        a, b = ours.ropes[key], theirs.ropes[key]
        np.testing.assert_allclose(a.inv_freq, b.inv_freq, atol=0, rtol=1e-6)
        assert (a.dim, a.scaling, a.threshold) == (b.dim, b.scaling, b.threshold)
        assert (a.long_inv_freq is None) == (b.long_inv_freq is None)
        if a.long_inv_freq is not None:
            np.testing.assert_allclose(a.long_inv_freq, b.long_inv_freq, atol=0, rtol=1e-6)
    expected = {
        "qwen2": (None, None, 4, 4),
        "gemma2": (4, None, 4, None),
        "gemma3": (4, 4, None, 4, 4, None),
        "phi3": (None, None),
        "mistral": (4, 4),
    }[family]
    assert ours.windows == expected


def test_longrope_tables_equal_transformers():
    """Phi-3's short and long inverse frequencies and attention factor, against transformers'
    own LongRoPE initialisation."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    legacy = {"model_type": "phi3", **SIZES, **LEGACY["phi3"]}
    rope = arch("phi3").spec(CheckpointInfo(config=legacy)).ropes[""]
    fed = {k: v for k, v in legacy.items() if k != "model_type"}
    fed["rope_scaling"] = {**legacy["rope_scaling"], "original_max_position_embeddings": 8}
    config = Phi3Config(**fed)
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=9)
    np.testing.assert_allclose(rope.inv_freq, short.numpy(), atol=0, rtol=1e-6)
    np.testing.assert_allclose(rope.long_inv_freq, long.numpy(), atol=0, rtol=1e-6)
    assert rope.scaling == pytest.approx(factor) and factor > 1.0
    assert rope.threshold == 8


@pytest.mark.slow
def test_multimodal_mistral3_is_its_language_model(tmp_path):
    """Mistral3ForConditionalGeneration: detected by the mistral3 plugin only (not when it wraps
    Mistral 4); its dense layers are the decoder's (none of the Pixtral tower's same-named
    projections); the vision tower and projector are named as left out; the export module's
    logits, with and without the KV cache, equal transformers' multimodal model on text."""
    from loraformat_plugins import mistral3
    from transformers import Mistral3ForConditionalGeneration

    path = tiny_families.mistral3_multimodal(tmp_path / "base")
    info, tensors = tiny_families.opened(path)
    (family,) = mistral3.loraformat_architectures()
    assert family.names.problems() == []
    assert family.detect(info)
    assert [f for f in FAMILIES if arch(f).detect(info)] == []
    moe = {**info.config, "text_config": {**info.config["text_config"], "model_type": "mistral4"}}
    assert not family.detect(CheckpointInfo(path, moe, info.shapes))
    layers = family.dense_layers(info)
    assert {layer.path for layer in layers} == {
        f"language_model.model.layers.{i}.{p}" for i in range(2) for p in family.projections
    } | {"language_model.model.embed_tokens", "language_model.lm_head"}
    left_out = family.left_out(info)
    assert left_out and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in
                            left_out)
    assert set(left_out) | {layer.weight for layer in layers} <= set(info.shapes)
    # PEFT names the in-memory path; llama.cpp drops the language_model level.
    q = "language_model.model.layers.1.self_attn.q_proj"
    assert family.names.foreign(q, "peft") == "model.language_model.layers.1.self_attn.q_proj"
    assert family.names.foreign(q, "gguf") == "blk.1.attn_q"
    assert family.model_shape(info).num_layers == 2
    reference = Mistral3ForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager"
    ).eval()
    ids = torch.randint(0, 95, (2, 13), generator=torch.Generator().manual_seed(0))
    em = family.export_model(info, tensors, ExportOptions())
    with torch.no_grad():
        torch.testing.assert_close(em.module(input_ids=ids), reference(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)
    em = family.export_model(info, tensors, ExportOptions(with_past=True))
    prompt = torch.randint(3, 95, (2, 5), generator=torch.Generator().manual_seed(1))
    _decode_against_transformers_cache(em, reference, prompt, 6)
    # The KV-cache export asks the description of the language model (text_config), not of the
    # multimodal config.
    from cli_harness import run_cli

    from loraformat.generate import greedy_generate

    run = run_cli("export", path, "-o", tmp_path / "d.onnx", "--with-past", "--no-genai-config")
    assert run.code == 0, run.err
    start = [5, 17, 33, 2, 71]
    expected = reference.generate(torch.tensor([start]), do_sample=False, max_new_tokens=8,
                                  eos_token_id=None, pad_token_id=0)
    assert greedy_generate(tmp_path / "d.onnx", start, 8).new_ids == [expected[0, 5:].tolist()]


@pytest.mark.slow
def test_new_spec_pieces_are_flagged_and_absent_from_earlier_families(built):
    """The DecoderSpec pieces issue 25 added keep their defaults for issue 13's families (so
    their modules are unchanged and the emitter may take them); each new family's spec says
    which pieces it uses, so a consumer that does not know them falls back."""
    expected = {
        "olmo2": ("block_norms", "qk_norm_span"),
        "olmo3": ("block_norms", "qk_norm_span"),
        "smollm3": ("no_rope",),
        "granite": ("residual_scale", "logits_divisor"),
        "ministral3": ("query_scale",),
    }
    for family in FAMILIES:
        info, _ = built(family)
        assert arch(family).spec(info).extensions() == expected.get(family, ()), family
