"""spec/vectors: an independent reader (tests/independent_reader.py: written from spec/FORMAT.md
and the schema, importing neither loraformat nor the safetensors package) reproduces the expected
ΔW, bias, replacement, DoRA merge, checksum and fingerprint of every valid vector and refuses every
invalid one; loraformat reads the valid vectors identically and refuses every invalid one with the
refusal recorded beside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import independent_reader as ir
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
EXPECTED = VECTORS / "expected"
INVALID = VECTORS / "invalid"
VALID = ["basic", "rslora.safetensors", "fused", "embedding.safetensors", "dora", "fused-wide",
         "lora-bias-fused", "wide-dtypes", "newer-minor.safetensors", "header-extras.safetensors",
         "experts", "experts-rslora.safetensors", "explicit-defaults", "fused-all-parts",
         "zero-size.safetensors", "empty.safetensors", "higher-version.safetensors"]
#: what needs more than 1.0 (refused by an older reader's own rule, §8)
NEEDS_1_1 = {"fused-wide", "fused-all-parts"}
NEEDS_1_2 = {"experts", "experts-rslora.safetensors"}
INVALID_NAMES = sorted(
    p.name.removesuffix(".expected.json") for p in INVALID.glob("*.expected.json")
)


def _invalid_path(stem: str) -> Path:
    return INVALID / stem if (INVALID / stem).exists() else INVALID / f"{stem}.safetensors"


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    """spec/vectors/README.md: relative Frobenius error ≤ 1e-6."""
    assert actual.shape == expected.shape
    assert np.linalg.norm(actual - expected) <= 1e-6 * np.linalg.norm(expected)


def test_reader_is_independent():
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r});"
        "import independent_reader as r;"
        f"r.read({str(VECTORS / 'basic')!r});"
        "assert not {'loraformat', 'safetensors'} & set(sys.modules), 'not independent'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_vector_is_listed():
    on_disk = {p.name for p in VECTORS.iterdir()} - {"README.md", "expected", "invalid",
                                                     "dora.base.safetensors"}
    assert on_disk == set(VALID)
    assert len(INVALID_NAMES) >= 40 and all(_invalid_path(n).exists() for n in INVALID_NAMES)


@pytest.mark.parametrize("name", VALID)
def test_independent_reader_reproduces_expected(name: str):
    manifest, tensors = ir.read(VECTORS / name)
    assert ir.checksum(tensors) == manifest["tensors_sha256"]
    stem = name.removesuffix(".safetensors")
    assert manifest["layers"] or name == "empty.safetensors"
    for layer, entry in manifest["layers"].items():
        _close(ir.delta(manifest, tensors, layer), np.load(EXPECTED / f"{stem}.{layer}.npy"))
        if entry.get("lora_bias"):
            _close(ir.bias_delta(manifest, tensors, layer),
                   np.load(EXPECTED / f"{stem}.{layer}.bias.npy"))
    for replaced in manifest.get("replacements", []):
        _close(ir.array(*tensors[f"{replaced}.replacement"]),
               np.load(EXPECTED / f"{stem}.{replaced}.replacement.npy"))


@pytest.mark.parametrize("minor", [0, 1])
@pytest.mark.parametrize("name", VALID)
def test_an_older_reader_reads_all_it_can(name: str, minor: int, monkeypatch):
    """§8 applied to ourselves: the independent reader as a 1.0 (1.1) reader reads every vector
    except those that need 1.1's rank rule (1.2's experts), which it refuses by its own rule —
    an expert layer by the tensor-shape rule, after dropping 'experts' (§8, never silently)."""
    monkeypatch.setattr(ir, "KNOWN_MINOR", minor)
    if name in NEEDS_1_2:
        with pytest.raises(ir.Invalid, match=r"lora_[AB]: shape \[\d+, \d+, \d+\], expected "
                                             r"\[\d+, \d+\]"):
            ir.read(VECTORS / name)
        return
    if name in NEEDS_1_1 and minor == 0:
        with pytest.raises(ir.Invalid, match="rank rule"):
            ir.read(VECTORS / name)
        return
    manifest, tensors = ir.read(VECTORS / name)
    stem = name.removesuffix(".safetensors")
    for layer in manifest["layers"]:
        _close(ir.delta(manifest, tensors, layer), np.load(EXPECTED / f"{stem}.{layer}.npy"))


@pytest.mark.parametrize("stem", INVALID_NAMES)
def test_invalid_vectors_refused_by_both(stem: str):
    """§9's two levels: an "open" vector is refused by every reader when it opens the adapter
    (loraformat's load, the independent reader without content checks); a "validate" vector only
    by a validator (both validators refuse every vector)."""
    from loraformat.errors import LoraformatError
    from loraformat.format.adapter import load, validate

    path = _invalid_path(stem)
    with pytest.raises(ir.Invalid):
        ir.read(path)
    expected = json.loads((INVALID / f"{stem}.expected.json").read_text(encoding="utf-8"))
    assert expected["rule"].startswith("§")
    problems = [str(p) for p in validate(path)]
    assert any(expected["refusal"] in p for p in problems), problems
    if expected["level"] == "open":
        with pytest.raises(ir.Invalid):
            ir.read(path, content=False)
        with pytest.raises(LoraformatError):
            load(path)
    else:
        assert expected["level"] == "validate"
        ir.read(path, content=False)
        load(path).close()


def test_expected_deltas_are_not_trivial():
    # A vector whose ΔW were all zero would pass any reader.
    for file in EXPECTED.glob("*.npy"):
        array = np.load(file)
        assert (array.size == 0 and file.name.startswith("zero-size.empty.")) or (
            np.abs(array).max() > 0.1), file


def test_vectors_cover_the_gaps():
    """F16/F64, x- members, ignored directory metadata, a 1.1 file, a newer minor with unknown
    members and roles, lora_bias with out_rows, extra tensor-entry members."""
    manifest, tensors = ir.read(VECTORS / "wide-dtypes")
    assert {t[0] for t in tensors.values()} == {"F16", "F64"}
    assert "x-vendor" in manifest and "x-revision" in manifest["base_model"]
    decoy = ir.read_container((VECTORS / "wide-dtypes" / "adapter.safetensors").read_bytes())[0]
    assert json.loads(decoy["loraformat"])["alpha"] != manifest["alpha"]  # and it is ignored
    manifest, _ = ir.read(VECTORS / "fused-wide")
    entry = manifest["layers"]["transformer.h.0.attn.c_attn"]
    assert manifest["format_version"] == "1.1" and manifest["rank"] > entry["in_features"]
    raw = json.loads(ir.read_container((VECTORS / "newer-minor.safetensors").read_bytes())[0][
        "loraformat"])
    assert raw["format_version"] == "1.9" and "future_member" in raw
    _, tensors = ir.read(VECTORS / "newer-minor.safetensors")
    assert any(k.endswith(".future_role") for k in tensors)
    manifest, _ = ir.read(VECTORS / "lora-bias-fused")
    entry = manifest["layers"]["transformer.h.0.attn.c_attn"]
    assert entry["lora_bias"] and entry["out_rows"]
    d = ir.delta(manifest, *ir.read(VECTORS / "lora-bias-fused")[1:], "transformer.h.0.attn.c_attn")
    assert np.all(d[8:16] == 0)  # out_rows restricts ΔW ...
    bias = np.load(EXPECTED / "lora-bias-fused.transformer.h.0.attn.c_attn.bias.npy")
    assert np.all(bias[8:16] != 0)  # ... but not the bias
    data = (VECTORS / "header-extras.safetensors").read_bytes()
    assert b'"x-note"' in data[: 8 + int.from_bytes(data[:8], "little")]


def test_fused_matches_loralib_merged_linear():
    """loralib MergedLinear(enable_lora=[T,F,T], r=2, lora_alpha=4): group g's update B_g·A_g,
    zero-padded into the enabled rows, times lora_alpha/r."""
    _, raw = ir.read_container((EXPECTED / "fused.loralib.safetensors").read_bytes())
    lora = {n.rpartition(".")[2]: ir.array(*v) for n, v in raw.items()}
    r, part, k = 2, 8, 2
    update = np.zeros((3 * part, 8))
    enabled = [0, 2]
    for g in range(k):
        bg = lora["lora_B"][g * part : (g + 1) * part]
        ag = lora["lora_A"][g * r : (g + 1) * r]
        update[enabled[g] * part : (enabled[g] + 1) * part] = bg @ ag
    manifest, tensors = ir.read(VECTORS / "fused")
    _close(ir.delta(manifest, tensors, "transformer.h.0.attn.c_attn"), (4 / r) * update)


def test_convert_from_loralib_reads_the_fused_vector(tmp_path: Path):
    from cli_harness import run_cli

    out = tmp_path / "converted"
    result = run_cli("convert", EXPECTED / "fused.loralib.safetensors", "--from", "loralib",
                     "--alpha", "4", "--rank", "2", "--enable-lora", "true,false,true",
                     "--architecture", "gpt2", "-o", out)
    assert result.code == 0, result.err
    manifest, tensors = ir.read(out)
    expected, expected_tensors = ir.read(VECTORS / "fused")
    layer = "transformer.h.0.attn.c_attn"
    _close(ir.delta(manifest, tensors, layer), ir.delta(expected, expected_tensors, layer))


def test_dora_merge_and_fingerprint():
    manifest, tensors = ir.read(VECTORS / "dora")
    base = VECTORS / "dora.base.safetensors"
    assert ir.fingerprint(base) == manifest["base_model"]["fingerprint"]
    layer = "model.layers.0.self_attn.q_proj"
    _, base_tensors = ir.read_container(base.read_bytes())
    weight = ir.array(*base_tensors[layer + ".weight"])
    merged = ir.dora_merged(manifest, tensors, layer, weight)
    _close(merged, np.load(EXPECTED / f"dora.{layer}.merged.npy"))


def test_dora_zero_row_stays_zero():
    """§4.5: n_i = 0 gives a zero row, in the independent reader and in loraformat's merge."""
    from loraformat.format.adapter import LoraLayer
    from loraformat.merge.weights import Contribution, merge_weight

    weight = np.zeros((2, 3))
    weight[1] = [1.0, 2.0, 2.0]
    layer = LoraLayer(A=np.zeros((1, 3), np.float32), B=np.zeros((2, 1), np.float32), alpha=1,
                      in_features=3, out_features=2, magnitude=np.array([5.0, 6.0], np.float32))
    merged = merge_weight(weight.astype(np.float32), "out_in", [Contribution(layer, 1.0)])
    assert np.all(np.isfinite(merged)) and np.all(merged[0] == 0)
    np.testing.assert_allclose(merged[1], [2.0, 4.0, 4.0], rtol=1e-6)


@pytest.mark.parametrize("name", VALID)
def test_loraformat_reads_vectors_identically(name: str):
    from loraformat.format.adapter import load, validate

    assert validate(VECTORS / name) == []
    manifest, tensors = ir.read(VECTORS / name)
    with load(VECTORS / name) as adapter:
        assert set(adapter.layer_paths) == set(manifest["layers"])
        if manifest["format_version"] in ("1.0", "1.1", "1.2"):
            assert adapter.manifest == manifest
        for layer in manifest["layers"]:
            key = f"{layer}.lora_A"
            assert adapter.tensors.dtype(key) == tensors[key][0]
            assert bytes(adapter.tensors.raw(key)) == tensors[key][2]
            np.testing.assert_allclose(
                adapter.delta(layer, np.float64), ir.delta(manifest, tensors, layer), rtol=1e-12
            )


@pytest.mark.parametrize("form", ["dir", "single.safetensors"])
def test_independent_reader_agrees_on_what_loraformat_writes(tmp_path: Path, form: str):
    """Every feature at once, in both forms, as the library (and so the CLI) writes it."""
    import ml_dtypes

    from loraformat.format.adapter import Adapter, LoraLayer, load

    rng = np.random.default_rng(5)

    def layer(r, i, o, dtype=np.float32, **kw):
        rows = kw.pop("b_rows", o)
        return LoraLayer(A=rng.standard_normal((r, i)).astype(dtype),
                         B=rng.standard_normal((rows, r)).astype(dtype), alpha=r + 1.5,
                         in_features=i, out_features=o, **kw)

    layers = {
        "m.q": layer(2, 8, 6, lora_bias=rng.standard_normal(6).astype(np.float32)),
        "m.bf": layer(3, 8, 6, ml_dtypes.bfloat16),
        "m.h": layer(2, 8, 6, np.float16, magnitude=np.ones(6, np.float16)),
        "m.fused": layer(6, 4, 12, b_rows=8, out_rows=[(0, 4), (8, 12)]),  # needs 1.1
        "m.emb": layer(2, 10, 4, kind="embedding"),
    }
    adapter = Adapter.from_layers("llama", layers, scaling="alpha/sqrt(r)",
                                  replacements={"head.weight": np.ones((3, 4), np.float64)})
    adapter.save(tmp_path / form)
    manifest, tensors = ir.read(tmp_path / form)
    assert manifest["format_version"] == "1.1"
    with load(tmp_path / form) as written:
        assert written.manifest == manifest
        for path in layers:
            np.testing.assert_allclose(written.delta(path, np.float64),
                                       ir.delta(manifest, tensors, path), rtol=1e-12)


def test_loraformat_fingerprint_matches_independent():
    from loraformat.checkpoint import Checkpoint

    base = VECTORS / "dora.base.safetensors"
    with Checkpoint(base) as ckpt:
        assert ckpt.fingerprint() == ir.fingerprint(base)


def test_vectors_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_vectors.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
