"""The ViT plugin against transformers 5 (reference) on tiny checkpoints saved by transformers."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from loraformat_plugins import vit as plugin
from safetensors import safe_open
from safetensors.torch import load_file

from loraformat.architecture import CheckpointInfo, ExportOptions
from loraformat.base import open_base
from loraformat.errors import LoraformatError

ARCH = plugin.ViT()

def info(config=None, shapes=()) -> CheckpointInfo:
    """What the architecture is told about a checkpoint: its config and tensor shapes (a list of
    names is enough for detection)."""
    if not isinstance(shapes, dict):
        shapes = dict.fromkeys(shapes, ())
    return CheckpointInfo(config=dict(config or {}), shapes=shapes)



@pytest.fixture(scope="module")
def vit_dir(tiny_checkpoint):
    return tiny_checkpoint("vit")


@pytest.fixture(scope="module")
def reference(vit_dir):
    return tiny_models.load_transformers(vit_dir, "vit")


@pytest.fixture(scope="module")
def config(vit_dir):
    with open_base(vit_dir) as base:
        return base.config


def test_detected_with_and_without_config(vit_dir):
    with open_base(vit_dir) as base:
        assert base.architecture == "vit"
        names = base.checkpoint.names()
    assert ARCH.detect(info({}, names))
    assert not ARCH.detect(info({"model_type": "deit"}, names))


def test_dense_layers_and_targets(vit_dir, config):
    with open_base(vit_dir) as base:
        layers = base.layers  # BaseModel checks every stored shape against the checkpoint
        targets = base.default_target_paths()
    assert len(layers) == 2 * 6 + 1
    assert all(layer.kind == "linear" and layer.layout == "out_in" for layer in layers.values())
    assert not any("patch_embeddings" in p for p in layers)
    assert layers["vit.encoder.layer.1.intermediate.dense"].stored_shape() == (64, 32)
    assert layers["classifier"].bias == "classifier.bias"
    assert ARCH.default_targets(info(config)) == ["query", "value"]
    assert targets == [
        f"vit.encoder.layer.{i}.attention.attention.{m}" for i in (0, 1) for m in ("query", "value")
    ]


def test_peft_names_are_the_in_memory_modules(vit_dir, reference, config):
    """Every Linear transformers 5 builds maps to the checkpoint layer holding the same weight."""
    tensors = load_file(vit_dir / "model.safetensors")
    with open_base(vit_dir) as base:
        layers = base.layers
    seen = set()
    for name, module in reference.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        path = ARCH.names.layer_path(name, "peft")
        assert path in layers, name
        assert torch.equal(module.weight, tensors[path + ".weight"]), (name, path)
        assert ARCH.names.foreign(path, "peft") == name
        seen.add(path)
    assert seen == set(layers)
    # transformers-4 adapters used the checkpoint names: not in the table (PEFT conversion takes
    # a name that is already a layer path as it is).
    old = "vit.encoder.layer.0.attention.attention.key"
    assert ARCH.names.layer_path(old, "peft") is None
    assert ARCH.names.layer_path("vit.layers.0.attention.qkv", "peft") is None
    assert ARCH.names.foreign("vit.layernorm", "peft") is None
    assert ARCH.names.foreign(old, "mlx") is None


def test_a_real_peft_adapter_translates(vit_dir, config, tmp_path):
    adapter = tiny_models.peft_adapter(
        vit_dir, "vit", tmp_path / "peft",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
    )
    with safe_open(adapter / "adapter_model.safetensors", "np") as f:
        keys = list(f.keys())
    modules = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in keys}
    assert len(modules) == 12
    paths = {ARCH.names.layer_path(m, "peft") for m in modules}
    with open_base(vit_dir) as base:
        assert paths == set(base.layers) - {"classifier"}


@pytest.fixture(scope="module")
def export(vit_dir, config):
    tensors = load_file(vit_dir / "model.safetensors")
    return ARCH.export_model(info(config), tensors, ExportOptions())


@pytest.mark.slow
def test_export_module_matches_transformers(export, reference):
    assert (export.input_names, export.output_names) == (["pixel_values"], ["logits"])
    assert export.dynamic_axes["pixel_values"] == {0: "batch"}
    for batch in (1, 3):
        pixels = tiny_models.example_inputs("vit", batch=batch, seed=batch)["pixel_values"]
        with torch.no_grad():
            want = reference(pixel_values=pixels).logits
            got = export.module(pixels)
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_export_module_state_dict_is_the_checkpoint(export, vit_dir):
    from loraformat.architecture.modules import Dense

    tensors = load_file(vit_dir / "model.safetensors")
    state = export.module.state_dict()
    assert set(state) == set(tensors)
    assert all(torch.equal(state[k], tensors[k]) for k in state)
    with open_base(vit_dir) as base:
        for path in base.layers:
            assert isinstance(export.module.get_submodule(path), Dense), path


@pytest.mark.slow
def test_bare_vit_model_with_pooler_and_no_qkv_bias(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        image_size=16, patch_size=8, qkv_bias=False, hidden_act="gelu_new",
    )
    model = transformers.ViTModel(config).eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "encoder.layer.0.attention.attention.query.bias" not in tensors
    with open_base(tmp_path) as base:
        assert "pooler.dense" in base.layers
        assert base.layers["encoder.layer.0.attention.attention.query"].bias is None
        export = ARCH.export_model(info(base.config), tensors, ExportOptions())
    assert export.output_names == ["last_hidden_state", "pooler_output"]
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(pixel_values=pixels)
        hidden, pooled = export.module(pixels)
    assert torch.allclose(hidden, out.last_hidden_state, atol=1e-4, rtol=0)
    assert torch.allclose(pooled, out.pooler_output, atol=1e-4, rtol=0)
    loaded = transformers.ViTModel.from_pretrained(tmp_path)
    assert ARCH.names.foreign("encoder.layer.0.output.dense", "peft") == (
        "layers.0.mlp.fc2"
    )
    assert isinstance(loaded.get_submodule("layers.0.mlp.fc2"), torch.nn.Linear)


def test_export_refuses_what_it_cannot_build(vit_dir, config):
    tensors = load_file(vit_dir / "model.safetensors")
    lacking = CheckpointInfo(vit_dir, {"layer_norm_eps": 1e-12})
    where = rf"^{vit_dir}/config\.json: vit: lacks 'num_attention_heads', needed for export$"
    with pytest.raises(LoraformatError, match=where):
        ARCH.export_model(lacking, tensors, ExportOptions())
    with pytest.raises(LoraformatError, match="unsupported activation 'mish'"):
        ARCH.export_model(info({**config, "hidden_act": "mish"}), tensors, ExportOptions())
    del tensors["vit.layernorm.weight"]
    where = rf"^{vit_dir}: vit: checkpoint lacks vit\.layernorm\.weight"
    with pytest.raises(LoraformatError, match=where):
        ARCH.export_model(CheckpointInfo(vit_dir, config), tensors, ExportOptions())
