"""The conformance kit (loraformat.testing) on every installed plugin, and on broken ones."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import tiny_models
import torch

from loraformat.architecture import DenseLayer, FusedPart, Registry, hookimpl
from loraformat.testing import check_plugin

toyarch = pytest.importorskip(
    "loraformat_toyarch", reason="install tests/third_party_plugin (make setup does)"
)
from loraformat_toyarch import plugin as toy  # noqa: E402

PLUGINS_DIR = Path(__file__).parent.parent / "plugins"


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["gpt2", "bert", "llama", "vit"])
def test_builtin_plugins_conform(architecture, tiny_checkpoint):
    if not (PLUGINS_DIR / f"{architecture}.py").exists():
        pytest.skip(f"plugins/{architecture}.py is not written yet")
    path = tiny_checkpoint(architecture)
    reference = tiny_models.load_transformers(path, architecture)
    report = check_plugin(path, architecture, reference=reference)
    assert report.plugin == architecture
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert "peft" in report.foreign_names
    assert not report.unused_layers


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return toyarch.write_checkpoint(tmp_path_factory.mktemp("toymlp"))


def toy_reference(toy_dir):
    def run(input_ids):
        return torch.from_numpy(toyarch.reference_logits(toy_dir, input_ids.numpy()))

    return run


def test_third_party_plugin_conforms(toy_dir):
    report = check_plugin(toy_dir, reference=toy_reference(toy_dir))
    assert (report.architecture, report.plugin) == ("toymlp", "toymlp")
    assert report.foreign_names["gguf"]["blocks.1.up"] == "blk.1.ffn_gate_up"
    assert report.permuted == {"gguf": ["blocks.0.up", "blocks.1.up"]}
    assert report.max_abs_diff < 1e-5


# -- the kit must catch broken plugins ------------------------------------------------------------

HOOKS = [name for name in dir(toy) if name.startswith("loraformat_")]


def registry_with(**overrides) -> Registry:
    """A registry holding only the toy plugin, with some hooks replaced."""
    namespace = {name: getattr(toy, name) for name in HOOKS}
    namespace.update({name: hookimpl(fn) for name, fn in overrides.items()})
    reg = Registry(load_entry_points=False)
    reg.register(types.SimpleNamespace(**namespace), name="toymlp")
    assert not reg.records["toymlp"].errors
    return reg


def wrong_shape(architecture, config, tensor_shapes):
    layers = toy.loraformat_dense_layers(architecture, config, tensor_shapes)
    if layers is None:
        return None
    # blocks.0.down is [out, in]; claiming [in, out] makes its stored shape wrong.
    return [
        DenseLayer(x.path, x.in_features, x.out_features, "in_out", bias=x.bias)
        if x.path == "blocks.0.down" else x
        for x in layers
    ]


def gappy_parts(architecture, config, tensor_shapes):
    layers = toy.loraformat_dense_layers(architecture, config, tensor_shapes)
    if layers is None:
        return None
    return [
        DenseLayer(x.path, x.in_features, x.out_features, x.layout,
                   parts=(FusedPart("gate", 0, 20), FusedPart("up", 24, 48)), bias=x.bias)
        if x.parts else x
        for x in layers
    ]


def lossy_layer_path(architecture, config, foreign_name, convention):
    if convention == "gguf" and foreign_name == "output":
        return "embed"  # maps the head's GGUF name back to the wrong layer
    return toy.loraformat_layer_path(architecture, config, foreign_name, convention)


def altered_export(architecture, config, tensors, options):
    built = toy.loraformat_export_model(architecture, config, tensors, options)
    if built is not None:
        built.module.head.bias = torch.nn.Parameter(built.module.head.bias + 1)
    return built


def greedy_targets(architecture, config):
    return ["up"]  # answers for every architecture: breaks first-result for other plugins


def bad_permutation(architecture, config, layer_path, convention):
    if architecture == "toymlp" and convention == "mlx" and layer_path == "head":
        return [0, 0, 1]
    return None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loraformat_dense_layers": wrong_shape},
         r"blocks\.0\.down: stored_shape\(\) \[24, 16\] \(in_out, in=24, out=16\) != "
         r"checkpoint \[16, 24\]"),
        ({"loraformat_dense_layers": gappy_parts},
         r"blocks\.0\.up: fused parts \[\(0, 20\), \(24, 48\)\] must tile the out rows"),
        ({"loraformat_layer_path": lossy_layer_path},
         r"gguf: head → 'output' → 'embed' does not round-trip"),
        ({"loraformat_export_model": altered_export},
         r"head\.bias: the module's value .* differs from the checkpoint's"),
        ({"loraformat_default_targets": greedy_targets},
         r"loraformat_default_targets must return None for another architecture"),
        ({"loraformat_default_targets": lambda architecture, config: ["nope"] if architecture
          == "toymlp" else None},
         r"default target 'nope' names no dense layer"),
        ({"loraformat_foreign_row_permutation": bad_permutation},
         r"mlx: row permutation of head is not a permutation of its 3 out rows"),
        ({"loraformat_detect": lambda config, tensor_names: "toymlp"},
         r"detecting an empty checkpoint must give None, got 'toymlp'"),
    ],
    ids=["shape", "parts", "round-trip", "state-dict", "first-result", "targets", "perm", "detect"],
)
def test_kit_catches_broken_plugins(toy_dir, overrides, message):
    with pytest.raises(AssertionError, match=message):
        check_plugin(toy_dir, "toymlp", reg=registry_with(**overrides))


def test_kit_compares_with_the_reference(toy_dir):
    reference = toy_reference(toy_dir)
    mismatch = r"output 'logits': max \|export − reference\| = 0\.01"
    with pytest.raises(AssertionError, match=mismatch):
        check_plugin(
            toy_dir, reg=registry_with(), reference=lambda input_ids: reference(input_ids) + 0.01
        )
    with pytest.raises(AssertionError, match=r"reference lacks outputs \['logits'\]"):
        check_plugin(toy_dir, reg=registry_with(), reference=lambda input_ids: {"scores": 0})


def test_kit_reports_missing_hooks_and_unknown_architectures(toy_dir):
    reg = Registry(load_entry_points=False)
    namespace = {n: getattr(toy, n) for n in HOOKS if n != "loraformat_export_model"}
    reg.register(types.SimpleNamespace(**namespace), name="partial")
    missing = "'partial' does not implement loraformat_export_model"
    with pytest.raises(AssertionError, match=missing):
        check_plugin(toy_dir, reg=reg)
    with pytest.raises(AssertionError, match=r"architecture 'gpt2' is not listed by any plugin"):
        check_plugin(toy_dir, "gpt2", reg=reg)
    with pytest.raises(AssertionError, match="no plugin detects this checkpoint"):
        check_plugin(toy_dir, reg=Registry(load_entry_points=False))


@pytest.mark.slow
def test_kit_reads_sharded_checkpoints(tiny_checkpoint):
    if not (PLUGINS_DIR / "llama.py").exists():
        pytest.skip("plugins/llama.py is not written yet")
    path = tiny_checkpoint("llama", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    report = check_plugin(path, reference=tiny_models.load_transformers(path, "llama"))
    assert report.architecture == "llama" and report.max_abs_diff <= 1e-4
