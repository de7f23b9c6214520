"""Plugin discovery by entry point, `loraformat plugins`, failure isolation, third-party use."""

from __future__ import annotations

import importlib
import json
import sys
import types
from importlib import metadata

import numpy as np
import pytest
from click.testing import CliRunner

from loraformat import architecture as arch
from loraformat.architecture import ArchitectureInfo, Registry, hookimpl, registry
from loraformat.base import open_base
from loraformat.cli import cli
from loraformat.errors import LoraformatError
from loraformat.format.adapter import Adapter, LoraLayer

# The package re-exports the function ``registry``, which hides the submodule of that name.
registry_module = importlib.import_module("loraformat.architecture.registry")
toyarch = pytest.importorskip(
    "loraformat_toyarch", reason="install tests/third_party_plugin (make setup does)"
)

GROUP = "loraformat.plugins"
BUILTIN = {"gpt2", "bert", "llama", "vit"}


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return toyarch.write_checkpoint(tmp_path_factory.mktemp("toymlp"))


def test_plugins_json_lists_the_five():
    code, out = run_cli("plugins", "--json")
    assert code == 0
    records = {r["name"]: r for r in json.loads(out)}
    assert set(records) >= BUILTIN | {"toymlp"}
    for name in BUILTIN:
        assert records[name]["distribution"] == "loraformat"
        assert records[name]["version"] == metadata.version("loraformat")
        assert records[name]["architectures"] == [name]
        assert records[name]["ok"], records[name]["errors"]
    assert records["toymlp"] == {
        "name": "toymlp", "distribution": "loraformat-toyarch", "version": "0.3.0",
        "architectures": ["toymlp"], "ok": True, "errors": [],
    }
    code, text = run_cli("plugins")
    assert code == 0
    assert any(line.split()[:5] == ["toymlp", "loraformat-toyarch", "0.3.0", "ok", "toymlp"]
               for line in text.splitlines())


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


def broken_detect_plugin():
    @hookimpl
    def loraformat_architectures():
        return [ArchitectureInfo("brokenarch", "raises when asked to detect")]

    @hookimpl
    def loraformat_detect(config, tensor_names):
        raise RuntimeError("boom in detect")

    return types.SimpleNamespace(
        loraformat_architectures=loraformat_architectures, loraformat_detect=loraformat_detect
    )


@pytest.fixture
def isolated_registry(monkeypatch):
    """The real entry points plus one that fails to import and one whose hook raises."""
    module = types.ModuleType("loraformat_test_raising_plugin")
    plugin = broken_detect_plugin()
    module.loraformat_architectures = plugin.loraformat_architectures
    module.loraformat_detect = plugin.loraformat_detect
    monkeypatch.setitem(sys.modules, module.__name__, module)
    real = registry_module._entry_points()
    fake = [
        metadata.EntryPoint("aaa_unimportable", "loraformat_no_such_module_xyz", GROUP),
        metadata.EntryPoint("zzz_raising", module.__name__, GROUP),
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
        "loraformat_detect raised RuntimeError: boom in detect ("
    )
    assert all(records[name]["ok"] for name in BUILTIN | {"toymlp"})
    # The core keeps working: the raising plugin, registered last, is asked first and skipped.
    with open_base(toy_dir) as base:
        assert base.architecture == "toymlp"
    assert isolated_registry.records["zzz_raising"].errors == raising["errors"]  # once only
    code, text = run_cli("plugins")
    assert "aaa_unimportable" in text and "FAILED" in text
    assert "    failed to load: ModuleNotFoundError" in text


def test_registered_plugin_object_failures_are_captured():
    reg = Registry(load_entry_points=False)

    class BadSignature:
        @hookimpl
        def loraformat_detect(self, config, tensor_names, surprise):
            return None

    record = reg.register(BadSignature(), name="badsig")
    assert not record.to_json()["ok"]
    assert "failed to register: PluginValidationError" in record.errors[0]

    class ArchitecturesRaise:
        @hookimpl
        def loraformat_architectures(self):
            raise ValueError("no list today")

    record = reg.register(ArchitecturesRaise(), name="noarch")
    assert record.architectures == []
    assert record.errors[0].startswith("loraformat_architectures raised ValueError: no list today")

    reg.register(broken_detect_plugin(), name="first")
    record = reg.register(broken_detect_plugin(), name="second")
    assert record.errors == ["architecture 'brokenarch' is already provided by plugin 'first'"]
    assert reg.architectures()["brokenarch"].plugin == "first"


def test_plugin_verdicts_on_input_propagate_but_bugs_are_skipped(monkeypatch):
    class Strict:
        @hookimpl
        def loraformat_architectures(self):
            return [ArchitectureInfo("strict", "refuses bad configs")]

        @hookimpl
        def loraformat_default_targets(self, architecture, config):
            if architecture != "strict":
                return None
            if "hidden_size" not in config:
                raise LoraformatError("config.json", "strict: hidden_size is missing")
            return ["proj"]

    class Buggy:
        @hookimpl
        def loraformat_default_targets(self, architecture, config):
            return [][0]  # IndexError: a bug, not a verdict

    reg = Registry(load_entry_points=False)
    reg.register(Strict(), name="strict")
    reg.register(Buggy(), name="buggy")  # registered last, so asked first
    monkeypatch.setattr(registry_module, "registry", lambda: reg)
    assert arch.default_targets("strict", {"hidden_size": 4}) == ["proj"]
    assert "loraformat_default_targets raised IndexError" in reg.records["buggy"].errors[0]
    with pytest.raises(LoraformatError, match=r"config\.json: strict: hidden_size is missing"):
        arch.default_targets("strict", {})
    unknown = r"no plugin provides architecture 'nope' \(installed: strict\)"
    with pytest.raises(LoraformatError, match=unknown):
        arch.dense_layers("nope", {}, {})
