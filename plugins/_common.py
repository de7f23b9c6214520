"""Helpers shared by the built-in plugins (nothing here is part of the plugin contract)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from loraformat.architecture import (
    CheckpointInfo,
    DenseLayer,
    ExportModel,
    FusedPart,
    LayerRepeat,
)
from loraformat.errors import LoraformatError


def detect_by_names(
    checkpoint: CheckpointInfo, model_type: str, prefixes: Sequence[str], *required: str
) -> bool:
    """Detection for a family whose relatives share its tensor names: ``config.json``'s
    ``model_type`` decides when present; otherwise every ``required`` tensor must exist under one
    of ``prefixes`` (a bare ``.safetensors`` file)."""
    said = checkpoint.config.get("model_type")
    if said is not None:
        return bool(said == model_type)
    names = checkpoint.shapes
    return any(all(prefix + name in names for name in required) for prefix in prefixes)


def model_type_is(config: Mapping[str, Any], model_type: str, class_prefix: str) -> bool | None:
    """True/False when ``config`` says which model it is; None when it says nothing."""
    if config.get("model_type"):
        return config["model_type"] == model_type
    archs = config.get("architectures") or []
    if archs:
        return any(str(a).startswith(class_prefix) for a in archs)
    return None


def dense_from_shape(
    path: str,
    shape: Sequence[int],
    layout: str = "out_in",
    kind: str = "linear",
    parts: tuple[FusedPart, ...] = (),
    bias: str | None = None,
) -> DenseLayer:
    """A :class:`DenseLayer` with features read from the stored weight shape (so they agree)."""
    if len(shape) != 2:
        raise LoraformatError(None, f"{path}.weight has shape {list(shape)}, expected 2 dimensions")
    rows, cols = int(shape[0]), int(shape[1])
    in_f, out_f = (cols, rows) if layout == "out_in" else (rows, cols)
    return DenseLayer(path, in_f, out_f, layout=layout, kind=kind, parts=parts, bias=bias)  # type: ignore[arg-type]


def optional_linear(tensor_shapes: Mapping[str, tuple[int, ...]], path: str) -> DenseLayer | None:
    """The ``nn.Linear`` at ``path`` ([out, in] weight, bias if stored); None if it has no 2-D
    weight."""
    shape = tensor_shapes.get(path + ".weight")
    if shape is None or len(shape) != 2:
        return None
    bias = path + ".bias" if path + ".bias" in tensor_shapes else None
    return DenseLayer(path, in_features=shape[1], out_features=shape[0], bias=bias)


def encoder_linears(
    tensor_shapes: Mapping[str, tuple[int, ...]],
    layer_prefix: str,
    per_layer: Iterable[str],
    heads: Iterable[str] = (),
) -> list[DenseLayer]:
    """The ``nn.Linear`` layers of a BERT-style encoder, in checkpoint order.

    For each numbered layer ``<layer_prefix>.<i>`` (counted while ``<layer_prefix>.<i>.<first of
    per_layer>.weight`` exists), its ``per_layer`` suffixes in order; then the ``heads`` paths
    (pooler, classifier). Linears a checkpoint lacks are skipped.
    """
    suffixes = list(per_layer)
    paths: list[str] = []
    i = 0
    while f"{layer_prefix}.{i}.{suffixes[0]}.weight" in tensor_shapes:
        paths += [f"{layer_prefix}.{i}.{name}" for name in suffixes]
        i += 1
    found = (optional_linear(tensor_shapes, path) for path in [*paths, *heads])
    return [layer for layer in found if layer is not None]


def encoder_activation(name: str, error: str) -> Any:
    """The torch function for an encoder's ``hidden_act`` (transformers' ACT2FN names).

    An unknown name is a :class:`LoraformatError` reading ``"<error> '<name>' (known: …)"``.
    """
    import torch
    import torch.nn.functional as F

    acts = {
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
        "swish": F.silu,
        "tanh": torch.tanh,
    }
    if name not in acts:
        raise LoraformatError(None, f"{error} {name!r} (known: {', '.join(sorted(acts))})")
    return acts[name]


class EncoderParts:
    """Torch modules of a BERT-style encoder, sized from the checkpoint's own tensors (the export
    modules of ``bert`` and ``vit`` build from these). A missing tensor is an error naming the
    checkpoint."""

    def __init__(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], arch: str, heads: int,
        eps: float,
    ) -> None:
        self.checkpoint, self.tensors, self.arch = checkpoint, tensors, arch
        self.heads, self.eps = heads, eps

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.tensors:
            raise self.checkpoint.error(f"{self.arch}: checkpoint lacks {name}")
        return tuple(self.tensors[name].shape)

    def dense(self, path: str) -> Any:
        from loraformat.architecture.modules import Dense

        out_f, in_f = self.shape(path + ".weight")
        return Dense(in_f, out_f, bias=path + ".bias" in self.tensors)

    def layer_norm(self, path: str) -> Any:
        from torch import nn

        return nn.LayerNorm(self.shape(path + ".weight")[0], eps=self.eps)

    def self_attention(self, path: str) -> Any:
        from loraformat.architecture.modules import EncoderSelfAttention

        query, key, value = (self.dense(f"{path}.{n}") for n in ("query", "key", "value"))
        return EncoderSelfAttention(query, key, value, self.heads)


def uniform_layers(
    checkpoint: CheckpointInfo, pattern: str, depth_key: str | None
) -> LayerRepeat | None:
    """A :class:`LayerRepeat` of identical layers, counted by the layer indices ``pattern`` (a
    regex whose one group is the index) finds in the tensor names; ``None`` when they are not
    0..n-1, or when ``depth_key`` is given and the config says another depth."""
    found = re.compile(pattern)
    ids = {int(m.group(1)) for name in checkpoint.shapes if (m := found.search(name))}
    if not ids or ids != set(range(len(ids))):
        return None
    if depth_key is not None and checkpoint.config.get(depth_key) != len(ids):
        return None
    return LayerRepeat(kinds=("layer",) * len(ids), depth_key=depth_key)


def find_prefix(names: Sequence[str], pattern: str) -> str | None:
    """The prefix before the first match of ``pattern`` (a regex anchored after the prefix).

    ``find_prefix(names, r"layers\\.\\d+\\.")`` is ``"model."`` for ``model.layers.0.…``, ``""``
    for ``layers.0.…``, ``None`` when nothing matches.
    """
    rx = re.compile(r"^(.*?)" + pattern)
    for name in names:
        m = rx.match(name)
        if m:
            return m.group(1)
    return None


def load_tensors(module: Any, tensors: Mapping[str, Any], where: str) -> None:
    """Copy ``tensors`` into ``module``'s state dict by name; every state-dict key is required."""
    import torch

    state = module.state_dict()
    missing = [k for k in state if k not in tensors]
    if missing:
        raise LoraformatError(
            None,
            f"{where}: checkpoint lacks {len(missing)} tensor(s) the model needs, "
            f"e.g. {missing[0]}",
        )
    loaded = {}
    for key, ref in state.items():
        value = tensors[key]
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        if tuple(value.shape) != tuple(ref.shape):
            raise LoraformatError(
                None, f"{where}: {key} has shape {list(value.shape)}, expected {list(ref.shape)}"
            )
        loaded[key] = value
    module.load_state_dict(loaded, strict=True, assign=True)
    module.eval()


def decoder_export_model(
    module: Any,
    n_layers: int,
    kv_heads: int,
    head_dim: int,
    with_past: bool,
    vocab: int,
    dtype: Any,
) -> ExportModel:
    """The :class:`ExportModel` for a decoder LM whose forward is
    ``(input_ids, attention_mask=None, position_ids=None, **past_key_values)``.

    Plain: inputs ``input_ids`` and ``attention_mask`` [batch, sequence] (0 at padding) →
    ``logits``; positions follow the mask, so a padded row's logits are the unpadded row's. With
    past (optimum naming):
    inputs ``input_ids``, ``attention_mask`` [batch, total_sequence], ``position_ids``,
    ``past_key_values.N.key/value`` [batch, kv_heads, past_sequence, head_dim]; outputs ``logits``,
    ``present.N.key/value`` [batch, kv_heads, total_sequence, head_dim]. Python keywords cannot
    contain dots, so ``example_inputs`` (and ``forward``) spell the past inputs
    ``past_key_values_N_key``; ``input_names`` (same order) carry the graph names.
    """
    import torch

    batch, seq, past = 2, 3, 4  # distinct, all > 1, so no axis is specialised when traced
    ids = torch.randint(0, vocab, (batch, seq))
    seq_axes = {0: "batch", 1: "sequence"}
    if not with_past:
        return ExportModel(
            module,
            {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.int64)},
            ["input_ids", "attention_mask"],
            ["logits"],
            {"input_ids": seq_axes, "attention_mask": seq_axes, "logits": seq_axes},
        )
    inputs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64),
        "position_ids": torch.arange(past, past + seq).expand(batch, seq).contiguous(),
    }
    axes: dict[str, dict[int, str]] = {
        "input_ids": seq_axes,
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": seq_axes,
        "logits": seq_axes,
    }
    outputs = ["logits"]
    names = list(inputs)
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs[past_arg_name(i, kind)] = torch.randn(
                batch, kv_heads, past, head_dim, dtype=dtype
            )
            names.append(f"past_key_values.{i}.{kind}")
            axes[names[-1]] = {0: "batch", 2: "past_sequence"}
            outputs.append(f"present.{i}.{kind}")
            axes[f"present.{i}.{kind}"] = {0: "batch", 2: "total_sequence"}
    return ExportModel(module, inputs, names, outputs, axes)


def past_arg_name(layer: int, kind: str) -> str:
    """The forward() keyword for graph input ``past_key_values.<layer>.<kind>``."""
    return f"past_key_values_{layer}_{kind}"


def past_pairs(flat: Sequence[Any], n_layers: int) -> list[tuple[Any, Any] | None]:
    """Per layer, the (key, value) past tensors from the flat [k0, v0, k1, v1, ...] list."""
    pairs: list[tuple[Any, Any] | None] = []
    for i in range(n_layers):
        k, v = flat[2 * i], flat[2 * i + 1]
        pairs.append((k, v) if k is not None and v is not None else None)
    return pairs


def causal_lm(
    body: Any,
    prefix: str,
    lm_head: Any | None,
    with_past: bool,
    n_layers: int,
    head_path: str = "lm_head",
) -> Any:
    """Wrap a decoder ``body`` so its parameters sit under ``prefix`` (``"transformer."``,
    ``"model."`` or ``""``) exactly as in the checkpoint, with an optional ``lm_head`` at
    ``head_path`` (``language_model.lm_head`` in a multimodal checkpoint).

    ``body.hidden(input_ids, attention_mask, position_ids, pairs)`` returns (hidden states,
    presents); ``body.embedding_weight()`` is used for the logits when ``lm_head`` is None (tied).
    """
    from torch import nn

    class CausalLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Not registered as a child under its own name: its modules are attached at
            # ``prefix`` so state-dict keys and get_submodule paths equal checkpoint names.
            object.__setattr__(self, "_body", body)
            self.with_past = with_past
            parts = [p for p in prefix.split(".") if p]
            holder: nn.Module = self
            for part in parts[:-1]:
                child = nn.Module()
                holder.add_module(part, child)
                holder = child
            if parts:
                holder.add_module(parts[-1], body)
            else:
                for name, child in body.named_children():
                    self.add_module(name, child)
            if lm_head is not None:
                *parents, leaf = head_path.split(".")
                holder = self
                for part in parents:
                    if not hasattr(holder, part):
                        holder.add_module(part, nn.Module())
                    holder = getattr(holder, part)
                holder.add_module(leaf, lm_head)

        def run(self, input_ids, attention_mask, position_ids, flat_past):
            pairs = past_pairs(flat_past, n_layers)
            hidden, presents = self._body.hidden(input_ids, attention_mask, position_ids, pairs)
            if lm_head is not None:
                logits = self.get_submodule(head_path)(hidden)
            else:
                logits = hidden @ self._body.embedding_weight().t()
            if not self.with_past:
                return logits
            flat = [logits]
            for k, v in presents:
                flat += [k, v]
            return tuple(flat)

    # One named parameter per graph input (torch.onnx maps dynamic axes by signature), so the
    # past tensors get identifier names: ``past_key_values.0.key`` is ``past_key_values_0_key``.
    names = [past_arg_name(i, kind) for i in range(n_layers) for kind in ("key", "value")]
    src = (
        "def forward(self, input_ids, attention_mask=None, position_ids=None"
        + "".join(f", {n}=None" for n in names)
        + "):\n    return self.run(input_ids, attention_mask, position_ids, ["
        + ", ".join(names)
        + "])\n"
    )
    scope: dict[str, Any] = {}
    exec(src, scope)
    CausalLM.forward = scope["forward"]  # type: ignore[method-assign]

    return CausalLM()
