"""``extract``: a known low-rank difference between two checkpoints is recovered exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from loraformat import LoraformatError, load, validate
from loraformat.algebra import extract, randomized_svd
from loraformat.checkpoint import Checkpoint
from loraformat.cli import cli


def finetune(base, out, changes):
    """A copy of checkpoint ``base`` with ``changes[name](array) -> array`` applied."""
    out.mkdir()
    shutil.copy(base / "config.json", out / "config.json")
    tensors = load_file(base / "model.safetensors")
    for name, change in changes.items():
        tensors[name] = change(tensors[name]).astype(tensors[name].dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def low_rank(rng, rows, cols, rank, size=0.05):
    return (rng.standard_normal((rows, rank)) * size) @ rng.standard_normal((rank, cols))


@pytest.fixture(scope="module")
def llama_pair(tiny_checkpoint, tmp_path_factory):
    base = tiny_checkpoint("llama")
    rng = np.random.default_rng(0)
    q = low_rank(rng, 32, 32, 3)  # math orientation out×in
    down = low_rank(rng, 32, 64, 2)
    embed = low_rank(rng, 32, 96, 2)  # math: dim × vocab; stored vocab × dim
    changes = {
        "model.layers.0.self_attn.q_proj.weight": lambda w: w + q,
        "model.layers.1.mlp.down_proj.weight": lambda w: w + down,
        "model.embed_tokens.weight": lambda w: w + embed.T,
        "model.norm.weight": lambda w: w + 0.1,
    }
    tuned = finetune(base, tmp_path_factory.mktemp("llama-ft") / "ft", changes)
    truth = {
        "model.layers.0.self_attn.q_proj": q,
        "model.layers.1.mlp.down_proj": down,
        "model.embed_tokens": embed,
    }
    return base, tuned, truth


def stored_delta(base, tuned, path):
    """ΔW from the files themselves (the fp32 rounding of W + ΔW included)."""
    b = Checkpoint(base).numpy(path + ".weight").astype(np.float64)
    t = Checkpoint(tuned).numpy(path + ".weight").astype(np.float64)
    return t - b


def rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def test_extract_recovers_known_low_rank_difference(llama_pair):
    base, tuned, truth = llama_pair
    adapter, report = extract(tuned, base, rank=3, compute_dtype="float64")
    assert sorted(adapter.layer_paths) == sorted(truth)  # unchanged layers are skipped
    for path, delta in truth.items():
        reference = stored_delta(base, tuned, path)
        if path == "model.embed_tokens":
            reference = reference.T  # stored vocab × dim, math orientation dim × vocab
            assert adapter.specs[path].kind == "embedding"
        assert rel(adapter.delta(path, np.float64), reference) < 1e-6
        assert rel(adapter.delta(path, np.float64), delta) < 1e-6
    rows = {row.path: row for row in report}
    assert rows["model.layers.0.self_attn.q_proj"].rank == 3
    assert rows["model.layers.0.self_attn.q_proj"].relative_error < 1e-6
    assert rows["model.layers.0.self_attn.k_proj.weight"].action == "unchanged"
    assert rows["model.norm.weight"].action == "replacement"
    np.testing.assert_array_equal(
        adapter.replacement("model.norm.weight"),
        Checkpoint(tuned).numpy("model.norm.weight"),
    )
    assert adapter.fingerprint == Checkpoint(base).fingerprint()
    prov = adapter.manifest["provenance"]
    assert prov["operation"] == "extract" and prov["parameters"]["rank"] == 3
    assert prov["inputs"][0]["fingerprint"] == Checkpoint(tuned).fingerprint()
    assert adapter.layer("model.layers.0.self_attn.q_proj").A.dtype == np.float32


def test_extract_by_energy_picks_true_ranks_and_full_embeddings(llama_pair):
    base, tuned, _ = llama_pair
    calls = []
    adapter, _ = extract(
        tuned, base, energy=0.999999, full_embeddings=True, progress=lambda *c: calls.append(c)
    )
    total = len(Checkpoint(base).names())
    assert calls[0] == (1, total) and calls[-1] == (total, total)
    ranks = {p: s.rank for p, s in adapter.specs.items()}
    assert ranks == {"model.layers.0.self_attn.q_proj": 3, "model.layers.1.mlp.down_proj": 2}
    assert sorted(adapter.replacement_names) == ["model.embed_tokens.weight", "model.norm.weight"]


def test_extract_in_out_layout_and_bias(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("gpt2")
    rng = np.random.default_rng(1)
    delta = low_rank(rng, 96, 32, 2)  # c_attn math orientation: 96 out × 32 in
    tuned = finetune(
        base,
        tmp_path / "ft",
        {
            "transformer.h.1.attn.c_attn.weight": lambda w: w + delta.T,  # Conv1D stores in × out
            "transformer.h.1.attn.c_attn.bias": lambda b: b + 0.5,
        },
    )
    adapter, _ = extract(tuned, base, rank=2)
    assert adapter.layer_paths == ["transformer.h.1.attn.c_attn"]
    assert rel(adapter.delta("transformer.h.1.attn.c_attn", np.float64), delta) < 1e-5
    assert adapter.replacement_names == ["transformer.h.1.attn.c_attn.bias"]


def test_extract_cli_json_and_errors(llama_pair, tmp_path, tiny_checkpoint):
    base, tuned, _ = llama_pair
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(
        cli,
        ["extract", str(tuned), str(base), "--rank", "4", "-o", str(out), "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["fingerprint"] == Checkpoint(base).fingerprint()
    lora = [t for t in report["tensors"] if t["action"] == "lora"]
    assert len(lora) == 3 and all(t["relative_error"] < 1e-5 for t in lora)
    assert validate(out) == []
    assert load(out).fingerprint == report["fingerprint"]
    with pytest.raises(LoraformatError, match="nothing to extract"):
        extract(base, base, rank=2)
    other = tiny_checkpoint("llama", layers=1)
    with pytest.raises(LoraformatError, match=r"lacks base tensor 'model\.layers\.1"):
        extract(other, base, rank=2)
    with pytest.raises(LoraformatError, match="exactly one of a rank or an energy"):
        extract(tuned, base)


def test_randomized_svd_matches_numpy_on_low_rank_plus_noise():
    rng = np.random.default_rng(2)
    matrix = low_rank(rng, 400, 300, 6, size=1.0) + 1e-4 * rng.standard_normal((400, 300))
    u, s, vt = randomized_svd(matrix, 6, rng=np.random.default_rng(0))
    reference = np.linalg.svd(matrix, compute_uv=False)[:6]
    np.testing.assert_allclose(s, reference, rtol=1e-9)
    np.testing.assert_allclose(u.T @ u, np.eye(6), atol=1e-10)
    best = np.sqrt(np.sum(np.linalg.svd(matrix, compute_uv=False)[6:] ** 2))
    assert np.linalg.norm(matrix - (u * s) @ vt) <= best * (1 + 1e-6)
