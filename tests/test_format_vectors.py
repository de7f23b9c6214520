"""spec/vectors: an independent reader (json + safetensors + numpy only) reproduces the expected
ΔW, checksum and fingerprint of every vector, and loraformat reads the vectors identically.

The reader below is written from spec/FORMAT.md alone; it must not import loraformat.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import deserialize, safe_open

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
EXPECTED = VECTORS / "expected"
NAMES = ["basic", "rslora.safetensors", "fused", "embedding.safetensors", "dora"]

_NP = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


# -- the independent reader -------------------------------------------------------------------


def _array(dtype: str, shape: list[int], data: bytes) -> np.ndarray:
    if dtype == "BF16":  # the top 16 bits of an IEEE float32
        bits = np.frombuffer(bytes(data), dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64).reshape(shape)
    return np.frombuffer(bytes(data), dtype=_NP[dtype]).astype(np.float64).reshape(shape)


def read(path: Path) -> tuple[dict, dict[str, tuple[str, list[int], bytes]]]:
    """(manifest, name → (dtype, shape, raw bytes)) per spec/FORMAT.md §On-disk forms."""
    if path.is_dir():
        manifest = json.loads((path / "adapter.json").read_text(encoding="utf-8"))
        file = path / "adapter.safetensors"
    else:
        with safe_open(str(path), framework="numpy") as f:
            manifest = json.loads(f.metadata()["loraformat"])
        file = path
    tensors = {
        name: (info["dtype"], info["shape"], bytes(info["data"]))
        for name, info in deserialize(file.read_bytes())
    }
    return manifest, tensors


def delta(manifest: dict, tensors: dict, layer: str) -> np.ndarray:
    entry = manifest["layers"][layer]
    rank = entry.get("rank", manifest.get("rank"))
    alpha = entry.get("alpha", manifest.get("alpha"))
    scale = alpha / rank if manifest["scaling"] == "alpha/r" else alpha / math.sqrt(rank)
    a = _array(*tensors[layer + ".lora_A"])
    b = _array(*tensors[layer + ".lora_B"])
    full = np.zeros((entry["out_features"], entry["in_features"]))
    ranges = entry.get("out_rows", [[0, entry["out_features"]]])
    rows = [i for lo, hi in ranges for i in range(lo, hi)]
    full[rows] = scale * (b @ a)
    return full


def checksum(tensors: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        dtype, shape, data = tensors[name]
        digest.update(name.encode("utf-8") + b"\0" + dtype.encode("ascii") + b"\0")
        digest.update(",".join(map(str, shape)).encode("ascii") + b"\0")
        digest.update(struct.pack("<Q", len(data)) + data)
    return digest.hexdigest()


def fingerprint(files: list[Path]) -> str:
    lines = []
    for file in files:
        for name, info in deserialize(file.read_bytes()):
            data = bytes(info["data"])
            sample = data if len(data) <= 8192 else data[:4096] + data[-4096:]
            shape = ",".join(map(str, info["shape"]))
            lines.append((name, f"{name}\t{info['dtype']}\t{shape}\t"
                          f"{hashlib.sha256(sample).hexdigest()}\n"))
    lines.sort(key=lambda item: item[0].encode("utf-8"))
    return "lfp1:" + hashlib.sha256("".join(l for _, l in lines).encode("utf-8")).hexdigest()


# -- tests ----------------------------------------------------------------------------------------


def test_reader_is_independent():
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r});"
        "import test_format_vectors as t, pathlib;"
        f"m, ts = t.read(pathlib.Path({str(VECTORS / 'basic')!r}));"
        "assert 'loraformat' not in sys.modules, 'independent reader imported loraformat'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", NAMES)
def test_independent_reader_reproduces_expected(name: str):
    manifest, tensors = read(VECTORS / name)
    assert manifest["format"] == "loraformat" and manifest["format_version"] == "1.0"
    assert checksum(tensors) == manifest["tensors_sha256"]
    stem = name.removesuffix(".safetensors")
    assert manifest["layers"]
    for layer in manifest["layers"]:
        expected = np.load(EXPECTED / f"{stem}.{layer}.npy")
        np.testing.assert_allclose(delta(manifest, tensors, layer), expected, rtol=1e-6, atol=1e-9)


def test_expected_deltas_are_not_trivial():
    # A vector whose ΔW were all zero would pass any reader.
    for file in EXPECTED.glob("*.npy"):
        assert np.abs(np.load(file)).max() > 0.1, file


def test_bias_and_rows_of_basic_and_fused():
    manifest, tensors = read(VECTORS / "basic")
    layer = "model.layers.0.self_attn.v_proj"
    assert manifest["layers"][layer]["rank"] == 2  # the override
    bias = (manifest["alpha"] / 2) * _array(*tensors[layer + ".lora_bias"])
    np.testing.assert_allclose(bias, np.load(EXPECTED / f"basic.{layer}.bias.npy"))
    manifest, tensors = read(VECTORS / "fused")
    d = delta(manifest, tensors, "transformer.h.0.attn.c_attn")
    assert np.all(d[8:16] == 0) and np.abs(d[:8]).max() > 0 and np.abs(d[16:]).max() > 0


def test_fused_matches_loralib_merged_linear():
    """loralib MergedLinear(enable_lora=[T,F,T], r=2, lora_alpha=4): group g's update B_g·A_g,
    zero-padded into the enabled rows, times lora_alpha/r."""
    lora = {n: _array(*v) for n, v in read_raw(EXPECTED / "fused.loralib.safetensors").items()}
    r, part, k = 2, 8, 2
    update = np.zeros((3 * part, 8))
    enabled = [0, 2]
    for g in range(k):
        bg = lora["lora_B"][g * part : (g + 1) * part]
        ag = lora["lora_A"][g * r : (g + 1) * r]
        update[enabled[g] * part : (enabled[g] + 1) * part] = bg @ ag
    manifest, tensors = read(VECTORS / "fused")
    np.testing.assert_allclose(
        delta(manifest, tensors, "transformer.h.0.attn.c_attn"), (4 / r) * update, rtol=1e-6
    )


def read_raw(file: Path) -> dict[str, tuple[str, list[int], bytes]]:
    items = deserialize(file.read_bytes())
    return {n: (i["dtype"], i["shape"], bytes(i["data"])) for n, i in items}


def test_dora_merge_and_fingerprint():
    manifest, tensors = read(VECTORS / "dora")
    base = VECTORS / "dora.base.safetensors"
    assert fingerprint([base]) == manifest["base_model"]["fingerprint"]
    layer = "model.layers.0.self_attn.q_proj"
    weight = _array(*read_raw(base)[layer + ".weight"])
    v = weight + delta(manifest, tensors, layer)
    m = _array(*tensors[layer + ".magnitude"])
    merged = (m / np.linalg.norm(v, axis=1))[:, None] * v
    np.testing.assert_allclose(merged, np.load(EXPECTED / f"dora.{layer}.merged.npy"), rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_loraformat_reads_vectors_identically(name: str):
    from loraformat.format.adapter import load, validate

    assert validate(VECTORS / name) == []
    manifest, tensors = read(VECTORS / name)
    with load(VECTORS / name) as adapter:
        assert adapter.manifest == manifest
        assert set(adapter.tensors) == set(tensors)
        for key, (dtype, shape, data) in tensors.items():
            assert adapter.tensors.dtype(key) == dtype
            assert list(adapter.tensors.shape(key)) == shape
            assert bytes(adapter.tensors.raw(key)) == data
        for layer in manifest["layers"]:
            np.testing.assert_allclose(
                adapter.delta(layer, np.float64), delta(manifest, tensors, layer), rtol=1e-12
            )


def test_loraformat_fingerprint_matches_independent():
    from loraformat.checkpoint import Checkpoint

    base = VECTORS / "dora.base.safetensors"
    with Checkpoint(base) as ckpt:
        assert ckpt.fingerprint() == fingerprint([base])


def test_vectors_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_vectors.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
