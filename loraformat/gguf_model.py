"""A llama.cpp GGUF model file as a base model: which architecture it is, the few config values
the plugins need, and its layers under both llama.cpp's and Hugging Face's names.

A GGUF model says its architecture in llama.cpp's words (``general.architecture``); the plugin
says which llama.cpp architecture it is written as (``gguf_architecture``). Several plugins can
be written as one (llama.cpp converts Mistral and Mixtral as ``llama``: same names, same q/k row
order), so the architecture of a GGUF base is the plugin an adapter asks for among those written
as the file's architecture, else the one whose id is that name, else the first.

:func:`open_gguf` gives what a :class:`~loraformat.base.BaseModel` is made of
(:func:`loraformat.base.open_adapter_base`): the GGUF file seen through the plugin's names
(:class:`GgufCheckpoint`: Hugging Face tensor names and shapes, no fingerprint), so adapters of
any format are read and written through a GGUF base as through a checkpoint. The merge into a
GGUF file (:mod:`loraformat.merge.gguf`) uses the llama.cpp side (:func:`gguf_layers`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .architecture import CheckpointInfo, DenseLayer, PluginArchitecture, registry
from .errors import LoraformatError


def read_field(reader: Any, key: str) -> Any:
    """A metadata value of a ``gguf.GGUFReader`` (None when absent)."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def open_reader(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors for a bad file
        raise LoraformatError(path, f"not a readable GGUF file ({exc})") from None


def model_architecture(reader: Any, path: Path) -> str:
    """``general.architecture`` of a GGUF model (refusing an adapter or a file without it)."""
    name = read_field(reader, "general.architecture")
    if not isinstance(name, str):
        raise LoraformatError(path, "GGUF file has no general.architecture")
    if read_field(reader, "general.type") == "adapter":
        raise LoraformatError(path, "is a GGUF adapter, not a model; a base must be a model")
    return name


def gguf_config(reader: Any, arch_name: str) -> dict[str, Any]:
    """The Hugging Face config values the plugins need, from llama.cpp's metadata keys."""
    config: dict[str, Any] = {"model_type": arch_name}
    keys = {
        "num_attention_heads": "attention.head_count",
        "num_key_value_heads": "attention.head_count_kv",
        "hidden_size": "embedding_length",
        "head_dim": "attention.key_length",
        "num_hidden_layers": "block_count",
        "intermediate_size": "feed_forward_length",
        "vocab_size": "vocab_size",
        # A Gated DeltaNet's sizes (Qwen3.5), as llama.cpp's converter writes them.
        "linear_num_key_heads": "ssm.group_count",
        "linear_num_value_heads": "ssm.time_step_rank",
        "linear_key_head_dim": "ssm.state_size",
        "linear_conv_kernel_dim": "ssm.conv_kernel",
        "full_attention_interval": "full_attention_interval",
    }
    for hf, key in keys.items():
        value = read_field(reader, f"{arch_name}.{key}")
        if isinstance(value, (int, float)):
            config[hf] = int(value)
    inner = read_field(reader, f"{arch_name}.ssm.inner_size")
    if isinstance(inner, (int, float)) and config.get("linear_num_value_heads"):
        config["linear_value_head_dim"] = int(inner) // config["linear_num_value_heads"]
    recurrent = read_field(reader, f"{arch_name}.attention.recurrent_layers")
    if isinstance(recurrent, list):
        config["layer_types"] = ["linear_attention" if r else "full_attention" for r in recurrent]
    return config


def _written_as(arch_name: str) -> list[PluginArchitecture]:
    return [a for a in registry().architectures().values() if a.gguf_architecture == arch_name]


def written_as(arch_name: str) -> list[str]:
    """The ids of the installed plugins written as llama.cpp architecture ``arch_name``."""
    return [a.id for a in _written_as(arch_name)]


def gguf_architecture(
    arch_name: str, where: Path | None, wanted: str | None = None
) -> PluginArchitecture:
    """The installed architecture written as llama.cpp architecture ``arch_name``: ``wanted``
    (an adapter's architecture) if it is one of them, else the one with that id, else the first.
    ``wanted`` written as another llama.cpp architecture is refused in one line."""
    found = _written_as(arch_name)
    if not found:
        raise LoraformatError(
            where, f"no installed plugin names the tensors of llama.cpp architecture "
            f"{arch_name!r}; cannot locate adapted layers",
        )
    if wanted is not None:
        match = next((a for a in found if a.id == wanted), None)
        if match is None:
            ids = ", ".join(repr(a.id) for a in found)
            raise LoraformatError(
                where, f"adapter is for architecture {wanted!r}, but the base is llama.cpp "
                f"architecture {arch_name!r} (written by {ids})",
            )
        return match
    return next((a for a in found if a.id == arch_name), found[0])


def _named(
    architecture: PluginArchitecture, config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, tuple[int, ...]]]:
    """(layer path → (llama.cpp name, GGUF shape), Hugging Face weight name → its shape in the
    checkpoint's layout) for every 2-D weight of ``shapes`` the plugin names."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        path = architecture.names.layer_path(name.removesuffix(".weight"), "gguf")
        if path is not None:
            found[path] = (name, shape)
    # GGUF stores every linear weight (out, in); a layer the plugin stores [in, out] (GPT-2's
    # Conv1D) is turned back, so that fused parts (rows of the output) come out right.
    shapes_hf = {p + ".weight": s for p, (_, s) in found.items()}
    for d in architecture.dense_layers(CheckpointInfo(None, config, shapes_hf)):
        if d.layout == "in_out" and d.kind == "linear":
            shapes_hf[d.weight] = tuple(reversed(shapes_hf[d.weight]))
    return found, shapes_hf


def checked_permutation(perm: Any, rows: int, path: str, what: str = "row") -> np.ndarray | None:
    """A plugin's row (or column) permutation as indices, refused unless it permutes ``rows``
    rows (columns)."""
    if perm is None:
        return None
    perm = np.asarray(perm, dtype=np.int64)
    if perm.shape != (rows,) or not np.array_equal(np.sort(perm), np.arange(rows)):
        raise LoraformatError(None, f"plugin gave an invalid gguf {what} permutation for {path}")
    return perm


def column_permutation(
    architecture: Any, checkpoint: CheckpointInfo, path: str, columns: int
) -> np.ndarray | None:
    """The input-column order llama.cpp stores ``path``'s weight in (the plugin's optional
    ``column_permutation``), checked; None where it keeps the checkpoint's."""
    ask = getattr(architecture, "column_permutation", None)
    perm = ask(checkpoint, path, "gguf") if ask is not None else None
    return checked_permutation(perm, columns, path, "column")


def gguf_layers(
    architecture: PluginArchitecture, config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, tuple[DenseLayer, str, np.ndarray | None]]:
    """Layer path → (layer, llama.cpp tensor name, row permutation llama.cpp applied or None)
    for every tensor of ``shapes`` (llama.cpp names, numpy shapes) the plugin names.

    GGUF stores every linear weight as ne [in, out], i.e. (out, in) here, and embedding tables as
    (vocab, dim), whatever the Hugging Face layout was.
    """
    found, shapes_hf = _named(architecture, config, shapes)
    checkpoint = CheckpointInfo(None, config, shapes_hf)
    kinds = {d.path: d for d in architecture.dense_layers(checkpoint)}
    layers = {}
    for path, (name, shape) in found.items():
        plugin = kinds.get(path)
        if plugin is None:
            continue
        if plugin.kind == "embedding":
            dense = DenseLayer(path, shape[0], shape[1], "in_out", "embedding")
        else:
            dense = DenseLayer(path, shape[1], shape[0], "out_in", "linear", plugin.parts)
        perm = checked_permutation(
            architecture.row_permutation(checkpoint, path, "gguf"), dense.out_features, path
        )
        layers[path] = (dense, name, perm)
    return layers


_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


def _expert_shapes(
    architecture: PluginArchitecture, found: Mapping[str, tuple[str, tuple[int, ...]]],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, tuple[int, ...]]:
    """The Hugging Face names and shapes of llama.cpp's stacked expert tensors
    (``blk.N.ffn_gate_exps.weight``, numpy [E, out, in]), as the plugin's expert storage says the
    checkpoint holds them: one 2-D weight per expert and part, or the stacked parameter (its
    parts' rows together, in its layout). The block's prefix is the one its other layers have."""
    storages = tuple(getattr(architecture, "expert_storage", ()))
    prefixes = {}
    for path in found:
        m = re.match(r"^(.*?layers\.(\d+)\.)", path)
        if m:
            prefixes.setdefault(m[2], m[1])
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        m = _BLOCK.match(name)
        if m is None or len(shape) != 3 or m[1] not in prefixes:
            continue
        storage = next((s for s in storages if m[2] in s.gguf), None)
        if storage is None:
            continue
        prefix, (experts, rows, columns) = prefixes[m[1]], shape
        if storage.per_expert:
            template = storage.per_expert[storage.gguf.index(m[2])]
            for e in range(experts):
                out[prefix + template.replace("{e}", str(e)) + ".weight"] = (rows, columns)
        else:
            total = rows * len(storage.gguf)
            out[prefix + storage.parameter] = (
                (experts, total, columns) if storage.layout == "out_in" else
                (experts, columns, total)
            )
    return out


@dataclass(frozen=True)
class GgufTensorInfo:
    shape: tuple[int, ...]


class GgufCheckpoint:
    """A GGUF model as the checkpoint a :class:`~loraformat.base.BaseModel` reads: the weights
    the plugin names, under their Hugging Face names and shapes. Adapters read and written
    through it need names, shapes and row order only; it has no fingerprint (a Hugging Face
    checkpoint's), and its weights are not handed out (they may be quantized)."""

    def __init__(self, path: Path, architecture: PluginArchitecture, arch_name: str,
                 reader: Any) -> None:
        self.path = path
        self.arch_name = arch_name
        self.config = gguf_config(reader, arch_name)
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist()))
                  for t in reader.tensors}
        found, self._shapes = _named(architecture, self.config, shapes)
        self._shapes.update(_expert_shapes(architecture, found, shapes))

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def info(self, name: str) -> GgufTensorInfo:
        return GgufTensorInfo(self._shapes[name])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def numpy(self, name: str) -> np.ndarray:
        raise LoraformatError(self.path, f"{name}: a GGUF base's weights are not read here "
                                         "(give the Hugging Face checkpoint as --base)")

    def fingerprint(self) -> None:
        return None

    def close(self) -> None:
        pass


def open_gguf(
    path: str | os.PathLike[str], architecture: str | None = None
) -> tuple[GgufCheckpoint, PluginArchitecture]:
    """A GGUF model file as (checkpoint, architecture) for a
    :class:`~loraformat.base.BaseModel` (:func:`loraformat.base.open_adapter_base`);
    ``architecture``: the id wanted among the plugins written as its llama.cpp architecture."""
    path = Path(path)
    reader = open_reader(path)
    arch_name = model_architecture(reader, path)
    found = gguf_architecture(arch_name, path, architecture)
    checkpoint = GgufCheckpoint(path, found, arch_name, reader)
    if not checkpoint.shapes():
        raise LoraformatError(
            path, f"no installed plugin names the tensors of llama.cpp architecture "
            f"{arch_name!r}; cannot locate adapted layers",
        )
    return checkpoint, found


__all__ = ["GgufCheckpoint", "checked_permutation", "column_permutation", "gguf_architecture",
           "gguf_config",
           "gguf_layers", "model_architecture", "open_gguf", "open_reader", "read_field",
           "written_as"]
