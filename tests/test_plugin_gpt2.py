"""The built-in GPT-2 plugin against transformers, gguf and onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch
from loraformat_plugins import gpt2 as plugin

from loraformat.architecture import CheckpointInfo, ExportOptions, FusedPart
from loraformat.checkpoint import Checkpoint
from loraformat.errors import LoraformatError

ARCH = plugin.GPT2()

def info(config=None, shapes=()) -> CheckpointInfo:
    """What the architecture is told about a checkpoint: its config and tensor shapes (a list of
    names is enough for detection)."""
    if not isinstance(shapes, dict):
        shapes = dict.fromkeys(shapes, ())
    return CheckpointInfo(config=dict(config or {}), shapes=shapes)



@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    return tiny_checkpoint("gpt2")


@pytest.fixture(scope="module")
def ckpt(base):
    with Checkpoint(base) as c:
        yield c


@pytest.fixture(scope="module")
def tensors(ckpt):
    return {name: torch.tensor(np.array(arr)) for name, arr in ckpt.items()}


@pytest.fixture(scope="module")
def reference(base):
    return tiny_models.load_transformers(base, "gpt2")


def test_registered_through_entry_point_without_errors():
    from loraformat.architecture import registry

    record = registry().records["gpt2"]
    assert record.architectures == ["gpt2"] and record.errors == []


def test_detect(ckpt):
    names = ckpt.names()
    assert ARCH.detect(info(ckpt.config, names))
    assert ARCH.detect(info({}, names))
    assert ARCH.detect(info({}, [n.removeprefix("transformer.") for n in names]))
    assert not ARCH.detect(info({"model_type": "bert"}, names))
    assert not ARCH.detect(info({}, ["model.layers.0.self_attn.q_proj.weight"]))


def test_dense_layers_match_checkpoint(ckpt):
    shapes = ckpt.shapes()
    layers = ARCH.dense_layers(info(ckpt.config, shapes))
    by_path = {layer.path: layer for layer in layers}
    n = ckpt.config["n_layer"]
    assert len(layers) == 4 * n + 2
    for layer in layers:
        assert layer.stored_shape() == shapes[layer.weight]
        assert layer.layout == "in_out"
        if layer.kind == "linear":
            assert layer.bias == layer.path + ".bias"
    c_attn = by_path["transformer.h.0.attn.c_attn"]
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)
    assert c_attn.parts == (FusedPart("q", 0, 32), FusedPart("k", 32, 64), FusedPart("v", 64, 96))
    assert (
        by_path["transformer.h.1.mlp.c_fc"].in_features,
        by_path["transformer.h.1.mlp.c_fc"].out_features,
    ) == (32, 128)
    wte = by_path["transformer.wte"]
    assert (wte.kind, wte.in_features, wte.out_features) == ("embedding", 96, 32)
    assert by_path["transformer.wpe"].kind == "embedding"
    assert "lm_head" not in by_path  # tied: not stored
    # without the ``transformer.`` prefix (the original hub layout) and without a config
    bare = {k.removeprefix("transformer."): v for k, v in shapes.items()}
    assert [x.path for x in ARCH.dense_layers(info({}, bare))] == [
        x.path.removeprefix("transformer.") for x in layers
    ]


def test_sharded_checkpoint_gives_same_layers(tiny_checkpoint, ckpt):
    sharded = tiny_checkpoint("gpt2", max_shard_size="20KB")
    with Checkpoint(sharded) as c:
        assert len(c.shards) > 1
        layers = ARCH.dense_layers(info(c.config, c.shapes()))
    assert sorted(layers, key=lambda x: x.path) == sorted(
        ARCH.dense_layers(info(ckpt.config, ckpt.shapes())), key=lambda x: x.path
    )


def test_default_targets_match_peft():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    assert ARCH.default_targets(info({})) == list(peft_map["gpt2"])


@pytest.mark.parametrize("convention", ["peft", "gguf", "mlx"])
def test_names_round_trip(ckpt, convention):
    for layer in ARCH.dense_layers(info(ckpt.config, ckpt.shapes())):
        foreign = ARCH.names.foreign(layer.path, convention)
        assert foreign is not None
        assert ARCH.names.layer_path(foreign, convention) == layer.path
    assert ARCH.names.layer_path("blk.0.attn_q", "gguf") is None
    assert ARCH.names.foreign("transformer.ln_f", convention) is None


def test_gguf_names_match_gguf_tensor_mapping(ckpt):
    import gguf

    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, ckpt.config["n_layer"])
    for layer in ARCH.dense_layers(info(ckpt.config, ckpt.shapes())):
        ours = ARCH.names.foreign(layer.path, "gguf")
        assert ours == mapping.get_name(layer.path)
        assert ours == mapping.get_name(layer.path.removeprefix("transformer."))
    assert (
        ARCH.row_permutation(info({}), "transformer.h.0.attn.c_attn", "gguf")
        is None
    )


def test_peft_names_are_peft_module_names(base, tmp_path, ckpt):
    from safetensors import safe_open

    out = tiny_models.peft_adapter(
        base, "gpt2", tmp_path / "a", target_modules=["c_attn", "c_proj", "c_fc"]
    )
    with safe_open(str(out / "adapter_model.safetensors"), "np") as f:
        keys = list(f.keys())
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}
    ours = {
        ARCH.names.foreign(layer.path, "peft")
        for layer in ARCH.dense_layers(info(ckpt.config, ckpt.shapes()))
        if layer.kind == "linear"
    }
    assert modules == ours


@pytest.mark.slow
def test_logits_match_transformers(ckpt, tensors, reference):
    em = ARCH.export_model(info(ckpt.config), tensors, ExportOptions())
    assert set(em.module.state_dict()) <= set(tensors)
    assert set(em.module.state_dict()) == set(tensors)  # every GPT-2 tensor is used
    x = tiny_models.example_inputs("gpt2")
    with torch.no_grad():
        ours = em.module(**x)
        ref = reference(**x, use_cache=False).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    # every dense layer is a Dense reachable under its layer path (LoRA slots use this)
    from loraformat.architecture.modules import Dense

    for layer in ARCH.dense_layers(info(ckpt.config, ckpt.shapes())):
        if layer.kind == "linear":
            assert isinstance(em.module.get_submodule(layer.path), Dense)


def check_prefill_and_decode(em, reference, prompt, steps=2):
    """Prefill (past length 0) then ``steps`` greedy one-token decode steps through the export
    module; each step's logits must equal transformers' full-sequence forward, and each present
    must be [batch, kv_heads, total, head_dim]. Returns the generated ids."""
    past_args = [k for k in em.example_inputs if k.startswith("past_key_values_")]
    batch, (_, kv_heads, _, head_dim) = prompt.shape[0], em.example_inputs[past_args[0]].shape
    past = {k: torch.zeros(batch, kv_heads, 0, head_dim) for k in past_args}
    tokens, new, start = prompt, prompt, 0
    for _ in range(steps + 1):
        total = start + new.shape[1]
        inputs = {
            "input_ids": new,
            "attention_mask": torch.ones(batch, total, dtype=torch.int64),
            "position_ids": torch.arange(start, total).expand(batch, -1),
            **past,
        }
        with torch.no_grad():
            out = em.module(**inputs)
            expected = reference(input_ids=tokens, use_cache=False).logits[:, start:]
        assert len(out) == len(em.output_names) == 1 + len(past_args)
        torch.testing.assert_close(out[0], expected, atol=1e-4, rtol=0)
        for present in out[1:]:
            assert present.shape == (batch, kv_heads, total, head_dim)
        past = dict(zip(past_args, out[1:], strict=True))
        new = out[0][:, -1:].argmax(-1)
        tokens, start = torch.cat((tokens, new), dim=1), total
    return tokens


@pytest.mark.slow
def test_with_past_prefill_and_decode_match_transformers(ckpt, tensors, reference):
    em = ARCH.export_model(info(ckpt.config), tensors, ExportOptions(with_past=True))
    n = ckpt.config["n_layer"]
    assert em.input_names == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(n) for kind in ("key", "value")
    ]
    assert em.output_names == ["logits"] + [
        f"present.{i}.{k}" for i in range(n) for k in ("key", "value")
    ]
    assert em.dynamic_axes["past_key_values.0.key"] == {0: "batch", 2: "past_sequence"}
    check_prefill_and_decode(em, reference, tiny_models.example_inputs("gpt2", seq=5)["input_ids"])


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime(ckpt, tensors, tmp_path):
    """One dynamo export (with past, so it covers the plain path's layers too), run in ORT at
    sizes other than the traced ones: prefill with an empty past, then a decode step."""
    import onnxruntime as ort

    em = ARCH.export_model(info(ckpt.config), tensors, ExportOptions(with_past=True))
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
    assert [i.name for i in session.get_inputs()] == em.input_names
    assert [o.name for o in session.get_outputs()] == em.output_names
    head_shape = em.example_inputs["past_key_values_0_key"].shape[1::2]
    for batch, past, seq in ((1, 0, 6), (3, 5, 1)):
        inputs = {
            "input_ids": torch.randint(0, 96, (batch, seq)),
            "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64),
            "position_ids": torch.arange(past, past + seq).expand(batch, -1).contiguous(),
        }
        for k in em.example_inputs:
            if k.startswith("past_key_values_"):
                inputs[k] = torch.randn(batch, head_shape[0], past, head_shape[1])
        with torch.no_grad():
            expected = em.module(**inputs)
        feed = {n: inputs[k].numpy() for n, k in zip(em.input_names, inputs, strict=True)}
        got = session.run(None, feed)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=0)


def test_export_errors_name_the_problem(ckpt, tensors):
    config = {k: v for k, v in ckpt.config.items() if k != "n_head"}
    with pytest.raises(LoraformatError, match="n_head"):
        ARCH.export_model(info(config), tensors, ExportOptions())
    partial = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(LoraformatError, match=r"lacks 1 tensor.*h\.1\.mlp\.c_fc\.bias"):
        ARCH.export_model(info(ckpt.config), partial, ExportOptions())


@pytest.mark.slow
def test_bare_hub_layout_exports_under_its_own_names(ckpt, tensors, reference):
    """The original hub checkpoints have no ``transformer.`` prefix: the export module then keeps
    the bare names (state dict and submodule paths) and still matches transformers."""
    from loraformat.architecture.modules import Dense

    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    em = ARCH.export_model(info(ckpt.config), bare, ExportOptions())
    assert set(em.module.state_dict()) == set(bare)
    assert isinstance(em.module.get_submodule("h.1.mlp.c_proj"), Dense)
    x = tiny_models.example_inputs("gpt2")
    with torch.no_grad():
        expected = reference(**x, use_cache=False).logits
        torch.testing.assert_close(em.module(**x), expected, atol=1e-4, rtol=0)
