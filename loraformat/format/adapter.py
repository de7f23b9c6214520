"""The :class:`Adapter`: a manifest plus lazily read tensors, and its two on-disk forms.

Loading reads the manifest and the safetensors header only; a tensor's bytes are read (through the
memory map) the first time it is asked for.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_dir
from ..errors import LoraformatError, ValidationError
from . import manifest as mf
from .safetensors_io import (
    DTYPES,
    FLOAT_DTYPES,
    SafetensorsFile,
    TensorEntry,
    dtype_name,
    refuse_special_file,
    strict_json,
    write_safetensors,
)

# -- the mathematical content -----------------------------------------------------------------


def scale_of(scaling: str, alpha: float, rank: int) -> float:
    """The factor multiplying B·A: ``alpha/r`` or, for rsLoRA, ``alpha/sqrt(r)``."""
    if scaling == "alpha/r":
        return alpha / rank
    if scaling == "alpha/sqrt(r)":
        return alpha / math.sqrt(rank)
    raise ValueError(f"unknown scaling rule {scaling!r}")


@dataclass
class LoraLayer:
    """One adapted layer in mathematical orientation: ΔW = scale·B·A, A is r×in, B is rows×r.

    ``out_rows`` lists the [start, stop) output rows that B's rows land in (fused layers where only
    some parts are adapted); by default B covers all ``out_features`` rows.

    ``experts`` (format 1.2, spec §4.7): a stack of E independent LoRAs on a stacked expert
    weight; A is [E, r, in], B is [E, rows, r] and expert e's update is scale·B[e]·A[e].
    """

    A: np.ndarray
    B: np.ndarray
    alpha: float
    in_features: int
    out_features: int
    kind: str = "linear"
    out_rows: list[tuple[int, int]] | None = None
    magnitude: np.ndarray | None = None  # DoRA: per-output-row norm target
    lora_bias: np.ndarray | None = None  # the layer's bias changes by scale·lora_bias
    experts: int | None = None  # E for a stacked-expert layer (A [E, r, in], B [E, rows, r])

    @property
    def rank(self) -> int:
        """r: per expert for an expert layer (A's second-to-last axis either way)."""
        return int(self.A.shape[-2])

    def rows(self) -> np.ndarray:
        """Indices of the output rows B writes into."""
        if self.out_rows is None:
            return np.arange(self.out_features)
        return np.concatenate([np.arange(a, b) for a, b in self.out_rows])


@dataclass(frozen=True)
class LayerSpec:
    """A layer as the manifest declares it, with defaults resolved."""

    path: str
    rank: int
    alpha: float
    in_features: int
    out_features: int
    kind: str = "linear"
    out_rows: tuple[tuple[int, int], ...] | None = None
    dora: bool = False
    lora_bias: bool = False
    experts: int | None = None

    @property
    def b_rows(self) -> int:
        if self.out_rows is None:
            return self.out_features
        return sum(b - a for a, b in self.out_rows)

    @property
    def max_rank(self) -> int:
        """spec §9 (1.1): B·A with k row ranges (k = 1 without out_rows) — as loralib's
        MergedLinear, one r×in block per part — has rank ≤ min(k·in_features, b_rows)."""
        return min(len(self.out_rows or ((0, 0),)) * self.in_features, self.b_rows)

    @property
    def max_rank_1_0(self) -> int:
        """spec §9 in format 1.0: rank ≤ min(in_features, b_rows)."""
        return min(self.in_features, self.b_rows)

    @property
    def stack(self) -> tuple[int, ...]:
        """The leading axes of every tensor of the layer: ``(E,)`` for experts, else ``()``."""
        return () if self.experts is None else (self.experts,)


@dataclass(frozen=True)
class Problem:
    """One validation finding: the file, where in it, and what is wrong."""

    file: str
    where: str
    message: str

    def __str__(self) -> str:
        if self.where:
            return f"{self.file}: {self.where}: {self.message}"
        return f"{self.file}: {self.message}"


# -- tensor checksum ----------------------------------------------------------------------------


def tensors_sha256(items: Iterable[tuple[str, str, tuple[int, ...], bytes | memoryview]]) -> str:
    """The layout-independent checksum of spec/FORMAT.md §Checksum.

    For each tensor in ascending UTF-8 byte order of its key: the key, NUL, the dtype, NUL, the
    shape as comma-separated decimals, NUL, the data length as 8-byte little-endian, the data.
    """
    digest = hashlib.sha256()
    for name, dtype, shape, data in sorted(items, key=lambda item: item[0].encode("utf-8")):
        digest.update(name.encode("utf-8") + b"\0" + dtype.encode("ascii") + b"\0")
        digest.update(",".join(str(d) for d in shape).encode("ascii") + b"\0")
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
    return digest.hexdigest()


# -- tensor storage -----------------------------------------------------------------------------


class TensorStore(Mapping[str, np.ndarray]):
    """Name → array, backed by an open safetensors file (lazy) or by arrays in memory."""

    def __init__(
        self,
        source: SafetensorsFile | Mapping[str, np.ndarray],
        exclude: Iterable[str] = (),
    ) -> None:
        self._source = source
        skip = set(exclude)
        if isinstance(source, SafetensorsFile):
            self._names = [n for n in source if n not in skip]
        else:
            self._names = [n for n in source if n not in skip]
        self._name_set = frozenset(self._names)  # O(1) membership for 1,000s of layers

    @property
    def file(self) -> SafetensorsFile | None:
        return self._source if isinstance(self._source, SafetensorsFile) else None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._name_set:
            raise KeyError(name)
        if isinstance(self._source, SafetensorsFile):
            return self._source.numpy(name)
        return np.asarray(self._source[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def dtype(self, name: str) -> str:
        if isinstance(self._source, SafetensorsFile):
            return self._source.info(name).dtype
        return dtype_name(np.asarray(self._source[name]).dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        if isinstance(self._source, SafetensorsFile):
            return self._source.info(name).shape
        return tuple(np.asarray(self._source[name]).shape)

    def raw(self, name: str) -> bytes | memoryview:
        if isinstance(self._source, SafetensorsFile):
            return self._source.raw(name)
        array = np.ascontiguousarray(self[name])
        return memoryview(array.view(np.uint8).reshape(-1)) if array.size else b""

    def close(self) -> None:
        if isinstance(self._source, SafetensorsFile):
            self._source.close()


# -- the adapter --------------------------------------------------------------------------------


@dataclass
class Adapter:
    """A LoRA adapter: the manifest (a JSON object) and its tensors.

    Build one with :meth:`from_layers`; read one with :func:`load`; write with :meth:`save`.
    """

    manifest: dict[str, Any]
    tensors: TensorStore
    path: Path | None = None
    _specs: dict[str, LayerSpec] | None = field(default=None, repr=False)

    # construction ------------------------------------------------------------------------
    @classmethod
    def from_layers(
        cls,
        architecture: str,
        layers: Mapping[str, LoraLayer],
        *,
        scaling: str = "alpha/r",
        replacements: Mapping[str, np.ndarray] | None = None,
        base_name: str | None = None,
        fingerprint: str | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> Adapter:
        """An in-memory adapter. The most common rank and alpha become the defaults."""
        if scaling not in mf.SCALING_RULES:
            raise ValueError(f"scaling must be one of {mf.SCALING_RULES}, got {scaling!r}")
        base: dict[str, Any] = {"architecture": architecture}
        if base_name:
            base["name"] = base_name
        if fingerprint:
            base["fingerprint"] = fingerprint
        ranks = Counter(layer.rank for layer in layers.values())
        alphas = Counter(_json_number(layer.alpha) for layer in layers.values())
        default_rank = ranks.most_common(1)[0][0] if ranks else None
        default_alpha = alphas.most_common(1)[0][0] if alphas else 1
        manifest: dict[str, Any] = {
            "format": mf.FORMAT_NAME,
            "format_version": mf.BASE_VERSION,
            "base_model": base,
            "scaling": scaling,
            "alpha": default_alpha,
            "layers": {},
        }
        if default_rank is not None:
            manifest["rank"] = default_rank
        arrays: dict[str, np.ndarray] = {}
        for path in sorted(layers):
            layer = layers[path]
            entry: dict[str, Any] = {
                "in_features": int(layer.in_features),
                "out_features": int(layer.out_features),
            }
            if layer.rank != default_rank:
                entry["rank"] = layer.rank
            if _json_number(layer.alpha) != default_alpha:
                entry["alpha"] = _json_number(layer.alpha)
            if layer.kind != "linear":
                entry["kind"] = layer.kind
            if layer.out_rows is not None:
                entry["out_rows"] = [[int(a), int(b)] for a, b in layer.out_rows]
            if layer.experts is not None:
                entry["experts"] = int(layer.experts)
            arrays[mf.tensor_key(path, mf.ROLE_A)] = layer.A
            arrays[mf.tensor_key(path, mf.ROLE_B)] = layer.B
            if layer.magnitude is not None:
                entry["dora"] = True
                arrays[mf.tensor_key(path, mf.ROLE_MAGNITUDE)] = layer.magnitude
            if layer.lora_bias is not None:
                entry["lora_bias"] = True
                arrays[mf.tensor_key(path, mf.ROLE_BIAS)] = layer.lora_bias
            manifest["layers"][path] = entry
        if replacements:
            manifest["replacements"] = sorted(replacements)
            for name, array in replacements.items():
                arrays[mf.tensor_key(name, mf.ROLE_REPLACEMENT)] = array
        if provenance:
            manifest["provenance"] = dict(provenance)
        manifest["format_version"] = lowest_version(manifest)
        store = TensorStore({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        manifest["tensors_sha256"] = _store_checksum(store)
        return cls(manifest, store)

    # reading -----------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.manifest["base_model"]["architecture"]

    @property
    def scaling(self) -> str:
        return self.manifest["scaling"]

    @property
    def fingerprint(self) -> str | None:
        return self.manifest["base_model"].get("fingerprint")

    @property
    def specs(self) -> dict[str, LayerSpec]:
        """Every layer's declaration, defaults resolved. Raises if the manifest is malformed."""
        if self._specs is None:
            specs, problems = _layer_specs(self.manifest)
            if problems:
                raise ValidationError(self.path, problems)
            self._specs = specs
        return self._specs

    @property
    def layer_paths(self) -> list[str]:
        return list(self.specs)

    @property
    def replacement_names(self) -> list[str]:
        return list(self.manifest.get("replacements", []))

    def scale(self, path: str) -> float:
        spec = self.specs[path]
        return scale_of(self.scaling, spec.alpha, spec.rank)

    def layer(self, path: str) -> LoraLayer:
        """The layer's tensors as arrays (memory-mapped views where the file allows)."""
        spec = self._spec(path)
        get = self.tensors.__getitem__
        return LoraLayer(
            A=get(mf.tensor_key(path, mf.ROLE_A)),
            B=get(mf.tensor_key(path, mf.ROLE_B)),
            alpha=spec.alpha,
            in_features=spec.in_features,
            out_features=spec.out_features,
            kind=spec.kind,
            out_rows=[tuple(r) for r in spec.out_rows] if spec.out_rows else None,
            magnitude=get(mf.tensor_key(path, mf.ROLE_MAGNITUDE)) if spec.dora else None,
            lora_bias=get(mf.tensor_key(path, mf.ROLE_BIAS)) if spec.lora_bias else None,
            experts=spec.experts,
        )

    def layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for path in self.specs:
            yield path, self.layer(path)

    def replacement(self, name: str) -> np.ndarray:
        if name not in self.replacement_names:
            raise LoraformatError(self.path, f"no replacement tensor {name!r}")
        return self.tensors[mf.tensor_key(name, mf.ROLE_REPLACEMENT)]

    def delta(self, path: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """ΔW = scale·B·A as a dense ``out_features × in_features`` array (math orientation);
        for an expert layer ``[E, out_features, in_features]``, expert e's ΔW at [e].

        For a DoRA layer this is the low-rank part only; the merged weight also depends on W
        (see :func:`loraformat.merge.merge_weight`).
        """
        spec = self._spec(path)
        layer = self.layer(path)
        scale = dtype_scalar(self.scale(path), dtype)
        low_rank = (layer.B.astype(dtype) * scale) @ layer.A.astype(dtype)
        if spec.out_rows is None:
            return low_rank
        full = np.zeros((*spec.stack, spec.out_features, spec.in_features), dtype=dtype)
        full[..., layer.rows(), :] = low_rank
        return full

    def delta_norm(self, path: str) -> float:
        """‖ΔW‖_F from the factors alone: sqrt(trace((AAᵀ)(BᵀB)))·|scale|, never dense. For an
        expert layer, the norm of the whole stack: sqrt(Σ_e ‖ΔW_e‖²)."""
        layer = self.layer(path)
        if layer.experts is None:
            a = layer.A.astype(np.float64)
            b = layer.B.astype(np.float64)
            value = float(np.sum((a @ a.T) * (b.T @ b)))
        else:
            value = float(np.sum(_squared_norms(layer)))
        return abs(self.scale(path)) * math.sqrt(max(value, 0.0))

    def expert_delta_norms(self, path: str) -> np.ndarray:
        """‖ΔW_e‖_F of every expert of an expert layer (float64, shape [E])."""
        layer = self.layer(path)
        if layer.experts is None:
            raise LoraformatError(self.path, f"layer {path!r} has no experts")
        return abs(self.scale(path)) * np.sqrt(np.maximum(_squared_norms(layer), 0.0))

    def parameter_count(self) -> int:
        return sum(math.prod(self.tensors.shape(name)) for name in self.tensors)

    def _spec(self, path: str) -> LayerSpec:
        try:
            return self.specs[path]
        except KeyError:
            raise LoraformatError(self.path, f"adapter has no layer {path!r}") from None

    # writing -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the adapter atomically: ``*.safetensors`` → single file, else → directory."""
        from ..atomic import check_output

        out = check_output(path, overwrite)
        manifest = dict(self.manifest)
        manifest["tensors_sha256"] = _store_checksum(self.tensors)
        entries = [
            TensorEntry(
                name,
                self.tensors.dtype(name),
                self.tensors.shape(name),
                _raw_getter(self.tensors, name),
            )
            for name in self.tensors
        ]
        if is_single_file(out):
            write_safetensors(out, entries, {mf.METADATA_KEY: mf.dumps(manifest, compact=True)})
        else:
            with atomic_dir(out) as tmp:
                write_safetensors(tmp / mf.TENSORS_FILE, entries)
                (tmp / mf.MANIFEST_FILE).write_text(mf.dumps(manifest), encoding="utf-8")
        return out

    def close(self) -> None:
        self.tensors.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _squared_norms(layer: LoraLayer) -> np.ndarray:
    """‖B[e]·A[e]‖_F² of every expert, from the factors: Σ (A Aᵀ) ∘ (Bᵀ B)."""
    a = layer.A.astype(np.float64)
    b = layer.B.astype(np.float64)
    gram_a = a @ a.transpose(0, 2, 1)
    gram_b = b.transpose(0, 2, 1) @ b
    return np.sum(gram_a * gram_b, axis=(1, 2))


def dtype_scalar(value: float, dtype: np.dtype | type) -> Any:
    return np.dtype(dtype).type(value)


def _json_number(value: float) -> int | float:
    value = float(value)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _raw_getter(store: TensorStore, name: str) -> Callable[[], bytes | memoryview]:
    return lambda: store.raw(name)


def _store_checksum(store: TensorStore) -> str:
    return tensors_sha256(
        (name, store.dtype(name), store.shape(name), store.raw(name)) for name in store
    )


def is_single_file(path: Path) -> bool:
    return path.suffix == ".safetensors"


# -- manifest → layer specs -------------------------------------------------------------------


def lowest_version(manifest: Mapping[str, Any]) -> str:
    """The lowest format version that expresses ``manifest`` (spec §8: writers write it, so a
    1.0 reader reads every adapter that 1.0 can express). A layer with ``experts`` needs 1.2;
    1.1's rank rule for fused layers (§9) needs 1.1."""
    specs, _ = _layer_specs({**manifest, "format_version": mf.FORMAT_VERSION})
    if any(spec.experts is not None for spec in specs.values()):
        return "1.2"
    if any(spec.max_rank_1_0 < spec.rank <= spec.max_rank for spec in specs.values()):
        return "1.1"
    return mf.BASE_VERSION


_MEMBERS_SINCE = tuple((m, v) for (where, m), v in mf.MEMBER_SINCE.items() if where == "layer")


def _layer_specs(manifest: Mapping[str, Any]) -> tuple[dict[str, LayerSpec], list[str]]:
    specs: dict[str, LayerSpec] = {}
    rule_1_1 = mf.version_at_least(dict(manifest), 1)
    minor = mf.declared_minor(dict(manifest))
    problems: list[str] = []
    default_rank = manifest.get("rank")
    default_alpha = manifest.get("alpha")
    for path, entry in sorted(manifest.get("layers", {}).items()):
        rank = entry.get("rank", default_rank)
        alpha = entry.get("alpha", default_alpha)
        if rank is None:
            problems.append(f"layers/{path}: no rank given and the manifest has no default rank")
            continue
        if alpha is None:
            problems.append(f"layers/{path}: no alpha given and the manifest has no default alpha")
            continue
        try:
            alpha = float(alpha)
        except OverflowError:
            alpha = math.inf
        if not math.isfinite(alpha):
            problems.append(f"layers/{path}: alpha must be a finite number")
            continue
        out_rows = entry.get("out_rows")
        if out_rows is not None:
            out_rows = tuple((int(a), int(b)) for a, b in out_rows)
            last = 0
            for a, b in out_rows:
                if not (last <= a < b <= entry["out_features"]):
                    problems.append(
                        f"layers/{path}/out_rows: ranges must be ascending, non-empty, "
                        f"non-overlapping and within out_features={entry['out_features']}"
                    )
                    break
                last = b
        spec = LayerSpec(
            path=path,
            rank=int(rank),
            alpha=float(alpha),
            in_features=int(entry["in_features"]),
            out_features=int(entry["out_features"]),
            kind=entry.get("kind", "linear"),
            out_rows=out_rows,
            dora=bool(entry.get("dora", False)),
            lora_bias=bool(entry.get("lora_bias", False)),
            experts=entry.get("experts"),
        )
        for member, since in _MEMBERS_SINCE:
            if member in entry and minor < since:
                problems.append(
                    f"layers/{path}: unknown member {member!r} (format 1.{minor} allows only "
                    f"the members of spec/FORMAT.md; {member!r} needs format_version 1.{since})"
                )
        if spec.experts is not None and (spec.dora or spec.lora_bias or spec.kind != "linear"):
            problems.append(
                f"layers/{path}: an expert layer cannot have dora, lora_bias or kind embedding "
                "(format 1.2)"
            )
        if spec.dora and spec.out_rows is not None:
            problems.append(f"layers/{path}: dora cannot be combined with out_rows")
        if spec.kind == "embedding" and (spec.dora or spec.lora_bias or spec.out_rows):
            problems.append(
                f"layers/{path}: an embedding layer cannot have dora, lora_bias or out_rows"
            )
        bound = spec.max_rank if rule_1_1 else spec.max_rank_1_0
        if spec.rank > bound:
            if rule_1_1:
                problems.append(
                    f"layers/{path}: rank {spec.rank} exceeds min(parts × in_features, rows) = "
                    f"{bound}"
                )
            else:
                problems.append(
                    f"layers/{path}: rank {spec.rank} exceeds the layer's smaller dimension "
                    f"{bound} (format 1.0; 1.1 allows min(parts × in_features, rows) = "
                    f"{spec.max_rank} for fused layers)"
                )
        specs[path] = spec
    for name in manifest.get("replacements", []):
        layer, _, member = name.rpartition(".")
        if name in specs and specs[name].experts is not None:
            problems.append(
                f"replacements: {name!r} is the stacked weight of expert layer {name!r}; "
                "a tensor is either replaced or adapted"
            )
        if member == "weight" and layer in specs and specs[layer].experts is None:
            problems.append(
                f"replacements: {name!r} is the weight of adapted layer "
                f"{layer!r}; a tensor is either replaced or adapted"
            )
        if member == "bias" and layer in specs and specs[layer].lora_bias:
            problems.append(
                f"replacements: {name!r} is the bias of layer {layer!r}, which has a lora_bias; "
                "a tensor is either replaced or adapted"
            )
    return specs, problems


def _expected_tensors(specs: Mapping[str, LayerSpec], replacements: list[str]):
    """(key, expected shape or None for any) for every tensor the manifest implies."""
    for path, spec in specs.items():
        yield mf.tensor_key(path, mf.ROLE_A), (*spec.stack, spec.rank, spec.in_features)
        yield mf.tensor_key(path, mf.ROLE_B), (*spec.stack, spec.b_rows, spec.rank)
        if spec.dora:
            yield mf.tensor_key(path, mf.ROLE_MAGNITUDE), (spec.out_features,)
        if spec.lora_bias:
            yield mf.tensor_key(path, mf.ROLE_BIAS), (spec.out_features,)
    for name in replacements:
        yield mf.tensor_key(name, mf.ROLE_REPLACEMENT), None


def structural_problems(manifest: dict[str, Any], store: TensorStore) -> list[str]:
    """Schema, version, and header-level tensor checks (presence, dtype, shape). No tensor bytes."""
    refusal = mf.check_version(manifest)
    if refusal:
        return [refusal]
    problems = mf.schema_problems(manifest) or _tensor_problems(manifest, store)
    if problems and mf.is_newer_minor(manifest):
        # §8: what a newer minor version adds is either ignored or refused by an older rule;
        # the refusal says why the file may still be fine for a newer reader.
        problems.append(
            f"format_version: {manifest['format_version']} is newer than this reader "
            f"({mf.FORMAT_VERSION}); a newer loraformat may read this file"
        )
    return problems


def _tensor_problems(manifest: dict[str, Any], store: TensorStore) -> list[str]:
    """The layer rules and the tensor set, dtypes and shapes of a manifest the schema accepts."""
    specs, problems = _layer_specs(manifest)
    expected = dict(_expected_tensors(specs, list(manifest.get("replacements", []))))
    for key, shape in expected.items():
        if key not in store:
            problems.append(f"tensor {key!r}: missing")
            continue
        dtype = store.dtype(key)
        if dtype not in FLOAT_DTYPES:
            problems.append(f"tensor {key!r}: dtype {dtype} is not one of {sorted(FLOAT_DTYPES)}")
        actual = store.shape(key)
        if shape is not None and actual != shape:
            problems.append(
                f"tensor {key!r}: shape {list(actual)} does not match the manifest, "
                f"expected {list(shape)}"
            )
    newer_minor = mf.is_newer_minor(manifest)
    for key in store:
        if key not in expected:
            if newer_minor and mf.is_future_role(key, specs):
                continue  # §8: a newer minor version's optional tensor role, ignored
            problems.append(f"tensor {key!r}: not declared by the manifest")
    return problems


def content_problems(manifest: dict[str, Any], store: TensorStore) -> list[str]:
    """Checks that read tensor bytes: the checksum, and NaN/Inf values of the tensors the manifest
    implies (a newer minor version's ignored roles mean nothing to this reader: §8)."""
    specs, _ = _layer_specs(manifest)
    implied = dict(_expected_tensors(specs, list(manifest.get("replacements", []))))
    problems = []
    actual = _store_checksum(store)
    if manifest.get("tensors_sha256") != actual:
        problems.append(
            f"tensors_sha256: data does not match the manifest's checksum "
            f"(manifest {str(manifest.get('tensors_sha256'))[:12]}…, data {actual[:12]}…)"
        )
    for key in store:
        if key in implied and store.dtype(key) in FLOAT_DTYPES:
            # isfinite in the stored dtype: casting F64 to F32 would turn large values into Inf.
            finite = np.isfinite(store[key])
            if not finite.all():
                problems.append(
                    f"tensor {key!r}: {int(finite.size - finite.sum())} "
                    "non-finite value(s) (NaN/Inf)"
                )
    return problems


# -- opening both forms -------------------------------------------------------------------------


def refuse_escape(adapter_dir: Path, member: Path) -> None:
    """An adapter's files must lie inside it (spec §9): a member that is a symbolic link must
    resolve, every link on the way followed, to a place inside the adapter directory's own
    resolved path (a member that is no link is a name in the directory, so inside)."""
    if member.is_symlink():
        target = member.resolve()
        if adapter_dir.resolve() not in target.parents:
            raise LoraformatError(member, "symbolic link points outside the adapter directory")


def _open(path: Path) -> tuple[dict[str, Any], SafetensorsFile, Path]:
    """(manifest, open tensor file, the file to name in messages about the manifest)."""
    if path.is_dir():
        manifest_path = path / mf.MANIFEST_FILE
        if not manifest_path.exists():
            raise LoraformatError(
                path, f"not a loraformat adapter directory: no {mf.MANIFEST_FILE}"
            )
        tensors_path = path / mf.TENSORS_FILE
        for member in (manifest_path, tensors_path):
            refuse_escape(path, member)
        refuse_special_file(manifest_path)
        try:
            size = manifest_path.stat().st_size
            if size > mf.MAX_MANIFEST_BYTES:
                raise LoraformatError(
                    manifest_path,
                    f"manifest is {size} bytes, over the {mf.MAX_MANIFEST_BYTES}-byte limit",
                )
            data = manifest_path.read_bytes()
            if data.startswith(b"\xef\xbb\xbf"):
                raise LoraformatError(
                    manifest_path, "manifest starts with a UTF-8 byte order mark; save it without"
                )
            manifest = strict_json(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise LoraformatError(manifest_path, f"manifest is not valid UTF-8 ({exc})") from None
        except ValueError as exc:
            raise LoraformatError(manifest_path, f"manifest is not valid JSON ({exc})") from None
        except OSError as exc:
            raise LoraformatError(manifest_path, f"cannot read: {exc.strerror}") from None
        return manifest, SafetensorsFile(tensors_path), manifest_path
    if not path.exists():
        raise LoraformatError(path, "no such file or directory")
    st = SafetensorsFile(path)
    text = st.metadata.get(mf.METADATA_KEY)
    if text is None:
        st.close()
        raise LoraformatError(
            path, f"not a loraformat adapter: no {mf.METADATA_KEY!r} key in __metadata__"
        )
    try:
        manifest = strict_json(text)
    except ValueError as exc:
        st.close()
        raise LoraformatError(path, f"embedded manifest is not valid JSON ({exc})") from None
    return manifest, st, path


def load(path: str | os.PathLike[str]) -> Adapter:
    """Open an adapter (directory or single file) lazily, refusing it if it is malformed.

    Header-level checks run here (schema, version, tensor presence and shapes); the checksum and
    NaN/Inf checks read every byte and are left to :func:`validate`.
    """
    path = Path(path)
    manifest, st, manifest_path = _open(path)
    store = TensorStore(st)
    problems = structural_problems(manifest, store)
    if problems:
        st.close()
        in_data = problems[0].startswith("tensor ")
        raise ValidationError(st.path if in_data else manifest_path, problems)
    return Adapter(manifest, store, path)


def validate(path: str | os.PathLike[str]) -> list[Problem]:
    """Every problem found in an adapter, each naming the file and the field or tensor.

    An empty list means the adapter is valid.
    """
    path = Path(path)
    try:
        manifest, st, manifest_path = _open(path)
    except LoraformatError as exc:
        return [Problem(exc.path or str(path), "", exc.message)]
    store = TensorStore(st)
    try:
        found = structural_problems(manifest, store)
        if not found:
            found = content_problems(manifest, store)
        problems = []
        for message in found:
            in_data = message.startswith(("tensor ", "tensors_sha256: data does not match"))
            file = st.path if in_data else manifest_path
            where, _, text = message.partition(": ")
            problems.append(Problem(str(file), where, text))
        return problems
    finally:
        st.close()


def repack(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Rewrite an adapter in the other form — directory ↔ single file — or the same; the content
    is unchanged. (Converting between formats is :func:`loraformat.interchange.convert`.)"""
    with load(src) as adapter:
        return adapter.save(dst, overwrite=overwrite)


__all__ = [
    "DTYPES",
    "Adapter",
    "LayerSpec",
    "LoraLayer",
    "Problem",
    "TensorStore",
    "load",
    "repack",
    "scale_of",
    "tensors_sha256",
    "validate",
]
