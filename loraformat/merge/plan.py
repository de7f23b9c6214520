"""Checking adapters against a base and deciding what happens to each base tensor.

:func:`plan_merge` does every refusal up front — before a byte is written — and returns a
:class:`MergePlan`: checkpoint tensor name → :class:`TensorOp`. The plan is independent of where
the weights live, so the same plan drives the streamed checkpoint merge, the in-memory merge used
by ONNX export, and (with layers located in the graph instead of the plugin) ONNX surgery.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..architecture import DenseLayer
from ..errors import LoraformatError
from ..format import manifest as mf
from ..format.adapter import Adapter, load
from ..format.safetensors_io import FLOAT_DTYPES
from .weights import Contribution, merge_bias, merge_weight

PEFT_CONFIG = "adapter_config.json"


@dataclass
class TensorOp:
    """What happens to one base tensor: ``weight`` (low-rank update), ``bias`` (lora_bias), or
    ``replace`` (the adapter ships the whole tensor)."""

    name: str
    kind: str  # "weight" | "bias" | "replace"
    layer_path: str
    layout: str = "out_in"
    contributions: list[Contribution] = field(default_factory=list)
    replacement: np.ndarray | None = None
    source: str = ""  # the adapter that asked for it, for messages

    def apply(
        self, value: np.ndarray, *, inplace: bool = False, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The new value of the tensor, given its current value (same dtype and shape).

        ``inplace``/``out`` are :func:`~loraformat.merge.weights.merge_weight`'s (weights only).
        """
        if self.kind == "weight":
            return merge_weight(value, self.layout, self.contributions, inplace=inplace, out=out)
        if self.kind == "bias":
            return merge_bias(value, self.contributions)
        assert self.replacement is not None
        return np.ascontiguousarray(self.replacement.astype(value.dtype, copy=False))


@dataclass
class MergePlan:
    """Every tensor a merge changes, and how many layers that is (for progress)."""

    ops: dict[str, TensorOp]
    layer_count: int
    subtract: bool = False

    def __len__(self) -> int:
        return len(self.ops)


def open_adapter(path: str | os.PathLike[str] | Adapter) -> Adapter:
    """A loraformat adapter (an object as it is, a path loaded lazily).

    Merges take loraformat adapters; another format (a PEFT directory) is converted at the
    boundary — :func:`loraformat.interchange.open_adapter`, as the CLI does — not here.
    """
    if isinstance(path, Adapter):
        return path
    p = Path(path)
    if p.is_dir() and (p / PEFT_CONFIG).is_file() and not (p / mf.MANIFEST_FILE).is_file():
        raise LoraformatError(
            p, "is a PEFT adapter; merges take loraformat adapters: convert it first "
            "(loraformat.interchange.open_adapter(path, base=...), which the CLI does)",
        )
    return load(p)


def open_adapters(
    stack: contextlib.ExitStack, items: Sequence[str | os.PathLike[str] | Adapter]
) -> list[Adapter]:
    """:func:`open_adapter` for each item; those opened here are closed when ``stack`` unwinds
    (adapters passed in as objects belong to the caller)."""
    opened = []
    for item in items:
        adapter = open_adapter(item)
        if not isinstance(item, Adapter):
            stack.callback(adapter.close)
        opened.append(adapter)
    return opened


def _same_kind(op: TensorOp, kind: str, where: object) -> None:
    if op.kind != kind:
        raise LoraformatError(
            where, f"{op.name!r} is both replaced ({op.source}) and adapted; merge them separately"
        )


def _nonfinite(adapter: Adapter) -> str | None:
    for key in adapter.tensors:
        if adapter.tensors.dtype(key) not in FLOAT_DTYPES:
            continue
        array = adapter.tensors[key]
        bad = array.size - int(np.count_nonzero(np.isfinite(array.astype(np.float32, copy=False))))
        if bad:
            return f"tensor {key!r} has {bad} non-finite value(s) (NaN/Inf)"
    return None


def plan_merge(
    layers: Mapping[str, DenseLayer],
    tensor_shapes: Mapping[str, tuple[int, ...]],
    adapters: Sequence[Adapter],
    *,
    architecture: str | None,
    base_path: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    subtract: bool = False,
    fingerprint: str | object | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> MergePlan:
    """Check every adapter against the base and return what to do to each base tensor.

    ``layers`` are the base's dense layers by path (from the plugin, or located in an ONNX graph),
    ``tensor_shapes`` every base tensor's shape. ``fingerprint`` is the base's fingerprint or a
    zero-argument callable computing it (only called when an adapter names one). Refusals, each a
    one-line :class:`LoraformatError`: architecture mismatch; fingerprint mismatch (unless
    ``force``; never checked when ``subtract``, whose base is a merged model); a layer the base
    lacks; a shape or kind mismatch; a lora_bias for a layer without a bias; NaN/Inf in an
    adapter (unless ``allow_nonfinite``); replacing a tensor the base lacks, of another shape, or
    that something else also changes; unmerging DoRA or replacements, which cannot be undone.
    """
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise LoraformatError(
            None,
            f"{len(weights)} weight(s) given for {len(adapters)} adapter(s); give one per adapter",
        )
    sign = -1 if subtract else 1
    ops: dict[str, TensorOp] = {}
    base_fp: str | None = None
    adapted: set[str] = set()
    for adapter, weight in zip(adapters, weights, strict=True):
        where = adapter.path
        if architecture is not None and adapter.architecture != architecture:
            raise LoraformatError(
                where, f"adapter is for architecture {adapter.architecture!r}, but the base "
                f"{base_path} is {architecture!r}",
            )
        if adapter.fingerprint and not subtract and not force:
            if base_fp is None:
                base_fp = fingerprint() if callable(fingerprint) else fingerprint  # type: ignore[assignment]
            if base_fp is not None and base_fp != adapter.fingerprint:
                raise LoraformatError(
                    where, f"adapter was made for base fingerprint {adapter.fingerprint[:17]}…, "
                    f"but {base_path} has {base_fp[:17]}… (a different base; use --force to merge "
                    "anyway)",
                )
        if not allow_nonfinite:
            problem = _nonfinite(adapter)
            if problem:
                raise LoraformatError(
                    where, f"{problem}; refusing to merge (use --allow-nonfinite to merge anyway)"
                )
        for path, spec in adapter.specs.items():
            dense = layers.get(path)
            if dense is None:
                raise LoraformatError(
                    where, f"adapter layer {path!r} is not a layer of the base {base_path}"
                )
            if spec.kind != dense.kind:
                raise LoraformatError(
                    where, f"layer {path!r} is a {spec.kind} layer in the adapter but a "
                    f"{dense.kind} layer in the base",
                )
            if spec.experts != dense.experts:
                stored = list(tensor_shapes.get(dense.weight, ()))
                raise LoraformatError(
                    where, f"layer {path!r} is "
                    + (f"a stack of {spec.experts} experts" if spec.experts else "one weight")
                    + " in the adapter but "
                    + (f"a stack of {dense.experts} experts" if dense.experts else "one weight")
                    + f" in the base ({dense.weight} is {stored})",
                )
            if (spec.in_features, spec.out_features) != (dense.in_features, dense.out_features):
                raise LoraformatError(
                    where, f"shape mismatch at layer {path!r}: adapter is {spec.in_features}→"
                    f"{spec.out_features} (in→out), base {dense.weight} is {dense.in_features}→"
                    f"{dense.out_features}",
                )
            if spec.dora and subtract:
                raise LoraformatError(
                    where, f"layer {path!r} is DoRA; a DoRA merge cannot be undone (the row norms "
                    "of the pre-normalisation weight are not recoverable from the merged one)",
                )
            contribution = Contribution(
                adapter.layer(path), adapter.scale(path), float(weight), sign
            )
            op = ops.setdefault(
                dense.weight,
                TensorOp(dense.weight, "weight", path, dense.layout, source=str(where)),
            )
            _same_kind(op, "weight", where)
            op.contributions.append(contribution)
            adapted.add(path)
            if spec.lora_bias:
                if dense.bias is None or dense.bias not in tensor_shapes:
                    raise LoraformatError(
                        where,
                        f"layer {path!r} has a lora_bias, but the base layer has no bias tensor",
                    )
                bias_op = ops.setdefault(
                    dense.bias, TensorOp(dense.bias, "bias", path, source=str(where))
                )
                _same_kind(bias_op, "bias", where)
                bias_op.contributions.append(contribution)
        for name in adapter.replacement_names:
            if subtract:
                raise LoraformatError(
                    where, f"adapter replaces {name!r}; a replaced tensor cannot be unmerged "
                    "(the original is not in the merged model)",
                )
            if name not in tensor_shapes:
                raise LoraformatError(
                    where, f"adapter replaces {name!r}, which the base {base_path} does not have"
                )
            value = adapter.replacement(name)
            if tuple(value.shape) != tuple(tensor_shapes[name]):
                raise LoraformatError(
                    where, f"shape mismatch: replacement {name!r} is {list(value.shape)}, base "
                    f"tensor is {list(tensor_shapes[name])}",
                )
            if name in ops:
                raise LoraformatError(
                    where, f"{name!r} is changed by more than one adapter or both replaced and "
                    f"adapted ({ops[name].source}); merge them separately",
                )
            ops[name] = TensorOp(name, "replace", name, replacement=value, source=str(where))
    for op in ops.values():
        if op.kind == "weight" and op.name not in tensor_shapes:
            raise LoraformatError(base_path, f"base has no tensor {op.name!r}")
    return MergePlan(ops, len(adapted), subtract)


__all__ = ["PEFT_CONFIG", "MergePlan", "TensorOp", "open_adapter", "open_adapters", "plan_merge"]
