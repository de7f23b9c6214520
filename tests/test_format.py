"""The v1 format: round trips of both forms, safetensors parity, schema and validation errors,
forward compatibility, lazy loading, atomic writes."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from safetensors import deserialize, safe_open

from loraformat.atomic import TMP_MARKER, atomic_dir, atomic_file
from loraformat.errors import LoraformatError, ValidationError
from loraformat.format import manifest as mf
from loraformat.format.adapter import Adapter, LoraLayer, load, repack, validate
from loraformat.format.safetensors_io import SafetensorsFile, write_safetensors

RNG = np.random.default_rng(0)


def _layer(rank=2, in_f=8, out_f=6, alpha=4.0, dtype=np.float32, **kw) -> LoraLayer:
    rows = kw.pop("b_rows", out_f)
    return LoraLayer(
        A=RNG.standard_normal((rank, in_f)).astype(dtype),
        B=RNG.standard_normal((rows, rank)).astype(dtype),
        alpha=alpha,
        in_features=in_f,
        out_features=out_f,
        **kw,
    )


def make_adapter(**kw) -> Adapter:
    layers = {
        "m.l0.q": _layer(),
        "m.l0.v": _layer(rank=3, alpha=2.0, lora_bias=RNG.standard_normal(6).astype(np.float32)),
        "m.l1.q": _layer(dtype=ml_dtypes.bfloat16),
        "m.l1.fused": _layer(rank=2, in_f=8, out_f=12, b_rows=8, out_rows=[(0, 4), (8, 12)]),
        "m.emb": _layer(rank=2, in_f=10, out_f=4, kind="embedding"),
        "m.l2.d": _layer(magnitude=np.abs(RNG.standard_normal(6)).astype(np.float16) + 1),
    }
    return Adapter.from_layers(
        "llama",
        layers,
        replacements={"head.weight": RNG.standard_normal((3, 4)).astype(np.float32)},
        provenance={"tool": "test"},
        **kw,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved") / "adapter"
    make_adapter().save(out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _params(cases: list[tuple]) -> list:
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


def _rewrite_manifest(adapter_dir: Path, change) -> None:
    path = adapter_dir / "adapter.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


# -- round trips ---------------------------------------------------------------------------------


def _tensors(path: Path) -> dict[str, tuple]:
    file = path / "adapter.safetensors" if path.is_dir() else path
    items = deserialize(file.read_bytes())
    return {n: (i["dtype"], i["shape"], bytes(i["data"])) for n, i in items}


def test_dir_file_dir_is_bit_exact(saved: Path, tmp_path: Path):
    single = repack(saved, tmp_path / "a.safetensors")
    back = repack(single, tmp_path / "back")
    assert (back / "adapter.json").read_bytes() == (saved / "adapter.json").read_bytes()
    for name in ("adapter.json", "adapter.safetensors"):
        assert (back / name).read_bytes() == (saved / name).read_bytes()
    assert _tensors(single) == _tensors(saved)
    with safe_open(str(single), "numpy") as f:
        assert json.loads(f.metadata()["loraformat"]) == json.loads(
            (saved / "adapter.json").read_text()
        )


def test_save_of_load_is_byte_identical(saved: Path, tmp_path: Path):
    with load(saved) as adapter:
        adapter.save(tmp_path / "again")
        adapter.save(tmp_path / "again.safetensors")
    for name in ("adapter.json", "adapter.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (saved / name).read_bytes()
    with load(tmp_path / "again.safetensors") as adapter:
        adapter.save(tmp_path / "again2.safetensors")
    assert (tmp_path / "again2.safetensors").read_bytes() == (
        tmp_path / "again.safetensors"
    ).read_bytes()


def test_loaded_adapter_has_the_built_content(saved: Path):
    with load(saved) as adapter:
        assert validate(saved) == []
        m = adapter.manifest
        assert m["rank"] == 2 and m["alpha"] == 4 and m["layers"]["m.l0.v"]["rank"] == 3
        assert m["layers"]["m.l0.v"]["alpha"] == 2 and m["layers"]["m.emb"]["kind"] == "embedding"
        assert m["layers"]["m.l1.fused"]["out_rows"] == [[0, 4], [8, 12]]
        assert adapter.tensors.dtype("m.l1.q.lora_A") == "BF16"
        assert adapter.tensors.dtype("m.l2.d.magnitude") == "F16"
        assert adapter.replacement("head.weight").shape == (3, 4)


def test_delta_against_numpy(saved: Path):
    with load(saved) as adapter:
        for path in adapter.layer_paths:
            layer = adapter.layer(path)
            spec = adapter.specs[path]
            expected = np.zeros((spec.out_features, spec.in_features))
            rows = layer.rows()
            expected[rows] = (spec.alpha / spec.rank) * (
                layer.B.astype(np.float64) @ layer.A.astype(np.float64)
            )
            np.testing.assert_allclose(adapter.delta(path, np.float64), expected, rtol=1e-12)
            assert adapter.delta_norm(path) == pytest.approx(np.linalg.norm(expected), rel=1e-9)
        fused = adapter.delta("m.l1.fused")
        assert np.all(fused[4:8] == 0) and np.abs(fused[:4]).sum() > 0


def test_rslora_scale(tmp_path: Path):
    adapter = Adapter.from_layers("x", {"a": _layer(rank=4, alpha=8.0)}, scaling="alpha/sqrt(r)")
    assert adapter.scale("a") == pytest.approx(4.0)
    layer = adapter.layer("a")
    np.testing.assert_allclose(adapter.delta("a", np.float64), 4.0 * (layer.B @ layer.A), rtol=1e-6)


# -- safetensors parity --------------------------------------------------------------------------


def _arrays() -> dict[str, np.ndarray]:
    return {
        "f32": RNG.standard_normal((3, 5)).astype(np.float32),
        "f16": RNG.standard_normal((7,)).astype(np.float16),
        "f64": RNG.standard_normal((2, 2, 2)).astype(np.float64),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(5, dtype=np.uint8),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar": np.array(3.5, dtype=np.float32),
    }


def test_our_writer_read_by_safetensors(tmp_path: Path):
    arrays = _arrays()
    bf16 = RNG.standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    write_safetensors(tmp_path / "ours.safetensors", {**arrays, "bf16": bf16}, {"k": "v"})
    items = dict(deserialize((tmp_path / "ours.safetensors").read_bytes()))
    for name, array in arrays.items():
        assert items[name]["shape"] == list(array.shape)
        assert bytes(items[name]["data"]) == array.tobytes()
    assert items["bf16"]["dtype"] == "BF16"
    assert bytes(items["bf16"]["data"]) == bf16.tobytes()
    with safe_open(str(tmp_path / "ours.safetensors"), "numpy") as f:
        assert f.metadata() == {"k": "v"}
        for name, array in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(name), array)


def test_safetensors_writer_read_by_ours(tmp_path: Path):
    arrays = _arrays()
    safetensors.numpy.save_file(arrays, tmp_path / "theirs.safetensors", metadata={"a": "b"})
    # BF16 through the raw serializer (numpy has no bf16 of its own).
    bf16 = RNG.standard_normal((4, 3)).astype(ml_dtypes.bfloat16)
    f16 = RNG.standard_normal((2, 3)).astype(np.float16)
    blob = safetensors.serialize(
        {
            name: safetensors.TensorSpec(
                dtype=dtype, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes
            )
            for name, dtype, a in (("bf16", "bfloat16", bf16), ("f16", "float16", f16))
        }
    )
    (tmp_path / "bf16.safetensors").write_bytes(blob)
    with SafetensorsFile(tmp_path / "theirs.safetensors") as st:
        assert st.metadata == {"a": "b"}
        assert set(st.keys()) == set(arrays)
        for name, array in arrays.items():
            assert st.info(name).dtype == mf_dtype(array)
            np.testing.assert_array_equal(st.numpy(name), array)
    with SafetensorsFile(tmp_path / "bf16.safetensors") as st:
        assert st.info("bf16").dtype == "BF16"
        np.testing.assert_array_equal(st.numpy("bf16"), bf16)
        np.testing.assert_array_equal(st.numpy("f16"), f16)


def mf_dtype(array: np.ndarray) -> str:
    from loraformat.format.safetensors_io import dtype_name

    return dtype_name(array.dtype)


# -- schema rejection ----------------------------------------------------------------------------

SCHEMA_CASES = [
    ("missing format", lambda m: m.pop("format"), "format"),
    ("wrong format", lambda m: m.update(format="peft"), "not a loraformat manifest"),
    ("bad version text", lambda m: m.update(format_version="one"), "is not 'MAJOR.MINOR'"),
    ("missing base_model", lambda m: m.pop("base_model"), "'base_model' is a required property"),
    ("missing architecture", lambda m: m["base_model"].pop("architecture"), "'architecture'"),
    ("bad fingerprint", lambda m: m["base_model"].update(fingerprint="x"), "/fingerprint"),
    ("bad scaling", lambda m: m.update(scaling="alpha"), "scaling: 'alpha' is not one of"),
    ("rank zero", lambda m: m.update(rank=0), "rank: 0 is less than the minimum of 1"),
    ("rank string", lambda m: m.update(rank="2"), "rank: '2' is not of type 'integer'"),
    ("alpha bool", lambda m: m.update(alpha=True), "alpha: True is not of type 'number'"),
    ("layers not object", lambda m: m.update(layers=[]), "layers: [] is not of type 'object'"),
    ("bad layer path", lambda m: m["layers"].update({"../etc": m["layers"]["m.l0.q"]}), "layers"),
    ("absolute path", lambda m: m["layers"].update({"/abs": m["layers"]["m.l0.q"]}), "layers"),
    ("missing in_features", lambda m: m["layers"]["m.l0.q"].pop("in_features"), "in_features"),
    ("bad kind", lambda m: m["layers"]["m.l0.q"].update(kind="conv"), "layers/m.l0.q/kind"),
    ("bad out_rows", lambda m: m["layers"]["m.l1.fused"].update(out_rows=[[0]]), "out_rows"),
    ("dora not bool", lambda m: m["layers"]["m.l2.d"].update(dora=1), "layers/m.l2.d/dora"),
    ("unknown top member", lambda m: m.update(colour="red"), "unknown member 'colour'"),
    (
        "unknown layer member",
        lambda m: m["layers"]["m.l0.q"].update(foo=1),
        "layers/m.l0.q: unknown member 'foo'",
    ),
    ("bad sha", lambda m: m.update(tensors_sha256="XYZ"), "tensors_sha256"),
    ("replacement path", lambda m: m.update(replacements=["a/b"]), "replacements/0"),
    ("missing alpha", lambda m: m.pop("alpha"), "'alpha' is a required property"),
]


@pytest.mark.parametrize(("change", "expect"), _params(SCHEMA_CASES))
def test_schema_rejects(saved: Path, tmp_path: Path, change, expect: str):
    adapter_dir = _copy(saved, tmp_path / "a")
    _rewrite_manifest(adapter_dir, change)
    problems = [str(p) for p in validate(adapter_dir)]
    assert problems, "accepted a bad manifest"
    assert any(expect in p for p in problems), problems
    assert all(str(adapter_dir / "adapter.json") in p for p in problems), problems
    with pytest.raises(ValidationError) as info:
        load(adapter_dir)
    assert "\n" not in str(info.value) and str(adapter_dir) in str(info.value)


def test_x_extension_members_allowed(saved: Path, tmp_path: Path):
    adapter_dir = _copy(saved, tmp_path / "a")

    def change(m):
        m["x-vendor"] = {"any": [1, 2]}
        m["base_model"]["x-revision"] = "abc"
        m["layers"]["m.l0.q"]["x-note"] = "hi"

    _rewrite_manifest(adapter_dir, change)
    assert validate(adapter_dir) == []


# -- validation errors ---------------------------------------------------------------------------


def _retensor(adapter_dir: Path, change) -> None:
    """Rewrite adapter.safetensors with changed tensors, keeping the manifest (and its checksum)."""
    with SafetensorsFile(adapter_dir / "adapter.safetensors") as st:
        arrays = {name: np.array(st.numpy(name)) for name in st}
    change(arrays)
    (adapter_dir / "adapter.safetensors").unlink()
    write_safetensors(adapter_dir / "adapter.safetensors", arrays)


VALIDATION_CASES = [
    ("missing tensor", lambda t: t.pop("m.l0.q.lora_B"), "tensor 'm.l0.q.lora_B': missing"),
    (
        "wrong rank",
        lambda t: t.update({"m.l0.q.lora_A": np.zeros((3, 8), np.float32)}),
        "tensor 'm.l0.q.lora_A': shape [3, 8] does not match the manifest, expected [2, 8]",
    ),
    (
        "wrong out",
        lambda t: t.update({"m.l0.q.lora_B": np.zeros((5, 2), np.float32)}),
        "tensor 'm.l0.q.lora_B': shape [5, 2] does not match the manifest, expected [6, 2]",
    ),
    (
        "undeclared",
        lambda t: t.update({"m.other.lora_A": np.zeros((2, 2), np.float32)}),
        "tensor 'm.other.lora_A': not declared by the manifest",
    ),
    (
        "bad dtype",
        lambda t: t.update({"m.l0.q.lora_A": t["m.l0.q.lora_A"].astype(np.int32)}),
        "tensor 'm.l0.q.lora_A': dtype I32 is not one of",
    ),
    (
        "checksum",
        lambda t: t["m.l0.q.lora_A"].__setitem__((0, 0), 123.0),
        "tensors_sha256: data does not match the manifest's checksum",
    ),
    (
        "nan",
        lambda t: t["m.l0.q.lora_A"].__setitem__((0, 0), np.nan),
        "tensor 'm.l0.q.lora_A': 1 non-finite value(s) (NaN/Inf)",
    ),
    (
        "inf bf16",
        lambda t: t["m.l1.q.lora_B"].__setitem__((1, 1), np.inf),
        "tensor 'm.l1.q.lora_B': 1 non-finite value(s) (NaN/Inf)",
    ),
]


@pytest.mark.parametrize(("change", "expect"), _params(VALIDATION_CASES))
def test_validation_error(saved: Path, tmp_path: Path, change, expect: str):
    adapter_dir = _copy(saved, tmp_path / "a")
    _retensor(adapter_dir, change)
    problems = [str(p) for p in validate(adapter_dir)]
    assert any(expect in p for p in problems), problems
    tensors_file = str(adapter_dir / "adapter.safetensors")
    assert all(p.startswith(tensors_file + ": ") for p in problems), problems


def test_large_f64_values_are_finite(tmp_path: Path):
    layer = _layer(dtype=np.float64)
    layer.A[0, 0] = 1e300  # finite in F64, Inf if cast to F32
    Adapter.from_layers("x", {"a": layer}).save(tmp_path / "a")
    assert validate(tmp_path / "a") == []


MANIFEST_RULES = [
    (
        "rank > min dim",
        {"m.l0.q": _layer(rank=7, in_f=8, out_f=6)},
        "layers/m.l0.q: rank 7 exceeds the layer's smaller dimension 6",
    ),
    (
        "out_rows overlap",
        {"f": _layer(rank=1, out_f=12, b_rows=8, out_rows=[(0, 6), (4, 6)])},
        "layers/f/out_rows: ranges must be ascending, non-empty, non-overlapping",
    ),
    (
        "out_rows beyond out",
        {"f": _layer(rank=1, out_f=12, b_rows=8, out_rows=[(0, 4), (10, 14)])},
        "within out_features=12",
    ),
    (
        "dora + out_rows",
        {
            "f": _layer(
                rank=1, out_f=12, b_rows=8, out_rows=[(0, 4), (8, 12)], magnitude=np.ones(12, "f4")
            )
        },
        "layers/f: dora cannot be combined with out_rows",
    ),
    (
        "embedding + dora",
        {"e": _layer(kind="embedding", magnitude=np.ones(6, "f4"))},
        "layers/e: an embedding layer cannot have dora, lora_bias or out_rows",
    ),
]


@pytest.mark.parametrize(("layers", "expect"), _params(MANIFEST_RULES))
def test_manifest_rule(tmp_path: Path, layers, expect: str):
    Adapter.from_layers("x", layers).save(tmp_path / "a")
    problems = [str(p) for p in validate(tmp_path / "a")]
    assert any(expect in p for p in problems), problems
    with pytest.raises(ValidationError, match=r"adapter\.json"):
        load(tmp_path / "a")


def test_replacing_an_adapted_weight_refused(tmp_path: Path):
    Adapter.from_layers(
        "x", {"a": _layer()}, replacements={"a.weight": np.zeros((6, 8), "f4")}
    ).save(tmp_path / "a")
    problems = [str(p) for p in validate(tmp_path / "a")]
    assert any("'a.weight' is the weight of adapted layer 'a'" in p for p in problems), problems


def test_non_finite_alpha_refused(saved: Path, tmp_path: Path):
    adapter_dir = _copy(saved, tmp_path / "a")
    text = (adapter_dir / "adapter.json").read_text().replace('"alpha": 4,', '"alpha": 1e400,')
    (adapter_dir / "adapter.json").write_text(text)
    assert any("alpha must be a finite number" in str(p) for p in validate(adapter_dir))
    text = text.replace('"alpha": 1e400,', '"alpha": NaN,')
    (adapter_dir / "adapter.json").write_text(text)
    assert any("NaN is not valid JSON" in str(p) for p in validate(adapter_dir))


def test_every_problem_is_reported(saved: Path, tmp_path: Path):
    adapter_dir = _copy(saved, tmp_path / "a")

    def change(t):
        t.pop("m.l0.q.lora_B")
        t["m.l0.v.lora_A"] = np.zeros((1, 8), np.float32)
        t["extra.lora_A"] = np.zeros((1, 1), np.float32)

    _retensor(adapter_dir, change)
    assert len(validate(adapter_dir)) == 3


# -- forward compatibility ------------------------------------------------------------------------


def test_newer_minor_with_unknown_members_loads(saved: Path, tmp_path: Path):
    adapter_dir = _copy(saved, tmp_path / "a")

    def change(m):
        m["format_version"] = "1.7"
        m["quantization"] = {"method": "future"}
        m["layers"]["m.l0.q"]["future_flag"] = True

    _rewrite_manifest(adapter_dir, change)
    assert validate(adapter_dir) == []
    with load(adapter_dir) as adapter:
        assert adapter.delta("m.l0.q").shape == (6, 8)
    # The same unknown member in a 1.0 manifest is an error.
    _rewrite_manifest(adapter_dir, lambda m: m.update(format_version="1.0"))
    assert any("unknown member 'quantization'" in str(p) for p in validate(adapter_dir))


def test_newer_major_refused_with_clear_message(saved: Path, tmp_path: Path):
    adapter_dir = _copy(saved, tmp_path / "a")
    _rewrite_manifest(adapter_dir, lambda m: m.update(format_version="2.0", layers="new shape"))
    problems = validate(adapter_dir)
    assert len(problems) == 1
    assert str(problems[0]) == (
        f"{adapter_dir / 'adapter.json'}: format_version: 2.0 is a newer major version than "
        "this reader supports (1.x); upgrade loraformat"
    )
    with pytest.raises(ValidationError, match="newer major version"):
        load(adapter_dir)


# -- lazy loading ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def thousand(tmp_path_factory) -> Path:
    layers = {
        f"model.layers.{i}.proj": LoraLayer(
            A=np.full((2, 16), 0.5, np.float32),
            B=np.full((16, 2), 0.25, np.float32),
            alpha=4,
            in_features=16,
            out_features=16,
        )
        for i in range(1000)
    }
    out = tmp_path_factory.mktemp("big") / "big.safetensors"
    Adapter.from_layers("llama", layers).save(out)
    return out


def _forbid_tensor_reads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(SafetensorsFile, "numpy", boom)
    monkeypatch.setattr(SafetensorsFile, "raw", boom)
    monkeypatch.setattr(SafetensorsFile, "_buffer", boom)


def test_loading_1000_layers_reads_only_the_header(thousand: Path, monkeypatch):
    _forbid_tensor_reads(monkeypatch)
    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            data = self._f.read(n)
            reads.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

    def counting_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Counting(f) if "b" in mode and str(path) == str(thousand) else f

    monkeypatch.setattr("builtins.open", counting_open)
    with load(thousand) as adapter:
        assert len(adapter.layer_paths) == 1000
        assert adapter.parameter_count() == 1000 * 64
        from loraformat.format.summary import summarize

        info = summarize(adapter, norms=False)
        assert info["layer_count"] == 1000
    header_size = struct.unpack("<Q", thousand.read_bytes()[:8])[0]
    assert sum(reads) == 8 + header_size
    assert thousand.stat().st_size > sum(reads) + 100_000


def test_lazy_read_gives_values_when_asked(thousand: Path):
    with load(thousand) as adapter:
        assert adapter.delta_norm("model.layers.999.proj") == pytest.approx(
            2.0 * math.sqrt(16 * 16) * 0.25, rel=1e-6
        )


# -- atomic writes --------------------------------------------------------------------------------


def test_failed_file_write_leaves_nothing(tmp_path: Path):
    def bad():
        raise RuntimeError("disk on fire")

    from loraformat.format.safetensors_io import TensorEntry

    entries = [
        TensorEntry.of("a", np.zeros(4, np.float32)),
        TensorEntry("b", "F32", (4,), bad),
    ]
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_safetensors(tmp_path / "out.safetensors", entries)
    assert list(tmp_path.iterdir()) == []


def test_failed_adapter_save_leaves_nothing(tmp_path: Path, monkeypatch):
    adapter = make_adapter()
    calls = {"n": 0}
    real = adapter.tensors.raw

    def flaky(name):
        calls["n"] += 1
        if calls["n"] > 20:  # after the checksum pass, during the write
            raise OSError("no space left")
        return real(name)

    monkeypatch.setattr(adapter.tensors, "raw", flaky)
    for out in (tmp_path / "dir", tmp_path / "one.safetensors"):
        calls["n"] = 0
        with pytest.raises(OSError, match="no space left"):
            adapter.save(out)
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_helpers_clean_up(tmp_path: Path):
    with pytest.raises(ValueError), atomic_file(tmp_path / "f") as handle:
        handle.write(b"partial")
        raise ValueError
    with pytest.raises(ValueError), atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("partial")
        raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_file(tmp_path / "f") as handle:
        handle.write(b"ok")
    assert (tmp_path / "f").read_bytes() == b"ok"
    assert oct((tmp_path / "f").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert not any(TMP_MARKER in p.name for p in tmp_path.iterdir())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_existing_output_refused_without_overwrite(saved: Path, tmp_path: Path):
    target = _copy(saved, tmp_path / "a")
    before = (target / "adapter.safetensors").read_bytes()
    with load(saved) as adapter:
        with pytest.raises(LoraformatError, match="output already exists"):
            adapter.save(target)
        (tmp_path / "x.safetensors").write_bytes(b"keep")
        with pytest.raises(LoraformatError, match=r"use overwrite=True"):  # Python words
            adapter.save(tmp_path / "x.safetensors")
        assert (tmp_path / "x.safetensors").read_bytes() == b"keep"
        assert (target / "adapter.safetensors").read_bytes() == before
        adapter.save(tmp_path / "x.safetensors", overwrite=True)
    assert validate(tmp_path / "x.safetensors") == []


def test_load_never_modifies_input(saved: Path):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    validate(saved)
    with load(saved) as adapter:
        adapter.delta("m.l0.q")
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_manifest_copy_is_independent(saved: Path):
    with load(saved) as adapter:
        m = copy.deepcopy(adapter.manifest)
    assert m["format"] == mf.FORMAT_NAME
