"""The built-in LLaMA plugin against transformers, gguf, llama.cpp's converter and onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch
from loraformat_plugins import llama as plugin
from test_plugin_gpt2 import check_prefill_and_decode

from loraformat.architecture import CheckpointInfo, ExportOptions
from loraformat.checkpoint import Checkpoint
from loraformat.errors import LoraformatError

ARCH = plugin.Llama()

def info(config=None, shapes=()) -> CheckpointInfo:
    """What the architecture is told about a checkpoint: its config and tensor shapes (a list of
    names is enough for detection)."""
    if not isinstance(shapes, dict):
        shapes = dict.fromkeys(shapes, ())
    return CheckpointInfo(config=dict(config or {}), shapes=shapes)



def _load(path):
    with Checkpoint(path) as c:
        return c.config, c.shapes(), {n: torch.tensor(np.array(a)) for n, a in c.items()}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request, tiny_checkpoint):
    """(checkpoint path, config, shapes, tensors, transformers reference) for a GQA LLaMA with
    llama3 rope scaling, untied and tied."""
    path = tiny_checkpoint("llama", tie_word_embeddings=request.param)
    config, shapes, tensors = _load(path)
    return path, config, shapes, tensors, tiny_models.load_transformers(path, "llama")


@pytest.fixture(scope="module")
def untied(tiny_checkpoint):
    return _load(tiny_checkpoint("llama"))


def test_registered_through_entry_point_without_errors():
    from loraformat.architecture import registry

    record = registry().records["llama"]
    assert record.architectures == ["llama"] and record.errors == []


def test_detect(untied):
    config, shapes, _ = untied
    names = list(shapes)
    assert ARCH.detect(info(config, names))
    assert ARCH.detect(info({}, names))
    assert ARCH.detect(info({}, [n.removeprefix("model.") for n in names]))
    assert not ARCH.detect(info({"model_type": "mistral"}, names))
    assert ARCH.detect(info({"architectures": ["LlamaForCausalLM"]}, []))
    qwen2 = [*names, "model.layers.0.self_attn.q_proj.bias"]
    assert not ARCH.detect(info({}, qwen2))
    assert not ARCH.detect(info({}, ["transformer.h.0.attn.c_attn.weight"]))


def test_dense_layers_match_checkpoint(model):
    _, config, shapes, _, _ = model
    layers = ARCH.dense_layers(info(config, shapes))
    by_path = {layer.path: layer for layer in layers}
    n = config["num_hidden_layers"]
    tied = config["tie_word_embeddings"]
    assert len(layers) == 7 * n + 1 + (0 if tied else 1)
    for layer in layers:
        assert layer.stored_shape() == shapes[layer.weight]
        assert layer.bias is None
    q, k = by_path["model.layers.0.self_attn.q_proj"], by_path["model.layers.1.self_attn.k_proj"]
    assert (q.in_features, q.out_features, q.layout) == (32, 32, "out_in")
    assert (k.in_features, k.out_features) == (32, 16)  # GQA: 2 KV heads of 8
    down = by_path["model.layers.0.mlp.down_proj"]
    assert (down.in_features, down.out_features) == (64, 32)
    emb = by_path["model.embed_tokens"]
    assert (emb.kind, emb.layout, emb.in_features, emb.out_features) == (
        "embedding",
        "in_out",
        96,
        32,
    )
    assert ("lm_head" in by_path) == (not tied)
    if not tied:
        assert (by_path["lm_head"].in_features, by_path["lm_head"].out_features) == (32, 96)
    bare = {k.removeprefix("model."): v for k, v in shapes.items()}
    assert [x.path for x in ARCH.dense_layers(info({}, bare))] == [
        x.path.removeprefix("model.") for x in layers
    ]


def test_sharded_checkpoint_gives_same_layers(tiny_checkpoint, untied):
    sharded = tiny_checkpoint("llama", max_shard_size="20KB")
    with Checkpoint(sharded) as c:
        assert len(c.shards) > 1
        layers = ARCH.dense_layers(info(c.config, c.shapes()))
    config, shapes, _ = untied
    expected = ARCH.dense_layers(info(config, shapes))
    assert sorted(layers, key=lambda x: x.path) == sorted(expected, key=lambda x: x.path)


def test_default_targets_match_peft():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    assert ARCH.default_targets(info({})) == list(peft_map["llama"])


@pytest.mark.parametrize("convention", ["peft", "gguf", "mlx"])
def test_names_round_trip(untied, convention):
    config, shapes, _ = untied
    seen = set()
    for layer in ARCH.dense_layers(info(config, shapes)):
        foreign = ARCH.names.foreign(layer.path, convention)
        assert foreign is not None and foreign not in seen
        seen.add(foreign)
        assert ARCH.names.layer_path(foreign, convention) == layer.path
    assert ARCH.names.foreign("model.norm", convention) is None
    assert ARCH.names.layer_path("blk.0.attn_qkv", convention) is None


def test_gguf_names_match_gguf_tensor_mapping(untied):
    import gguf

    config, shapes, _ = untied
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for layer in ARCH.dense_layers(info(config, shapes)):
        ours = ARCH.names.foreign(layer.path, "gguf")
        assert ours == mapping.get_name(layer.path)
        assert ARCH.names.layer_path(ours, "gguf") == layer.path


def test_peft_and_mlx_names(untied, tiny_checkpoint, tmp_path):
    from safetensors import safe_open

    config, shapes, _ = untied
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out = tiny_models.peft_adapter(
        tiny_checkpoint("llama"), "llama", tmp_path / "a", target_modules=targets
    )
    with safe_open(str(out / "adapter_model.safetensors"), "np") as f:
        keys = list(f.keys())
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}
    linear = [x for x in ARCH.dense_layers(info(config, shapes))]
    ours = {
        ARCH.names.foreign(x.path, "peft")
        for x in linear
        if x.module_name in targets
    }
    assert modules == ours
    # MLX-LM's llama keeps transformers' module tree (model.layers.N..., lm_head)
    assert ARCH.names.foreign("model.layers.1.mlp.up_proj", "mlx") == (
        "model.layers.1.mlp.up_proj"
    )


def _converter_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``, transcribed for numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def test_gguf_row_permutation_equals_converter(untied):
    config, _, tensors = untied
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    for path, kv in (
        ("model.layers.0.self_attn.q_proj", n_head),
        ("model.layers.1.self_attn.k_proj", n_kv),
    ):
        w = tensors[path + ".weight"].numpy()
        perm = ARCH.row_permutation(info(config), path, "gguf")
        assert sorted(perm) == list(range(w.shape[0])) and list(perm) != list(range(w.shape[0]))
        np.testing.assert_array_equal(w[list(perm)], _converter_permute(w, n_head, kv))
    for path in ("model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj", "lm_head"):
        assert ARCH.row_permutation(info(config), path, "gguf") is None
    q = "model.layers.0.self_attn.q_proj"
    assert ARCH.row_permutation(info(config), q, "peft") is None
    with pytest.raises(LoraformatError, match="num_attention_heads"):
        ARCH.row_permutation(info({}), q, "gguf")


def test_rope_frequencies_match_transformers(untied):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config, _, _ = untied
    ref, ref_scale = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config), "cpu")
    ours, scale = plugin.rope_inv_freq(info(config), 8)
    np.testing.assert_allclose(ours, ref.numpy(), atol=0, rtol=1e-6)
    assert scale == ref_scale
    plain, _ = plugin.rope_inv_freq(info({}), 8)
    assert not np.allclose(plain, ours)  # the scaling is not a no-op on this config
    legacy = {"rope_theta": 10000.0, "rope_scaling": dict(config["rope_parameters"])}
    np.testing.assert_array_equal(plugin.rope_inv_freq(info(legacy), 8)[0], ours)
    with pytest.raises(LoraformatError, match="rope type 'dynamic' is not supported"):
        plugin.rope_inv_freq(info({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}), 8)


@pytest.mark.slow
def test_logits_match_transformers(model):
    _, config, shapes, tensors, reference = model
    em = ARCH.export_model(info(config), tensors, ExportOptions())
    assert set(em.module.state_dict()) == set(tensors)
    x = tiny_models.example_inputs("llama", seq=40)  # beyond original_max_position_embeddings
    with torch.no_grad():
        torch.testing.assert_close(
            em.module(**x), reference(**x, use_cache=False).logits, atol=1e-4, rtol=0
        )
    from loraformat.architecture.modules import Dense

    for layer in ARCH.dense_layers(info(config, shapes)):
        if layer.kind == "linear":
            assert isinstance(em.module.get_submodule(layer.path), Dense)


@pytest.mark.slow
def test_with_past_prefill_and_decode_match_transformers(model):
    _, config, _, tensors, reference = model
    em = ARCH.export_model(info(config), tensors, ExportOptions(with_past=True))
    assert em.input_names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert em.input_names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert em.output_names[1:3] == ["present.0.key", "present.0.value"]
    assert em.example_inputs["past_key_values_0_key"].shape[1::2] == (2, 8)  # GQA kv heads
    prompt = tiny_models.example_inputs("llama", seq=5)["input_ids"]
    check_prefill_and_decode(em, reference, prompt)


@pytest.mark.slow
def test_left_padded_batch_matches_transformers(untied, tiny_checkpoint):
    """attention_mask and position_ids are honoured: a left-padded row gives the same logits as
    transformers given the same mask and positions."""
    config, _, tensors = untied
    reference = tiny_models.load_transformers(tiny_checkpoint("llama"), "llama")
    em = ARCH.export_model(info(config), tensors, ExportOptions(with_past=True))
    ids = tiny_models.example_inputs("llama", batch=2, seq=6)["input_ids"]
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    past = {k: torch.zeros(2, 2, 0, 8) for k in em.example_inputs if k.startswith("past_")}
    with torch.no_grad():
        ours = em.module(input_ids=ids, attention_mask=mask, position_ids=positions, **past)[0]
        ref = reference(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime(untied, tmp_path):
    import onnxruntime as ort

    config, _, tensors = untied
    em = ARCH.export_model(info(config), tensors, ExportOptions())
    program = torch.onnx.export(
        em.module,
        (),
        kwargs=em.example_inputs,
        input_names=em.input_names,
        output_names=em.output_names,
        dynamic_axes=em.dynamic_axes,
        dynamo=True,
        optimize=False,
    )
    program.save(tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    for batch, seq in ((1, 9), (3, 2)):
        ids = torch.randint(0, 96, (batch, seq))
        with torch.no_grad():
            expected = em.module(input_ids=ids).numpy()
        (got,) = session.run(None, tiny_models.feed(session, ids))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_export_errors_name_the_problem(untied):
    config, _, tensors = untied
    no_head = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    message = r"no lm_head\.weight and tie_word_embeddings is false"
    with pytest.raises(LoraformatError, match=message):
        ARCH.export_model(info(config), no_head, ExportOptions())
    config = {k: v for k, v in config.items() if k != "num_attention_heads"}
    with pytest.raises(LoraformatError, match="num_attention_heads"):
        ARCH.export_model(info(config), tensors, ExportOptions())
