"""Format 1.2 (issue 24): stacked-expert layers. A is [E, r, in], B is [E, rows, r] and expert e's
update is scale·B[e]·A[e] — checked against numpy's einsum, through both on-disk forms, the
checksum, the version rule (1.2 only when a layer has experts) and the layer rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loraformat.format.adapter import Adapter, LoraLayer, load, validate

RNG = np.random.default_rng(24)
PATH = "model.layers.0.mlp.experts.gate_up_proj"


def expert_layer(experts=4, rank=2, in_f=6, out_f=8, rows=None, alpha=3.0, dtype=np.float32):
    b_rows = out_f if rows is None else sum(b - a for a, b in rows)
    return LoraLayer(
        A=RNG.standard_normal((experts, rank, in_f)).astype(dtype),
        B=RNG.standard_normal((experts, b_rows, rank)).astype(dtype),
        alpha=alpha, in_features=in_f, out_features=out_f, out_rows=rows, experts=experts,
    )


def numpy_delta(layer: LoraLayer, scale: float) -> np.ndarray:
    a = layer.A.astype(np.float64)
    b = layer.B.astype(np.float64)
    dense = scale * np.einsum("ekr,eri->eki", b, a)
    full = np.zeros((layer.experts, layer.out_features, layer.in_features))
    rows = [i for lo, hi in (layer.out_rows or [(0, layer.out_features)]) for i in range(lo, hi)]
    full[:, rows] = dense
    return full


@pytest.mark.parametrize("rows", [None, [(0, 3), (5, 8)]])
@pytest.mark.parametrize("form", ["dir", "file.safetensors"])
def test_expert_layer_round_trips_and_computes_per_expert_delta(tmp_path: Path, rows, form):
    layer = expert_layer(rows=rows)
    dense = LoraLayer(A=RNG.standard_normal((2, 6)).astype(np.float32),
                      B=RNG.standard_normal((5, 2)).astype(np.float32),
                      alpha=3.0, in_features=6, out_features=5)
    adapter = Adapter.from_layers(
        "gpt_oss", {PATH: layer, "model.layers.0.self_attn.q_proj": dense})
    assert adapter.manifest["format_version"] == "1.2"
    assert adapter.manifest["layers"][PATH]["experts"] == 4
    out = adapter.save(tmp_path / form)
    assert validate(out) == []
    with load(out) as back:
        assert back.manifest == adapter.manifest  # the checksum included
        spec = back.specs[PATH]
        assert (spec.experts, spec.rank, spec.b_rows) == (4, 2, 8 if rows is None else 6)
        expected = numpy_delta(layer, 3.0 / 2)
        np.testing.assert_allclose(back.delta(PATH, np.float64), expected, rtol=1e-12)
        assert back.delta_norm(PATH) == pytest.approx(np.linalg.norm(expected), rel=1e-12)
        np.testing.assert_allclose(back.expert_delta_norms(PATH),
                                   np.linalg.norm(expected, axis=(1, 2)), rtol=1e-12)
        assert back.delta("model.layers.0.self_attn.q_proj").shape == (5, 6)
        assert back.parameter_count() == 4 * 2 * 6 + 4 * (8 if rows is None else 6) * 2 + 12 + 10


def test_dense_adapters_stay_below_1_2():
    dense = LoraLayer(A=np.ones((2, 4), np.float32), B=np.ones((4, 2), np.float32), alpha=2,
                      in_features=4, out_features=4)
    assert Adapter.from_layers("llama", {"a.b": dense}).manifest["format_version"] == "1.0"


def _rewrite(folder: Path, change) -> Path:
    path = folder / "adapter.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(format_version="1.1"), "'experts' needs format_version 1.2"),
    (lambda m: m["layers"][PATH].update(dora=True), "an expert layer cannot have"),
    (lambda m: m["layers"][PATH].update(kind="embedding"), "an expert layer cannot have"),
    (lambda m: m["layers"][PATH].update(experts=3), "does not match the manifest"),
    (lambda m: m["layers"][PATH].update(experts=0), "less than the minimum"),
    (lambda m: m["layers"][PATH].update(experts=65537), "greater than the maximum"),
])
def test_expert_layer_rules(tmp_path: Path, change, message):
    Adapter.from_layers("gpt_oss", {PATH: expert_layer()}).save(tmp_path / "a")
    _rewrite(tmp_path / "a", change)
    problems = [str(p) for p in validate(tmp_path / "a")]
    assert any(message in p for p in problems), problems


def test_inspect_shows_experts(tmp_path: Path):
    from click.testing import CliRunner

    from loraformat.cli import cli

    layer = expert_layer(experts=3, rank=2)
    Adapter.from_layers("gpt_oss", {PATH: layer}).save(tmp_path / "a")
    expected = numpy_delta(layer, 3.0 / 2)
    per_expert = np.linalg.norm(expected, axis=(1, 2))
    result = CliRunner().invoke(cli, ["inspect", "--json", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)["layers"][0]
    assert (row["experts"], row["rank"]) == (3, 2)
    assert row["delta_norm"] == pytest.approx(np.linalg.norm(expected), rel=1e-12)
    np.testing.assert_allclose(row["expert_delta_norms"], per_expert, rtol=1e-12)
    text = CliRunner().invoke(cli, ["inspect", str(tmp_path / "a")]).output
    assert "1 layer(s) of 3 experts" in text
    assert f"[3 experts, ‖ΔW_e‖ {per_expert.min():.4g}…{per_expert.max():.4g}]" in text


def test_the_spec_worked_example(tmp_path: Path):
    """spec/FORMAT.md §4.7's numbers, by loraformat and by the independent reader."""
    import independent_reader as ir

    layer = LoraLayer(A=np.array([[[1, 0]], [[0, 1]]], np.float32),
                      B=np.array([[[1], [2]], [[3], [0]]], np.float32), alpha=2,
                      in_features=2, out_features=4, out_rows=[(1, 2), (3, 4)], experts=2)
    Adapter.from_layers("gpt_oss", {PATH: layer}).save(tmp_path / "a")
    expected = np.array([[[0, 0], [2, 0], [0, 0], [4, 0]], [[0, 0], [0, 6], [0, 0], [0, 0]]])
    with load(tmp_path / "a") as adapter:
        np.testing.assert_array_equal(adapter.delta(PATH), expected)
    manifest, tensors = ir.read(tmp_path / "a")
    np.testing.assert_array_equal(ir.delta(manifest, tensors, PATH), expected)
