"""Finding plugins and asking them questions.

Plugins come from the ``loraformat.plugins`` entry-point group — built-in ones included, so nothing
about them is special. A plugin that fails to import, or raises inside a hook, is recorded with its
error and skipped; the others keep working.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from ..errors import LoraformatError
from . import hookspecs
from .layers import ArchitectureInfo, DenseLayer, ExportModel, ExportOptions

ENTRY_POINT_GROUP = "loraformat.plugins"
hookimpl = pluggy.HookimplMarker("loraformat")


@dataclass
class PluginRecord:
    """One plugin as ``loraformat plugins`` reports it."""

    name: str
    distribution: str | None
    version: str | None
    architectures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "architectures": self.architectures,
            "ok": not self.errors,
            "errors": self.errors,
        }


class Registry:
    """A plugin manager plus the failure records pluggy itself does not keep."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("loraformat")
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._arch_cache: dict[str, list[ArchitectureInfo]] = {}
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in sorted(_entry_points(), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            if ep.name in self.records:  # the same plugin seen twice (e.g. two installs)
                self.records[ep.name].errors.append(
                    f"entry point {ep.name!r} is defined more than once; using the first"
                )
                continue
            record = PluginRecord(
                ep.name, dist.metadata["Name"] if dist else None, dist.version if dist else None
            )
            self.records[ep.name] = record
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not break the others
                record.errors.append(f"failed to load: {type(exc).__name__}: {exc}")
                continue
            self._collect_architectures(ep.name)

    def register(self, plugin: object, name: str, version: str | None = None) -> PluginRecord:
        """Register a plugin object directly (tests, embedding applications).

        Like an entry point, a plugin that pluggy rejects is recorded with its error, not raised.
        """
        record = PluginRecord(name, None, version)
        self.records[name] = record
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            record.errors.append(f"failed to register: {type(exc).__name__}: {exc}")
            return record
        self._collect_architectures(name)
        return record

    def _collect_architectures(self, name: str) -> None:
        record = self.records[name]
        taken = {
            info.id: other
            for other, infos in self._arch_cache.items()
            if other != name
            for info in infos
        }
        infos = self._architectures_of(name)
        for info in infos:
            if info.id in taken:
                record.errors.append(
                    f"architecture {info.id!r} is already provided by plugin {taken[info.id]!r}"
                )
        self._arch_cache[name] = [i for i in infos if i.id not in taken]
        record.architectures = [info.id for info in infos]

    def unregister(self, name: str) -> None:
        """Forget a plugin (tests)."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin, name=name)
        self.records.pop(name, None)
        self._arch_cache.pop(name, None)

    def health_check(self) -> None:
        """Ask every loaded plugin the cheapest question, so one that raises is recorded.

        A plugin must answer ``None`` to detection of an empty checkpoint; raising there marks it
        broken (``loraformat plugins`` shows the error).
        """
        for impl in self._impls("loraformat_detect"):
            try:
                impl.function(*[{"config": {}, "tensor_names": []}[a] for a in impl.argnames])
            except Exception as exc:
                self._fail(impl.plugin_name, "loraformat_detect", exc)

    def _impls(self, hook: str) -> list[pluggy.HookImpl]:
        # pluggy calls the last registered first; keep its order.
        return list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))

    def _fail(self, plugin_name: str, hook: str, exc: Exception) -> None:
        record = self.records.setdefault(plugin_name, PluginRecord(plugin_name, None, None))
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
        message = f"{hook} raised {type(exc).__name__}: {exc}{where}"
        if message not in record.errors:  # the same failure on every call is reported once
            record.errors.append(message)

    def call_first(self, hook: str, **kwargs: Any) -> Any:
        """Like a ``firstresult`` hook call, but a plugin that raises is recorded and skipped.

        A :class:`LoraformatError` is the plugin's verdict on the user's input (a config it cannot
        export, say), not a plugin bug: it propagates to the caller unchanged.
        """
        for impl in self._impls(hook):
            args = [kwargs[name] for name in impl.argnames]
            try:
                result = impl.function(*args)
            except LoraformatError:
                raise
            except Exception as exc:
                self._fail(impl.plugin_name, hook, exc)
                continue
            if result is not None:
                return result
        return None

    def _architectures_of(self, plugin_name: str) -> list[ArchitectureInfo]:
        plugin = self.pm.get_plugin(plugin_name)
        for impl in self._impls("loraformat_architectures"):
            if impl.plugin is plugin:
                try:
                    return [
                        ArchitectureInfo(str(i.id), str(i.description), plugin=plugin_name)
                        for i in impl.function()
                    ]
                except Exception as exc:  # includes answers that are not ArchitectureInfo
                    self._fail(plugin_name, "loraformat_architectures", exc)
                    return []
        return []

    def architectures(self) -> dict[str, ArchitectureInfo]:
        """Architecture id → info, over every plugin that loaded (asked once per plugin)."""
        found: dict[str, ArchitectureInfo] = {}
        for name, infos in self._arch_cache.items():
            if self.pm.get_plugin(name) is None:  # unregistered behind our back (pm.unregister)
                continue
            for info in infos:
                found.setdefault(info.id, info)
        return found


def _entry_points() -> list[metadata.EntryPoint]:
    # A seam for tests: monkeypatch this to add a fake or broken entry point.
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


@functools.cache
def registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    return Registry()


def plugin_report() -> list[dict[str, Any]]:
    """What ``loraformat plugins`` shows: one entry per plugin, sorted by name, with fields
    name, distribution, version, architectures, ok, errors.

    Every loaded plugin is asked to detect an empty checkpoint first, so a plugin that raises
    inside a hook shows up with its error even before a real checkpoint reaches it.
    """
    reg = registry()
    reg.health_check()
    return [reg.records[name].to_json() for name in sorted(reg.records)]


# -- the questions the core asks, one function each ------------------------------------------


def _known(architecture: str) -> None:
    if architecture not in registry().architectures():
        known = ", ".join(sorted(registry().architectures())) or "none"
        raise LoraformatError(
            None, f"no plugin provides architecture {architecture!r} (installed: {known})"
        )


def detect(config: Mapping[str, Any], tensor_names: Sequence[str]) -> str | None:
    return registry().call_first("loraformat_detect", config=config, tensor_names=tensor_names)


def dense_layers(
    architecture: str, config: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
) -> list[DenseLayer]:
    _known(architecture)
    found = registry().call_first(
        "loraformat_dense_layers",
        architecture=architecture,
        config=config,
        tensor_shapes=tensor_shapes,
    )
    return list(found or [])


def default_targets(architecture: str, config: Mapping[str, Any]) -> list[str]:
    _known(architecture)
    found = registry().call_first(
        "loraformat_default_targets", architecture=architecture, config=config
    )
    return list(found or [])


def foreign_name(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> str | None:
    return registry().call_first(
        "loraformat_foreign_name",
        architecture=architecture,
        config=config,
        layer_path=layer_path,
        convention=convention,
    )


def layer_path(
    architecture: str, config: Mapping[str, Any], foreign: str, convention: str
) -> str | None:
    return registry().call_first(
        "loraformat_layer_path",
        architecture=architecture,
        config=config,
        foreign_name=foreign,
        convention=convention,
    )


def row_permutation(
    architecture: str, config: Mapping[str, Any], path: str, convention: str
) -> Sequence[int] | None:
    return registry().call_first(
        "loraformat_foreign_row_permutation",
        architecture=architecture,
        config=config,
        layer_path=path,
        convention=convention,
    )


def export_model(
    architecture: str,
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    options: ExportOptions | None = None,
) -> ExportModel:
    _known(architecture)
    found = registry().call_first(
        "loraformat_export_model",
        architecture=architecture,
        config=config,
        tensors=tensors,
        options=options or ExportOptions(),
    )
    if found is None:
        raise LoraformatError(None, f"the {architecture!r} plugin cannot build an export model")
    return found
