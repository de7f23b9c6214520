"""The base fingerprint (spec/FORMAT.md §6): sharding-independent, sample-based, per the spec."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from loraformat.checkpoint import Checkpoint
from loraformat.errors import LoraformatError
from loraformat.format.safetensors_io import write_safetensors

RNG = np.random.default_rng(5)
TENSORS = {
    "model.embed_tokens.weight": RNG.standard_normal((64, 48)).astype(np.float32),  # 12 KiB
    "model.layers.0.self_attn.q_proj.weight": RNG.standard_normal((8, 8)).astype(np.float16),
    "model.norm.weight": np.ones(8, np.float32),
    "lm_head.weight": RNG.standard_normal((64, 8)).astype(np.float32),
    "scalar": np.array(1.5, np.float64),
}


def spec_fingerprint(tensors: dict[str, np.ndarray]) -> str:
    """§6 written out from the spec, independent of loraformat."""
    names = {np.dtype("f4"): "F32", np.dtype("f2"): "F16", np.dtype("f8"): "F64"}
    lines = b""
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        data = tensors[name].tobytes()
        sample = data if len(data) <= 8192 else data[:4096] + data[-4096:]
        shape = ",".join(str(d) for d in tensors[name].shape)
        digest = hashlib.sha256(sample).hexdigest()
        lines += f"{name}\t{names[tensors[name].dtype]}\t{shape}\t{digest}\n".encode()
    return "lfp1:" + hashlib.sha256(lines).hexdigest()


def _single(tmp: Path, tensors: dict[str, np.ndarray]) -> Path:
    tmp.mkdir()
    write_safetensors(tmp / "model.safetensors", tensors)
    return tmp


def _sharded(tmp: Path, tensors: dict[str, np.ndarray]) -> Path:
    tmp.mkdir()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    weight_map = {}
    for shard, members in shards.items():
        write_safetensors(tmp / shard, {n: tensors[n] for n in members})
        weight_map.update(dict.fromkeys(members, shard))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp


def fp(path: Path) -> str:
    with Checkpoint(path) as ckpt:
        return ckpt.fingerprint()


def test_matches_spec_and_is_sharding_independent(tmp_path: Path):
    expected = spec_fingerprint(TENSORS)
    assert fp(_single(tmp_path / "one", TENSORS)) == expected
    assert fp(_sharded(tmp_path / "two", TENSORS)) == expected
    assert fp(tmp_path / "one" / "model.safetensors") == expected


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t["model.norm.weight"].__setitem__(3, 2.0),  # small tensor: every byte counts
        lambda t: t["lm_head.weight"].__setitem__((0, 0), 9.0),  # first bytes of a large one
        lambda t: t["model.embed_tokens.weight"].__setitem__((-1, -1), 9.0),  # its last bytes
        lambda t: t.update({"model.norm.weight": np.ones(8, np.float64)}),  # dtype
        lambda t: t.update({"lm_head.weight": t["lm_head.weight"].reshape(8, 64)}),  # shape
        lambda t: t.update({"extra": np.zeros(1, np.float32)}),  # one more tensor
        lambda t: t.pop("scalar"),
    ],
)
def test_detects_changes(tmp_path: Path, change):
    tensors = {k: v.copy() for k, v in TENSORS.items()}
    change(tensors)
    assert fp(_single(tmp_path / "c", tensors)) != spec_fingerprint(TENSORS)


def test_interior_of_large_tensor_is_not_hashed(tmp_path: Path):
    # The documented trade-off: cheap (≤ 8 KiB per tensor), so the middle of a >8 KiB tensor
    # does not count.
    tensors = {k: v.copy() for k, v in TENSORS.items()}
    tensors["model.embed_tokens.weight"][32, 0] += 1
    assert fp(_single(tmp_path / "c", tensors)) == spec_fingerprint(TENSORS)


@pytest.mark.parametrize(
    ("index", "expect"),
    [
        ("[1, 2]", "not a safetensors index"),
        ('{"weight_map": {"a": 3}}', "not a safetensors index"),
        ('{"weight_map": {"a": "../x.safetensors"}}', "is outside the checkpoint"),
        ("{nope", "not valid JSON"),
    ],
)
def test_bad_index_refused(tmp_path: Path, index: str, expect: str):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(LoraformatError, match=expect) as info:
        Checkpoint(tmp_path)
    assert "model.safetensors.index.json" in str(info.value)
