"""``loraformat inspect`` and ``validate``: one clear line per problem, torch never imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from loraformat.cli import cli
from loraformat.format.adapter import Adapter, LoraLayer
from loraformat.format.safetensors_io import SafetensorsFile, write_safetensors

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from loraformat.cli import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    layers = {
        f"model.layers.{i}.self_attn.q_proj": LoraLayer(
            A=rng.standard_normal((2, 8)).astype(np.float32),
            B=rng.standard_normal((6, 2)).astype(np.float32),
            alpha=4 + i,
            in_features=8,
            out_features=6,
        )
        for i in range(3)
    }
    out = tmp_path_factory.mktemp("cli") / "adapter"
    Adapter.from_layers("llama", layers, base_name="tiny").save(out)
    return out


def test_validate_valid(adapter_dir: Path):
    result = run_cli("validate", str(adapter_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{adapter_dir}: valid"


def _one_error_line(result: subprocess.CompletedProcess, path: Path, text: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and text in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def test_validate_truncated_file(tmp_path: Path):
    data = (VECTORS / "rslora.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - 100])
    line = _one_error_line(run_cli("validate", str(bad)), bad, "truncated safetensors file")
    need = len(data) - 8 - int.from_bytes(data[:8], "little")
    assert line == (
        f"{bad}: truncated safetensors file: tensors need {need} data bytes, file has {need - 100}"
    )
    _one_error_line(run_cli("inspect", str(bad)), bad, "truncated safetensors file")


def test_validate_wrong_rank_tensor(adapter_dir: Path, tmp_path: Path):
    bad = Path(shutil.copytree(adapter_dir, tmp_path / "a"))
    with SafetensorsFile(bad / "adapter.safetensors") as st:
        arrays = {n: np.array(st.numpy(n)) for n in st}
    arrays["model.layers.1.self_attn.q_proj.lora_A"] = np.zeros((3, 8), np.float32)
    (bad / "adapter.safetensors").unlink()
    write_safetensors(bad / "adapter.safetensors", arrays)
    line = _one_error_line(run_cli("validate", str(bad)), bad / "adapter.safetensors", "shape")
    assert line == (
        f"{bad / 'adapter.safetensors'}: tensor 'model.layers.1.self_attn.q_proj.lora_A': "
        "shape [3, 8] does not match the manifest, expected [2, 8]"
    )
    line = _one_error_line(run_cli("inspect", str(bad)), bad, "does not match the manifest")
    assert line.startswith("error: ")


def test_validate_newer_major(adapter_dir: Path, tmp_path: Path):
    bad = Path(shutil.copytree(adapter_dir, tmp_path / "a"))
    manifest = json.loads((bad / "adapter.json").read_text())
    manifest["format_version"] = "2.0"
    (bad / "adapter.json").write_text(json.dumps(manifest))
    line = _one_error_line(run_cli("validate", str(bad)), bad / "adapter.json", "2.0")
    assert line == (
        f"{bad / 'adapter.json'}: format_version: 2.0 is a newer major version than this reader "
        "supports (1.x); upgrade loraformat"
    )
    _one_error_line(run_cli("inspect", str(bad)), bad, "newer major version")


@pytest.mark.parametrize("what", ["missing", "bad json", "not an adapter"])
def test_bad_input_one_line(tmp_path: Path, what: str):
    if what == "missing":
        path, text = tmp_path / "nope", "no such file or directory"
    elif what == "bad json":
        path = tmp_path / "d"
        path.mkdir()
        (path / "adapter.json").write_text("{not json")
        text = "manifest is not valid JSON"
    else:
        path, text = tmp_path / "plain.safetensors", "not a loraformat adapter"
        write_safetensors(path, {"w": np.zeros(2, np.float32)})
    for command in ("inspect", "validate"):
        _one_error_line(run_cli(command, str(path)), path, text)


def test_inspect_and_validate_never_import_torch(adapter_dir: Path):
    code = (
        "import sys, time; t = time.perf_counter(); from loraformat.cli import main\n"
        "for args in (['inspect', sys.argv[1]], ['inspect', '--json', sys.argv[1]],"
        " ['validate', sys.argv[1]]):\n"
        "    try:\n        main(args)\n    except SystemExit as e:\n        assert not e.code, e\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('elapsed', time.perf_counter() - t, file=sys.stderr)\n"
    )
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, str(adapter_dir)], capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    # Reported, not asserted (timings vary on CI): interpreter start + 3 commands.
    print(f"inspect+validate without torch: {wall:.2f} s wall, {result.stderr.strip()}")


def test_inspect_json_norms_match_numpy(adapter_dir: Path):
    result = run_cli("inspect", "--json", str(adapter_dir))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "llama" and info["base_name"] == "tiny"
    assert info["layer_count"] == 3 and info["ranks"] == {"2": 3}
    assert info["parameters"] == 3 * (16 + 12)
    assert info["size_bytes"] == sum(f.stat().st_size for f in adapter_dir.iterdir())
    with SafetensorsFile(adapter_dir / "adapter.safetensors") as st:
        for i, row in enumerate(info["layers"]):
            path = f"model.layers.{i}.self_attn.q_proj"
            assert row["path"] == path and row["alpha"] == 4 + i and row["dtype"] == "F32"
            a = st.numpy(path + ".lora_A").astype(np.float64)
            b = st.numpy(path + ".lora_B").astype(np.float64)
            expected = np.linalg.norm((4 + i) / 2 * (b @ a))
            assert row["delta_norm"] == pytest.approx(expected, rel=1e-9)
            assert row["scale"] == pytest.approx((4 + i) / 2)


def test_inspect_text_lists_layers(adapter_dir: Path):
    result = run_cli("inspect", str(adapter_dir))
    assert result.returncode == 0, result.stderr
    assert "base          llama (tiny)" in result.stdout
    assert "layers        3 (r=2×3)" in result.stdout
    assert "model.layers.2.self_attn.q_proj" in result.stdout


def test_inspect_no_norms_reads_header_only(tmp_path: Path, monkeypatch):
    layers = {
        f"model.layers.{i}.mlp": LoraLayer(
            A=np.ones((1, 4), np.float32), B=np.ones((4, 1), np.float32), alpha=1,
            in_features=4, out_features=4,
        )
        for i in range(1000)
    }
    out = tmp_path / "big.safetensors"
    Adapter.from_layers("llama", layers).save(out)

    def boom(*a, **k):
        raise AssertionError("tensor data was read")

    for name in ("numpy", "raw", "_buffer"):
        monkeypatch.setattr(SafetensorsFile, name, boom)
    result = CliRunner().invoke(cli, ["inspect", "--no-norms", "--json", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["layer_count"] == 1000 and "delta_norm" not in info["layers"][0]
    result = CliRunner().invoke(cli, ["inspect", "--no-norms", str(out)])
    assert result.exit_code == 0 and "layers        1000 (r=1×1000)" in result.output
    # With norms the tensors must be read: the guard really guards.
    result = CliRunner().invoke(cli, ["inspect", "--json", str(out)])
    assert result.exit_code == 1 and "error: internal error AssertionError" in result.output


def test_validate_json_lists_every_problem(adapter_dir: Path, tmp_path: Path):
    bad = Path(shutil.copytree(adapter_dir, tmp_path / "a"))
    manifest = json.loads((bad / "adapter.json").read_text())
    manifest["rank"] = 0
    manifest["scaling"] = "nope"
    (bad / "adapter.json").write_text(json.dumps(manifest))
    result = run_cli("validate", "--json", str(bad))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["valid"] is False and len(report["problems"]) == 2
    assert all(p.startswith(str(bad / "adapter.json")) for p in report["problems"])
