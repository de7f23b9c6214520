"""Qwen3.5 (Gated DeltaNet linear attention + gated full attention) against independent
references: transformers (its modules, its model with PEFT's merge, its greedy generate), gguf-py's
tensor map and llama.cpp's converter's value-head reorder (re-derived here with numpy), mlx-lm's
own model.

The tiny checkpoints (tests/tiny_qwen35.py) have layers linear, linear, linear, full; 2 key heads
and 4 value heads in the linear layers; initializer_range 0.2. Adapters are PEFT's
``target_modules="all-linear"``.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import tiny_families
import tiny_qwen35
import torch

from loraformat.architecture import ExportOptions
from loraformat.architecture.protocol import Architecture, CheckpointInfo

PROMPT = [5, 17, 33, 2, 71, 40, 9]


def families():
    from loraformat_plugins import qwen3_5

    text, multimodal = qwen3_5.loraformat_architectures()
    return text, multimodal


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built("text" | "multimodal")`` → (CheckpointInfo, tensors) of a tiny checkpoint."""
    cache: dict[str, tuple[CheckpointInfo, dict]] = {}

    def get(kind: str):
        if kind not in cache:
            make = tiny_qwen35.qwen3_5 if kind == "text" else tiny_qwen35.qwen3_5_multimodal
            cache[kind] = tiny_families.opened(make(tmp_path_factory.mktemp(kind)))
        return cache[kind]

    return get


def test_plugin_declares_two_architectures():
    from loraformat_plugins import qwen3_5

    assert qwen3_5.LORAFORMAT_PLUGIN_API == 2
    text, multimodal = families()
    assert (text.id, multimodal.id) == ("qwen3_5", "qwen3_5_multimodal")
    for arch in (text, multimodal):
        assert isinstance(arch, Architecture)
        assert arch.names.problems() == []
        assert arch.gguf_architecture == "qwen35"


def test_detection(built):
    """Each checkpoint is its own architecture and no other installed one's, from its config and
    from its tensor names alone; PEFT's adapter config (model_type "qwen3_5", the transformers
    module, for both) is told apart by its class."""
    from loraformat.architecture import registry

    text, multimodal = families()
    for kind, arch in (("text", text), ("multimodal", multimodal)):
        info, _ = built(kind)
        assert [a.id for a in registry().architectures().values() if a.detect(info)] == [arch.id]
        bare = CheckpointInfo(None, {}, info.shapes)
        assert registry().detect(bare).id == arch.id
    for cls, arch in (("Qwen3_5ForCausalLM", text), ("Qwen3_5ForConditionalGeneration",
                                                      multimodal)):
        said = CheckpointInfo(config={"architectures": [cls], "model_type": "qwen3_5"})
        assert registry().detect(said).id == arch.id
    assert not text.detect(CheckpointInfo()) and not multimodal.detect(CheckpointInfo())


def _gguf_reference(n_layer: int):
    import gguf
    from gguf.tensor_mapping import get_tensor_name_map

    return get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, n_layer)


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_dense_layers_and_llama_cpp_names(built, kind):
    """Every projection of both layer kinds, the embedding and the head; each named as gguf-py's
    tensor map names it (after llama.cpp drops ``language_model.``), and read back."""
    text, multimodal = families()
    arch = text if kind == "text" else multimodal
    info, _ = built(kind)
    layers = arch.dense_layers(info)
    prefix = "model." if kind == "text" else "model.language_model."
    kinds = info.config.get("layer_types") or info.config["text_config"]["layer_types"]
    expected = {prefix + "embed_tokens", "lm_head"}
    for i, layer_kind in enumerate(kinds):
        suffixes = (tiny_qwen35.LINEAR_PROJECTIONS if layer_kind == "linear_attention"
                    else tiny_qwen35.ATTENTION_PROJECTIONS)
        mixer = "linear_attn." if layer_kind == "linear_attention" else "self_attn."
        expected |= {f"{prefix}layers.{i}.{mixer}{s}" for s in suffixes}
        expected |= {f"{prefix}layers.{i}.mlp.{s}" for s in tiny_qwen35.MLP_PROJECTIONS}
    assert {layer.path for layer in layers} == expected
    reference = _gguf_reference(len(kinds))
    for layer in layers:
        assert layer.stored_shape() == info.shapes[layer.weight]
        ours = arch.names.foreign(layer.path, "gguf")
        assert ours == reference.get_name(layer.path.replace("language_model.", "")), layer.path
        assert arch.names.layer_path(ours, "gguf") == layer.path
        assert arch.names.foreign(layer.path, "peft") == layer.path
    shape = arch.model_shape(info)
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (4, 4, 2, 16)


def _llama_cpp_reorder(rows: np.ndarray, n_k: int, n_v: int, head_dim: int) -> np.ndarray:
    """llama.cpp's _reorder_v_heads on axis 0, as its converter writes it: view the value rows
    as (key head, value head of that key head, head_dim) and swap the first two axes."""
    per_k = n_v // n_k
    shape = rows.shape
    return rows.reshape(n_k, per_k, head_dim, *shape[1:]).swapaxes(0, 1).reshape(shape)


def test_gguf_order_is_llama_cpp_value_head_reorder(built):
    """2 key heads, 4 value heads: llama.cpp stores the value heads tiled — the rows of
    in_proj_qkv's value part, in_proj_z, in_proj_a and in_proj_b (row permutations), the input
    columns of out_proj (a column permutation)."""
    text, _ = families()
    info, tensors = built("text")
    n_k, n_v, dk, dv = 2, 4, 8, 8
    block = "model.layers.0.linear_attn."
    for name, split in (("in_proj_qkv", 2 * n_k * dk), ("in_proj_z", 0), ("in_proj_a", 0),
                        ("in_proj_b", 0)):
        weight = tensors[block + name + ".weight"].numpy()
        head = 1 if name in ("in_proj_a", "in_proj_b") else dv
        expected = np.concatenate(
            [weight[:split], _llama_cpp_reorder(weight[split:], n_k, n_v, head)]
        )
        perm = text.row_permutation(info, block + name, "gguf")
        np.testing.assert_array_equal(weight[perm], expected, err_msg=name)
        assert text.row_permutation(info, block + name, "mlx") is None
        assert text.column_permutation(info, block + name, "gguf") is None
    out_proj = tensors[block + "out_proj.weight"].numpy()
    columns = text.column_permutation(info, block + "out_proj", "gguf")
    np.testing.assert_array_equal(out_proj[:, columns],
                                  _llama_cpp_reorder(out_proj.T, n_k, n_v, dv).T)
    assert text.row_permutation(info, block + "out_proj", "gguf") is None
    assert text.row_permutation(info, "model.layers.3.self_attn.q_proj", "gguf") is None
    # With as many value heads as key heads llama.cpp keeps every order.
    same = CheckpointInfo(info.path, {**info.config, "linear_num_value_heads": 2}, info.shapes)
    assert text.column_permutation(same, block + "out_proj", "gguf") is None
    assert text.row_permutation(same, block + "in_proj_qkv", "gguf") is None


def test_mlx_names_are_mlx_lm_qwen3_5_modules(built):
    """mlx-lm runs the multimodal config (model_type qwen3_5) only: the multimodal names are the
    module paths of mlx-lm's own Qwen3.5 model; the text model has no MLX names and mlx-lm has
    no qwen3_5_text model."""
    pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3_5 as mlx_qwen3_5

    text, multimodal = families()
    info, _ = built("multimodal")
    model = mlx_qwen3_5.Model(mlx_qwen3_5.ModelArgs.from_dict(info.config))
    weights = {name for name, _ in tree_flatten(model.parameters())}
    for layer in multimodal.dense_layers(info):
        assert multimodal.names.foreign(layer.path, "mlx") + ".weight" in weights, layer.path
    text_info, _ = built("text")
    assert all(text.names.foreign(layer.path, "mlx") is None
               for layer in text.dense_layers(text_info))
    with pytest.raises(ImportError):
        importlib.import_module("mlx_lm.models.qwen3_5_text")


def test_left_out_names_the_vision_tower_and_the_mtp_head(built):
    """What merge and export leave as stored: the multimodal checkpoint's vision tower and
    merger; the multi-token-prediction head the published checkpoints carry (transformers does
    not load it), in both."""
    text, multimodal = families()
    mtp = {"mtp.fc.weight": (32, 64), "mtp.layers.0.self_attn.q_proj.weight": (128, 32)}
    info, _ = built("multimodal")
    with_mtp = CheckpointInfo(info.path, info.config, {**info.shapes, **mtp})
    assert set(multimodal.left_out(with_mtp)) == set(mtp) | {
        n for n in info.shapes if n.startswith("model.visual.")
    }
    assert not any(p.startswith("mtp.") for p in
                   (layer.path for layer in multimodal.dense_layers(with_mtp)))
    info, _ = built("text")
    with_mtp = CheckpointInfo(info.path, info.config, {**info.shapes, **mtp})
    assert text.left_out(info) == [] and set(text.left_out(with_mtp)) == set(mtp)
    assert not any(p.startswith("mtp.") for p in
                   (layer.path for layer in text.dense_layers(with_mtp)))


def test_linear_attention_state_carries_across_calls(built):
    """transformers' Gated DeltaNet layer over 9 positions = ours over 5, then 4 calls of one
    position each carrying the conv and recurrent state (fp32, 1e-5)."""
    from transformers import Qwen3_5ForCausalLM

    from loraformat.architecture.decoder.blocks import Step

    text, _ = families()
    info, tensors = built("text")
    reference = Qwen3_5ForCausalLM.from_pretrained(info.path).eval()
    layer = reference.model.layers[1].linear_attn
    em = text.export_model(info, tensors, ExportOptions())
    ours = em.module.get_submodule("model.layers.1.linear_attn")

    def step(seq: int) -> Step:
        return Step(None, torch.ones(2, seq, dtype=torch.int64), 0, {}, {})

    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layer(x)
        whole, _ = ours(x, step(9), None)
        out, past = ours(x[:, :5], step(5), None)
        outs = [out]
        for t in range(5, 9):
            out, past = ours(x[:, t : t + 1], step(1), past)
            outs.append(out)
    assert past[0].shape == (2, 2 * 2 * 8 + 4 * 8, 3) and past[1].shape == (2, 4, 8, 8)
    torch.testing.assert_close(whole, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_export_module_logits_equal_transformers(built, kind):
    text, multimodal = families()
    arch = text if kind == "text" else multimodal
    info, tensors = built(kind)
    em = arch.export_model(info, tensors, ExportOptions())
    assert set(em.module.state_dict()) == {
        n for n in tensors if not n.startswith("model.visual.")
    }
    ids = torch.randint(3, 90, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 13, dtype=torch.int64)
    mask[1, :3] = 0  # left padding: the linear layers zero the padded positions
    reference = tiny_qwen35.load(info.path)
    with torch.no_grad():
        ours = em.module(input_ids=ids, attention_mask=mask)
        expected = reference(input_ids=ids, attention_mask=mask).logits
    scale = expected.abs().max().item()
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], expected[keep], atol=1e-4 * scale, rtol=0)


# -- the ONNX exports (slow: each traces the module) ----------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The text checkpoint, its all-linear PEFT adapter, and PEFT's merged transformers model."""
    root = tmp_path_factory.mktemp("qwen3_5_onnx")
    base = tiny_qwen35.qwen3_5(root / "base")
    adapter = tiny_qwen35.peft_adapter(base, root / "peft")
    return {"base": base, "peft": adapter, "merged": tiny_qwen35.peft_merged(base, adapter),
            "root": root}


def _ort_logits(path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


def _padded_batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(3, 90, (2, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


@pytest.mark.slow
def test_merged_onnx_equals_peft_merge(made, tmp_path):
    """`merge BASE PEFT -o m.onnx --verify`: one Scan per linear layer over the dynamic
    sequence; logits of a left-padded batch of 11 and of a single token equal transformers on
    PEFT's merged model (1e-4 of the logits' scale)."""
    import json

    import onnx
    from cli_harness import run_cli

    out = tmp_path / "merged.onnx"
    run = run_cli("merge", made["base"], made["peft"], "-o", out, "--verify", "--json")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert report["tensors_changed"] == 3 * 5 + 4 + 4 * 3  # every linear of every block
    assert report["max_abs_diff"] <= report["tolerance"]
    assert sum(n.op_type == "Scan" for n in onnx.load(out).graph.node) == 3
    for ids, mask in (_padded_batch(), (np.array([[7]]), np.ones((1, 1), np.int64))):
        with torch.no_grad():
            expected = made["merged"](input_ids=torch.from_numpy(ids),
                                      attention_mask=torch.from_numpy(mask)).logits.numpy()
        ours = _ort_logits(out, ids, mask)
        keep = mask.astype(bool)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(ours[keep], expected[keep], atol=1e-4 * scale, rtol=0)
    with torch.no_grad():
        plain = tiny_qwen35.load(made["base"])(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(plain - expected).max() > 0.05  # the adapter changes the logits


@pytest.mark.slow
def test_lora_slots_with_onnx_adapter_equal_the_merge(made, tmp_path):
    """`export BASE --lora-slots` + `convert PEFT -o x.onnx_adapter`: every linear layer has a
    slot; the adapter file active gives the merged model's logits, none the base's."""
    from cli_harness import run_cli

    from loraformat.runtime import Session

    graph = tmp_path / "slots.onnx"
    run = run_cli("export", made["base"], "-o", graph, "--lora-slots")
    assert run.code == 0, run.err
    assert "with 32 LoRA slot(s)" in run.out  # 31 block projections and the head
    file = tmp_path / "x.onnx_adapter"
    run = run_cli("convert", made["peft"], "-o", file, "--base", made["base"])
    assert run.code == 0, run.err
    ids, mask = _padded_batch(1)
    keep = mask.astype(bool)
    with torch.no_grad():
        expected = made["merged"](input_ids=torch.from_numpy(ids),
                                  attention_mask=torch.from_numpy(mask)).logits.numpy()
        plain = tiny_qwen35.load(made["base"])(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits.numpy()
    scale = np.abs(expected).max()
    with Session(graph) as session:
        session.load("x", file)
        feed = {"input_ids": ids, "attention_mask": mask}
        ours = session.run(feed, adapter="x")[0]
        base = session.run(feed)[0]
    np.testing.assert_allclose(ours[keep], expected[keep], atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(base[keep], plain[keep], atol=1e-4 * scale, rtol=0)


@pytest.mark.slow
def test_multimodal_language_model_merges_and_exports(tmp_path):
    """Qwen3_5ForConditionalGeneration with a PEFT adapter on its language model's projections:
    `merge -o m.onnx` exports the language model (text in, logits out) with PEFT's merged
    weights, equal to transformers' merged multimodal model on text; `export --with-past` has
    the linear layers' states; the vision tower is left out of both."""
    import onnx
    from cli_harness import run_cli

    base = tiny_qwen35.qwen3_5_multimodal(tmp_path / "base")
    targets = [*tiny_qwen35.ATTENTION_PROJECTIONS, *tiny_qwen35.LINEAR_PROJECTIONS,
               *tiny_qwen35.MLP_PROJECTIONS]  # the vision tower's are qkv, proj, linear_fc*
    adapter = tiny_qwen35.peft_adapter(base, tmp_path / "peft", target_modules=targets)
    out = tmp_path / "m.onnx"
    run = run_cli("merge", base, adapter, "-o", out, "--verify")
    assert run.code == 0, run.err
    initializers = {t.name for t in onnx.load(out).graph.initializer}
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in initializers
    assert not any(n.startswith("model.visual.") for n in initializers)
    ids, mask = _padded_batch(2)
    with torch.no_grad():
        expected = tiny_qwen35.peft_merged(base, adapter)(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits.numpy()
    keep = mask.astype(bool)
    np.testing.assert_allclose(_ort_logits(out, ids, mask)[keep], expected[keep],
                               atol=1e-4 * np.abs(expected).max(), rtol=0)
    run = run_cli("export", base, "-o", tmp_path / "p.onnx", "--with-past")
    assert run.code == 0, run.err
    inputs = [i.name for i in onnx.load(tmp_path / "p.onnx").graph.input]
    assert inputs[3:7] == ["past_key_values.0.conv_state", "past_key_values.0.recurrent_state",
                           "past_key_values.1.conv_state", "past_key_values.1.recurrent_state"]
    assert inputs[-2:] == ["past_key_values.3.key", "past_key_values.3.value"]


@pytest.mark.slow
def test_mlx_lm_runs_the_multimodal_adapter_as_peft_merge(tmp_path):
    """`convert PEFT --to mlx --base MULTIMODAL`: mlx-lm's Qwen3.5 with that adapter
    (load_adapters) gives what mlx-lm gives for PEFT's merged checkpoint."""
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from cli_harness import run_cli
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    base = tiny_qwen35.qwen3_5_multimodal(tmp_path / "base")
    targets = [*tiny_qwen35.ATTENTION_PROJECTIONS, *tiny_qwen35.LINEAR_PROJECTIONS,
               *tiny_qwen35.MLP_PROJECTIONS]
    peft = tiny_qwen35.peft_adapter(base, tmp_path / "peft", target_modules=targets)
    run = run_cli("convert", peft, "-o", tmp_path / "mlx", "--to", "mlx", "--base", base)
    assert run.code == 0, run.err
    tiny_qwen35.peft_merged(base, peft).save_pretrained(tmp_path / "merged")
    ids = mx.array(np.random.default_rng(0).integers(3, 90, (2, 7)))
    expected = np.array(load_model(tmp_path / "merged")[0](ids))
    model = load_model(base)[0]
    plain = np.array(model(ids))
    got = np.array(load_adapters(model, str(tmp_path / "mlx"))(ids))
    assert np.abs(expected - plain).max() > 0.1  # the adapter matters
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


@pytest.mark.slow
def test_with_past_generate_equals_transformers_greedy(made, tmp_path):
    """`export BASE --with-past` (merged: `merge --with-past`): each linear layer carries
    conv_state/recurrent_state, the full layer key/value; loraformat's greedy generate over 24
    tokens (the states carried from the prefill through every single-token step) gives
    transformers' greedy generate on PEFT's merged model, token for token; a batch of two
    prompts too."""
    import onnx
    from cli_harness import run_cli

    from loraformat.generate import greedy_generate

    out = tmp_path / "past.onnx"
    run = run_cli("merge", made["base"], made["peft"], "-o", out, "--with-past", "--verify")
    assert run.code == 0, run.err
    graph = onnx.load(out).graph
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in graph.input}
    assert shapes["past_key_values.0.conv_state"] == ["batch", 2 * 2 * 8 + 4 * 8, 3]
    assert shapes["past_key_values.2.recurrent_state"] == ["batch", 4, 8, 8]
    assert shapes["past_key_values.3.key"] == ["batch", 2, "past_sequence", 16]
    assert "past_key_values.0.key" not in shapes and "past_key_values.3.conv_state" not in shapes
    prompts = [PROMPT, [11, 4, 60, 23, 7, 88, 31]]
    ids = torch.tensor(prompts)
    expected = made["merged"].generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
        eos_token_id=None, pad_token_id=0,
    )[:, len(PROMPT):].tolist()
    assert expected[0] != expected[1]
    assert greedy_generate(out, prompts, 24).new_ids == expected
    assert greedy_generate(out, PROMPT, 24).new_ids == expected[:1]


def _greedy(model) -> list[int]:
    """transformers' greedy tokens after test_genai's prompt (as many as genai_tokens gives)."""
    from test_genai import NEW_TOKENS
    from test_genai import PROMPT as GENAI_PROMPT

    ids = torch.tensor([GENAI_PROMPT])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    return out[0, len(GENAI_PROMPT):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_onnx_runtime_genai_runs_the_export_as_transformers(made, kind, tmp_path):
    """`merge --with-past` writes genai_config.json with model.type qwen3_5_text (GenAI 0.18's
    Qwen3.5 decoder, which finds the conv_state/recurrent_state inputs by name and keeps
    key/value only for the full layers); og's greedy tokens = transformers' on PEFT's merge. The
    multimodal checkpoint's language model runs the same way (text in)."""
    import json

    from cli_harness import run_cli

    if kind == "text":
        base, adapter, merged = made["base"], made["peft"], made["merged"]
    else:
        base = tiny_qwen35.qwen3_5_multimodal(tmp_path / "base")
        targets = [*tiny_qwen35.ATTENTION_PROJECTIONS, *tiny_qwen35.LINEAR_PROJECTIONS,
                   *tiny_qwen35.MLP_PROJECTIONS]
        adapter = tiny_qwen35.peft_adapter(base, tmp_path / "peft", target_modules=targets)
        merged = tiny_qwen35.peft_merged(base, adapter)
    folder = tmp_path / "genai"
    run = run_cli("merge", base, adapter, "-o", folder / "model.onnx", "--with-past")
    assert run.code == 0, run.err
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    assert config["type"] == "qwen3_5_text"
    assert config["decoder"]["num_hidden_layers"] == 4
    assert (config["decoder"]["num_key_value_heads"], config["decoder"]["head_size"]) == (2, 16)
    from test_genai import genai_tokens

    assert genai_tokens(folder) == _greedy(merged)


@pytest.mark.slow
def test_genai_slot_folder_switched_by_og_adapters(made, tmp_path):
    """`export --lora-slots --with-past`: og.Adapters with the converted .onnx_adapter gives the
    merged model's tokens, no active adapter the base's."""
    from cli_harness import run_cli

    folder = tmp_path / "slots"
    run = run_cli("export", made["base"], "-o", folder / "model.onnx", "--lora-slots",
                  "--with-past")
    assert run.code == 0, run.err
    file = tmp_path / "a.onnx_adapter"
    assert run_cli("convert", made["peft"], "-o", file, "--base", made["base"]).code == 0
    from test_genai import genai_tokens

    expected, plain = _greedy(made["merged"]), _greedy(tiny_qwen35.load(made["base"]))
    assert expected != plain
    assert genai_tokens(folder, file) == expected
    assert genai_tokens(folder) == plain


@pytest.mark.parametrize("kind", ["text", "multimodal"])
def test_conformance_kit(built, kind):
    from loraformat.testing import check_plugin

    info, _ = built(kind)
    arch_id = "qwen3_5" if kind == "text" else "qwen3_5_multimodal"
    report = check_plugin(info.path, arch_id, reference=tiny_qwen35.load(info.path))
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert {"peft", "gguf"} <= set(report.foreign_names) and not report.unused_layers
    # llama.cpp's value-head order: 4 row-permuted projections and out_proj's columns, 3 layers
    assert len(report.permuted["gguf"]) == 3 * 5


@pytest.mark.slow
def test_rank_above_the_value_heads_is_read_exactly(tmp_path):
    """PEFT's all-linear at r=8 on a model with 4 value heads: in_proj_a/in_proj_b (4 rows each)
    carry a rank-8 LoRA, above the format's bound. The reader stores them at rank 4 with the same
    ΔW (B·A refactored), says so in its report, and the merge equals PEFT's."""
    import json

    from cli_harness import run_cli

    from loraformat.interchange.front_door import read_adapter

    base = tiny_qwen35.qwen3_5(tmp_path / "base")
    peft = tiny_qwen35.peft_adapter(base, tmp_path / "peft", r=8, lora_alpha=16)
    adapter, report = read_adapter(peft)
    narrow = [p for p, _ in adapter.layers() if p.endswith(("in_proj_a", "in_proj_b"))]
    assert len(narrow) == 6 and all(adapter.layer(p).rank == 4 for p in narrow)
    assert any("refactored exactly" in n for n in report.notes)
    from safetensors.numpy import load_file

    raw = load_file(peft / "adapter_model.safetensors")
    for path in narrow:
        key = f"base_model.model.{path}"
        want = 2.0 * raw[key + ".lora_B.weight"] @ raw[key + ".lora_A.weight"]  # alpha/r = 2
        np.testing.assert_allclose(adapter.delta(path), want, rtol=1e-5, atol=1e-6)
    run = run_cli("merge", base, peft, "-o", tmp_path / "merged", "--json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["tensors_changed"] == 3 * 5 + 4 + 4 * 3
    merged = tiny_qwen35.peft_merged(base, peft)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want = merged(input_ids=ids).logits
        got = tiny_qwen35.load(tmp_path / "merged")(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
