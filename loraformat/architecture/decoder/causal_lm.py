"""A causal LM's export module and how to call it: the body wrapped so its parameters sit at the
checkpoint's names, and the graph's inputs and outputs (``input_ids``, ``attention_mask``,
``position_ids``, each layer's cache as ``past_key_values.N.<name>`` → ``present.N.<name>``).

Shared by every decoder, described (:mod:`.blocks`) or hand-written (GPT-2). Importing it does
not import torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from loraformat.architecture.layers import ExportModel

from .spec import BATCH, PAST, LayerCache, kv_cache

#: A layer's cache input as every KV-cache graph names it, ``past_key_values.<layer>.<name>``
#: (groups: the layer, the tensor's name: key/value, or a linear attention's conv_state and
#: recurrent_state); ONNX Runtime GenAI finds them by the same pattern.
CACHE_INPUT = re.compile(r"past_key_values\.(\d+)\.(\w+)$")


def past_arg_name(layer: int, name: str) -> str:
    """The forward() keyword for graph input ``past_key_values.<layer>.<name>``."""
    return f"past_key_values_{layer}_{name}"


def kv_caches(n_layers: int, kv_heads: int, head_dim: int) -> tuple[LayerCache, ...]:
    """Every layer attention's keys and values of one shape."""
    return (kv_cache(kv_heads, head_dim),) * n_layers


def layer_pasts(flat: Sequence[Any], caches: Sequence[LayerCache]) -> list[tuple[Any, ...] | None]:
    """Per layer, its past tensors (in its :class:`LayerCache` order) from the flat list of every
    layer's; None for a layer whose past was not given (a call without cache)."""
    out: list[tuple[Any, ...] | None] = []
    at = 0
    for cache in caches:
        mine = tuple(flat[at : at + len(cache.tensors)])
        at += len(cache.tensors)
        out.append(mine if mine and all(t is not None for t in mine) else None)
    return out


def decoder_export_model(
    module: Any,
    caches: Sequence[LayerCache],
    with_past: bool,
    vocab: int,
    dtype: Any,
) -> ExportModel:
    """The :class:`ExportModel` for a decoder LM whose forward is
    ``(input_ids, attention_mask=None, position_ids=None, **past)`` (:func:`causal_lm`).

    Plain: inputs ``input_ids`` and ``attention_mask`` [batch, sequence] (0 at padding) →
    ``logits``; positions follow the mask, so a padded row's logits are the unpadded row's. With
    past (optimum naming): inputs ``input_ids``, ``attention_mask`` [batch, total_sequence],
    ``position_ids``, and per layer each of its cache tensors ``past_key_values.N.<name>``
    (a growing one's ``past`` axis is ``past_sequence``); outputs ``logits`` and
    ``present.N.<name>`` (a growing one's axis is ``total_sequence``). Python keywords cannot
    contain dots, so ``example_inputs`` (and ``forward``) spell the past inputs
    ``past_key_values_N_<name>``; ``input_names`` (same order) carry the graph names.
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
    sizes = {BATCH: batch, PAST: past}
    for i, cache in enumerate(caches):
        for tensor in cache.tensors:
            shape = [sizes.get(d, d) if isinstance(d, str) else d for d in tensor.dims]
            inputs[past_arg_name(i, tensor.name)] = torch.randn(*shape, dtype=dtype)
            names.append(f"past_key_values.{i}.{tensor.name}")
            past_axes = {a: "batch" for a, d in enumerate(tensor.dims) if d == BATCH}
            present_axes = dict(past_axes)
            for a, d in enumerate(tensor.dims):
                if d == PAST:
                    past_axes[a], present_axes[a] = "past_sequence", "total_sequence"
            axes[names[-1]] = past_axes
            outputs.append(f"present.{i}.{tensor.name}")
            axes[outputs[-1]] = present_axes
    return ExportModel(module, inputs, names, outputs, axes)


def causal_lm(
    body: Any,
    prefix: str,
    lm_head: Any | None,
    with_past: bool,
    caches: Sequence[LayerCache],
    head_path: str = "lm_head",
) -> Any:
    """Wrap a decoder ``body`` so its parameters sit under ``prefix`` (``"transformer."``,
    ``"model."`` or ``""``) exactly as in the checkpoint, with an optional ``lm_head`` at
    ``head_path`` (``language_model.lm_head`` in a multimodal checkpoint).

    ``body.hidden(input_ids, attention_mask, position_ids, pasts)`` returns (hidden states,
    presents), one tuple per layer in its ``caches`` entry's order (``pasts``: per layer, that
    tuple or None); ``body.embedding_weight()`` is used for the logits when ``lm_head`` is None
    (tied).
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
            pasts = layer_pasts(flat_past, caches)
            hidden, presents = self._body.hidden(input_ids, attention_mask, position_ids, pasts)
            if lm_head is not None:
                logits = self.get_submodule(head_path)(hidden)
            else:
                logits = hidden @ self._body.embedding_weight().t()
            if not self.with_past:
                return logits
            flat = [logits]
            for present in presents:
                flat += list(present)
            return tuple(flat)

    # One named parameter per graph input (torch.onnx maps dynamic axes by signature), so the
    # past tensors get identifier names: ``past_key_values.0.key`` is ``past_key_values_0_key``.
    names = [past_arg_name(i, t.name) for i, c in enumerate(caches) for t in c.tensors]
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


__all__ = ["causal_lm", "decoder_export_model", "kv_caches", "layer_pasts", "past_arg_name"]
