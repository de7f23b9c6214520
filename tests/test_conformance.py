"""The conformance kit (loraformat.testing) on every installed plugin, and on broken ones."""

from __future__ import annotations

import pytest
import tiny_models
import torch

from loraformat.architecture import SAME, DenseLayer, FusedPart, NameTable, Registry, hookimpl
from loraformat.testing import check_plugin

try:  # skipped per test, so the built-in plugins' conformance runs without the toy plugin
    import loraformat_toyarch as toyarch
    from loraformat_toyarch import plugin as toy
except ImportError:
    toyarch = toy = None


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["gpt2", "bert", "llama", "vit"])
def test_builtin_plugins_conform(architecture, tiny_checkpoint):
    path = tiny_checkpoint(architecture)
    reference = tiny_models.load_transformers(path, architecture)
    report = check_plugin(path, architecture, reference=reference)
    assert report.plugin == architecture
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert "peft" in report.foreign_names
    assert not report.unused_layers


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    if toyarch is None:
        pytest.skip("install tests/third_party_plugin (make setup does)")
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


def plugin_of(*architectures, api=2):
    """A plugin object answering the hook with ``architectures`` (a module works the same)."""

    class Plugin:
        LORAFORMAT_PLUGIN_API = api

        @hookimpl
        def loraformat_architectures(self):
            return list(architectures)

    return Plugin()


def registry_with(**overrides) -> Registry:
    """A registry holding only the toy architecture, with some attributes or methods replaced."""
    broken = type("BrokenToy", (toy.ToyMLP,), overrides)()
    reg = Registry(load_entry_points=False)
    reg.register(plugin_of(broken), name="toymlp")
    assert not reg.records["toymlp"].errors
    return reg


def wrong_shape(self, checkpoint):
    # blocks.0.down is [out, in]; claiming [in, out] makes its stored shape wrong.
    return [
        DenseLayer(x.path, x.in_features, x.out_features, "in_out", bias=x.bias)
        if x.path == "blocks.0.down" else x
        for x in toy.ToyMLP.dense_layers(self, checkpoint)
    ]


def gappy_parts(self, checkpoint):
    return [
        DenseLayer(x.path, x.in_features, x.out_features, x.layout,
                   parts=(FusedPart("gate", 0, 20), FusedPart("up", 24, 48)), bias=x.bias)
        if x.parts else x
        for x in toy.ToyMLP.dense_layers(self, checkpoint)
    ]


# Two rows claiming one GGUF name: the head's name maps back to the embedding.
clashing_names = NameTable(
    ("checkpoint", "peft", "gguf"),
    [("embed", SAME, "token_embd"), ("blocks.{bid}.up", SAME, "blk.{bid}.ffn_gate_up"),
     ("blocks.{bid}.down", SAME, "blk.{bid}.ffn_down"), ("head", SAME, "token_embd")],
)


def altered_export(self, checkpoint, tensors, options):
    built = toy.ToyMLP.export_model(self, checkpoint, tensors, options)
    built.module.head.bias = torch.nn.Parameter(built.module.head.bias + 1)
    return built


def bad_permutation(self, checkpoint, layer_path, convention):
    if convention == "mlx" and layer_path == "head":
        return [0, 0, 1]
    return None


def greedy_detect(self, checkpoint):
    return True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dense_layers": wrong_shape},
         r"blocks\.0\.down: stored_shape\(\) \[24, 16\] \(in_out, in=24, out=16\) != "
         r"checkpoint \[16, 24\]"),
        ({"dense_layers": gappy_parts},
         r"blocks\.0\.up: fused parts \[\(0, 20\), \(24, 48\)\] must tile the out rows"),
        ({"names": clashing_names},
         r"gguf name 'token_embd' is given to both embed and head"),
        ({"export_model": altered_export},
         r"head\.bias: the module's value .* differs from the checkpoint's"),
        ({"targets": ("nope",)},
         r"default target 'nope' names no dense layer"),
        ({"row_permutation": bad_permutation},
         r"mlx: row permutation of head is not a permutation of its 3 out rows"),
        ({"detect": greedy_detect},
         r"detecting an empty checkpoint must give False, got True"),
    ],
    ids=["shape", "parts", "names", "state-dict", "targets", "perm", "detect"],
)
def test_kit_catches_broken_plugins(toy_dir, overrides, message):
    with pytest.raises(AssertionError, match=message):
        check_plugin(toy_dir, "toymlp", reg=registry_with(**overrides))


def test_kit_checks_that_the_table_round_trips_on_the_checkpoint(toy_dir):
    # A table whose PEFT name for the head is another layer's path: each row is fine on its own,
    # but the head's name maps back to blocks.0.down.
    table = NameTable(
        ("checkpoint", "peft"),
        [("blocks.{bid}.down", SAME), ("head", "blocks.0.down")],
    )
    shared = r"peft: head and blocks\.0\.down share the name 'blocks\.0\.down'"
    with pytest.raises(AssertionError, match=shared):
        check_plugin(toy_dir, "toymlp", reg=registry_with(names=table), export=False)


def test_kit_compares_with_the_reference(toy_dir):
    reference = toy_reference(toy_dir)
    mismatch = r"output 'logits': max \|export − reference\| = 0\.01"
    with pytest.raises(AssertionError, match=mismatch):
        check_plugin(
            toy_dir, reg=registry_with(), reference=lambda input_ids: reference(input_ids) + 0.01
        )
    with pytest.raises(AssertionError, match=r"reference lacks outputs \['logits'\]"):
        check_plugin(toy_dir, reg=registry_with(), reference=lambda input_ids: {"scores": 0})


def test_kit_reports_unknown_architectures(toy_dir):
    reg = registry_with()
    with pytest.raises(AssertionError, match=r"architecture 'gpt2' is not provided by any plugin"):
        check_plugin(toy_dir, "gpt2", reg=reg)
    with pytest.raises(AssertionError, match="no plugin detects this checkpoint"):
        check_plugin(toy_dir, reg=Registry(load_entry_points=False))


@pytest.mark.slow
def test_kit_reads_sharded_checkpoints(tiny_checkpoint):
    path = tiny_checkpoint("llama", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    report = check_plugin(path, reference=tiny_models.load_transformers(path, "llama"))
    assert report.architecture == "llama" and report.max_abs_diff <= 1e-4
