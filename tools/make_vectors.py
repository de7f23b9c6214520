"""Regenerate the test vectors in spec/vectors/ (deterministic: same bytes every run).

    .venv/bin/python tools/make_vectors.py [--check]

Each vector is a small adapter plus, under ``expected/``, the dense ΔW of every layer as float64
``.npy`` files computed here in float64 straight from the stored tensors, so an independent reader
can check itself (spec/vectors/README.md). ``--check`` regenerates into a temporary folder and
exits 1 if anything differs from what is committed.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from loraformat.checkpoint import Checkpoint
from loraformat.format.adapter import Adapter, LoraLayer, load, tensors_sha256
from loraformat.format.manifest import dumps
from loraformat.format.safetensors_io import TensorEntry, build_header, write_safetensors

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
PROVENANCE = {"tool": "tools/make_vectors.py", "purpose": "loraformat test vector"}


def _rand(rng: np.random.Generator, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    # Values that are exact in every stored dtype (multiples of 1/64 in [-2, 2]).
    return (np.round(rng.standard_normal(shape) * 64) / 64).clip(-2, 2).astype(dtype)


def _layer(rng, rank, in_f, out_f, alpha, dtype=np.float32, **extra) -> LoraLayer:
    rows = extra.pop("b_rows", out_f)
    return LoraLayer(
        A=_rand(rng, (rank, in_f), dtype),
        B=_rand(rng, (rows, rank), dtype),
        alpha=alpha,
        in_features=in_f,
        out_features=out_f,
        **extra,
    )


def basic(out: Path) -> None:
    """Directory form, alpha/r, default rank/alpha with per-layer overrides, a lora_bias."""
    rng = np.random.default_rng(1)
    layers = {
        "model.layers.0.self_attn.q_proj": _layer(rng, 4, 16, 16, 8),
        "model.layers.0.self_attn.v_proj": _layer(
            rng, 2, 16, 8, 8, lora_bias=_rand(rng, (8,))
        ),
        "model.layers.1.self_attn.q_proj": _layer(rng, 4, 16, 16, 16),
    }
    Adapter.from_layers(
        "llama", layers, base_name="tiny-llama", provenance=PROVENANCE
    ).save(out / "basic", overwrite=True)


def rslora(out: Path) -> None:
    """Single-file form, rsLoRA scaling alpha/sqrt(r), BF16 tensors."""
    rng = np.random.default_rng(2)
    layers = {
        "transformer.h.0.mlp.c_fc": _layer(rng, 8, 16, 64, 16, ml_dtypes.bfloat16),
        "transformer.h.0.mlp.c_proj": _layer(rng, 8, 64, 16, 16, ml_dtypes.bfloat16),
    }
    Adapter.from_layers("gpt2", layers, scaling="alpha/sqrt(r)", provenance=PROVENANCE).save(
        out / "rslora.safetensors", overwrite=True
    )


def fused(out: Path) -> dict[str, np.ndarray]:
    """GPT-2 c_attn (q,k,v fused, 3×8 outputs) with loralib enable_lora=[True, False, True].

    loralib: r=2 per enabled part, lora_alpha=4 → scale 4/2 = 2. In the format: A = [A_q; A_v]
    (rank 4), B = blockdiag(B_q, B_v), out_rows = [[0, 8], [16, 24]], alpha = 4·2 = 8 so that
    alpha/rank = 8/4 = 2 equals loralib's scale.
    """
    rng = np.random.default_rng(3)
    r, n_embd, lora_alpha = 2, 8, 4
    a_q, a_v = _rand(rng, (r, n_embd)), _rand(rng, (r, n_embd))
    b_q, b_v = _rand(rng, (n_embd, r)), _rand(rng, (n_embd, r))
    block = np.zeros((2 * n_embd, 2 * r), dtype=np.float32)
    block[:n_embd, :r], block[n_embd:, r:] = b_q, b_v
    layer = LoraLayer(
        A=np.concatenate([a_q, a_v]),
        B=block,
        alpha=lora_alpha * 2,
        in_features=n_embd,
        out_features=3 * n_embd,
        out_rows=[(0, n_embd), (2 * n_embd, 3 * n_embd)],
    )
    Adapter.from_layers(
        "gpt2", {"transformer.h.0.attn.c_attn": layer}, provenance=PROVENANCE
    ).save(out / "fused", overwrite=True)
    # loralib's own tensors (MergedLinear, k=2 enabled parts), for the mapping test.
    # keyed by module, as loralib's state_dict and `convert --from loralib` have them
    return {
        "transformer.h.0.attn.c_attn.lora_A": np.concatenate([a_q, a_v]),  # (r·k) × in
        "transformer.h.0.attn.c_attn.lora_B": np.concatenate([b_q, b_v]),  # (out/3·k) × r
    }


def embedding(out: Path) -> None:
    """Single-file form: an embedding-layer adapter plus a full replacement tensor."""
    rng = np.random.default_rng(4)
    layers = {"model.embed_tokens": _layer(rng, 4, 32, 8, 4, kind="embedding")}
    Adapter.from_layers(
        "llama",
        layers,
        replacements={"score.weight": _rand(rng, (3, 8))},
        provenance=PROVENANCE,
    ).save(out / "embedding.safetensors", overwrite=True)


def dora(out: Path) -> tuple[np.ndarray, str]:
    """Directory form, DoRA magnitude; bound to a base (base.safetensors) by fingerprint."""
    rng = np.random.default_rng(5)
    path = "model.layers.0.self_attn.q_proj"
    weight = _rand(rng, (16, 16))
    base_file = out / "dora.base.safetensors"
    write_safetensors(base_file, {f"{path}.weight": weight})
    with Checkpoint(base_file) as ckpt:
        fp = ckpt.fingerprint()
    magnitude = (np.abs(_rand(rng, (16,))) + 1).astype(np.float32)
    layers = {path: _layer(rng, 2, 16, 16, 4, magnitude=magnitude)}
    Adapter.from_layers(
        "llama", layers, base_name="tiny-llama", fingerprint=fp, provenance=PROVENANCE
    ).save(out / "dora", overwrite=True)
    return weight, path


def fused_wide(out: Path) -> None:
    """Format 1.1's rank rule: loralib MergedLinear with k·r = 2·3 = 6 > in_features = 4."""
    rng = np.random.default_rng(6)
    r, d = 3, 4
    a = _rand(rng, (2 * r, d))
    block = np.zeros((2 * d, 2 * r), dtype=np.float32)
    block[:d, :r], block[d:, r:] = _rand(rng, (d, r)), _rand(rng, (d, r))
    layer = LoraLayer(A=a, B=block, alpha=2 * 2.0, in_features=d, out_features=3 * d,
                      out_rows=[(0, d), (2 * d, 3 * d)])
    Adapter.from_layers("gpt2", {"transformer.h.0.attn.c_attn": layer},
                        provenance=PROVENANCE).save(out / "fused-wide", overwrite=True)


def lora_bias_fused(out: Path) -> None:
    """lora_bias on a fused layer: the bias has out_features entries, out_rows restricts ΔW only."""
    rng = np.random.default_rng(7)
    layer = _layer(rng, 2, 8, 24, 4, b_rows=16, out_rows=[(0, 8), (16, 24)],
                   lora_bias=_rand(rng, (24,)))
    Adapter.from_layers("gpt2", {"transformer.h.0.attn.c_attn": layer},
                        provenance=PROVENANCE).save(out / "lora-bias-fused", overwrite=True)


def wide_dtypes(out: Path) -> None:
    """F16 and F64 tensors, ``x-`` members at every level, and (directory form) an
    adapter.safetensors whose own ``loraformat`` metadata disagrees with adapter.json: ignored."""
    rng = np.random.default_rng(8)
    layers = {
        "model.layers.0.mlp.up_proj": _layer(rng, 2, 8, 16, 4, np.float16),
        "model.layers.0.mlp.down_proj": _layer(rng, 3, 16, 8, 6, np.float64),
    }
    adapter = Adapter.from_layers("llama", layers, provenance=PROVENANCE)
    manifest = dict(adapter.manifest)
    manifest["x-vendor"] = {"note": "extensions never change ΔW"}
    manifest["base_model"] = {**manifest["base_model"], "x-revision": "abc"}
    manifest["layers"] = {k: dict(v) for k, v in manifest["layers"].items()}
    manifest["layers"]["model.layers.0.mlp.up_proj"]["x-trained-steps"] = 100
    decoy = {**manifest, "alpha": 1000, "layers": {}}
    _write_dir(out / "wide-dtypes", manifest, adapter.tensors,
               {"loraformat": dumps(decoy, compact=True)})


def newer_minor(out: Path) -> None:
    """format_version 1.9: unknown members at every level and unknown tensor roles of a declared
    layer — one I64, one F32 holding a NaN — all ignored by a 1.2 reader, dtype and values
    unchecked (§8); ΔW is computed from what it knows."""
    rng = np.random.default_rng(9)
    path = "model.layers.0.self_attn.q_proj"
    adapter = Adapter.from_layers("llama", {path: _layer(rng, 2, 8, 8, 4)}, provenance=PROVENANCE)
    tensors = {k: np.asarray(adapter.tensors[k]) for k in adapter.tensors}
    future = _rand(rng, (8,))
    future[3] = np.nan
    tensors[f"{path}.future_role"] = future
    tensors[f"{path}.future_index"] = np.arange(4, dtype=np.int64)
    manifest = dict(adapter.manifest)
    manifest.update({"format_version": "1.9", "future_member": {"a": 1}})
    manifest["base_model"] = {**manifest["base_model"], "future_base": True}
    manifest["layers"] = {path: {**manifest["layers"][path], "future_layer": [1, 2]}}
    _write_single(out / "newer-minor.safetensors", manifest, tensors)


def header_extras(out: Path) -> None:
    """A tensor entry with an extra member, which readers ignore (§1.1)."""
    rng = np.random.default_rng(10)
    path = "model.layers.0.self_attn.v_proj"
    adapter = Adapter.from_layers("llama", {path: _layer(rng, 2, 8, 4, 2)}, provenance=PROVENANCE)
    tensors = {k: np.asarray(adapter.tensors[k]) for k in adapter.tensors}
    header, data = _container(tensors, {"loraformat": dumps(dict(adapter.manifest), compact=True)})
    header[f"{path}.lora_A"]["x-note"] = "ignored"
    (out / "header-extras.safetensors").write_bytes(_pack(header, data))


def experts(out: Path) -> None:
    """Format 1.2 expert layers (§4.7), gpt-oss names (stacked in the checkpoint): the fused
    gate/up projection adapted on its up rows only — interleaved with gate, so the odd rows, one
    range each (out_rows per expert) — down_proj whole with its own rank and alpha, and a dense
    attention layer beside them."""
    rng = np.random.default_rng(13)
    e, hidden, inter = 4, 8, 6
    up_rows = [(2 * i + 1, 2 * i + 2) for i in range(inter)]

    def stacked(rank, in_f, out_f, alpha, rows=None):
        b_rows = out_f if rows is None else sum(b - a for a, b in rows)
        return LoraLayer(A=_rand(rng, (e, rank, in_f)), B=_rand(rng, (e, b_rows, rank)),
                         alpha=alpha, in_features=in_f, out_features=out_f, out_rows=rows,
                         experts=e)

    layers = {
        "model.layers.0.mlp.experts.gate_up_proj": stacked(2, hidden, 2 * inter, 4,
                                                           rows=up_rows),
        "model.layers.0.mlp.experts.down_proj": stacked(3, inter, hidden, 9),
        "model.layers.0.self_attn.q_proj": _layer(rng, 2, hidden, hidden, 4),
    }
    Adapter.from_layers("gpt_oss", layers, base_name="tiny-gpt-oss",
                        provenance=PROVENANCE).save(out / "experts", overwrite=True)


def experts_rslora(out: Path) -> None:
    """Expert layers in a single file: rsLoRA, BF16, gpt-oss names (stored [E, in, out] by the
    base; the format's A and B are in math orientation all the same)."""
    rng = np.random.default_rng(14)
    e, hidden, inter = 3, 8, 4
    layers = {
        "model.layers.0.mlp.experts.down_proj": LoraLayer(
            A=_rand(rng, (e, 4, inter), ml_dtypes.bfloat16),
            B=_rand(rng, (e, hidden, 4), ml_dtypes.bfloat16),
            alpha=8, in_features=inter, out_features=hidden, experts=e),
    }
    Adapter.from_layers("gpt_oss", layers, scaling="alpha/sqrt(r)",
                        provenance=PROVENANCE).save(out / "experts-rslora.safetensors",
                                                    overwrite=True)


def explicit_defaults(out: Path) -> None:
    """§2: "dora": false, "lora_bias": false and "kind": "linear" mean what leaving them out means
    (an embedding layer with both flags false is valid)."""
    rng = np.random.default_rng(15)
    adapter = Adapter.from_layers("llama", {
        "model.embed_tokens": _layer(rng, 2, 16, 4, 4, kind="embedding"),
        "model.layers.0.self_attn.q_proj": _layer(rng, 2, 8, 8, 4),
    }, provenance=PROVENANCE)
    manifest = json.loads(json.dumps(adapter.manifest))
    manifest["layers"]["model.embed_tokens"].update(dora=False, lora_bias=False)
    manifest["layers"]["model.layers.0.self_attn.q_proj"].update(kind="linear", dora=False,
                                                                 lora_bias=False)
    _write_dir(out / "explicit-defaults", manifest, adapter.tensors)


def fused_all_parts(out: Path) -> None:
    """§5: loralib MergedLinear with every part enabled — three adjacent ranges, one per part,
    rank 3·3 = 9 > in_features 4 (k counts the ranges as written); format 1.1."""
    rng = np.random.default_rng(16)
    r, d = 3, 4
    block = np.zeros((3 * d, 3 * r), dtype=np.float32)
    for part in range(3):
        block[part * d:(part + 1) * d, part * r:(part + 1) * r] = _rand(rng, (d, r))
    layer = LoraLayer(A=_rand(rng, (3 * r, d)), B=block, alpha=3 * 2.0, in_features=d,
                      out_features=3 * d, out_rows=[(0, d), (d, 2 * d), (2 * d, 3 * d)])
    Adapter.from_layers("gpt2", {"transformer.h.0.attn.c_attn": layer},
                        provenance=PROVENANCE).save(out / "fused-all-parts", overwrite=True)


def zero_size(out: Path) -> None:
    """§1.1 item 3: zero-size replacement tensors at offset 0, at a tensor boundary and at the
    end of the buffer — each sorting before the tensor that begins where it sits."""
    rng = np.random.default_rng(17)
    path = "model.layers.0.self_attn.q_proj"
    adapter = Adapter.from_layers("llama", {path: _layer(rng, 2, 4, 4, 4)},
                                  replacements={"empty.first": np.zeros((0,), np.float32),
                                                "empty.middle": np.zeros((2, 0), np.float32),
                                                "empty.last": np.zeros((0, 3), np.float32)},
                                  provenance=PROVENANCE)
    tensors = {k: np.asarray(adapter.tensors[k]) for k in adapter.tensors}
    header, data = _container(tensors, {"loraformat": dumps(dict(adapter.manifest),
                                                            compact=True)})
    a_end = header[f"{path}.lora_A"]["data_offsets"][1]
    header["empty.first.replacement"]["data_offsets"] = [0, 0]
    header["empty.middle.replacement"]["data_offsets"] = [a_end, a_end]
    header["empty.last.replacement"]["data_offsets"] = [len(data), len(data)]
    assert header[f"{path}.lora_A"]["data_offsets"][0] == 0
    (out / "zero-size.safetensors").write_bytes(_pack(header, data))


def empty(out: Path) -> None:
    """§1.1 item 3, §2: no layers, no tensors — an empty data buffer (file = 8 + N bytes)."""
    Adapter.from_layers("llama", {}, provenance=PROVENANCE).save(out / "empty.safetensors",
                                                                 overwrite=True)


def higher_version(out: Path) -> None:
    """§8: a file declaring "1.2" that needs nothing of 1.1 or 1.2 is read like any other."""
    rng = np.random.default_rng(18)
    adapter = Adapter.from_layers("llama", {"model.layers.0.mlp.up_proj": _layer(rng, 2, 8, 8, 2)},
                                  provenance=PROVENANCE)
    tensors = {k: np.asarray(adapter.tensors[k]) for k in adapter.tensors}
    _write_single(out / "higher-version.safetensors",
                  {**adapter.manifest, "format_version": "1.2"}, tensors)


# -- raw writers: the vectors below need bytes the library writer would never produce ---------


def _container(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None):
    entries = [TensorEntry.of(k, np.ascontiguousarray(v)) for k, v in sorted(tensors.items())]
    header = json.loads(build_header(entries, metadata))
    data = b"".join(np.ascontiguousarray(tensors[e.name]).tobytes() for e in entries)
    return header, data


def _pack(header: dict | str | bytes, data: bytes, pad: bytes = b" ") -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    raw = header.encode("utf-8") if isinstance(header, str) else header
    raw += pad * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def _checksum(tensors: dict[str, np.ndarray]) -> str:
    return tensors_sha256(
        (k, TensorEntry.of(k, v).dtype, tuple(v.shape), np.ascontiguousarray(v).tobytes())
        for k, v in tensors.items()
    )


def _write_single(file: Path, manifest: dict, tensors: dict[str, np.ndarray]) -> None:
    manifest = {**manifest, "tensors_sha256": _checksum(tensors)}
    header, data = _container(tensors, {"loraformat": dumps(manifest, compact=True)})
    file.write_bytes(_pack(header, data))


def _write_dir(folder: Path, manifest: dict, tensors, metadata: dict[str, str] | None = None,
               manifest_text: str | bytes | None = None) -> None:
    tensors = {k: np.asarray(tensors[k]) for k in tensors}
    folder.mkdir(parents=True, exist_ok=True)
    if manifest.get("tensors_sha256") == "auto":
        manifest = {**manifest, "tensors_sha256": _checksum(tensors)}
    header, data = _container(tensors, metadata)
    (folder / "adapter.safetensors").write_bytes(_pack(header, data))
    text = dumps(manifest) if manifest_text is None else manifest_text
    (folder / "adapter.json").write_bytes(text if isinstance(text, bytes) else text.encode())


# -- invalid vectors: one per rule a reader MUST enforce --------------------------------------


def _valid_base() -> tuple[dict, dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    manifest = {
        "format": "loraformat", "format_version": "1.0", "base_model": {"architecture": "llama"},
        "scaling": "alpha/r", "rank": 2, "alpha": 4,
        "layers": {"m.q": {"in_features": 4, "out_features": 4}}, "tensors_sha256": "auto",
    }
    return manifest, {"m.q.lora_A": _rand(rng, (2, 4)), "m.q.lora_B": _rand(rng, (4, 2))}


def _manifest_case(change, tensors_change=None, text=None):
    """An invalid directory vector: the valid base with its manifest (and tensors) changed."""

    def build(target: Path) -> None:
        manifest, tensors = _valid_base()
        manifest = json.loads(json.dumps(manifest))
        change(manifest)
        if tensors_change is not None:
            tensors_change(tensors)
        if manifest.get("tensors_sha256") == "auto":
            manifest["tensors_sha256"] = _checksum(tensors)
        _write_dir(target, manifest, tensors,
                   manifest_text=text(manifest) if text is not None else None)

    return build


def _file_case(change_header=None, pad=b" ", data_change=None, raw=None):
    """An invalid single-file vector: the valid base as one file, its container changed."""

    def build(target: Path) -> None:
        manifest, tensors = _valid_base()
        manifest["tensors_sha256"] = _checksum(tensors)
        header, data = _container(tensors, {"loraformat": dumps(manifest, compact=True)})
        if change_header is not None:
            header = change_header(header)
        if data_change is not None:
            data = data_change(data)
        blob = _pack(header, data, pad)
        target.write_bytes(raw(blob) if raw is not None else blob)

    return build


def _set(obj_path: str, value):
    def change(m):
        *parents, last = obj_path.split("/")
        for key in parents:
            m = m[key]
        m[last] = value
    return change


def _del(key):
    return lambda m: m.pop(key)


def _entry(name, **fields):
    def change(h):
        h[name] = {**h[name], **fields}
        return h
    return change


def _layer_entry(**fields):
    return lambda m: m["layers"]["m.q"].update(fields)


def _fused(rank, in_features, version):
    """A fused layer (out_rows, 2 ranges of 2 rows) of the given rank and in_features."""

    def change(m):
        m["format_version"] = version
        m["rank"] = rank
        m["layers"] = {"m.q": {"in_features": in_features, "out_features": 6,
                               "out_rows": [[0, 2], [4, 6]]}}
    rng = np.random.default_rng(12)
    return _manifest_case(change, lambda t: t.update({
        "m.q.lora_A": _rand(rng, (rank, in_features)), "m.q.lora_B": _rand(rng, (4, rank))}))


def _text_with(old: str, new: str):
    return lambda m: dumps(m).replace(old, new, 1)


def _dir_metadata(metadata: dict):
    """A directory vector whose adapter.safetensors carries the given (raw) __metadata__."""

    def build(target: Path) -> None:
        manifest, tensors = _valid_base()
        manifest["tensors_sha256"] = _checksum(tensors)
        header, data = _container(tensors, None)
        target.mkdir(parents=True, exist_ok=True)
        (target / "adapter.safetensors").write_bytes(_pack({"__metadata__": metadata, **header},
                                                           data))
        (target / "adapter.json").write_text(dumps(manifest), encoding="utf-8")

    return build


def _embedded_text(text):
    """A single-file vector whose embedded manifest is ``text(manifest)``."""

    def build(target: Path) -> None:
        manifest, tensors = _valid_base()
        manifest["tensors_sha256"] = _checksum(tensors)
        header, data = _container(tensors, {"loraformat": text(manifest)})
        target.write_bytes(_pack(header, data))

    return build


def _header_text(old: str, new: str):
    """A single-file vector whose header text has ``old`` replaced by ``new`` (raw JSON)."""
    return _file_case(lambda h: json.dumps(h, separators=(",", ":")).replace(old, new, 1))


def _experts(change=None, tensors_change=None, experts=2, rank=2):
    """An expert layer (E = experts, 4 → 4) declared 1.2, then changed."""

    def manifest_change(m):
        m["format_version"] = "1.2"
        m["layers"]["m.q"]["experts"] = experts
        if change is not None:
            change(m)

    def tensors_update(t):
        rng = np.random.default_rng(19)
        t.update({"m.q.lora_A": _rand(rng, (experts, rank, 4)),
                  "m.q.lora_B": _rand(rng, (experts, 4, rank))})
        if tensors_change is not None:
            tensors_change(t)

    return _manifest_case(manifest_change, tensors_update)


_NAN = np.array([np.nan, 1, 1, 1, 1, 1, 1, 1], dtype=np.float32).reshape(2, 4)

#: name → (section, substring of loraformat's refusal, builder). Names end in .safetensors for
#: single files, otherwise they are directories.
INVALID = {
    # the container (§1.1)
    "header-leading-space.safetensors": ("§1.1 item 2: the header starts with '{'",
        "must start with '{'", _file_case(raw=lambda b: b[:8] + b" " + b[8:-1])),
    "header-newline-padding.safetensors": ("§1.1 item 2: padding is spaces only",
        "followed only by spaces", _file_case(pad=b"\n")),
    "header-size-over-limit.safetensors": ("§1.1 item 1: N ≤ 104,857,600",
        "exceeds the 104857600-byte limit",
        _file_case(raw=lambda b: struct.pack("<Q", 104_857_601) + b[8:])),
    "truncated.safetensors": ("§1.1 item 3: the tensors tile the buffer (file cut short)",
        "truncated", _file_case(raw=lambda b: b[:-4])),
    "tensor-hole.safetensors": ("§1.1 item 3: no holes", "leaves a hole",
        _file_case(_entry("m.q.lora_B", data_offsets=[36, 68]),
                   data_change=lambda d: d + bytes(4))),
    "tensor-overlap.safetensors": ("§1.1 item 3: no overlap", "overlaps another tensor",
        _file_case(_entry("m.q.lora_B", data_offsets=[28, 60]), data_change=lambda d: d[:-4])),
    "trailing-bytes.safetensors": ("§1.1 item 3: no trailing bytes", "unexpected trailing bytes",
        _file_case(data_change=lambda d: d + bytes(8))),
    "size-mismatch.safetensors": ("§1.1 item 4: bytes = elements × dtype size",
        "needs 24 bytes", _file_case(_entry("m.q.lora_A", shape=[2, 3]))),
    "too-many-dims.safetensors": ("§1.1 item 4: at most 8 dimensions",
        "shape must be a list", _file_case(_entry("m.q.lora_A", shape=[2, 4] + [1] * 7))),
    "unknown-dtype.safetensors": ("§1.1: dtypes are exactly those of the table",
        "unsupported dtype", _file_case(_entry("m.q.lora_A", dtype="F8_E8M0", shape=[8, 4]))),
    "header-duplicate-member.safetensors": ("§1.1 item 2: no repeated member names",
        "duplicate member", _file_case(lambda h: json.dumps(h, separators=(",", ":"))[:-1]
                                       + ',"m.q.lora_A":' + json.dumps(h["m.q.lora_A"]) + "}")),
    "metadata-not-strings.safetensors": ("§1.1 item 2: __metadata__ maps strings to strings",
        "must map strings to strings",
        _file_case(lambda h: {**h, "__metadata__": {**h["__metadata__"], "x": 1}})),
    "no-manifest.safetensors": ("§1: a single file holds the manifest under 'loraformat'",
        "no 'loraformat' key", _file_case(lambda h: {k: v for k, v in h.items()
                                                     if k != "__metadata__"})),
    # the manifest (§2)
    "manifest-bom": ("§2: no byte order mark", "byte order mark",
        _manifest_case(lambda m: None, text=lambda m: "\ufeff" + dumps(m))),
    "manifest-nan": ("§2: NaN/Infinity are not JSON", "not valid JSON",
        _manifest_case(lambda m: None, text=_text_with('"alpha": 4', '"alpha": NaN'))),
    "manifest-duplicate-member": ("§2: no repeated member names", "duplicate member",
        _manifest_case(lambda m: None, text=_text_with('"alpha": 4', '"alpha": 4, "alpha": 5'))),
    "format-wrong": ("§2: format is 'loraformat'", "not a loraformat manifest",
        _manifest_case(_set("format", "lora"))),
    "version-leading-zero": ("§8: MAJOR.MINOR without leading zeros",
        "'1.01' is not 'MAJOR.MINOR'", _manifest_case(_set("format_version", "1.01"))),
    "version-trailing-newline": ("§2: patterns match whole strings",
        "is not 'MAJOR.MINOR'", _manifest_case(_set("format_version", "1.0\n"))),
    "version-newer-major": ("§8: another major version is refused",
        "newer major version", _manifest_case(_set("format_version", "2.0"))),
    "missing-checksum": ("§2: required members", "'tensors_sha256' is a required property",
        _manifest_case(_del("tensors_sha256"))),
    "unknown-member": ("§8: a 1.0 manifest has only the members of 1.0 and x- members",
        "unknown member 'quantization'", _manifest_case(_set("quantization", "int4"))),
    "path-slash": ("§3: path grammar", "does not match",
        _manifest_case(lambda m: m.update(layers={"m/q": m["layers"]["m.q"]}))),
    "path-trailing-newline": ("§2, §3: patterns match whole strings", "does not match",
        _manifest_case(lambda m: m.update(layers={"m.q\n": m["layers"]["m.q"]}))),
    "replacement-trailing-newline": ("§2, §3: patterns match whole strings", "does not match",
        _manifest_case(_set("replacements", ["head.weight\n"]),
                       lambda t: t.update({"head.weight\n.replacement": np.ones(2, np.float32)}))),
    "rank-not-integer-token": ("§2: integers are integer tokens",
        "is not of type 'integer'", _manifest_case(_set("rank", 2.0))),
    "rank-zero": ("§2: rank 1–65536", "less than the minimum", _manifest_case(_set("rank", 0))),
    "features-over-limit": ("§2: in_features ≤ 16,777,216", "greater than the maximum",
        _manifest_case(_layer_entry(in_features=16_777_217))),
    "no-rank": ("§2: a layer's rank or the default rank", "no rank given",
        _manifest_case(_del("rank"))),
    "alpha-overflow": ("§2: alpha is finite", "alpha must be a finite number",
        _manifest_case(lambda m: None, text=_text_with('"alpha": 4', '"alpha": 1e400'))),
    "scaling-unknown": ("§2, §4.1: scaling rules", "is not one of",
        _manifest_case(_set("scaling", "alpha/r^2"))),
    "newer-minor-unknown-scaling": ("§8: an unknown value of a known member, even in a newer "
        "minor version", "is not one of",
        _manifest_case(lambda m: m.update(format_version="1.9", scaling="alpha/r^2"))),
    "fingerprint-malformed": ("§2: fingerprint pattern", "does not match",
        _manifest_case(_set("base_model/fingerprint", "lfp1:" + "A" * 64))),
    # layer rules (§3, §4, §5, §9)
    "out-rows-overlap": ("§5: out_rows ascending, non-overlapping", "ranges must be ascending",
        _manifest_case(_layer_entry(out_features=6, out_rows=[[0, 3], [2, 3]]))),
    "dora-with-out-rows": ("§4.5: no dora with out_rows", "dora cannot be combined with out_rows",
        _manifest_case(_layer_entry(dora=True, out_features=8, out_rows=[[0, 4]]),
                       lambda t: t.update({"m.q.magnitude": np.ones(8, np.float32)}))),
    "embedding-with-lora-bias": ("§4.3: embedding without dora/lora_bias/out_rows",
        "an embedding layer cannot have",
        _manifest_case(_layer_entry(kind="embedding", lora_bias=True),
                       lambda t: t.update({"m.q.lora_bias": np.ones(4, np.float32)}))),
    "replacement-of-adapted-weight": ("§4.6: a tensor is replaced or adapted",
        "is the weight of adapted layer",
        _manifest_case(_set("replacements", ["m.q.weight"]),
                       lambda t: t.update({"m.q.weight.replacement": np.ones(2, np.float32)}))),
    "replacement-of-lora-bias-bias": ("§4.6: nor the bias of a layer with lora_bias",
        "is the bias of layer",
        _manifest_case(lambda m: (m.update(replacements=["m.q.bias"]),
                                  m["layers"]["m.q"].update(lora_bias=True)),
                       lambda t: t.update({"m.q.bias.replacement": np.ones(4, np.float32),
                                           "m.q.lora_bias": np.ones(4, np.float32)}))),
    "rank-over-1.0-rule": ("§9: in 1.0, rank ≤ min(in_features, b_rows)", "format 1.0; 1.1 allows",
        _fused(3, 2, "1.0")),
    "rank-over-1.1-rule": ("§9: in 1.1, rank ≤ min(k·in_features, b_rows)",
        "exceeds min(parts × in_features, rows) = 4", _fused(5, 3, "1.1")),
    "rank-over-rows": ("§9: rank ≤ min(in_features, b_rows)", "exceeds the layer's smaller",
        _manifest_case(_layer_entry(rank=3, out_features=2),
                       lambda t: t.update({"m.q.lora_A": np.ones((3, 4), np.float32),
                                           "m.q.lora_B": np.ones((2, 3), np.float32)}))),
    # the tensor set (§3), checksum (§7), values (§9)
    "tensor-missing": ("§3: every implied key is present", "missing",
        _manifest_case(lambda m: None, lambda t: t.pop("m.q.lora_B"))),
    "tensor-undeclared": ("§3: no key the manifest does not imply", "not declared by the manifest",
        _manifest_case(lambda m: None, lambda t: t.update({"m.k.lora_A": np.ones((2, 4),
                                                                                 np.float32)}))),
    "tensor-undeclared-role-same-minor": ("§3, §8: unknown roles are ignored only in a newer minor "
        "version", "not declared by the manifest",
        _manifest_case(_set("format_version", "1.1"),
                       lambda t: t.update({"m.q.future_role": np.ones(4, np.float32)}))),
    "tensor-shape": ("§3: A is [r, in_features]", "does not match the manifest",
        _manifest_case(_layer_entry(in_features=5))),
    "tensor-integer-dtype": ("§1.1, §3: adapter tensors are F16/BF16/F32/F64", "dtype I32 is not",
        _manifest_case(lambda m: None,
                       lambda t: t.update({"m.q.lora_A": np.ones((2, 4), np.int32)}))),
    "checksum-mismatch": ("§7: the checksum matches", "data does not match the manifest's checksum",
        _manifest_case(_set("tensors_sha256", "0" * 64))),
    "nonfinite-values": ("§9: validators report NaN/Inf", "non-finite value",
        _manifest_case(lambda m: None, lambda t: t.update({"m.q.lora_A": _NAN}))),
    # format 1.2: expert layers (§4.7) and the answers to 1.1's open questions (§12.1)
    "experts-in-1.1": ("§8 step 3: 'experts' is a member of 1.2; a 1.1 file may not have it",
        "'experts' needs format_version 1.2",
        _experts(lambda m: m.update(format_version="1.1"))),
    "experts-with-dora": ("§4.7: no dora with experts", "an expert layer cannot have",
        _experts(lambda m: m["layers"]["m.q"].update(dora=True),
                 lambda t: t.update({"m.q.magnitude": np.ones(4, np.float32)}))),
    "experts-with-lora-bias": ("§4.7: no lora_bias with experts", "an expert layer cannot have",
        _experts(lambda m: m["layers"]["m.q"].update(lora_bias=True),
                 lambda t: t.update({"m.q.lora_bias": np.ones(4, np.float32)}))),
    "experts-embedding": ("§4.7: no kind embedding with experts", "an expert layer cannot have",
        _experts(lambda m: m["layers"]["m.q"].update(kind="embedding"))),
    "experts-tensor-2d": ("§3, §4.7: A is [E, r, in] with experts", "does not match the manifest",
        _experts(tensors_change=lambda t: t.update({"m.q.lora_A": np.ones((2, 4), np.float32)}))),
    "experts-count-mismatch": ("§3, §4.7: the first axis is E", "does not match the manifest",
        _experts(lambda m: m["layers"]["m.q"].update(experts=3))),
    "experts-zero": ("§2: experts 1–65,536", "less than the minimum",
        _experts(lambda m: m["layers"]["m.q"].update(experts=0))),
    "experts-not-integer-token": ("§2: integers are integer tokens", "is not of type 'integer'",
        _experts(lambda m: m["layers"]["m.q"].update(experts=2.0))),
    "experts-rank-rule": ("§9: the rank rule applies per expert", "exceeds min(parts",
        _experts(lambda m: m.update(rank=5), rank=5)),
    "replacement-of-expert-layer": ("§4.6, §4.7: an expert layer's stacked weight is adapted, "
        "not replaced", "is the stacked weight of expert layer",
        _experts(lambda m: m.update(replacements=["m.q"]),
                 lambda t: t.update({"m.q.replacement": np.ones((2, 4, 4), np.float32)}))),
    "dir-metadata-not-strings": ("§1.1 item 2: __metadata__ maps strings to strings in every "
        "file, a directory's adapter.safetensors too", "must map strings to strings",
        _dir_metadata({"x": 1})),
    "header-shape-not-integer-token.safetensors": ("§1.1 item 2, §2: shape and data_offsets "
        "are integer tokens", "shape must be a list",
        _header_text('"shape":[2,4]', '"shape":[2.0,4]')),
    "header-lone-surrogate.safetensors": ("§1.1 item 2, §2: no lone surrogate escapes in a header",
        "lone surrogate", _header_text('"__metadata__":{', '"__metadata__":{"x\\ud800":"y",')),
    "replacement-integer-dtype": ("§1.1: replacements are F16/BF16/F32/F64 too", "dtype I64 is not",
        _manifest_case(_set("replacements", ["position_ids"]),
                       lambda t: t.update({"position_ids.replacement": np.arange(4)}))),
    "newer-minor-empty-role": ("§3, §8 step 4: an ignored role is a non-empty segment",
        "not declared by the manifest",
        _manifest_case(_set("format_version", "1.9"),
                       lambda t: t.update({"m.q.": np.ones(4, np.float32)}))),
    "newer-minor-role-on-replacement": ("§8 step 4: only declared layers carry ignored roles",
        "not declared by the manifest",
        _manifest_case(lambda m: m.update(format_version="1.9", replacements=["head.weight"]),
                       lambda t: t.update({"head.weight.replacement": np.ones(2, np.float32),
                                           "head.weight.future_role": np.ones(2, np.float32)}))),
    "newer-minor-known-role-as-future": ("§8 step 4: 'replacement' on a layer is a §3 role, not "
        "a future one", "not declared by the manifest",
        _manifest_case(_set("format_version", "1.9"),
                       lambda t: t.update({"m.q.replacement": np.ones(2, np.float32)}))),
    "embedding-with-full-out-rows": ("§2, §4.3: out_rows present is out_rows, whatever it covers",
        "an embedding layer cannot have",
        _manifest_case(_layer_entry(kind="embedding", out_rows=[[0, 4]]))),
    "dora-false-is-absent": ("§2: dora false means no magnitude tensor",
        "not declared by the manifest",
        _manifest_case(_layer_entry(dora=False),
                       lambda t: t.update({"m.q.magnitude": np.ones(4, np.float32)}))),
    "alpha-integer-overflow": ("§2: an integer token beyond binary64's range is not finite",
        "alpha must be a finite number",
        _manifest_case(lambda m: None, text=_text_with('"alpha": 4', '"alpha": 1' + "0" * 400))),
    "embedded-manifest-bom.safetensors": ("§2: no byte order mark in an embedded manifest either",
        "byte order mark", _embedded_text(lambda m: "\ufeff" + dumps(m, compact=True))),
    "manifest-lone-surrogate": ("§2: no lone surrogate escapes (provenance included)",
        "lone surrogate", _manifest_case(lambda m: None, text=lambda m: dumps(
            {**m, "provenance": {"note": "@"}}).replace("@", "\\udc00"))),
    "manifest-too-deep": ("§2, §9: nesting ≤ 64 levels (provenance included)", "nested too deeply",
        _manifest_case(lambda m: None, text=lambda m: dumps(
            {**m, "provenance": {"deep": "@"}}).replace('"@"', "[" * 63 + "]" * 63))),
    "manifest-long-number": ("§2, §9: number tokens ≤ 4,096 characters (provenance included)",
        "longer than 4096 characters",
        _manifest_case(lambda m: None, text=lambda m: dumps(
            {**m, "provenance": {"n": "@"}}).replace('"@"', "1" * 4097))),
    "version-major-zero": ("§8 step 2: major version 0 is refused",
        "is not a version this reader knows", _manifest_case(_set("format_version", "0.9"))),
}

#: §9: invalid vectors a validator refuses but a reader may open (the rest: every reader, on open)
VALIDATE_LEVEL = {"checksum-mismatch", "nonfinite-values"}


def invalid(out: Path) -> None:
    folder = out / "invalid"
    folder.mkdir(exist_ok=True)
    for name, (section, refusal, build) in INVALID.items():
        build(folder / name)
        stem = name.removesuffix(".safetensors")
        level = "validate" if stem in VALIDATE_LEVEL else "open"
        note = {"rule": section, "refusal": refusal, "level": level}
        (folder / f"{stem}.expected.json").write_text(
            json.dumps(note, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def expected_delta(adapter: Adapter, path: str) -> np.ndarray:
    """ΔW in float64, straight from the spec (not via Adapter.delta): [out, in], or for an expert
    layer [E, out, in], expert by expert (§4.7)."""
    spec = adapter.specs[path]
    layer = adapter.layer(path)
    if adapter.scaling == "alpha/r":
        scale = spec.alpha / spec.rank
    else:
        scale = spec.alpha / math.sqrt(spec.rank)
    a = layer.A.astype(np.float64)
    b = layer.B.astype(np.float64)
    rows = layer.rows()
    if spec.experts is None:
        full = np.zeros((spec.out_features, spec.in_features))
        full[rows] = scale * (b @ a)
        return full
    full = np.zeros((spec.experts, spec.out_features, spec.in_features))
    for e in range(spec.experts):
        full[e, rows] = scale * (b[e] @ a[e])
    return full


#: every valid vector: a directory, or a single file ending in .safetensors
VALID = ("basic", "rslora.safetensors", "fused", "embedding.safetensors", "dora", "fused-wide",
         "lora-bias-fused", "wide-dtypes", "newer-minor.safetensors", "header-extras.safetensors",
         "experts", "experts-rslora.safetensors", "explicit-defaults", "fused-all-parts",
         "zero-size.safetensors", "empty.safetensors", "higher-version.safetensors")


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    expected = out / "expected"
    expected.mkdir(exist_ok=True)
    basic(out)
    rslora(out)
    loralib = fused(out)
    write_safetensors(expected / "fused.loralib.safetensors", loralib)
    embedding(out)
    weight, dora_path = dora(out)
    fused_wide(out)
    lora_bias_fused(out)
    wide_dtypes(out)
    newer_minor(out)
    header_extras(out)
    experts(out)
    experts_rslora(out)
    explicit_defaults(out)
    fused_all_parts(out)
    zero_size(out)
    empty(out)
    higher_version(out)
    invalid(out)
    for name in VALID:
        stem = name.removesuffix(".safetensors")
        with load(out / name) as adapter:
            for path in adapter.layer_paths:
                np.save(expected / f"{stem}.{path}.npy", expected_delta(adapter, path))
            for p in adapter.layer_paths:
                if adapter.specs[p].lora_bias:
                    bias = adapter.scale(p) * adapter.layer(p).lora_bias.astype(np.float64)
                    np.save(expected / f"{stem}.{p}.bias.npy", bias)
            for n in adapter.replacement_names:
                np.save(expected / f"{stem}.{n}.replacement.npy",
                        np.asarray(adapter.replacement(n), dtype=np.float64))
            if stem == "dora":
                mag = adapter.layer(dora_path).magnitude.astype(np.float64)
                v = weight.astype(np.float64) + expected_delta(adapter, dora_path)
                merged = (mag / np.linalg.norm(v, axis=1))[:, None] * v
                np.save(expected / f"dora.{dora_path}.merged.npy", merged)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    if not args.check:
        for item in VECTORS.iterdir() if VECTORS.exists() else []:
            if item.name != "README.md":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        generate(VECTORS)
        print(f"wrote {VECTORS}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        cmp = filecmp.dircmp(tmp, VECTORS, ignore=["README.md"])
        differ = _diffs(cmp)
        print("\n".join(differ) if differ else "vectors up to date")
        return 1 if differ else 0


def _diffs(cmp: filecmp.dircmp, prefix: str = "") -> list[str]:
    out = [f"{prefix}{n}: only in one tree" for n in cmp.left_only + cmp.right_only]
    _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
    out += [f"{prefix}{n}: differs" for n in mismatch + errors]
    for name, sub in cmp.subdirs.items():
        out += _diffs(sub, f"{prefix}{name}/")
    return out


if __name__ == "__main__":
    sys.exit(main())
