"""Hostile and broken adapters: every mutation ends in a valid load or one clean line.

Hypothesis mutates manifests (structure and values), safetensors headers (sizes, offsets, dtypes,
shapes) and raw bytes (flips, truncation). For every case, ``load`` either succeeds (and then every
layer can be read) or raises :class:`LoraformatError` with one line naming the file; ``validate``
agrees with ``load`` and reports one-line problems. Any other exception is a bug.

Bounded for CI (derandomized, fixed example counts, ~20 s on 2 cores). Set
``LORAFORMAT_FUZZ_SCALE=10`` to run ten times as many cases. The number of cases tried is reported
as a ``FuzzReport`` warning, which pytest prints in its summary (also under xdist).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import independent_reader as ir
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraformat.errors import LoraformatError
from loraformat.format import manifest as mf
from loraformat.format import safetensors_io
from loraformat.format.adapter import Adapter, LoraLayer, load, validate
from loraformat.format.safetensors_io import SafetensorsFile, write_safetensors
from loraformat.format.summary import summarize

SCALE = int(os.environ.get("LORAFORMAT_FUZZ_SCALE", "1"))


class FuzzReport(UserWarning):
    """Carries the count of fuzz cases tried into pytest's summary."""


def fuzz_settings(n: int):
    return settings(
        max_examples=n * SCALE,
        deadline=None,
        derandomize=SCALE == 1,  # CI: the same cases every run; scaled-up runs explore
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def _layer(rng, rank, in_f, out_f, **kw) -> LoraLayer:
    rows = kw.pop("b_rows", out_f)
    return LoraLayer(
        A=rng.standard_normal((rank, in_f)).astype(np.float32),
        B=rng.standard_normal((rows, rank)).astype(np.float32),
        alpha=kw.pop("alpha", 4),
        in_features=in_f,
        out_features=out_f,
        **kw,
    )


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory) -> Path:
    rng = np.random.default_rng(11)
    layers = {
        "m.q": _layer(rng, 2, 6, 4, lora_bias=np.ones(4, np.float32)),
        "m.v": _layer(rng, 1, 6, 4, alpha=2, magnitude=np.ones(4, np.float32)),
        "m.fused": _layer(rng, 2, 6, 9, b_rows=6, out_rows=[(0, 3), (6, 9)]),
        "m.emb": _layer(rng, 2, 5, 3, kind="embedding"),
        "m.experts.gate_up_proj": LoraLayer(  # format 1.2: an expert layer, fused rows per expert
            A=rng.standard_normal((3, 2, 4)).astype(np.float32),
            B=rng.standard_normal((3, 3, 2)).astype(np.float32),
            alpha=4, in_features=4, out_features=6, out_rows=[(3, 6)], experts=3,
        ),
    }
    out = tmp_path_factory.mktemp("fuzz") / "seed"
    Adapter.from_layers(
        "llama",
        layers,
        replacements={"head.weight": np.ones((2, 3), np.float32)},
        provenance={"tool": "fuzz", "steps": 3},
    ).save(out)
    Adapter.from_layers("llama", layers, scaling="alpha/sqrt(r)").save(
        out.parent / "seed.safetensors"
    )
    return out


# -- the oracle -------------------------------------------------------------------------------


def _clean(message: str, path: Path) -> None:
    assert "\n" not in message, message
    assert str(path) in message, f"message does not name {path}: {message}"


def exercise(path: Path, outcomes: Counter) -> None:
    """Load, use and validate ``path``; fail on anything but success or a clean LoraformatError."""
    try:
        adapter = load(path)
    except LoraformatError as exc:
        _clean(str(exc), path)
        loaded = False
    else:
        loaded = True
        with adapter:
            summarize(adapter, norms=True)
            for layer in adapter.layer_paths:
                spec = adapter.specs[layer]
                if spec.out_features * spec.in_features <= 1_000_000:
                    assert adapter.delta(layer).shape == (
                        *spec.stack, spec.out_features, spec.in_features)
            for name in adapter.replacement_names:
                adapter.replacement(name)
    problems = validate(path)
    for problem in problems:
        _clean(str(problem), path)
    if not loaded:
        assert problems, "load refused what validate accepts"
    _agree_with_independent_reader(path, problems)
    outcomes["valid" if not problems else "loaded" if loaded else "refused"] += 1


def _agree_with_independent_reader(path: Path, problems: list) -> None:
    """tests/independent_reader.py (written from the spec alone) accepts exactly what validate
    accepts, and computes the same ΔW."""
    try:
        manifest, tensors = ir.read(path)
    except ir.Invalid as exc:
        assert problems, f"independent reader refuses what validate accepts: {exc}"
        return
    except (OSError, RecursionError):
        return  # e.g. a dangling path: both refuse, by different routes
    assert not problems, f"validate refuses what the independent reader accepts: {problems}"
    with load(path) as adapter:
        for layer in manifest["layers"]:
            spec = adapter.specs[layer]
            if spec.out_features * spec.in_features <= 100_000:
                np.testing.assert_allclose(adapter.delta(layer, np.float64),
                                           ir.delta(manifest, tensors, layer), rtol=1e-12)


JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(
        [
            "1.0", "1.1", "2.0", "0.9", "1", "alpha/r", "alpha/sqrt(r)", "linear", "embedding",
            "../x", "/etc/passwd", "m.q", "F32", "BF16", "I64", "F8_E4M3", "lfp1:" + "0" * 64,
        ]
    ),
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=8,
)
# Type-preserving replacements reach past the schema into shape, rank and checksum logic.
SIMILAR = {
    int: st.integers(0, 12),
    float: st.floats(-8, 8) | st.integers(-8, 8),
    bool: st.booleans(),
    str: st.sampled_from(["1.0", "1.3", "alpha/r", "alpha/sqrt(r)", "embedding", "linear", "F16",
                          "BF16", "F32", "I32", "m.q", "head.weight", "x"]),
}
KEYS = [
    "format", "format_version", "base_model", "architecture", "fingerprint", "scaling", "rank",
    "alpha", "layers", "replacements", "tensors_sha256", "provenance", "in_features",
    "out_features", "kind", "out_rows", "dora", "lora_bias", "x-ext", "m.q", "m.emb", "dtype",
    "shape", "data_offsets", "__metadata__", "m.q.lora_A", "m.q.lora_B",
]


def mutate(data: st.DataObject, value: object, depth: int = 0) -> object:
    """One random structural or value change somewhere inside a JSON value."""
    containers = isinstance(value, dict | list) and bool(value)
    # Mostly descend: replacing the whole document is one case, not a fifth of them.
    choices = ["descend"] * (12 if depth == 0 else 3) + ["replace", "delete", "add"]
    action = data.draw(
        st.sampled_from(choices)
        if containers and depth < 6
        else st.sampled_from(["replace", "add"] if isinstance(value, dict | list) else ["replace"])
    )
    if action == "replace":
        return data.draw(SIMILAR.get(type(value), JSON) if data.draw(st.booleans()) else JSON)
    if isinstance(value, dict):
        value = dict(value)
        if action == "add":
            value[data.draw(st.sampled_from(KEYS) | st.text(max_size=5))] = data.draw(JSON)
            return value
        key = data.draw(st.sampled_from(sorted(value)))
        if action == "delete":
            del value[key]
        else:
            value[key] = mutate(data, value[key], depth + 1)
        return value
    assert isinstance(value, list)
    value = list(value)
    if action == "add":
        value.insert(data.draw(st.integers(0, len(value))), data.draw(JSON))
        return value
    index = data.draw(st.integers(0, len(value) - 1))
    if action == "delete":
        del value[index]
    else:
        value[index] = mutate(data, value[index], depth + 1)
    return value


def _report(name: str, outcomes: Counter) -> None:
    total = sum(outcomes.values())
    text = f"{name}: {total} cases tried ({dict(sorted(outcomes.items()))})"
    print(text)
    warnings.warn(text, FuzzReport, stacklevel=2)
    assert total > 0


# -- fuzz tests -------------------------------------------------------------------------------


def test_fuzz_manifest(seed_dir: Path):
    outcomes: Counter = Counter()
    agreement: Counter = Counter()
    manifest = json.loads((seed_dir / "adapter.json").read_text())
    work = Path(tempfile.mkdtemp())

    @fuzz_settings(250)
    @given(st.data())
    def case(data):
        target = work / "a"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(seed_dir, target)
        mutated = manifest
        for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]))):
            mutated = mutate(data, mutated)
        text = json.dumps(mutated)  # NaN/Infinity floats become the non-JSON tokens: refused
        (target / "adapter.json").write_text(text)
        exercise(target, outcomes)
        # The fast schema check must agree with jsonschema on every manifest.
        parsed = json.loads(text)
        if isinstance(parsed, dict):
            for lenient in (False, True):
                slow = not mf.jsonschema_problems(parsed, newer_minor=lenient)
                assert mf.conforms(parsed, lenient=lenient) == slow, (lenient, parsed)
                agreement[slow] += 1

    try:
        case()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report("fuzz manifest", outcomes)
    assert agreement[True] > 0 and agreement[False] > 0, agreement  # both answers exercised


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def test_fuzz_safetensors_header(seed_dir: Path):
    outcomes: Counter = Counter()
    sources = {
        "dir": (seed_dir / "adapter.safetensors").read_bytes(),
        "file": (seed_dir.parent / "seed.safetensors").read_bytes(),
    }
    work = Path(tempfile.mkdtemp())

    @fuzz_settings(250)
    @given(st.data(), st.sampled_from(sorted(sources)))
    def case(data, form):
        header, buffer = _split(sources[form])
        for _ in range(data.draw(st.integers(1, 3))):
            header = mutate(data, header)
        encoded = json.dumps(header).encode("utf-8")
        size = len(encoded) + data.draw(st.sampled_from([0, 0, 0, -1, 1, -8, 7, 2**40, 2**64 - 1]))
        size = min(max(size, 0), 2**64 - 1)
        cut = data.draw(st.sampled_from([None, None, 0, 1, 7, -1, -4]))
        if cut is not None:
            buffer = buffer[:cut]  # keep the first `cut` bytes, or drop the last -cut
        blob = struct.pack("<Q", size) + encoded + buffer
        if form == "dir":
            target = work / "a"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(seed_dir, target)
            (target / "adapter.safetensors").write_bytes(blob)
        else:
            target = work / "a.safetensors"
            target.write_bytes(blob)
        exercise(target, outcomes)

    try:
        case()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report("fuzz safetensors header", outcomes)


def test_fuzz_bytes(seed_dir: Path):
    outcomes: Counter = Counter()
    sources = {
        "adapter.safetensors": (seed_dir / "adapter.safetensors").read_bytes(),
        "adapter.json": (seed_dir / "adapter.json").read_bytes(),
        "single": (seed_dir.parent / "seed.safetensors").read_bytes(),
    }
    work = Path(tempfile.mkdtemp())

    @fuzz_settings(300)
    @given(st.data(), st.sampled_from(sorted(sources)))
    def case(data, which):
        blob = bytearray(sources[which])
        position = st.one_of(st.integers(0, 15), st.integers(0, len(blob) - 1))
        for _ in range(data.draw(st.integers(0, 4))):
            blob[data.draw(position)] ^= data.draw(st.integers(1, 255))
        if data.draw(st.booleans()):
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        if which == "single":
            target = work / "a.safetensors"
            target.write_bytes(blob)
        else:
            target = work / "a"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(seed_dir, target)
            (target / which).write_bytes(bytes(blob))
        exercise(target, outcomes)

    try:
        case()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report("fuzz bytes", outcomes)


# -- specific refusals -----------------------------------------------------------------------------


def test_symlinked_tensors_outside_refused(seed_dir: Path, tmp_path: Path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(seed_dir / "adapter.safetensors", outside)
    adapter = tmp_path / "a"
    adapter.mkdir()
    shutil.copy(seed_dir / "adapter.json", adapter / "adapter.json")
    (adapter / "adapter.safetensors").symlink_to(outside)
    link = adapter / "adapter.safetensors"
    message = f"{link}: symbolic link points outside the adapter directory"
    with pytest.raises(LoraformatError) as info:
        load(adapter)
    assert str(info.value) == message
    assert [str(p) for p in validate(adapter)] == [message]
    # A link that stays inside the adapter is fine.
    (adapter / "adapter.safetensors").unlink()
    shutil.copy(outside, adapter / "real.safetensors")
    (adapter / "adapter.safetensors").symlink_to("real.safetensors")
    assert validate(adapter) == []


def test_symlinked_manifest_outside_refused(seed_dir: Path, tmp_path: Path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    shutil.copy(seed_dir / "adapter.safetensors", adapter / "adapter.safetensors")
    (adapter / "adapter.json").symlink_to(seed_dir / "adapter.json")
    with pytest.raises(LoraformatError, match="symbolic link points outside the adapter"):
        load(adapter)


def test_manifest_paths_cannot_leave_the_adapter(seed_dir: Path, tmp_path: Path):
    adapter = Path(shutil.copytree(seed_dir, tmp_path / "a"))
    manifest = json.loads((adapter / "adapter.json").read_text())
    for bad in ("../../etc/passwd", "/etc/passwd", "a/../b", "..", "a\\b"):
        manifest["replacements"] = [bad]
        (adapter / "adapter.json").write_text(json.dumps(manifest))
        problems = [str(p) for p in validate(adapter)]
        assert any("replacements/0" in p and "does not match" in p for p in problems), problems


def _raw_file(path: Path, header: object, data: bytes = b"", size: int | None = None) -> Path:
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(encoded) if size is None else size) + encoded + data)
    return path


def test_absurd_header_size_refused(tmp_path: Path):
    bad = _raw_file(tmp_path / "a.safetensors", {}, size=2**63)
    with pytest.raises(LoraformatError) as info:
        SafetensorsFile(bad)
    assert str(info.value) == (
        f"{bad}: safetensors header size {2**63} exceeds the 104857600-byte limit"
    )


def test_too_many_tensors_refused(tmp_path: Path, monkeypatch):
    assert safetensors_io.MAX_TENSORS == 1_000_000
    monkeypatch.setattr(safetensors_io, "MAX_TENSORS", 10)
    write_safetensors(tmp_path / "a.safetensors", {f"t{i}": np.zeros(1, "f4") for i in range(11)})
    with pytest.raises(LoraformatError, match="11 tensors exceed the 10-tensor limit"):
        SafetensorsFile(tmp_path / "a.safetensors")


def test_shape_and_byte_size_disagree(tmp_path: Path):
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    bad = _raw_file(tmp_path / "a.safetensors", header, b"\0" * 20)
    with pytest.raises(LoraformatError) as info:
        SafetensorsFile(bad)
    assert str(info.value) == (
        f"{bad}: tensor 'w': shape [2, 3] of F32 needs 24 bytes, data_offsets give 20"
    )


@pytest.mark.parametrize(
    ("header", "data", "expect"),
    [
        ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, 4, "unsupported dtype"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "leaves a hole"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            8,
            "overlaps another tensor",
        ),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 6, "2 unexpected trailing"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, "non-negative"),
        ({"w": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, 4, "non-negative"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, 4, "begin <= end"),
        ({"__metadata__": {"k": 1}}, 0, "__metadata__ must map strings to strings"),
        (b"[" * 100_000, 0, "nested too deeply"),
        (b'{"w": NaN}', 0, "not valid UTF-8 JSON"),
        (
            b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            4,
            "duplicate member 'w'",
        ),
        (b"\xff\xfe", 0, "not valid UTF-8 JSON"),
        ([1, 2], 0, "not a JSON object"),
    ],
)
def test_malformed_header_refused(tmp_path: Path, header, data: int, expect: str):
    bad = _raw_file(tmp_path / "a.safetensors", header, b"\0" * data)
    with pytest.raises(LoraformatError) as info:
        SafetensorsFile(bad)
    assert expect in str(info.value) and str(info.value).startswith(f"{bad}: ")
    assert "\n" not in str(info.value)


def test_nan_inf_reported_by_validate(tmp_path: Path):
    rng = np.random.default_rng(3)
    layer = _layer(rng, 2, 6, 4)
    layer.A[0, 1] = np.nan
    layer.B[2, 0] = -np.inf
    Adapter.from_layers("llama", {"m.q": layer}).save(tmp_path / "a.safetensors")
    assert [str(p) for p in validate(tmp_path / "a.safetensors")] == [
        f"{tmp_path / 'a.safetensors'}: tensor 'm.q.lora_A': 1 non-finite value(s) (NaN/Inf)",
        f"{tmp_path / 'a.safetensors'}: tensor 'm.q.lora_B': 1 non-finite value(s) (NaN/Inf)",
    ]


def test_rank_larger_than_layer_refused(tmp_path: Path):
    rng = np.random.default_rng(4)
    Adapter.from_layers("llama", {"m.q": _layer(rng, 5, 6, 4)}).save(tmp_path / "a")
    with pytest.raises(LoraformatError, match="rank 5 exceeds the layer's smaller dimension 4"):
        load(tmp_path / "a")


def test_duplicate_manifest_member_refused(seed_dir: Path, tmp_path: Path):
    adapter = Path(shutil.copytree(seed_dir, tmp_path / "a"))
    text = (adapter / "adapter.json").read_text()
    (adapter / "adapter.json").write_text(text.replace('"alpha": 4,', '"alpha": 4, "alpha": 400,'))
    with pytest.raises(LoraformatError) as info:
        load(adapter)
    assert str(info.value) == (
        f"{adapter / 'adapter.json'}: manifest is not valid JSON (duplicate member 'alpha')"
    )
