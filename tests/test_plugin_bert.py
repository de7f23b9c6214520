"""The BERT plugin against transformers 5 (reference) on tiny checkpoints saved by transformers."""

from __future__ import annotations

import pytest
import tiny_models
import torch
from loraformat_plugins import bert as plugin
from safetensors.torch import load_file

from loraformat.architecture import CheckpointInfo, ExportOptions
from loraformat.base import open_base
from loraformat.errors import LoraformatError

ARCH = plugin.Bert()

def info(config=None, shapes=()) -> CheckpointInfo:
    """What the architecture is told about a checkpoint: its config and tensor shapes (a list of
    names is enough for detection)."""
    if not isinstance(shapes, dict):
        shapes = dict.fromkeys(shapes, ())
    return CheckpointInfo(config=dict(config or {}), shapes=shapes)



@pytest.fixture(scope="module")
def bert_dir(tiny_checkpoint):
    return tiny_checkpoint("bert")


@pytest.fixture(scope="module")
def reference(bert_dir):
    return tiny_models.load_transformers(bert_dir, "bert")


@pytest.fixture(scope="module")
def export(bert_dir):
    with open_base(bert_dir) as base:
        config = base.config
    tensors = load_file(bert_dir / "model.safetensors")
    return ARCH.export_model(info(config), tensors, ExportOptions())


def test_detected_with_and_without_config(bert_dir):
    with open_base(bert_dir) as base:
        assert base.architecture == "bert"
        names = base.checkpoint.names()
    assert ARCH.detect(info({}, names))
    # Same tensor names, another model_type: not ours (RoBERTa's positions differ).
    assert not ARCH.detect(info({"model_type": "roberta"}, names))


def test_dense_layers_are_the_modules_transformers_builds(bert_dir, reference):
    with open_base(bert_dir) as base:
        layers = base.layers  # BaseModel checks every stored shape against the checkpoint
    linears = {
        name for name, m in reference.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert {p for p, layer in layers.items() if layer.kind == "linear"} == linears
    word = layers["bert.embeddings.word_embeddings"]
    assert (word.kind, word.layout, word.in_features, word.out_features) == (
        "embedding", "in_out", 96, 32,
    )
    assert layers["classifier"].stored_shape() == (3, 32)
    assert layers["bert.encoder.layer.0.intermediate.dense"].bias == (
        "bert.encoder.layer.0.intermediate.dense.bias"
    )


def test_default_targets_are_peft_defaults(bert_dir):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    with open_base(bert_dir) as base:
        assert ARCH.default_targets(info(base.config)) == peft_map["bert"]
        paths = base.default_target_paths()
    assert len(paths) == 4 and all(p.endswith((".query", ".value")) for p in paths)


def test_peft_names_match_a_real_peft_adapter(bert_dir, tmp_path):
    """Every module PEFT adapts (in-memory names) maps to a layer path and back."""
    from safetensors import safe_open

    adapter = tiny_models.peft_adapter(
        bert_dir, "bert", tmp_path / "peft",
        target_modules=["query", "key", "value", "dense", "classifier"],
    )
    with safe_open(adapter / "adapter_model.safetensors", "np") as f:
        keys = list(f.keys())
    modules = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in keys}
    with open_base(bert_dir) as base:
        layers = base.layers
    assert len(modules) == 14 and {"classifier", "bert.pooler.dense"} <= modules
    for name in modules:
        path = ARCH.names.layer_path(name, "peft")
        assert path in layers, name
        assert ARCH.names.foreign(path, "peft") == name
    assert ARCH.names.foreign("bert.embeddings.LayerNorm", "peft") is None
    assert ARCH.names.foreign("bert.pooler.dense", "gguf") is None


@pytest.mark.slow
def test_export_module_matches_transformers(export, reference):
    module = export.module
    assert export.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert export.output_names == ["logits"]
    g = torch.Generator().manual_seed(3)
    for batch, seq in ((1, 5), (3, 11)):
        ids = torch.randint(0, 96, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[-1, seq - 3 :] = 0
        types = torch.randint(0, 2, (batch, seq), generator=g)
        with torch.no_grad():
            want = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            got = module(input_ids=ids, attention_mask=mask, token_type_ids=types)
            assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
            # Defaults: no mask = all ones, no token types = zeros.
            want = reference(input_ids=ids).logits
            assert torch.allclose(module(ids), want, atol=1e-4, rtol=0)


def test_export_module_state_dict_is_the_checkpoint(export, bert_dir):
    tensors = load_file(bert_dir / "model.safetensors")
    state = export.module.state_dict()
    assert set(state) == set(tensors)  # BERT+classifier uses every tensor
    assert all(torch.equal(state[k], tensors[k]) for k in state)
    # Every dense layer is reachable by its layer path (the exporter fills LoRA slots there).
    from loraformat.architecture.modules import Dense

    value = export.module.get_submodule("bert.encoder.layer.1.attention.self.value")
    assert isinstance(value, Dense)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["BertModel", "BertForTokenClassification"])
def test_other_heads_match_transformers(tmp_path, variant):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=32, num_labels=2, hidden_act="gelu_new",
    )
    model = getattr(transformers, variant)(config).eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    config_dict = config.to_dict()
    config_dict["architectures"] = [variant]
    export = ARCH.export_model(info(config_dict), tensors, ExportOptions())
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        got = export.module(ids)
        out = model(input_ids=ids)
    if variant == "BertModel":  # bare checkpoint, with a pooler: two outputs
        assert not any(k.startswith("bert.") for k in tensors)
        assert export.output_names == ["last_hidden_state", "pooler_output"]
        assert torch.allclose(got[0], out.last_hidden_state, atol=1e-4, rtol=0)
        assert torch.allclose(got[1], out.pooler_output, atol=1e-4, rtol=0)
    else:
        assert export.dynamic_axes["logits"] == {0: "batch", 1: "sequence"}
        assert torch.allclose(got, out.logits, atol=1e-4, rtol=0)


def test_export_refuses_what_it_cannot_build(bert_dir):
    tensors = load_file(bert_dir / "model.safetensors")
    with pytest.raises(LoraformatError, match="lacks 'num_attention_heads'"):
        ARCH.export_model(info({"layer_norm_eps": 1e-12}), tensors, ExportOptions())
    with open_base(bert_dir) as base:
        config = base.config
    with pytest.raises(LoraformatError, match="no KV cache"):
        ARCH.export_model(info(config), tensors, ExportOptions(with_past=True))
    del tensors["bert.encoder.layer.1.output.LayerNorm.weight"]
    with pytest.raises(LoraformatError, match=r"bert: checkpoint lacks .*1\.output\.LayerNorm"):
        ARCH.export_model(info(config), tensors, ExportOptions())
