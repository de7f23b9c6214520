"""Format 1.2's answers that vectors cannot carry (spec/FORMAT.md §12.1): symbolic links and FIFOs
(§1, §9), the JSON limits in a safetensors header (§2), and the note a refused newer-minor file
gets (§8) — each checked on loraformat and on the independent reader (tests/independent_reader.py)
alike."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import independent_reader as ir
import pytest

from loraformat.errors import LoraformatError
from loraformat.format.adapter import load, validate
from loraformat.format.safetensors_io import SafetensorsFile

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"


def _both_accept(path: Path) -> None:
    assert validate(path) == []
    ir.read(path)


def _both_refuse(path: Path, message: str) -> None:
    problems = [str(p) for p in validate(path)]
    assert any(message in p for p in problems), problems
    with pytest.raises(ir.Invalid):
        ir.read(path)


def test_path_given_as_a_link_is_followed(tmp_path: Path):
    shutil.copytree(VECTORS / "basic", tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file-link.safetensors").symlink_to(VECTORS / "rslora.safetensors")
    _both_accept(tmp_path / "link")
    _both_accept(tmp_path / "file-link.safetensors")


def test_member_links_inside_by_resolved_components(tmp_path: Path):
    """§9: inside = under the directory's fully resolved path, whole components; links on the
    way (an intermediate directory link) are followed."""
    adapter = tmp_path / "a"
    shutil.copytree(VECTORS / "basic", adapter)
    (adapter / "store").mkdir()
    (adapter / "adapter.safetensors").rename(adapter / "store" / "t.safetensors")
    (adapter / "via").symlink_to(adapter / "store")  # an intermediate link, inside
    (adapter / "adapter.safetensors").symlink_to(adapter / "via" / "t.safetensors")
    _both_accept(adapter)
    # a sibling whose name extends the adapter's ("a" → "ab") is outside, not a prefix match
    (tmp_path / "ab").mkdir()
    (adapter / "store" / "t.safetensors").rename(tmp_path / "ab" / "t.safetensors")
    (adapter / "store").rmdir()
    (adapter / "via").unlink()
    (adapter / "via").symlink_to(tmp_path / "ab")  # the intermediate link now leads out
    _both_refuse(adapter, "symbolic link points outside the adapter directory")


def _run_validate(path: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from loraformat.format.adapter import validate;"
            "print('\\n'.join(map(str, validate(sys.argv[1]))))")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_are_refused_without_blocking(tmp_path: Path):
    """§1: opening a FIFO would block until someone writes; it is refused unopened."""
    fifo = tmp_path / "adapter.safetensors"
    os.mkfifo(fifo)
    result = _run_validate(fifo)  # a blocking reader would hit the subprocess timeout
    assert "is a FIFO; an adapter or checkpoint is a regular file" in result.stdout
    with pytest.raises(ir.Invalid, match="neither a directory nor a regular file"):
        ir.read(fifo)
    adapter = tmp_path / "dir"
    shutil.copytree(VECTORS / "basic", adapter)
    (adapter / "adapter.safetensors").unlink()
    os.mkfifo(adapter / "adapter.safetensors")
    assert "is a FIFO" in _run_validate(adapter).stdout
    with pytest.raises(ir.Invalid, match="not a regular file"):
        ir.read(adapter)


def _header_file(tmp_path: Path, header_text: str) -> Path:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "h.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(4))
    return path


def _nested(depth: int) -> str:
    """An x- member making the header ``depth`` levels deep (the header object is level 1)."""
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    return f'"x-deep":{inner}'


@pytest.mark.parametrize(("extra", "ok", "ours", "theirs"), [
    (_nested(64), True, "", ""),
    (_nested(65), False, "nested too deeply", "nested too deeply"),
    ('"x-n":' + "9" * 4096, True, "", ""),
    ('"x-n":' + "9" * 4097, False, "longer than 4096 characters", "number token too long"),
])
def test_header_json_limits(tmp_path: Path, extra: str, ok: bool, ours: str, theirs: str):
    """§2: nesting ≤ 64 levels and number tokens ≤ 4096 characters in a header too — the same
    in any reader, whatever its JSON parser takes."""
    text = '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],' + extra + "}}"
    path = _header_file(tmp_path, text)
    if ok:
        SafetensorsFile(path).close()
        ir.read_container(path.read_bytes())
        return
    with pytest.raises(LoraformatError, match=ours):
        SafetensorsFile(path)
    with pytest.raises(ir.Invalid, match=theirs):
        ir.read_container(path.read_bytes())


def test_surrogate_pairs_are_allowed(tmp_path: Path):
    """§2: a valid pair is one character; only a lone surrogate is refused."""
    adapter = tmp_path / "a"
    shutil.copytree(VECTORS / "basic", adapter)
    path = adapter / "adapter.json"
    text = path.read_text().replace('"purpose"', '"note": "\\ud83d\\ude00", "purpose"')
    path.write_text(text)
    _both_accept(adapter)
    with load(adapter) as loaded:
        assert loaded.manifest["provenance"]["note"] == "\U0001f600"


def test_refused_newer_minor_file_says_so(tmp_path: Path):
    """§8: an expert layer declared by a future 1.9 with a member this reader does not know —
    its tensors are refused by their shape, and the refusal says the file is newer."""
    adapter = tmp_path / "a"
    shutil.copytree(VECTORS / "experts", adapter)
    path = adapter / "adapter.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = "1.9"
    entry = manifest["layers"]["model.layers.0.mlp.experts.down_proj"]
    entry["future_stack"] = entry.pop("experts")  # as if 1.9 had renamed it
    path.write_text(json.dumps(manifest))
    problems = [str(p) for p in validate(adapter)]
    assert any("does not match the manifest, expected [3, 6]" in p for p in problems), problems
    assert problems[-1].endswith("format_version: 1.9 is newer than this reader (1.2); a newer "
                                 "loraformat may read this file")
    with pytest.raises(ir.Invalid, match="shape"):
        ir.read(adapter)
