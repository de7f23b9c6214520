"""Format 1.1 (issue 16): the writer writes the lowest version that expresses the file, the 1.1
rank rule lets loralib's wide MergedLinear through (1.0 refuses it), newer-minor members and
tensor roles are ignored, patterns match whole strings, integers are integer tokens, and the
manifest's size, BOM and form rules — each checked against loraformat's validate/load and, where
the rule is about values, against jsonschema with the published schema."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from loraformat.errors import LoraformatError
from loraformat.format import manifest as mf
from loraformat.format.adapter import Adapter, LoraLayer, load, validate

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
RNG = np.random.default_rng(16)


def _fused(r: int, d: int) -> LoraLayer:
    """loralib MergedLinear, enable_lora=[T, F, T], per-part rank r, n_embd d: rank 2r."""
    block = np.zeros((2 * d, 2 * r), np.float32)
    block[:d, :r] = RNG.standard_normal((d, r))
    block[d:, r:] = RNG.standard_normal((d, r))
    return LoraLayer(A=RNG.standard_normal((2 * r, d)).astype(np.float32), B=block, alpha=2 * r,
                     in_features=d, out_features=3 * d, out_rows=[(0, d), (2 * d, 3 * d)])


def test_writer_writes_the_lowest_version(tmp_path: Path):
    narrow = Adapter.from_layers("gpt2", {"h.0.attn.c_attn": _fused(2, 8)})
    assert narrow.manifest["format_version"] == "1.0"  # 1.0 can express it
    wide = Adapter.from_layers("gpt2", {"h.0.attn.c_attn": _fused(3, 4)})  # rank 6 > in 4
    assert wide.manifest["format_version"] == "1.1"
    wide.save(tmp_path / "wide")
    assert validate(tmp_path / "wide") == []
    # The same file declared 1.0 is refused by 1.0's rule, naming the 1.1 bound.
    path = tmp_path / "wide" / "adapter.json"
    path.write_text(path.read_text().replace('"1.1"', '"1.0"'))
    problems = [str(p) for p in validate(tmp_path / "wide")]
    assert problems == [f"{path}: layers/h.0.attn.c_attn: rank 6 exceeds the layer's smaller "
                        "dimension 4 (format 1.0; 1.1 allows min(parts × in_features, rows) = 8 "
                        "for fused layers)"]


def test_loralib_wide_merged_linear_converts(tmp_path: Path):
    """§9 point 8: k·r = 2·3 > in_features = 4 is now representable, and ΔW is loralib's."""
    from loraformat import interchange

    r, d, alpha = 3, 4, 5.0
    a = RNG.standard_normal((2 * r, d)).astype(np.float32)
    b = RNG.standard_normal((2 * d, r)).astype(np.float32)
    src = tmp_path / "lora.safetensors"
    from loraformat.format.safetensors_io import write_safetensors

    write_safetensors(src, {"transformer.h.0.attn.c_attn.lora_A": a,
                            "transformer.h.0.attn.c_attn.lora_B": b})
    interchange.convert(src, tmp_path / "out", "loralib", architecture="gpt2", alpha=alpha,
                        rank=r, enable_lora="true,false,true")
    assert validate(tmp_path / "out") == []
    with load(tmp_path / "out") as adapter:
        assert adapter.manifest["format_version"] == "1.1"
        expected = np.zeros((3 * d, d))
        expected[:d] = b[:d].astype(np.float64) @ a[:r]
        expected[2 * d :] = b[d:].astype(np.float64) @ a[r:]
        np.testing.assert_allclose(adapter.delta("transformer.h.0.attn.c_attn", np.float64),
                                   (alpha / r) * expected, rtol=1e-6)


def _single(tmp_path: Path) -> Path:
    out = tmp_path / "a.safetensors"
    Adapter.from_layers("llama", {"m.q": _fused(1, 4)}).save(out)
    return out


@pytest.mark.parametrize(("member", "value", "message"), [
    ("format_version", "1.0\n", "'1.0\\n' is not 'MAJOR.MINOR'"),
    ("format_version", "1.01", "'1.01' is not 'MAJOR.MINOR'"),
    ("rank", 2.0, "2.0 is not of type 'integer'"),
    ("rank", 2e0, "2.0 is not of type 'integer'"),
    ("replacements", ["head.weight\n"], "does not match"),
])
def test_whole_strings_and_integer_tokens(tmp_path: Path, member, value, message):
    adapter_dir = tmp_path / "a"
    Adapter.from_layers("llama", {"m.q": _fused(1, 4)}).save(adapter_dir)
    manifest = json.loads((adapter_dir / "adapter.json").read_text())
    manifest[member] = value
    (adapter_dir / "adapter.json").write_text(json.dumps(manifest))
    problems = [str(p) for p in validate(adapter_dir)]
    assert any(message in p for p in problems), problems
    # the fast path and jsonschema agree
    assert not mf.conforms(manifest)


def test_schema_reading_rules_match_the_published_schema():
    """jsonschema with the schema file as published accepts what §2 forbids — which is why §2
    states the reading — and loraformat's reading of the same schema refuses it."""
    import jsonschema

    with open(VECTORS.parent.parent / "schemas" / "adapter.v1.schema.json") as f:
        schema = json.load(f)
    plain = jsonschema.Draft202012Validator(schema)
    manifest = json.loads((VECTORS / "basic" / "adapter.json").read_text())
    for change in ({"rank": 4.0}, {"format_version": "1.0\n"}):
        bad = {**manifest, **change}
        assert plain.is_valid(bad)  # Python's jsonschema: by value, re.search
        assert mf.jsonschema_problems(bad) and not mf.conforms(bad)


def test_newer_minor_members_dropped_before_schema_and_roles_ignored(tmp_path: Path):
    out = tmp_path / "n.safetensors"
    shutil.copy(VECTORS / "newer-minor.safetensors", out)
    assert validate(out) == []
    with load(out) as adapter:
        assert adapter.manifest["format_version"] == "1.9"
        assert "model.layers.0.self_attn.q_proj.future_role" in adapter.tensors
        assert adapter.delta("model.layers.0.self_attn.q_proj").shape == (8, 8)


def test_form_is_decided_by_path_type_not_name(tmp_path: Path):
    renamed = tmp_path / "adapter.bin"
    shutil.copy(VECTORS / "rslora.safetensors", renamed)
    assert validate(renamed) == []
    with load(renamed) as adapter, load(VECTORS / "rslora.safetensors") as original:
        assert adapter.manifest == original.manifest


def test_manifest_size_limit_and_bom(tmp_path: Path, monkeypatch):
    adapter_dir = tmp_path / "a"
    shutil.copytree(VECTORS / "basic", adapter_dir)
    size = (adapter_dir / "adapter.json").stat().st_size
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(LoraformatError, match=f"manifest is {size} bytes, over the"):
        load(adapter_dir)
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", size)
    assert validate(adapter_dir) == []
    monkeypatch.undo()
    text = (adapter_dir / "adapter.json").read_bytes()
    (adapter_dir / "adapter.json").write_bytes(b"\xef\xbb\xbf" + text)
    assert [p.message for p in validate(adapter_dir)] == [
        "manifest starts with a UTF-8 byte order mark; save it without"]


def test_single_file_metadata_bom_refused(tmp_path: Path):
    from loraformat.format.safetensors_io import SafetensorsFile, TensorEntry, write_safetensors

    src = _single(tmp_path)
    with SafetensorsFile(src) as st:
        meta = dict(st.metadata)
        entries = [TensorEntry.of(n, np.array(st.numpy(n))) for n in st]
    meta["loraformat"] = "\ufeff" + meta["loraformat"]
    write_safetensors(tmp_path / "b.safetensors", entries, meta)
    problems = [p.message for p in validate(tmp_path / "b.safetensors")]
    assert len(problems) == 1 and "embedded manifest is not valid JSON" in problems[0]
