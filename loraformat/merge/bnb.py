"""Merging adapters into a bitsandbytes 4-bit checkpoint (transformers' ``save_pretrained`` of a
model loaded with ``load_in_4bit``): the QLoRA deployment step.

Every 4-bit weight an adapter touches is dequantized exactly as bitsandbytes does
(:mod:`loraformat.quant.bnb4`), merged in float32 by the same plan and arithmetic as a checkpoint
merge, and then either

- written as a float tensor of the weight's original dtype (the default: a plain float
  checkpoint, every other 4-bit weight dequantized too, ``quantization_config`` dropped from the
  config) — the QLoRA recipe, exact up to that dtype; or
- with ``requantize``, quantized again to the same layout (type, code, block sizes, nesting), so
  the output loads in transformers as the same 4-bit model; the survival report says how much of
  each adapter layer the 4-bit weight kept.

Tensors nothing changes keep their bytes (safetensors files are rewritten, since a 4-bit state
blob may change length, so offsets move). Shards keep their names and metadata; the index and
the other top-level files are carried over. Streamed: one tensor at a time. Output is atomic.

The adapter's base fingerprint names the float checkpoint, not this one, so it is not checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..architecture import CheckpointInfo, registry
from ..architecture.generic import GenericArchitecture
from ..atomic import TMP_MARKER, atomic_dir, check_output
from ..checkpoint import CONFIG_FILE, INDEX_FILE, Checkpoint
from ..errors import LoraformatError
from ..format.adapter import Adapter
from ..format.safetensors_io import DTYPES, TensorEntry, read_header_only, write_safetensors
from ..quant import bnb4
from ..quant.survival import DEFAULT_THRESHOLD, SurvivalReport, measure
from .checkpoint import merged_in
from .plan import MERGED_KEY, MergePlan, open_adapters, plan_merge

Progress = Callable[[int, int], None]
ADVICE = (
    "write a float checkpoint instead (omit --requantize: the QLoRA recipe), or keep the adapter "
    "separate (PEFT on the 4-bit base)"
)
#: Weight files of other formats, not carried into the output (they would be unmerged).
_STALE = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")


@dataclass(frozen=True)
class BnbMergeResult:
    """What a bitsandbytes merge wrote; ``survival`` only when requantized."""

    path: Path
    layers: int
    tensors_changed: int
    shards: int
    requantized: bool
    survival: SurvivalReport | None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "output": str(self.path),
            "tensors_changed": self.tensors_changed,
            "layers": self.layers,
            "shards": self.shards,
            "requantized": self.requantized,
        }
        if self.survival is not None:
            data["survival"] = self.survival.to_json()
        return data


def quant_config(path: Path, method: str) -> dict[str, Any] | None:
    """The ``quantization_config`` of checkpoint directory ``path`` if its ``quant_method`` is
    ``method``; None otherwise (no directory, no config, another method)."""
    config_path = path / CONFIG_FILE
    if not path.is_dir() or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == method else None


def is_bnb4(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint directory quantized by bitsandbytes (4-bit or 8-bit:
    :func:`merge_bnb` refuses 8-bit with a message, rather than a safetensors merge failing)."""
    return quant_config(Path(path), "bitsandbytes") is not None


def _float_dtype(name: str, where: Path, weight: str) -> str:
    short = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(name)
    if short is None:
        raise LoraformatError(where, f"{weight}: quant_state dtype {name!r} is not a float dtype")
    return short


def cast(values: np.ndarray, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(values.astype(DTYPES[dtype], copy=False))


class _Quantized:
    """The 4-bit weights of a checkpoint: name → QuantState, and which tensors are auxiliary."""

    def __init__(self, ckpt: Checkpoint, where: Path) -> None:
        names = set(ckpt.names())
        self.states: dict[str, bnb4.QuantState] = {}
        self.aux_of: dict[str, str] = {}  # auxiliary tensor → its weight
        for name in sorted(names):
            if bnb4.state_key(name, names) is None:
                continue
            lazy = {n: ckpt.numpy(n) for n in [name, *bnb4.aux_names(name, names)]}
            self.states[name] = bnb4.read_state(lazy, name, where)
            for aux in bnb4.aux_names(name, names):
                self.aux_of[aux] = name

    def shapes(self, ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
        """Every tensor's logical shape (4-bit weights: their float shape), auxiliaries left out."""
        shapes = {}
        for name, shape in ckpt.shapes().items():
            if name in self.aux_of:
                continue
            shapes[name] = self.states[name].shape if name in self.states else tuple(shape)
        return shapes


def plan_quantized(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]],
                   adapters: Sequence[Adapter], where: Path, weights: Sequence[float] | None,
                   force: bool, allow_nonfinite: bool) -> MergePlan:
    """The merge plan on a quantized checkpoint whose tensors have the float ``shapes`` (each
    quantized weight under its float name, auxiliary tensors left out)."""
    info = CheckpointInfo(where, ckpt.config, shapes)
    # A plugin's architecture, or the generic one (layers are the 2-D weights, each read as its
    # adapter layer sees it), exactly as for a float checkpoint.
    arch = registry().detect(info) or GenericArchitecture.for_checkpoint(info)
    layers = {d.path: d for d in arch.dense_layers(info)}
    if getattr(arch, "generic", False):
        for adapter in adapters:
            for path, spec in adapter.specs.items():
                if path in layers:
                    layers[path] = GenericArchitecture.fit(
                        layers[path], spec.kind, spec.in_features, spec.out_features
                    )
    return plan_merge(layers, shapes, adapters, architecture=arch.id, base_path=where,
                      weights=weights, fingerprint=None, force=force,
                      allow_nonfinite=allow_nonfinite, merged=merged_in(ckpt))


def merge_bnb(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    requantize: bool = False,
    threshold: float | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BnbMergeResult:
    """Merge ``adapters`` into the bitsandbytes 4-bit checkpoint directory ``base``, writing the
    directory ``out``: a float checkpoint, or with ``requantize`` the same 4-bit layout.

    ``threshold``: the survival share below which a requantized layer is named in the warning.
    """
    where = Path(base)
    qc = quant_config(where, "bitsandbytes")
    if qc is None:
        raise LoraformatError(where, "not a bitsandbytes-quantized checkpoint directory "
                              "(config.json has no quantization_config with quant_method "
                              "'bitsandbytes')")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise LoraformatError(where, "8-bit bitsandbytes (LLM.int8) checkpoints are not "
                              "supported; only 4-bit (nf4/fp4) bases can be merged into")
    target = check_output(out, overwrite)
    if target.resolve() == where.resolve():
        raise LoraformatError(target, "output is the base itself; inputs are never modified")
    report = SurvivalReport(threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
                            advice=ADVICE) if requantize else None
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(Checkpoint(where))
        quantized = _Quantized(ckpt, where)
        if not quantized.states:
            raise LoraformatError(where, "config says bitsandbytes, but no tensor has a 4-bit "
                                  "quant_state")
        opened = open_adapters(stack, adapters)
        plan = plan_quantized(ckpt, quantized.shapes(ckpt), opened, where, weights, force,
                              allow_nonfinite)
        write_merged(where, target, ckpt, plan, requantize, progress,
                     lambda name, step: _entries(ckpt, quantized, plan, name, requantize, report,
                                                 where, step))
        return BnbMergeResult(target, plan.layer_count, len(plan.ops), len(ckpt.shards),
                              requantize, report)


def write_merged(
    where: Path, target: Path, ckpt: Checkpoint, plan: MergePlan, requantize: bool,
    progress: Progress | None,
    entries_of: Callable[[str, Callable[[], None]], list[TensorEntry]],
) -> None:
    """Write the merged quantized checkpoint ``target`` (atomic): each shard's tensors as
    ``entries_of(name, step)`` gives them (``step`` called once per merged tensor, for
    ``progress``), the merge record, the index and the side files."""
    total, done = len(plan.ops), 0
    if progress is not None:
        progress(0, total)

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    weight_map: dict[str, str] = {}
    with atomic_dir(target) as tmp:
        for shard in ckpt.shards:
            st = ckpt.shard_file(shard)
            entries: list[TensorEntry] = []
            for name in st:
                entries.extend(entries_of(name, step))
            for entry in entries:
                weight_map[entry.name] = shard
            write_safetensors(tmp / shard, entries,
                              metadata={**st.metadata, MERGED_KEY: plan.merged_record})
        side_files(where, tmp, set(ckpt.shards), requantize, weight_map, ckpt)


def raw_entry(ckpt: Checkpoint, name: str) -> TensorEntry:
    info = ckpt.info(name)
    return TensorEntry(name, info.dtype, tuple(info.shape), lambda: ckpt.raw(name))


def _entries(ckpt: Checkpoint, quantized: _Quantized, plan: MergePlan, name: str,
             requantize: bool, report: SurvivalReport | None, where: Path,
             step: Callable[[], None]) -> list[TensorEntry]:
    """The output tensors for input tensor ``name`` (none for an auxiliary one: its weight's
    entry writes it). Float outputs are computed when the writer reaches them, so one merged
    tensor is in memory at a time; a requantized weight is computed here (its state blob's
    length is needed for the header), and kept only in its 4-bit form."""
    op = plan.ops.get(name)
    if name in quantized.aux_of:
        weight = quantized.aux_of[name]
        if requantize and weight not in plan.ops:
            return [raw_entry(ckpt, name)]
        return []  # dropped (float output) or rewritten with its weight
    state = quantized.states.get(name)
    if op is None and (state is None or requantize):
        return [raw_entry(ckpt, name)]
    if state is None:
        assert op is not None
        info = ckpt.info(name)

        def merged_plain() -> np.ndarray:
            step()
            return np.ascontiguousarray(op.apply(ckpt.numpy(name)))

        return [TensorEntry(name, info.dtype, tuple(info.shape), merged_plain)]
    if not requantize:
        dtype = _float_dtype(state.dtype, where, name)

        def dequantized() -> np.ndarray:
            w = bnb4.dequantize(ckpt.numpy(name), state)
            if op is None:
                return cast(w, dtype)
            step()
            return cast(op.apply(w, inplace=True), dtype)

        return [TensorEntry(name, dtype, tuple(state.shape), dequantized)]
    assert op is not None and report is not None
    w = bnb4.dequantize(ckpt.numpy(name), state)
    merged = np.asarray(op.apply(w), dtype=np.float32)
    figures, (packed, aux) = measure(
        name, w, merged,
        lambda x: bnb4.quantize(x, state),
        lambda q: bnb4.dequantize(q[0], bnb4.requantized_state(q[1], state)),
        qtype=state.quant_type.upper(), stored=w,
    )
    report.add(figures)
    step()
    info = ckpt.info(name)  # packed codes keep the stored dtype (bnb_4bit_quant_storage)
    out = [TensorEntry.of(name, packed.reshape(-1).view(DTYPES[info.dtype]).reshape(info.shape))]
    for aux_name in bnb4.aux_names(name, set(ckpt.names())):
        suffix = "quant_state" if bnb4.STATE_SUFFIX in aux_name else aux_name[len(name):]
        value = aux[suffix]
        info = ckpt.info(aux_name)
        if suffix != "quant_state":
            value = value.astype(DTYPES[info.dtype]).reshape(info.shape)
        out.append(TensorEntry.of(aux_name, np.ascontiguousarray(value)))
    return out


def side_files(base: Path, out: Path, shards: set[str], requantize: bool,
                weight_map: dict[str, str], ckpt: Checkpoint) -> None:
    for item in sorted(base.iterdir()):
        name = item.name
        if name in shards or name == INDEX_FILE or name.startswith(TMP_MARKER) \
                or name.endswith(_STALE):
            continue
        if name == CONFIG_FILE and not requantize:
            config = dict(ckpt.config)
            config.pop("quantization_config", None)  # the output is a float checkpoint
            (out / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif item.is_dir():
            shutil.copytree(item, out / name, symlinks=False)
        elif item.is_file():
            shutil.copy2(item, out / name)
    if (base / INDEX_FILE).is_file():
        index = {"metadata": {**ckpt.index_metadata, "total_size": _tensor_bytes(out, shards)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _tensor_bytes(out: Path, shards: set[str]) -> int:
    total = 0
    for shard in shards:
        infos, _ = read_header_only(out / shard)
        total += sum(info.nbytes for info in infos.values())
    return total


__all__ = ["BnbMergeResult", "cast", "is_bnb4", "merge_bnb", "plan_quantized", "quant_config",
           "raw_entry", "side_files", "write_merged"]
