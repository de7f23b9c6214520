"""The conformance kit for architecture-plugin authors.

:func:`check_plugin` asks the architecture that a checkpoint is detected as every question of the
plugin contract (spec/PLUGINS.md) and checks the answers; a broken contract is an
``AssertionError`` listing every problem found at that stage. Use it from pytest::

    from loraformat.testing import check_plugin

    def test_my_plugin(tmp_path):
        ckpt = write_tiny_checkpoint(tmp_path)          # config.json + model.safetensors
        check_plugin(ckpt, "myarch", reference=my_reference_model)

The architecture object is called directly (not through the registry's failure capture), so an
exception inside it propagates with its traceback. Torch is imported only by the export checks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .architecture.layers import DenseLayer, ExportModel, ExportOptions
from .architecture.names import NameTable
from .architecture.protocol import Architecture, CheckpointInfo
from .architecture.registry import Registry, registry
from .checkpoint import Checkpoint

#: Conventions every plugin is asked about, besides the columns its name table has.
CONVENTIONS = ("peft", "gguf", "mlx")


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


def check_plugin(
    checkpoint_dir: str | os.PathLike[str],
    architecture: str | None = None,
    reference: Callable[..., Any] | None = None,
    *,
    reg: Registry | None = None,
    atol: float = 1e-4,
    export: bool = True,
) -> ConformanceReport:
    """Ask the checkpoint's architecture every question of the contract and check the answers.

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
        info = CheckpointInfo(checkpoint.path, dict(checkpoint.config), checkpoint.shapes())
        arch, plugin_name = _check_architecture(reg, info, architecture)
        layers = _check_dense_layers(arch, info)
        targets = _check_default_targets(arch, info, layers)
        report = ConformanceReport(arch.id, plugin_name, layers, targets)
        _check_names(arch, info, layers, report)
        if export:
            _check_export(arch, info, checkpoint, layers, reference, atol, report)
    return report


# -- stages -------------------------------------------------------------------------------------


def _check_architecture(
    reg: Registry, info: CheckpointInfo, architecture: str | None
) -> tuple[Any, str]:
    p = _Problems("architecture and detection")
    known = reg.architectures()
    detected = reg.detect(info)
    detected_id = detected.id if detected is not None else None
    if architecture is None:
        p.check(detected is not None, "no plugin detects this checkpoint")
        p.done()
        architecture = detected_id
    assert architecture is not None
    if architecture not in known:
        failed = {n: r.errors for n, r in reg.records.items() if r.errors}
        p.add(
            f"architecture {architecture!r} is not provided by any plugin "
            f"(provided: {sorted(known)}; failed plugins: {failed or 'none'})"
        )
        p.done()
    plugin_name = known[architecture].plugin
    arch = known[architecture].impl
    p.check(isinstance(arch, Architecture), f"{arch!r} does not implement Architecture")
    p.check(
        arch.id == arch.id.lower() and arch.id.strip() == arch.id and arch.id,
        f"architecture id {arch.id!r} must be lowercase, non-empty, without spaces",
    )
    p.check(isinstance(arch.names, NameTable), f"{arch.id}.names must be a NameTable")
    p.done()
    own = arch.detect(info)
    p.check(own is True, f"{arch.id}.detect answers {own!r} for this checkpoint, expected True")
    p.check(
        detected_id == architecture,
        f"the registry detects this checkpoint as {detected_id!r} (another architecture's detect "
        f"is not exact?), expected {architecture!r}",
    )
    try:
        empty = arch.detect(CheckpointInfo())
    except Exception as exc:
        empty = f"{type(exc).__name__}: {exc}"
    p.check(empty is False, f"detecting an empty checkpoint must give False, got {empty!r}")
    p.done()
    return arch, plugin_name


def _check_dense_layers(arch: Any, info: CheckpointInfo) -> list[DenseLayer]:
    p = _Problems("dense layers")
    shapes = info.shapes
    layers = arch.dense_layers(info)
    if not isinstance(layers, list) or not layers:
        p.add(f"{arch.id}.dense_layers must return a non-empty list, got {layers!r}")
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
            expected = (*((layer.experts,) if layer.experts else ()), layer.out_features)
            p.check(
                bias is not None and tuple(bias) == expected,
                f"{where}: bias {layer.bias!r} has shape {bias}, expected {list(expected)}",
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
    arch: Any, info: CheckpointInfo, layers: list[DenseLayer]
) -> list[str]:
    p = _Problems("default targets")
    targets = arch.default_targets(info)
    if not p.check(
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets),
        f"{arch.id}.default_targets must return a non-empty list of str, got {targets!r}",
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
    arch: Any, info: CheckpointInfo, layers: list[DenseLayer], report: ConformanceReport
) -> None:
    """The name table round-trips (every row, and every dense layer of this checkpoint), no two
    layers share a foreign name, and every row permutation is a permutation."""
    p = _Problems("names")
    table: NameTable = arch.names
    for problem in table.problems():
        p.add(f"name table: {problem}")
    for convention in dict.fromkeys([*table.conventions, *CONVENTIONS]):
        names: dict[str, str] = {}
        for layer in layers:
            foreign = table.foreign(layer.path, convention)
            if foreign is not None:
                back = table.layer_path(foreign, convention, present=info.shapes)
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
            # Rows, and the input columns where the plugin answers (an optional question).
            for what, ask, size in (
                ("row", arch.row_permutation, layer.out_features),
                ("column", getattr(arch, "column_permutation", None), layer.in_features),
            ):
                perm = ask(info, layer.path, convention) if ask is not None else None
                if perm is None:
                    continue
                p.check(
                    sorted(int(i) for i in perm) == list(range(size)),
                    f"{convention}: {what} permutation of {layer.path} is not a permutation of "
                    f"its {size} {'out rows' if what == 'row' else 'in columns'}",
                )
                report.permuted.setdefault(convention, []).append(layer.path)
        if names:
            report.foreign_names[convention] = names
        junk = table.layer_path("no.such.module.anywhere", convention)
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
    arch: Any,
    info: CheckpointInfo,
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
    built = arch.export_model(info, tensors, ExportOptions())
    if not isinstance(built, ExportModel) or not isinstance(built.module, torch.nn.Module):
        p.add(f"{arch.id}.export_model must return an ExportModel with an nn.Module, got {built!r}")
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
