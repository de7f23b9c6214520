"""Finding plugins and dispatching to their architectures.

Plugins come from the ``loraformat.plugins`` entry-point group — built-in ones included, so nothing
about them is special. pluggy loads and registers them and calls the one hook,
``loraformat_architectures``, through its own hook caller (so its tracing and wrappers apply); the
registry then keeps each architecture object by id and the core calls it directly.

A plugin that fails to import, declares another plugin API major version, answers with something
that is not an architecture, or raises inside a method is recorded with its error; the others keep
working. A method that raises anything but a :class:`LoraformatError` (the plugin's verdict on the
input) becomes a one-line :class:`LoraformatError` naming the checkpoint and the plugin.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TypeVar

import pluggy

from ..errors import LoraformatError
from . import hookspecs
from .layers import DenseLayer, ExpertStorage, ExportModel, ExportOptions
from .names import NameTable
from .protocol import (
    PLUGIN_API_VERSION,
    Architecture,
    CheckpointInfo,
    LayerRepeat,
    ModelShape,
)

ENTRY_POINT_GROUP = "loraformat.plugins"
HOOK = "loraformat_architectures"
#: The module attribute a plugin declares its plugin API major version in.
API_ATTRIBUTE = "LORAFORMAT_PLUGIN_API"
hookimpl = pluggy.HookimplMarker("loraformat")

T = TypeVar("T")


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

    def fail(self, what: str, exc: BaseException) -> None:
        """Record ``exc`` raised in ``what`` (once: the same failure on every call is one line)."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
        message = f"{what} raised {type(exc).__name__}: {exc}{where}"
        if message not in self.errors:
            self.errors.append(message)


class PluginArchitecture:
    """A plugin's architecture object as the core sees it: the same questions, plus failure
    capture. A bug in the plugin (any exception but :class:`LoraformatError`) is recorded on the
    plugin and raised as a one-line error naming the checkpoint; ``detect`` answers ``False``."""

    def __init__(self, impl: Architecture, record: PluginRecord) -> None:
        self.impl = impl
        self.record = record
        self.id: str = impl.id
        self.description: str = str(impl.description)
        self.names: NameTable = impl.names
        self.gguf_architecture: str | None = impl.gguf_architecture
        self.ort_model_type: str | None = impl.ort_model_type
        self.expert_storage: tuple[ExpertStorage, ...] = tuple(
            getattr(impl, "expert_storage", ())
        )
        self.peft_weight_parameters: tuple[str, ...] = tuple(
            getattr(impl, "peft_weight_parameters", ())
        )
        self.generic = False

    @property
    def plugin(self) -> str:
        return self.record.name

    def _call(self, method: str, checkpoint: CheckpointInfo, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except LoraformatError as exc:
            if exc.path is None and checkpoint.path is not None:  # name the real file
                raise LoraformatError(checkpoint.path, exc.message) from exc
            raise
        except Exception as exc:
            self.record.fail(f"{self.id}.{method}", exc)
            raise LoraformatError(
                checkpoint.path,
                f"plugin {self.plugin!r} failed in {self.id}.{method}: "
                f"{type(exc).__name__}: {exc}",
            ) from exc

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        try:
            return bool(self.impl.detect(checkpoint))
        except Exception as exc:  # a verdict-raising detect is a bug too: detection is a question
            self.record.fail(f"{self.id}.detect", exc)
            return False

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        return list(self._call("dense_layers", checkpoint,
                               lambda: self.impl.dense_layers(checkpoint)))

    def default_targets(self, checkpoint: CheckpointInfo) -> list[str]:
        return list(self._call("default_targets", checkpoint,
                               lambda: self.impl.default_targets(checkpoint)))

    def row_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        return self._call(
            "row_permutation", checkpoint,
            lambda: self.impl.row_permutation(checkpoint, layer_path, convention),
        )

    def column_permutation(
        self, checkpoint: CheckpointInfo, layer_path: str, convention: str
    ) -> Sequence[int] | None:
        impl = getattr(self.impl, "column_permutation", None)  # optional in the protocol
        if impl is None:
            return None
        return self._call("column_permutation", checkpoint,
                          lambda: impl(checkpoint, layer_path, convention))

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any],
        options: ExportOptions | None = None,
    ) -> ExportModel:
        return self._call(
            "export_model", checkpoint,
            lambda: self.impl.export_model(checkpoint, tensors, options or ExportOptions()),
        )

    def model_shape(self, checkpoint: CheckpointInfo) -> ModelShape | None:
        return self._call("model_shape", checkpoint, lambda: self.impl.model_shape(checkpoint))

    def layer_repeat(self, checkpoint: CheckpointInfo) -> LayerRepeat | None:
        """The plugin's :class:`LayerRepeat` (optional in the contract), or ``None``."""
        method = getattr(self.impl, "layer_repeat", None)
        if method is None:
            return None
        return self._call("layer_repeat", checkpoint, lambda: method(checkpoint))

    def left_out(self, checkpoint: CheckpointInfo) -> list[str]:
        """The stored tensors the plugin's export leaves out (optional in the contract)."""
        method = getattr(self.impl, "left_out", None)
        if method is None:
            return []
        return list(self._call("left_out", checkpoint, lambda: method(checkpoint)))

    def __repr__(self) -> str:
        return f"<architecture {self.id} from plugin {self.plugin}>"


class Registry:
    """A plugin manager, the architectures its plugins provide, and the failure records pluggy
    itself does not keep."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("loraformat")
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._architectures: dict[str, PluginArchitecture] = {}
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
            except Exception as exc:  # a broken plugin must not break the others
                record.errors.append(f"failed to load: {type(exc).__name__}: {exc}")
                continue
            self._admit(plugin, record)

    def register(self, plugin: object, name: str, version: str | None = None) -> PluginRecord:
        """Register a plugin module or object directly (tests, embedding applications).

        Like an entry point, a plugin that is rejected is recorded with its error, not raised.
        """
        record = PluginRecord(name, None, version)
        self.records[name] = record
        self._admit(plugin, record)
        return record

    def _admit(self, plugin: object, record: PluginRecord) -> None:
        api = getattr(plugin, API_ATTRIBUTE, None)
        if api != PLUGIN_API_VERSION:
            said = f"declares plugin API {api!r}" if api is not None else (
                f"declares no {API_ATTRIBUTE}"
            )
            record.errors.append(
                f"{said}, this loraformat speaks {PLUGIN_API_VERSION}; skipped"
            )
            return
        try:
            self.pm.register(plugin, name=record.name)
        except Exception as exc:
            record.errors.append(f"failed to register: {type(exc).__name__}: {exc}")
            return
        others = [p for n, p in self.pm.list_name_plugin() if n != record.name]
        try:
            answers = self.pm.subset_hook_caller(HOOK, remove_plugins=others)()
        except Exception as exc:
            record.fail(HOOK, exc)
            return
        for answer in answers:
            for obj in answer or []:
                self._add(obj, record)

    def _add(self, obj: object, record: PluginRecord) -> None:
        if not isinstance(obj, Architecture):
            missing = [
                n for n in ("id", "description", "names", "gguf_architecture", "ort_model_type",
                            "detect", "dense_layers", "default_targets", "row_permutation",
                            "export_model", "model_shape")
                if not hasattr(obj, n)
            ]
            record.errors.append(
                f"{HOOK} answered {obj!r}, which is not an Architecture (missing: "
                f"{', '.join(missing)})"
            )
            return
        arch_id = obj.id
        if not isinstance(arch_id, str) or not arch_id or arch_id != arch_id.lower():
            record.errors.append(f"architecture id {arch_id!r} must be a non-empty lowercase str")
            return
        record.architectures.append(arch_id)
        taken = self._architectures.get(arch_id)
        if taken is not None:
            record.errors.append(
                f"architecture {arch_id!r} is already provided by plugin {taken.plugin!r}"
            )
            return
        self._architectures[arch_id] = PluginArchitecture(obj, record)

    def unregister(self, name: str) -> None:
        """Forget a plugin (tests)."""
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin, name=name)
        self.records.pop(name, None)
        self._architectures = {
            k: a for k, a in self._architectures.items() if a.plugin != name
        }

    def architectures(self) -> dict[str, PluginArchitecture]:
        """Architecture id → architecture, over every plugin that loaded."""
        return dict(self._architectures)

    def get(self, architecture: str, where: object = None) -> PluginArchitecture:
        """The architecture with this id; a one-line error (naming ``where``) if none has it."""
        found = self._architectures.get(architecture)
        if found is None:
            known = ", ".join(sorted(self._architectures)) or "none"
            raise LoraformatError(
                where, f"no installed plugin provides architecture {architecture!r} "
                f"(installed: {known})",
            )
        return found

    def detect(self, checkpoint: CheckpointInfo) -> PluginArchitecture | None:
        """The architecture whose ``detect`` accepts the checkpoint (the first, by plugin name and
        then the order the plugin lists them), or ``None``."""
        for arch in self._architectures.values():
            if arch.detect(checkpoint):
                return arch
        return None

    def health_check(self) -> None:
        """Ask every architecture to detect an empty checkpoint, so one that raises is recorded
        (``loraformat plugins`` then shows the error)."""
        for arch in self._architectures.values():
            arch.detect(CheckpointInfo())


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

    Every architecture is asked to detect an empty checkpoint first, so a plugin that raises
    there shows up with its error even before a real checkpoint reaches it.
    """
    reg = registry()
    reg.health_check()
    return [reg.records[name].to_json() for name in sorted(reg.records)]


def get_architecture(architecture: str, where: object = None) -> PluginArchitecture:
    """The installed architecture with this id (see :meth:`Registry.get`)."""
    return registry().get(architecture, where)


def detect(checkpoint: CheckpointInfo) -> PluginArchitecture | None:
    """The installed architecture that recognises ``checkpoint``, or ``None``."""
    return registry().detect(checkpoint)
