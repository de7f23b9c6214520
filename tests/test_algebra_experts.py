"""The algebra on expert layers (format 1.2): stack, subtract, scale, reduce and combine work expert
by expert. Every result is checked against numpy on the dense per-expert ΔW_e built from the raw
tensors (einsum, np.linalg.svd), not through loraformat's own delta."""

from __future__ import annotations

import numpy as np
import pytest

from loraformat.algebra import combine, reduce, scale, stack, subtract
from loraformat.errors import LoraformatError
from loraformat.format.adapter import Adapter, LoraLayer

GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"
DOWN = "model.layers.0.mlp.experts.down_proj"
Q = "model.layers.0.self_attn.q_proj"
E, HIDDEN, INTER = 3, 8, 5


def _expert_layer(rng, rank, in_f, out_f, alpha, rows=None):
    b_rows = out_f if rows is None else sum(b - a for a, b in rows)
    return LoraLayer(A=rng.standard_normal((E, rank, in_f)),
                     B=rng.standard_normal((E, b_rows, rank)), alpha=alpha, in_features=in_f,
                     out_features=out_f, out_rows=rows, experts=E)


def _adapter(seed, rank=2, alpha=3.0, rows=None, scaling="alpha/r"):
    rng = np.random.default_rng(seed)
    return Adapter.from_layers("qwen3_moe", {
        GATE_UP: _expert_layer(rng, rank, HIDDEN, 2 * INTER, alpha, rows),
        DOWN: _expert_layer(rng, rank + 1, INTER, HIDDEN, alpha + 1),
        Q: LoraLayer(A=rng.standard_normal((rank, HIDDEN)), B=rng.standard_normal((HIDDEN, rank)),
                     alpha=alpha, in_features=HIDDEN, out_features=HIDDEN),
    }, scaling=scaling)


def dense(adapter: Adapter, path: str) -> np.ndarray:
    """ΔW (E × out × in for an expert layer) from the raw tensors and the manifest, in numpy."""
    entry = adapter.manifest["layers"][path]
    rank = entry.get("rank", adapter.manifest.get("rank"))
    alpha = entry.get("alpha", adapter.manifest["alpha"])
    s = alpha / rank if adapter.manifest["scaling"] == "alpha/r" else alpha / np.sqrt(rank)
    a = np.asarray(adapter.tensors[f"{path}.lora_A"], np.float64)
    b = np.asarray(adapter.tensors[f"{path}.lora_B"], np.float64)
    rows = [i for lo, hi in entry.get("out_rows", [[0, entry["out_features"]]])
            for i in range(lo, hi)]
    if "experts" not in entry:
        out = np.zeros((entry["out_features"], entry["in_features"]))
        out[rows] = s * b @ a
        return out
    out = np.zeros((entry["experts"], entry["out_features"], entry["in_features"]))
    out[:, rows] = s * np.einsum("ekr,eri->eki", b, a)
    return out


def best_rank(matrix: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k]


def test_stack_subtract_scale_are_exact_per_expert():
    x, y = _adapter(1), _adapter(2, rank=3, alpha=5.0, rows=[(INTER, 2 * INTER)],
                                 scaling="alpha/sqrt(r)")
    out = stack([x, y], [0.5, -2.0])
    assert out.manifest["format_version"] == "1.2"
    for path in (GATE_UP, DOWN, Q):
        np.testing.assert_allclose(dense(out, path), 0.5 * dense(x, path) - 2.0 * dense(y, path),
                                   atol=1e-10)
    assert out.specs[GATE_UP].experts == E and out.specs[GATE_UP].rank == 5
    diff = subtract(x, y)
    np.testing.assert_allclose(dense(diff, DOWN), dense(x, DOWN) - dense(y, DOWN), atol=1e-10)
    scaled = scale(y, -0.25)
    np.testing.assert_allclose(dense(scaled, GATE_UP), -0.25 * dense(y, GATE_UP), atol=1e-12)
    assert scaled.specs[GATE_UP].experts == E


def test_stack_refactors_each_expert_when_the_rank_sum_is_too_large():
    """rank 3 + 3 > in_features 5 of down_proj: refactored expert by expert, still exact."""
    x, y = _adapter(3, rank=2), _adapter(4, rank=2)
    out = stack([x, y])
    assert out.specs[DOWN].rank == INTER  # min(6, 5, 8)
    np.testing.assert_allclose(dense(out, DOWN), dense(x, DOWN) + dense(y, DOWN), atol=1e-10)


def test_reduce_per_expert_svd():
    x = _adapter(5, rank=4)
    out, report = reduce(x, 2)
    for path in (GATE_UP, DOWN):
        expected = np.stack([best_rank(d, 2) for d in dense(x, path)])
        np.testing.assert_allclose(dense(out, path), expected, atol=1e-10)
        row = next(r for r in report if r.path == path)
        whole = dense(x, path)
        assert row.relative_error == pytest.approx(
            np.linalg.norm(whole - expected) / np.linalg.norm(whole), rel=1e-9)
    np.testing.assert_allclose(dense(out, Q), best_rank(dense(x, Q), 2), atol=1e-10)


def test_reduce_by_energy_takes_the_largest_rank_any_expert_needs():
    rng = np.random.default_rng(6)
    # expert 0 is rank 1, expert 1 needs 3 values, expert 2 two — energy 0.99
    u = np.linalg.qr(rng.standard_normal((HIDDEN, 4)))[0]
    v = np.linalg.qr(rng.standard_normal((HIDDEN, 4)))[0]
    spectra = [[10, 0, 0, 0], [5, 4, 3, 0.01], [6, 5, 0.02, 0.01]]
    a = np.stack([v.T for _ in spectra])
    b = np.stack([u * np.asarray(s) for s in spectra])
    x = Adapter.from_layers("qwen3_moe", {DOWN: LoraLayer(
        A=a, B=b, alpha=4.0, in_features=HIDDEN, out_features=HIDDEN, experts=3)})
    out, report = reduce(x, energy=0.99)
    assert out.specs[DOWN].rank == 3 and report[0].rank_out == 3
    expected = np.stack([best_rank(d, 3) for d in dense(x, DOWN)])
    np.testing.assert_allclose(dense(out, DOWN), expected, atol=1e-10)


@pytest.mark.parametrize("method", ["cat", "svd", "linear", "ties_svd"])
def test_combine_per_expert(method):
    x, y = _adapter(7), _adapter(8)
    w = [0.7, 0.4]
    out, report = combine([x, y], w, method, density=0.5 if method == "ties_svd" else None)
    exact = {p: w[0] * dense(x, p) + w[1] * dense(y, p) for p in (GATE_UP, DOWN)}
    if method == "cat":
        for p in exact:
            np.testing.assert_allclose(dense(out, p), exact[p], atol=1e-10)
    elif method == "svd":  # rank 3 (the largest input rank) per expert
        for p in exact:
            k = out.specs[p].rank
            np.testing.assert_allclose(dense(out, p), np.stack([best_rank(d, k)
                                                                 for d in exact[p]]), atol=1e-9)
    elif method == "linear":  # PEFT's: A and B combined separately, per expert
        p = DOWN
        s = [m.scale(p) for m in (x, y)]
        a = sum(np.sign(wi * si) * np.sqrt(abs(wi * si)) * np.asarray(m.tensors[f"{p}.lora_A"])
                for wi, si, m in zip(w, s, (x, y), strict=True))
        b = sum(np.sqrt(abs(wi * si)) * np.asarray(m.tensors[f"{p}.lora_B"])
                for wi, si, m in zip(w, s, (x, y), strict=True))
        np.testing.assert_allclose(dense(out, p), np.einsum("ekr,eri->eki", b, a), atol=1e-10)
    got = {r.path: r for r in report}
    for p in exact:
        assert got[p].relative_error == pytest.approx(
            np.linalg.norm(dense(out, p) - exact[p]) / np.linalg.norm(exact[p]), rel=1e-6,
            abs=1e-12)


def test_an_expert_layer_and_a_dense_layer_at_one_path_are_refused():
    rng = np.random.default_rng(9)
    x = _adapter(10)
    y = Adapter.from_layers("qwen3_moe", {DOWN: LoraLayer(
        A=rng.standard_normal((2, INTER)), B=rng.standard_normal((HIDDEN, 2)), alpha=2,
        in_features=INTER, out_features=HIDDEN)})
    with pytest.raises(LoraformatError, match="of 3 experts in"):
        stack([x, y])
