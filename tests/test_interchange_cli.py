"""``loraformat convert``: detection, --to by suffix, --json report, lossy refusal as one line
with exit 1, --lossy printing what changed, loralib options, --overwrite."""

from __future__ import annotations

import json

import cli_harness
import numpy as np
import pytest

from loraformat.base import open_base
from loraformat.format.adapter import Adapter, LoraLayer, load


@pytest.fixture
def run_cli():
    """``loraformat ...`` in this process (its exit codes and error lines)."""
    return cli_harness.run_cli


@pytest.fixture(scope="module")
def llama(tiny_checkpoint, tmp_path_factory):
    base_path = tiny_checkpoint("llama")
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    with open_base(base_path) as base:
        paths = [p for p, layer in base.layers.items() if p.endswith(("q_proj", "v_proj"))]
        layers = {
            p: LoraLayer(
                A=rng.standard_normal((4, base.layers[p].in_features)).astype(np.float32),
                B=rng.standard_normal((base.layers[p].out_features, 4)).astype(np.float32),
                alpha=8.0, in_features=base.layers[p].in_features,
                out_features=base.layers[p].out_features,
                magnitude=np.ones(base.layers[p].out_features, np.float32) if i == 0 else None,
            )
            for i, p in enumerate(paths)
        }
    plain = {p: LoraLayer(l.A, l.B, l.alpha, l.in_features, l.out_features)
             for p, l in layers.items()}
    Adapter.from_layers("llama", plain).save(root / "plain")
    Adapter.from_layers("llama", layers).save(root / "dora.safetensors")
    return base_path, root


def test_convert_chain_with_json_report(llama, run_cli):
    base_path, root = llama
    r = run_cli("convert", root / "plain", "-o", root / "p", "--to", "peft", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["from"] == "loraformat" and report["to"] == "peft" and report["layers"] == 4
    r = run_cli("convert", root / "p", "-o", root / "a.gguf", "--base", base_path)
    assert r.code == 0, r.err
    assert "peft → gguf: 4 layer(s)" in r.out
    r = run_cli("convert", root / "a.gguf", "-o", root / "back.safetensors", "--base", base_path)
    assert r.code == 0, r.err
    original, back = load(root / "plain"), load(root / "back.safetensors")
    for name in original.tensors:
        assert np.array_equal(original.tensors[name], back.tensors[name])


def test_lossy_refused_then_allowed(llama, run_cli):
    _, root = llama
    out = root / "x.onnx_adapter"
    r = run_cli("convert", root / "dora.safetensors", "-o", out)
    assert r.code == 1
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "DoRA magnitudes on 1 layer(s)" in lines[0] and "--lossy" in lines[0]
    assert not out.exists()
    r = run_cli("convert", root / "dora.safetensors", "-o", out, "--lossy")
    assert r.code == 0, r.err
    assert "lossy: DoRA magnitudes" in r.err
    r = run_cli("convert", root / "dora.safetensors", "-o", out, "--lossy")
    assert r.code == 1 and "already exists (use --overwrite" in r.err
    r = run_cli("convert", root / "dora.safetensors", "-o", out, "--lossy", "--overwrite")
    assert r.code == 0, r.err


def test_loralib_options(llama, run_cli):
    base_path, root = llama
    r = run_cli("convert", root / "plain", "-o", root / "l.pt")
    assert r.code == 0, r.err
    assert "--alpha 8 --rank 4" in r.out
    r = run_cli("convert", root / "l.pt", "-o", root / "l2", "--base", base_path)
    assert r.code == 1 and "give it with --alpha" in r.err
    r = run_cli("convert", root / "l.pt", "-o", root / "l2", "--base", base_path,
                "--alpha", "8", "--rank", "4")
    assert r.code == 0, r.err
    r = run_cli("convert", root / "plain", "-o", root / "l3", "--to", "peft", "--alpha", "8")
    assert r.code == 1 and "option 'alpha' does not apply" in r.err


def test_unknown_input_is_one_line(tmp_path, run_cli):
    (tmp_path / "x.bin").write_bytes(b"not a checkpoint")
    r = run_cli("convert", tmp_path / "x.bin", "-o", tmp_path / "y")
    assert r.code == 1
    assert r.err.strip().count("\n") == 0 and "not a LoRA adapter" in r.err
    r = run_cli("convert", "--help")
    assert "weights_only=True" in r.out and "--lossy" in r.out
