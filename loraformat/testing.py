"""The conformance kit for architecture-plugin authors.

:func:`check_plugin` runs every hook of the plugin that provides a checkpoint's architecture and
checks the contracts in spec/PLUGINS.md; a broken contract is an ``AssertionError`` listing every
problem found at that stage. Use it from pytest::

    from loraformat.testing import check_plugin

    def test_my_plugin(tmp_path):
        ckpt = write_tiny_checkpoint(tmp_path)          # config.json + model.safetensors
        check_plugin(ckpt, "myarch", reference=my_reference_model)

Hooks are called on the plugin directly (not through the registry's failure capture), so an
exception inside a hook propagates with its traceback. Torch is imported only by the export
checks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .architecture import hookspecs
from .architecture.layers import ArchitectureInfo, DenseLayer, ExportModel, ExportOptions
from .architecture.registry import Registry, registry
from .checkpoint import Checkpoint

#: An architecture id no plugin provides: every first-result hook must answer it with ``None``.
UNKNOWN_ARCHITECTURE = "loraformat-conformance-unknown"

REQUIRED_HOOKS = (
    "loraformat_architectures",
    "loraformat_detect",
    "loraformat_dense_layers",
    "loraformat_default_targets",
    "loraformat_export_model",
)
OPTIONAL_HOOKS = (
    "loraformat_foreign_name",
    "loraformat_layer_path",
    "loraformat_foreign_row_permutation",
)


@dataclass
class ConformanceReport:
    """What :func:`check_plugin` found when every contract held."""

    architecture: str
    plugin: str
    layers: list[DenseLayer]
    default_targets: list[str]
    #: convention → {layer path: foreign name}, for the conventions the plugin answers.
    foreign_names: dict[str, dict[str, str]] = field(default_factory=dict)
    #: convention → layer paths with a row permutation.
    permuted: dict[str, list[str]] = field(default_factory=dict)
    skipped_hooks: list[str] = field(default_factory=list)
    #: dense layers whose weight the export module does not use (allowed, but worth a look).
    unused_layers: list[str] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    #: largest |export − reference| over all outputs, when a reference was given.
    max_abs_diff: float | None = None


class _Problems:
    """Collects the failures of one stage; ``done()`` raises them together."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def check(self, ok: object, message: str) -> bool:
        if not ok:
            self.items.append(message)
        return bool(ok)

    def done(self) -> None:
        if self.items:
            lines = "\n".join(f"  - {item}" for item in self.items)
            raise AssertionError(f"plugin conformance, {self.stage}:\n{lines}")


class _Hooks:
    """The hook functions of one plugin, called with keyword arguments by spec name."""

    def __init__(self, reg: Registry, plugin_name: str) -> None:
        self.impls = {}
        for hook in REQUIRED_HOOKS + OPTIONAL_HOOKS:
            for impl in getattr(reg.pm.hook, hook).get_hookimpls():
                if impl.plugin_name == plugin_name:
                    self.impls[hook] = impl

    def has(self, hook: str) -> bool:
        return hook in self.impls

    def __call__(self, hook: str, **kwargs: Any) -> Any:
        impl = self.impls[hook]
        return impl.function(*[kwargs[name] for name in impl.argnames])


def check_plugin(
    checkpoint_dir: str | os.PathLike[str],
    architecture: str | None = None,
    reference: Callable[..., Any] | None = None,
    *,
    reg: Registry | None = None,
    atol: float = 1e-4,
    export: bool = True,
) -> ConformanceReport:
    """Run every hook of the plugin for this checkpoint and check its contracts.

    ``architecture``: the id the checkpoint must be detected as (default: whatever is detected).
    ``reference``: called as ``reference(**example_inputs)`` with the export module's example
    inputs; returns a tensor, a sequence of tensors in ``output_names`` order, or a mapping (e.g. a
    transformers ``ModelOutput``) keyed by output name. Each output must match within ``atol``.
    ``reg``: the registry to use (default: the process-wide one, loaded from entry points).
    ``export=False`` skips the export-module stage (and so torch).

    Returns a :class:`ConformanceReport`; raises ``AssertionError`` naming each broken contract.
    """
    reg = reg or registry()
    with Checkpoint(checkpoint_dir) as checkpoint:
        config = dict(checkpoint.config)
        names = checkpoint.names()
        shapes = checkpoint.shapes()
        arch, plugin_name, hooks, skipped = _check_architecture(reg, config, names, architecture)
        layers = _check_dense_layers(hooks, arch, config, shapes)
        targets = _check_default_targets(hooks, arch, config, layers)
        report = ConformanceReport(arch, plugin_name, layers, targets, skipped_hooks=skipped)
        _check_names(hooks, arch, config, layers, report)
        if export:
            _check_export(hooks, arch, config, checkpoint, layers, reference, atol, report)
    return report


# -- stages -------------------------------------------------------------------------------------


def _check_architecture(
    reg: Registry, config: dict[str, Any], names: list[str], architecture: str | None
) -> tuple[str, str, _Hooks, list[str]]:
    p = _Problems("architecture and detection")
    known: Mapping[str, ArchitectureInfo] = reg.architectures()
    detected = reg.call_first("loraformat_detect", config=config, tensor_names=names)
    if architecture is None:
        p.check(detected is not None, "no plugin detects this checkpoint")
        p.done()
        architecture = detected
    assert architecture is not None
    if architecture not in known:
        failed = {n: r.errors for n, r in reg.records.items() if r.errors}
        p.add(
            f"architecture {architecture!r} is not listed by any plugin "
            f"(listed: {sorted(known)}; failed plugins: {failed or 'none'})"
        )
        p.done()
    plugin_name = known[architecture].plugin
    hooks = _Hooks(reg, plugin_name)
    for hook in REQUIRED_HOOKS:
        p.check(hooks.has(hook), f"plugin {plugin_name!r} does not implement {hook}")
    p.done()
    infos = hooks("loraformat_architectures")
    p.check(
        isinstance(infos, list) and all(isinstance(i, ArchitectureInfo) for i in infos),
        "loraformat_architectures must return a list of ArchitectureInfo",
    )
    p.check(
        architecture in [getattr(i, "id", None) for i in infos or []],
        f"plugin {plugin_name!r} provides {architecture!r} but its loraformat_architectures "
        "does not list it",
    )
    for info in infos or []:
        p.check(
            info.id == info.id.lower() and info.id.strip() == info.id and info.id,
            f"architecture id {info.id!r} must be lowercase, non-empty, without spaces",
        )
    own = hooks("loraformat_detect", config=config, tensor_names=names)
    p.check(
        own == architecture,
        f"plugin {plugin_name!r} detects this checkpoint as {own!r}, expected {architecture!r}",
    )
    p.check(
        detected == architecture,
        f"the registry detects this checkpoint as {detected!r} (an earlier plugin answered "
        f"first?), expected {architecture!r}",
    )
    empty = hooks("loraformat_detect", config={}, tensor_names=[])
    p.check(empty is None, f"detecting an empty checkpoint must give None, got {empty!r}")
    # First-result hooks MUST answer None for an architecture the plugin does not provide.
    probes = {
        "loraformat_dense_layers": {"tensor_shapes": {}},
        "loraformat_default_targets": {},
        "loraformat_foreign_name": {"layer_path": "x", "convention": "peft"},
        "loraformat_layer_path": {"foreign_name": "x", "convention": "peft"},
        "loraformat_foreign_row_permutation": {"layer_path": "x", "convention": "gguf"},
        "loraformat_export_model": {"tensors": {}, "options": ExportOptions()},
    }
    for hook, extra in probes.items():
        if not hooks.has(hook):
            continue
        try:
            got = hooks(hook, architecture=UNKNOWN_ARCHITECTURE, config={}, **extra)
        except Exception as exc:
            p.add(f"{hook} raised {type(exc).__name__} for another architecture: {exc}")
            continue
        p.check(got is None, f"{hook} must return None for another architecture, got {got!r}")
    p.done()
    skipped = [hook for hook in OPTIONAL_HOOKS if not hooks.has(hook)]
    return architecture, plugin_name, hooks, skipped


def _check_dense_layers(
    hooks: _Hooks, arch: str, config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> list[DenseLayer]:
    p = _Problems("dense layers")
    layers = hooks(
        "loraformat_dense_layers", architecture=arch, config=config, tensor_shapes=shapes
    )
    if not isinstance(layers, list) or not layers:
        p.add(f"loraformat_dense_layers must return a non-empty list, got {layers!r}")
        p.done()
    seen: set[str] = set()
    for layer in layers:
        if not p.check(isinstance(layer, DenseLayer), f"{layer!r} is not a DenseLayer"):
            continue
        where = layer.path
        p.check(where not in seen, f"{where}: listed twice")
        seen.add(where)
        p.check(layer.layout in ("out_in", "in_out"), f"{where}: bad layout {layer.layout!r}")
        p.check(layer.kind in ("linear", "embedding"), f"{where}: bad kind {layer.kind!r}")
        p.check(
            layer.in_features > 0 and layer.out_features > 0,
            f"{where}: in/out features must be positive",
        )
        actual = shapes.get(layer.weight)
        if not p.check(actual is not None, f"{where}: checkpoint has no tensor {layer.weight!r}"):
            continue
        p.check(
            tuple(actual) == layer.stored_shape(),
            f"{where}: stored_shape() {list(layer.stored_shape())} ({layer.layout}, in="
            f"{layer.in_features}, out={layer.out_features}) != checkpoint {list(actual)}",
        )
        if layer.kind == "embedding":
            p.check(
                layer.layout == "in_out",
                f"{where}: an embedding table is stored [vocab, dim]: layout must be 'in_out'",
            )
        if layer.bias is not None:
            bias = shapes.get(layer.bias)
            p.check(
                bias is not None and tuple(bias) == (layer.out_features,),
                f"{where}: bias {layer.bias!r} has shape {bias}, expected [{layer.out_features}]",
            )
        if layer.parts:
            spans = [(part.start, part.stop) for part in layer.parts]
            tiles = [0] + [stop for _, stop in spans]
            p.check(
                spans == sorted(spans)
                and all(start == tiles[i] for i, (start, _) in enumerate(spans))
                and tiles[-1] == layer.out_features
                and all(stop > start for start, stop in spans),
                f"{where}: fused parts {spans} must tile the out rows [0, {layer.out_features}) "
                "in order, without gaps or overlaps",
            )
            part_names = [part.name for part in layer.parts]
            p.check(
                len(set(part_names)) == len(part_names), f"{where}: duplicate part names"
            )
    p.done()
    return layers


def _check_default_targets(
    hooks: _Hooks, arch: str, config: dict[str, Any], layers: list[DenseLayer]
) -> list[str]:
    p = _Problems("default targets")
    targets = hooks("loraformat_default_targets", architecture=arch, config=config)
    if not p.check(
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets),
        f"loraformat_default_targets must return a non-empty list of str, got {targets!r}",
    ):
        p.done()
    module_names = {layer.module_name for layer in layers}
    for target in targets:
        p.check(
            target in module_names,
            f"default target {target!r} names no dense layer (module names: "
            f"{sorted(module_names)})",
        )
    p.done()
    return targets


def _check_names(
    hooks: _Hooks,
    arch: str,
    config: dict[str, Any],
    layers: list[DenseLayer],
    report: ConformanceReport,
) -> None:
    p = _Problems("foreign names")
    has_forward = hooks.has("loraformat_foreign_name")
    has_back = hooks.has("loraformat_layer_path")
    if has_forward != has_back:
        p.add("implement both loraformat_foreign_name and loraformat_layer_path, or neither")
        p.done()
    for convention in hookspecs.CONVENTIONS:
        names: dict[str, str] = {}
        for layer in layers:
            if has_forward:
                foreign = hooks(
                    "loraformat_foreign_name",
                    architecture=arch, config=config, layer_path=layer.path, convention=convention,
                )
                if foreign is not None:
                    if not p.check(
                        isinstance(foreign, str) and foreign,
                        f"{convention}: {layer.path} → {foreign!r} is not a non-empty string",
                    ):
                        continue
                    back = hooks(
                        "loraformat_layer_path",
                        architecture=arch, config=config, foreign_name=foreign,
                        convention=convention,
                    )
                    p.check(
                        back == layer.path,
                        f"{convention}: {layer.path} → {foreign!r} → {back!r} does not round-trip",
                    )
                    other = next((k for k, v in names.items() if v == foreign), None)
                    p.check(
                        other is None,
                        f"{convention}: {layer.path} and {other} share the name {foreign!r}",
                    )
                    names[layer.path] = foreign
            if hooks.has("loraformat_foreign_row_permutation"):
                perm = hooks(
                    "loraformat_foreign_row_permutation",
                    architecture=arch, config=config, layer_path=layer.path, convention=convention,
                )
                if perm is not None:
                    p.check(
                        sorted(int(i) for i in perm) == list(range(layer.out_features)),
                        f"{convention}: row permutation of {layer.path} is not a permutation of "
                        f"its {layer.out_features} out rows",
                    )
                    report.permuted.setdefault(convention, []).append(layer.path)
        if names:
            report.foreign_names[convention] = names
        if has_back:
            junk = hooks(
                "loraformat_layer_path", architecture=arch, config=config,
                foreign_name="no.such.module.anywhere", convention=convention,
            )
            p.check(junk is None, f"{convention}: an unknown foreign name maps to {junk!r}")
    p.done()


def _load_tensors(checkpoint: Checkpoint) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for shard in checkpoint.shards:
        file = checkpoint.path / shard if checkpoint.path.is_dir() else checkpoint.path
        for name, tensor in load_file(str(file)).items():
            if checkpoint.shard_of.get(name) == shard:
                tensors[name] = tensor
    return tensors


def _as_outputs(value: Any, names: Sequence[str], what: str) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise AssertionError(f"plugin conformance: {what} lacks outputs {missing}")
        return [value[n] for n in names]
    if isinstance(value, Sequence):
        return list(value)
    raise AssertionError(f"plugin conformance: {what} returned {type(value).__name__}")


def _check_export(
    hooks: _Hooks,
    arch: str,
    config: dict[str, Any],
    checkpoint: Checkpoint,
    layers: list[DenseLayer],
    reference: Callable[..., Any] | None,
    atol: float,
    report: ConformanceReport,
) -> None:
    import torch

    from .architecture.modules import Dense

    p = _Problems("export module")
    tensors = _load_tensors(checkpoint)
    built = hooks(
        "loraformat_export_model",
        architecture=arch, config=config, tensors=tensors, options=ExportOptions(),
    )
    if not isinstance(built, ExportModel) or not isinstance(built.module, torch.nn.Module):
        p.add(
            f"loraformat_export_model must return an ExportModel with an nn.Module, got {built!r}"
        )
        p.done()
    module = built.module
    state = module.state_dict()
    for key, value in state.items():
        if not p.check(key in tensors, f"state-dict key {key!r} is not a checkpoint tensor"):
            continue
        want = tensors[key]
        p.check(
            value.dtype == want.dtype and tuple(value.shape) == tuple(want.shape)
            and torch.equal(value, want),
            f"{key}: the module's value ({value.dtype}, {list(value.shape)}) differs from the "
            f"checkpoint's ({want.dtype}, {list(want.shape)})",
        )
    for layer in layers:
        if layer.weight not in state:
            report.unused_layers.append(layer.path)
            continue
        try:
            sub = module.get_submodule(layer.path)
        except AttributeError:
            p.add(f"{layer.path}: no submodule at the layer path (state dict has {layer.weight})")
            continue
        if layer.kind == "linear":
            p.check(
                isinstance(sub, Dense) and sub.layout == layer.layout,
                f"{layer.path}: must be a loraformat.architecture.modules.Dense with layout "
                f"{layer.layout!r} (LoRA slots are filled there), got {type(sub).__name__}",
            )
    names_in = list(built.input_names)
    # Graph names may hold dots where Python keywords cannot (past_key_values.0.key ↔ _0_).
    p.check(
        [k.replace(".", "_") for k in built.example_inputs]
        == [n.replace(".", "_") for n in names_in],
        f"example_inputs keys {list(built.example_inputs)} do not match input_names {names_in}",
    )
    p.check(
        built.output_names and len(set(built.output_names)) == len(built.output_names),
        f"output_names must be non-empty and unique, got {built.output_names}",
    )
    for name, axes in built.dynamic_axes.items():
        p.check(
            name in names_in or name in built.output_names,
            f"dynamic_axes names {name!r}, which is neither an input nor an output",
        )
        p.check(isinstance(axes, Mapping), f"dynamic_axes[{name!r}] must map axis → name")
    p.done()

    report.input_names, report.output_names = names_in, list(built.output_names)
    with torch.no_grad():
        outputs = _as_outputs(module(**built.example_inputs), built.output_names, "the module")
    p.check(
        len(outputs) == len(built.output_names),
        f"the module returned {len(outputs)} output(s), output_names declares "
        f"{len(built.output_names)}",
    )
    for name, out in zip(built.output_names, outputs, strict=False):
        p.check(
            isinstance(out, torch.Tensor) and bool(torch.isfinite(out).all()),
            f"output {name!r} is not a finite tensor",
        )
    # A dynamic batch axis must really be dynamic: run again on the first example only.
    batched = [n for n in names_in if built.dynamic_axes.get(n, {}).get(0) == "batch"]
    if batched and all(built.example_inputs[n].shape[0] > 1 for n in batched):
        one = {
            n: (v[:1] if n in batched else v) for n, v in built.example_inputs.items()
        }
        with torch.no_grad():
            single = _as_outputs(module(**one), built.output_names, "the module")
        for name, full, part in zip(built.output_names, outputs, single, strict=False):
            if built.dynamic_axes.get(name, {}).get(0) == "batch":
                p.check(
                    part.shape[0] == 1 and torch.allclose(part, full[:1], atol=atol, rtol=0),
                    f"output {name!r} of a batch of one differs from the first row of the batch",
                )
    p.done()

    if reference is not None:
        with torch.no_grad():
            want = _as_outputs(reference(**built.example_inputs), built.output_names, "reference")
        worst = 0.0
        for name, got, exp in zip(built.output_names, outputs, want, strict=False):
            exp = torch.as_tensor(exp)
            if not p.check(
                tuple(got.shape) == tuple(exp.shape),
                f"output {name!r}: shape {list(got.shape)} != reference {list(exp.shape)}",
            ):
                continue
            diff = float((got.double() - exp.double()).abs().max()) if got.numel() else 0.0
            worst = max(worst, diff)
            p.check(
                diff <= atol and not math.isnan(diff),
                f"output {name!r}: max |export − reference| = {diff:.3g} > {atol:g}",
            )
        report.max_abs_diff = worst
        p.done()
