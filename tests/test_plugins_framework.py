"""Plugin discovery by entry point, `loraformat plugins`, failure isolation, third-party use."""

from __future__ import annotations

import importlib
import json
import sys
import types
from importlib import metadata

import cli_harness
import numpy as np
import pytest

from loraformat.architecture import ArchitectureBase, CheckpointInfo, Registry, hookimpl, registry
from loraformat.base import open_base
from loraformat.errors import LoraformatError
from loraformat.format.adapter import Adapter, LoraLayer

# The package re-exports the function ``registry``, which hides the submodule of that name.
registry_module = importlib.import_module("loraformat.architecture.registry")
try:  # skipped per test, so the framework's own tests run without the toy plugin
    import loraformat_toyarch as toyarch
except ImportError:
    toyarch = None
NO_TOY = "install tests/third_party_plugin (make setup does)"
needs_toy = pytest.mark.skipif(toyarch is None, reason=NO_TOY)

GROUP = "loraformat.plugins"
BUILTIN = {"gpt2", "bert", "llama", "vit"}


def run_cli(*args: str) -> tuple[int, str]:
    result = cli_harness.run_cli(*args)
    return result.code, result.out + result.err


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    if toyarch is None:
        pytest.skip(NO_TOY)
    return toyarch.write_checkpoint(tmp_path_factory.mktemp("toymlp"))


def test_plugins_json_lists_the_five():
    code, out = run_cli("plugins", "--json")
    assert code == 0
    records = {r["name"]: r for r in json.loads(out)}
    assert set(records) >= BUILTIN
    for name in BUILTIN:
        assert records[name]["distribution"] == "loraformat"
        assert records[name]["version"] == metadata.version("loraformat")
        assert records[name]["architectures"] == [name]
        assert records[name]["ok"], records[name]["errors"]
    if toyarch is None:
        return
    assert records["toymlp"] == {
        "name": "toymlp", "distribution": "loraformat-toyarch", "version": "0.3.0",
        "architectures": ["toymlp"], "ok": True, "errors": [],
    }
    code, text = run_cli("plugins")
    assert code == 0
    assert any(line.split()[:5] == ["toymlp", "loraformat-toyarch", "0.3.0", "ok", "toymlp"]
               for line in text.splitlines())


@needs_toy
def test_third_party_plugin_comes_from_its_own_distribution():
    (ep,) = [e for e in metadata.entry_points(group="loraformat.plugins") if e.name == "toymlp"]
    assert ep.value == "loraformat_toyarch.plugin"
    assert ep.dist.metadata["Name"] == "loraformat-toyarch"
    plugin = registry().pm.get_plugin("toymlp")
    assert plugin is sys.modules["loraformat_toyarch.plugin"]
    assert "third_party_plugin" in plugin.__file__


def test_core_uses_the_third_party_plugin(toy_dir, tmp_path):
    """open_base, inspect and validate work on a toymlp adapter with no change to the core."""
    with open_base(toy_dir) as base:
        assert base.architecture == "toymlp"
        targets = base.default_target_paths()
        layers = base.layers
        fingerprint = base.checkpoint.fingerprint()
    assert targets == ["blocks.0.up", "blocks.1.up"]
    rng = np.random.default_rng(0)
    adapted = {}
    for path in [*targets, "head"]:
        layer = layers[path]
        adapted[path] = LoraLayer(
            A=rng.standard_normal((2, layer.in_features)).astype(np.float32),
            B=rng.standard_normal((layer.out_features, 2)).astype(np.float32),
            alpha=4.0, in_features=layer.in_features, out_features=layer.out_features,
        )
    adapter = Adapter.from_layers("toymlp", adapted, fingerprint=fingerprint)
    adapter.save(tmp_path / "toy-adapter")
    code, out = run_cli("inspect", "--json", str(tmp_path / "toy-adapter"))
    assert code == 0, out
    info = json.loads(out)
    assert info["architecture"] == "toymlp"
    assert info["base_fingerprint"] == fingerprint
    rows = {row["path"]: row for row in info["layers"]}
    assert set(rows) == set(adapted)
    up = adapted["blocks.0.up"]
    want = np.linalg.norm(2.0 * up.B.astype(np.float64) @ up.A)  # scale = alpha / r = 2
    assert rows["blocks.0.up"]["delta_norm"] == pytest.approx(want, rel=1e-5)
    code, out = run_cli("validate", str(tmp_path / "toy-adapter"))
    assert code == 0 and out.strip().endswith("valid")


# -- failure isolation --------------------------------------------------------------------------


class RaisingDetect(ArchitectureBase):
    id = "brokenarch"
    description = "raises when asked to detect"

    def detect(self, checkpoint):
        raise RuntimeError("boom in detect")


def plugin_module(name, *architectures, api=2):
    """A plugin module answering the hook with ``architectures``."""
    module = types.ModuleType(name)
    if api is not None:
        module.LORAFORMAT_PLUGIN_API = api

    @hookimpl
    def loraformat_architectures():
        return list(architectures)

    module.loraformat_architectures = loraformat_architectures
    return module


@pytest.fixture
def isolated_registry(monkeypatch):
    """The real entry points plus one that fails to import, one whose detect raises, and two
    written for other plugin API versions."""
    modules = [
        plugin_module("loraformat_test_raising_plugin", RaisingDetect()),
        plugin_module("loraformat_test_v1_plugin", RaisingDetect(), api=None),
        plugin_module("loraformat_test_v3_plugin", RaisingDetect(), api=3),
    ]
    for module in modules:
        monkeypatch.setitem(sys.modules, module.__name__, module)
    real = registry_module._entry_points()
    fake = [
        metadata.EntryPoint("aaa_unimportable", "loraformat_no_such_module_xyz", GROUP),
        metadata.EntryPoint("zzz_raising", modules[0].__name__, GROUP),
        metadata.EntryPoint("zzz_v1", modules[1].__name__, GROUP),
        metadata.EntryPoint("zzz_v3", modules[2].__name__, GROUP),
    ]
    monkeypatch.setattr(registry_module, "_entry_points", lambda: real + fake)
    reg = Registry()
    monkeypatch.setattr(registry_module, "registry", lambda: reg)
    return reg


def test_broken_plugins_are_reported_and_do_not_break_the_others(isolated_registry, toy_dir):
    code, out = run_cli("plugins", "--json")
    assert code == 0
    records = {r["name"]: r for r in json.loads(out)}
    bad = records["aaa_unimportable"]
    assert not bad["ok"] and bad["architectures"] == []
    assert bad["errors"] == [
        "failed to load: ModuleNotFoundError: No module named 'loraformat_no_such_module_xyz'"
    ]
    raising = records["zzz_raising"]
    assert not raising["ok"] and raising["architectures"] == ["brokenarch"]
    assert raising["errors"][0].startswith(
        "brokenarch.detect raised RuntimeError: boom in detect ("
    )
    # Another major version of the plugin API is reported by name and skipped.
    assert records["zzz_v1"]["errors"] == [
        "declares no LORAFORMAT_PLUGIN_API, this loraformat speaks 2; skipped"
    ]
    assert records["zzz_v3"]["errors"] == [
        "declares plugin API 3, this loraformat speaks 2; skipped"
    ]
    assert records["zzz_v3"]["architectures"] == []
    assert all(records[name]["ok"] for name in BUILTIN | {"toymlp"})
    # The core keeps working: the raising architecture answers "no" and is recorded once.
    with open_base(toy_dir) as base:
        assert base.architecture == "toymlp"
    assert isolated_registry.records["zzz_raising"].errors == raising["errors"]  # once only
    code, text = run_cli("plugins")
    assert "aaa_unimportable" in text and "FAILED" in text
    assert "    failed to load: ModuleNotFoundError" in text


def test_registered_plugin_object_failures_are_captured():
    reg = Registry(load_entry_points=False)

    class BadSignature:
        LORAFORMAT_PLUGIN_API = 2

        @hookimpl
        def loraformat_architectures(self, surprise):
            return []

    record = reg.register(BadSignature(), name="badsig")
    assert not record.to_json()["ok"]
    assert "failed to register: PluginValidationError" in record.errors[0]

    class ArchitecturesRaise:
        LORAFORMAT_PLUGIN_API = 2

        @hookimpl
        def loraformat_architectures(self):
            raise ValueError("no list today")

    record = reg.register(ArchitecturesRaise(), name="noarch")
    assert record.architectures == []
    assert record.errors[0].startswith("loraformat_architectures raised ValueError: no list today")

    record = reg.register(plugin_module("p", "gpt2"), name="strings")
    assert record.errors[0].startswith("loraformat_architectures answered 'gpt2', which is not an ")

    reg.register(plugin_module("first", RaisingDetect()), name="first")
    record = reg.register(plugin_module("second", RaisingDetect()), name="second")
    assert record.errors == ["architecture 'brokenarch' is already provided by plugin 'first'"]
    assert reg.architectures()["brokenarch"].plugin == "first"


def test_plugin_verdicts_propagate_and_bugs_name_the_checkpoint(toy_dir):
    class Strict(ArchitectureBase):
        id = "strict"
        description = "refuses bad configs"

        def detect(self, checkpoint):
            return checkpoint.config.get("model_type") == "strict"

        def default_targets(self, checkpoint):
            checkpoint.config_value("hidden_size", what="strict's default targets")
            return ["proj"]

        def dense_layers(self, checkpoint):
            return [][0]  # IndexError: a bug, not a verdict

    reg = Registry(load_entry_points=False)
    reg.register(plugin_module("strict", Strict()), name="strict")
    strict = reg.get("strict")
    info = CheckpointInfo(toy_dir, {"hidden_size": 4})
    assert strict.default_targets(info) == ["proj"]
    verdict = (
        rf"{toy_dir}/config\.json: strict's default targets needs 'hidden_size', which is missing"
    )
    with pytest.raises(LoraformatError, match=verdict):
        strict.default_targets(CheckpointInfo(toy_dir, {}))
    bug = rf"^{toy_dir}: plugin 'strict' failed in strict\.dense_layers: IndexError: list index"
    with pytest.raises(LoraformatError, match=bug):
        strict.dense_layers(info)
    assert reg.records["strict"].errors[0].startswith("strict.dense_layers raised IndexError")
    unknown = r"no installed plugin provides architecture 'nope' \(installed: strict\)"
    with pytest.raises(LoraformatError, match=unknown):
        reg.get("nope")


def test_plugin_errors_without_a_path_are_given_the_checkpoints(toy_dir):
    class Vague(ArchitectureBase):
        id = "vague"
        description = "raises errors naming no file"

        def detect(self, checkpoint):
            return False

        def dense_layers(self, checkpoint):
            raise LoraformatError(None, "vague: cannot read this")

    reg = Registry(load_entry_points=False)
    reg.register(plugin_module("vague", Vague()), name="vague")
    with pytest.raises(LoraformatError, match=rf"^{toy_dir}: vague: cannot read this$"):
        reg.get("vague").dense_layers(CheckpointInfo(toy_dir))
    assert reg.records["vague"].errors == []  # a verdict, not a bug


def test_no_hook_but_the_architectures_one():
    from loraformat.architecture import hookspecs

    specs = [name for name in dir(hookspecs) if name.startswith("loraformat_")]
    assert specs == ["loraformat_architectures"]


def test_the_hook_is_called_through_pluggy():
    """Hook-call monitoring (what pluggy's tracing hangs on) sees the registry's call."""
    reg = Registry(load_entry_points=False)
    seen = []
    undo = reg.pm.add_hookcall_monitoring(
        lambda name, impls, kwargs: seen.append((name, [i.plugin_name for i in impls])),
        lambda outcome, name, impls, kwargs: None,
    )
    reg.register(plugin_module("traced", RaisingDetect()), name="traced")
    undo()
    assert seen == [("loraformat_architectures", ["traced"])]
