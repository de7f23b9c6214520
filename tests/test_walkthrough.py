"""The edges a new user hits walking through the README (issue 26): each test failed before its
fix. Tiny LLaMA and Qwen2 checkpoints of the same shapes and names, so only what the files say
about their model can tell them apart."""

from __future__ import annotations

import pytest
import tiny_families
import tiny_models
from cli_harness import run_cli


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("walkthrough")
    llama = tiny_models.llama(root / "llama")
    qwen2 = tiny_families.qwen2(root / "qwen2")
    return {
        "root": root,
        "llama": llama,
        "qwen2": qwen2,
        "llama_peft": tiny_models.peft_adapter(
            llama, "llama", root / "llama_peft", target_modules=["q_proj", "v_proj"]
        ),
        "qwen2_peft": tiny_families.peft_adapter(qwen2, "qwen2", root / "qwen2_peft"),
    }


def _one_error(result, *parts: str) -> str:
    assert result.code == 1, (result.out, result.err)
    line = result.error
    for part in parts:
        assert part in line, line
    return line


# -- 2. wrong base ------------------------------------------------------------------------------


def test_peft_adapter_of_another_architecture_is_refused(models, tmp_path):
    out = tmp_path / "merged"
    r = run_cli("merge", models["llama"], models["qwen2_peft"], "-o", out)
    assert r.error == (f"error: {models['qwen2_peft']}: adapter is for architecture 'qwen2', "
                       f"but the base {models['llama']} is 'llama'")
    assert not out.exists()
    ok = run_cli("merge", models["qwen2"], models["qwen2_peft"], "-o", tmp_path / "right")
    assert ok.code == 0, ok.err


@pytest.mark.parametrize("target", ["mlx", "onnx_adapter"])
def test_nameless_formats_say_architecture_unknown(models, tmp_path, target):
    """MLX and ONNX Runtime adapters whose names many families share: unknown without --base,
    and read through --base they take the base's architecture."""
    out = tmp_path / ("a.onnx_adapter" if target == "onnx_adapter" else "a_mlx")
    r = run_cli("convert", models["qwen2_peft"], "--base", models["qwen2"], "-o", out,
                "--to", target)
    assert r.code == 0, r.err
    if target == "mlx":  # loraformat's own MLX writer records the architecture: drop it
        import json

        config = json.loads((out / "adapter_config.json").read_text())
        del config["loraformat"]
        (out / "adapter_config.json").write_text(json.dumps(config))
    converted = tmp_path / "lf.safetensors"
    r = run_cli("convert", out, "-o", converted)
    _one_error(r, "architecture unknown", "llama, mistral, qwen2", "--base BASE")
    assert not converted.exists()
    r = run_cli("convert", out, "--base", models["qwen2"], "-o", converted)
    assert r.code == 0, r.err
    assert "base          qwen2" in run_cli("inspect", converted).out


def test_mlx_adapter_recording_its_architecture_is_refused_by_another_base(models, tmp_path):
    mlx = tmp_path / "a_mlx"
    assert run_cli("convert", models["qwen2_peft"], "--base", models["qwen2"], "-o", mlx,
                   "--to", "mlx").code == 0
    r = run_cli("convert", mlx, "--base", models["llama"], "-o", tmp_path / "x.safetensors")
    _one_error(r, "adapter is for architecture 'qwen2'", "is 'llama'")
