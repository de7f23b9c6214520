"""Adapter algebra: properties against dense numpy references, refusals, files and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cli_harness import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraformat import Adapter, LoraformatError, LoraLayer, load, validate
from loraformat.algebra import (
    combine,
    energy_rank,
    factored_svd,
    parse_rank_pattern,
    reduce,
    scale,
    stack,
    subtract,
)
from loraformat.algebra.reduce import tall_qr

PROPERTY = settings(
    max_examples=int(__import__("os").environ.get("ALGEBRA_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- builders -------------------------------------------------------------------------------------


def random_layer(
    rng, in_f, out_f, rank, alpha, *, out_rows=None, kind="linear", dtype=np.float64, bias=False
):
    rows = out_f if out_rows is None else sum(b - a for a, b in out_rows)
    return LoraLayer(
        A=rng.standard_normal((rank, in_f)).astype(dtype),
        B=rng.standard_normal((rows, rank)).astype(dtype),
        alpha=alpha,
        in_features=in_f,
        out_features=out_f,
        kind=kind,
        out_rows=out_rows,
        lora_bias=rng.standard_normal(out_f).astype(dtype) if bias else None,
    )


@st.composite
def adapter_sets(draw, count=None):
    """1–3 adapters over the same (random) layer shapes, random ranks/alphas/scaling rules."""
    n = draw(count if count is not None else st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shapes = {
        f"m.l{i}": (draw(st.integers(1, 10)), draw(st.integers(1, 10)))
        for i in range(draw(st.integers(1, 3)))
    }
    adapters = []
    for _ in range(n):
        rule = draw(st.sampled_from(["alpha/r", "alpha/sqrt(r)"]))
        layers = {}
        for path, (in_f, out_f) in shapes.items():
            if n > 1 and not draw(st.booleans()) and layers:
                continue  # some layers only in some inputs
            rank = draw(st.integers(1, min(in_f, out_f)))
            alpha = draw(st.floats(0.25, 32, allow_nan=False))
            layers[path] = random_layer(rng, in_f, out_f, rank, alpha)
        adapters.append(Adapter.from_layers("llama", layers, scaling=rule))
    weights = [
        draw(st.floats(-3, 3, allow_nan=False).filter(lambda w: abs(w) > 1e-3)) for _ in range(n)
    ]
    return adapters, weights


def dense(adapter: Adapter, path: str) -> np.ndarray:
    return adapter.delta(path, np.float64)


def weighted_sum(adapters, weights, path):
    first = next(a for a in adapters if path in a.specs)
    spec = first.specs[path]
    total = np.zeros((spec.out_features, spec.in_features))
    for adapter, w in zip(adapters, weights, strict=True):
        if path in adapter.specs:
            total += w * dense(adapter, path)
    return total


def assert_close(actual, expected, rel=1e-10, magnitude=0.0):
    """‖actual − expected‖ ≤ rel·max(‖expected‖, magnitude) (magnitude: the inputs' size)."""
    scale_ = max(np.linalg.norm(expected), magnitude, 1e-300)
    assert np.linalg.norm(actual - expected) <= rel * scale_ + 1e-300, (
        np.linalg.norm(actual - expected) / scale_
    )


# -- properties (hypothesis, float64) ------------------------------------------------------------


@PROPERTY
@given(adapter_sets())
def test_stack_equals_weighted_sum_of_deltas(case):
    adapters, weights = case
    out = stack(adapters, weights)
    paths = sorted({p for a in adapters for p in a.layer_paths})
    assert out.layer_paths == paths  # layers present in only some inputs are kept
    for path in paths:
        spec = out.specs[path]
        assert spec.rank <= min(spec.in_features, spec.b_rows)  # always valid
        assert out.scale(path) == pytest.approx(1.0)
        assert_close(dense(out, path), weighted_sum(adapters, weights, path))


@PROPERTY
@given(adapter_sets(count=st.just(2)))
def test_subtract_then_stack_is_identity(case):
    (a, b), _ = case
    back = stack([subtract(a, b), b])
    for path in sorted(set(a.layer_paths) | set(b.layer_paths)):
        expected = dense(a, path) if path in a.specs else np.zeros_like(dense(b, path))
        size = sum(np.linalg.norm(dense(x, path)) for x in (a, b) if path in x.specs)
        assert_close(dense(back, path), expected, rel=1e-9, magnitude=size)


@PROPERTY
@given(adapter_sets(count=st.just(1)))
def test_reduce_to_full_rank_is_lossless(case):
    (a,), _ = case
    out, report = reduce(a, rank=max(s.rank for s in a.specs.values()))
    for row in report:
        assert row.relative_error < 1e-12
        assert_close(dense(out, row.path), dense(a, row.path), rel=1e-12)


@PROPERTY
@given(adapter_sets(count=st.just(2)), st.integers(1, 10))
def test_reduce_matches_truncated_svd_of_dense_delta(case, k):
    adapters, weights = case
    summed = stack(adapters, weights)  # ranks up to min(in, out): interesting spectra
    out, report = reduce(summed, rank=k)
    for row in report:
        ref = weighted_sum(adapters, weights, row.path)
        s = np.linalg.svd(ref, compute_uv=False)
        kept = min(k, s.size, summed.specs[row.path].rank)
        assert row.rank_out == kept
        # singular values of the output equal the top-k of the dense reference
        got = np.linalg.svd(dense(out, row.path), compute_uv=False)[:kept]
        np.testing.assert_allclose(got, s[:kept], rtol=0, atol=1e-6 * max(s[0], 1e-300))
        ref_error = np.sqrt(np.sum(s[kept:] ** 2)) / max(np.linalg.norm(ref), 1e-300)
        assert abs(row.relative_error - ref_error) <= 1e-6 * max(ref_error, 1.0)
        # the error reported is the error the output has
        actual = np.linalg.norm(dense(out, row.path) - ref) / max(np.linalg.norm(ref), 1e-300)
        assert abs(actual - row.relative_error) <= 1e-6


@PROPERTY
@given(adapter_sets(count=st.just(2)), st.floats(0.05, 1.0))
def test_energy_rank_is_smallest_rank_reaching_energy(case, energy):
    adapters, weights = case
    summed = stack(adapters, weights)
    out, report = reduce(summed, energy=energy)
    for row in report:
        s = np.linalg.svd(weighted_sum(adapters, weights, row.path), compute_uv=False)
        power = np.cumsum(s**2) / max(np.sum(s**2), 1e-300)
        k = row.rank_out
        if np.sum(s**2) == 0:
            assert k == 1
            continue
        assert power[k - 1] >= energy - 1e-9
        assert k == 1 or power[k - 2] < energy + 1e-9
        assert out.specs[row.path].rank == k


def test_factored_svd_never_needs_dense_and_matches_numpy():
    rng = np.random.default_rng(0)
    b, a = rng.standard_normal((300, 7)), rng.standard_normal((7, 200))
    svd = factored_svd(b, a, 0.5)
    np.testing.assert_allclose(svd.s, np.linalg.svd(0.5 * b @ a, compute_uv=False)[:7], rtol=1e-12)
    np.testing.assert_allclose((svd.U * svd.s) @ svd.Vt, 0.5 * b @ a, atol=1e-11)
    np.testing.assert_allclose(svd.U.T @ svd.U, np.eye(7), atol=1e-12)


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4, 1e9, math.inf], ids=str)
def test_tall_qr_every_route_is_accurate(cond):
    """Cholesky QR (κ < 1e3), CholeskyQR2 (κ < 1e6), Householder (worse or rank-deficient)."""
    rng = np.random.default_rng(12)
    q0, _ = np.linalg.qr(rng.standard_normal((500, 8)))
    v0, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    s = np.geomspace(1.0, 1.0 / cond if np.isfinite(cond) else 1.0, 8)
    if not np.isfinite(cond):
        s[-3:] = 0.0  # rank-deficient
    x = (q0 * s) @ v0
    q, r = tall_qr(x)
    np.testing.assert_allclose(q @ r, x, atol=1e-13)
    if np.isfinite(cond):
        np.testing.assert_allclose(q.T @ q, np.eye(8), atol=1e-9)
    a = rng.standard_normal((8, 40))
    svd = factored_svd(x, a)
    reference = np.linalg.svd(x @ a, compute_uv=False)[:8]
    np.testing.assert_allclose(svd.s, reference, rtol=0, atol=1e-12 * reference[0])
    np.testing.assert_allclose((svd.U * svd.s) @ svd.Vt, x @ a, atol=1e-12 * reference[0])


def test_energy_rank_examples():
    s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 9 / 14 + 1e-6) == 2
    assert energy_rank(s, 13 / 14) == 2
    assert energy_rank(s, 1.0) == 3


# -- structure: fused rows, bias, embeddings, dtypes, provenance ---------------------------------


def test_stack_fused_rows_expands_to_union_and_is_exact():
    rng = np.random.default_rng(1)
    q_only = Adapter.from_layers(
        "gpt2", {"h.0.attn.c_attn": random_layer(rng, 8, 24, 2, 4.0, out_rows=[(0, 8)])}
    )
    qv = Adapter.from_layers(
        "gpt2", {"h.0.attn.c_attn": random_layer(rng, 8, 24, 3, 2.0, out_rows=[(0, 8), (16, 24)])}
    )
    kv = Adapter.from_layers(
        "gpt2", {"h.0.attn.c_attn": random_layer(rng, 8, 24, 2, 1.0, out_rows=[(8, 24)])}
    )
    out = stack([q_only, qv], [1.0, 0.5])
    assert out.specs["h.0.attn.c_attn"].out_rows == ((0, 8), (16, 24))
    assert_close(
        dense(out, "h.0.attn.c_attn"), weighted_sum([q_only, qv], [1.0, 0.5], "h.0.attn.c_attn")
    )
    full = stack([q_only, kv])
    assert full.specs["h.0.attn.c_attn"].out_rows is None  # the union is every row
    assert_close(
        dense(full, "h.0.attn.c_attn"), weighted_sum([q_only, kv], [1, 1], "h.0.attn.c_attn")
    )


def test_stack_over_rank_limit_is_reduced_losslessly_and_validates(tmp_path):
    rng = np.random.default_rng(2)
    a = Adapter.from_layers("llama", {"m.k": random_layer(rng, 6, 5, 4, 4.0)})
    b = Adapter.from_layers("llama", {"m.k": random_layer(rng, 6, 5, 5, 1.0)})
    out = stack([a, b], [1.0, 2.0])
    assert out.specs["m.k"].rank == 5  # 9 would exceed min(6, 5)
    assert_close(dense(out, "m.k"), weighted_sum([a, b], [1.0, 2.0], "m.k"))
    out.save(tmp_path / "o.safetensors")
    assert validate(tmp_path / "o.safetensors") == []


def test_lora_bias_and_embedding_add_linearly():
    rng = np.random.default_rng(3)
    a = Adapter.from_layers(
        "llama",
        {
            "m.q": random_layer(rng, 6, 6, 2, 4.0, bias=True),
            "model.embed_tokens": random_layer(rng, 50, 6, 2, 2.0, kind="embedding"),
        },
    )
    b = Adapter.from_layers(
        "llama", {"m.q": random_layer(rng, 6, 6, 3, 1.0)}, scaling="alpha/sqrt(r)"
    )
    out = stack([a, b], [2.0, 1.0])
    la = a.layer("m.q")
    np.testing.assert_allclose(
        out.layer("m.q").lora_bias * out.scale("m.q"),
        2.0 * a.scale("m.q") * la.lora_bias,
        rtol=1e-12,
    )
    assert out.specs["model.embed_tokens"].kind == "embedding"
    assert_close(dense(out, "model.embed_tokens"), 2.0 * dense(a, "model.embed_tokens"))
    red, _ = reduce(a, rank=1)  # bias kept so that scale·lora_bias is unchanged
    np.testing.assert_allclose(
        red.layer("m.q").lora_bias * red.scale("m.q"),
        a.layer("m.q").lora_bias * a.scale("m.q"),
        rtol=1e-12,
    )


def test_output_dtype_follows_inputs_or_option():
    rng = np.random.default_rng(4)
    a = Adapter.from_layers("llama", {"m.q": random_layer(rng, 6, 6, 2, 4.0, dtype=np.float16)})
    assert stack([a, a]).layer("m.q").A.dtype == np.float16
    assert reduce(a, rank=1)[0].layer("m.q").B.dtype == np.float16
    assert str(stack([a], dtype="bfloat16").layer("m.q").B.dtype) == "bfloat16"
    assert stack([a], dtype="float32").layer("m.q").B.dtype == np.float32


def test_provenance_names_operation_parameters_and_inputs(tmp_path):
    rng = np.random.default_rng(5)
    a = Adapter.from_layers("llama", {"m.q": random_layer(rng, 6, 6, 2, 4.0)})
    a.save(tmp_path / "a")
    loaded = load(tmp_path / "a")
    out = stack([loaded, loaded], [0.5, 0.25])
    prov = out.manifest["provenance"]
    assert prov["operation"] == "stack"
    assert prov["parameters"]["weights"] == [0.5, 0.25]
    assert [i["tensors_sha256"] for i in prov["inputs"]] == [a.manifest["tensors_sha256"]] * 2
    assert prov["inputs"][0]["name"] == "a"
    reduced, _ = reduce(out, rank=1)
    assert reduced.manifest["provenance"]["inputs"][0]["provenance"]["operation"] == "stack"
    assert reduced.manifest["provenance"]["parameters"]["rank"] == 1
    reduced.save(tmp_path / "r")
    assert validate(tmp_path / "r") == []


def test_scale_keeps_rule_and_alpha():
    rng = np.random.default_rng(6)
    a = Adapter.from_layers(
        "llama", {"m.q": random_layer(rng, 6, 6, 2, 3.0)}, scaling="alpha/sqrt(r)"
    )
    out = scale(a, -0.5)
    assert out.scaling == "alpha/sqrt(r)" and out.specs["m.q"].alpha == 3.0
    assert_close(dense(out, "m.q"), -0.5 * dense(a, "m.q"), rel=1e-15)


# -- refusals ---------------------------------------------------------------------------------


def _dora_adapter(rng):
    layer = random_layer(rng, 6, 6, 2, 4.0)
    layer.magnitude = np.ones(6)
    return Adapter.from_layers("llama", {"model.layers.0.q_proj": layer})


def test_dora_is_refused_naming_the_layer():
    rng = np.random.default_rng(7)
    dora = _dora_adapter(rng)
    plain = Adapter.from_layers("llama", {"m.q": random_layer(rng, 6, 6, 2, 4.0)})
    for call in (
        lambda: stack([plain, dora]),
        lambda: subtract(plain, dora),
        lambda: scale(dora, 2.0),
        lambda: combine([plain, dora], method="linear"),
    ):
        with pytest.raises(LoraformatError, match=r"'model\.layers\.0\.q_proj' is a DoRA layer"):
            call()
    out, _ = reduce(dora, rank=1)  # reduce approximates the low-rank part and keeps m
    np.testing.assert_array_equal(out.layer("model.layers.0.q_proj").magnitude, np.ones(6))


def test_replacements_conflict_and_subtract_are_refused():
    rng = np.random.default_rng(8)
    layers = {"m.q": random_layer(rng, 6, 6, 2, 4.0)}
    r1 = Adapter.from_layers(
        "llama", layers, replacements={"model.norm.weight": np.ones(6, np.float32)}
    )
    r1b = Adapter.from_layers(
        "llama", layers, replacements={"model.norm.weight": np.ones(6, np.float32)}
    )
    r2 = Adapter.from_layers(
        "llama", layers, replacements={"model.norm.weight": np.zeros(6, np.float32)}
    )
    out = stack([r1, r1b])
    np.testing.assert_array_equal(out.replacement("model.norm.weight"), np.ones(6))
    with pytest.raises(LoraformatError, match=r"replacement 'model\.norm\.weight' differs"):
        stack([r1, r2])
    with pytest.raises(LoraformatError, match="difference of full replacements is undefined"):
        subtract(r1, r1b)


def test_mismatched_inputs_are_refused():
    rng = np.random.default_rng(9)
    a = Adapter.from_layers("llama", {"m.q": random_layer(rng, 6, 6, 2, 4.0)})
    other_arch = Adapter.from_layers("gpt2", {"m.q": random_layer(rng, 6, 6, 2, 4.0)})
    other_shape = Adapter.from_layers("llama", {"m.q": random_layer(rng, 7, 6, 2, 4.0)})
    with pytest.raises(LoraformatError, match="architecture 'gpt2' differs"):
        stack([a, other_arch])
    with pytest.raises(LoraformatError, match=r"layer 'm\.q' is linear 7→6 here but linear 6→6"):
        stack([a, other_shape])
    with pytest.raises(LoraformatError, match=r"got 1 weight\(s\) for 2 adapter\(s\)"):
        stack([a, a], [1.0])
    with pytest.raises(LoraformatError, match="needs equal ranks"):
        combine(
            [a, Adapter.from_layers("llama", {"m.q": random_layer(rng, 6, 6, 3, 4.0)})],
            method="ties",
            density=0.5,
        )
    with pytest.raises(LoraformatError, match="needs a density"):
        combine([a, a], method="dare_ties")
    with pytest.raises(LoraformatError, match="rank applies to the svd methods only"):
        combine([a, a], method="linear", rank=2)
    single, _ = combine([a], [2.0], method="ties")  # PEFT: one adapter is always "linear"
    assert single.manifest["provenance"]["parameters"]["requested_method"] == "ties"
    assert_close(dense(single, "m.q"), 2.0 * dense(a, "m.q"), rel=1e-12)
    with pytest.raises(LoraformatError, match="reduce needs a rank"):
        reduce(a)


def test_rank_pattern_by_suffix_and_glob():
    rng = np.random.default_rng(10)
    a = Adapter.from_layers(
        "llama",
        {
            "model.layers.0.self_attn.q_proj": random_layer(rng, 12, 12, 6, 6.0),
            "model.layers.0.self_attn.v_proj": random_layer(rng, 12, 12, 6, 6.0),
            "model.layers.1.self_attn.q_proj": random_layer(rng, 12, 12, 6, 6.0),
        },
    )
    pattern = parse_rank_pattern("layers.1.*=2, q_proj=4")
    _, report = reduce(a, rank_pattern=pattern)
    ranks = {row.path: row.rank_out for row in report}
    assert ranks == {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.self_attn.v_proj": 6,
        "model.layers.1.self_attn.q_proj": 2,
    }
    with pytest.raises(LoraformatError, match="not PATTERN=RANK"):
        parse_rank_pattern("q_proj")


# -- CLI --------------------------------------------------------------------------------------


@pytest.fixture
def two_files(tmp_path):
    rng = np.random.default_rng(11)
    paths = []
    for i, (rank, alpha) in enumerate([(4, 8.0), (4, 2.0)]):
        layers = {
            f"model.layers.0.self_attn.{m}": random_layer(
                rng, 16, 16, rank, alpha, dtype=np.float32
            )
            for m in ("q_proj", "v_proj")
        }
        path = tmp_path / f"in{i}.safetensors"
        Adapter.from_layers("llama", layers).save(path)
        paths.append(path)
    return paths


def test_cli_stack_subtract_scale(tmp_path, two_files):
    a, b = two_files
    assert run_cli("stack", a, b, "-w", "0.5", "-w", "-1", "-o", tmp_path / "s").code == 0
    s, la, lb = load(tmp_path / "s"), load(a), load(b)
    path = "model.layers.0.self_attn.q_proj"
    np.testing.assert_allclose(s.delta(path), 0.5 * la.delta(path) - lb.delta(path), atol=1e-5)
    assert run_cli("scale", a, "-0.5", "-o", tmp_path / "sc.safetensors").code == 0
    np.testing.assert_allclose(
        load(tmp_path / "sc.safetensors").delta(path), -0.5 * la.delta(path), atol=1e-6
    )
    assert run_cli("subtract", a, b, "-o", tmp_path / "d").code == 0
    assert validate(tmp_path / "d") == []
    again = run_cli("subtract", a, b, "-o", tmp_path / "d")
    assert again.code == 1 and "output already exists" in again.error
    assert run_cli("subtract", a, b, "-o", tmp_path / "d", "--overwrite").code == 0


def test_cli_reduce_and_combine_json(tmp_path, two_files):
    a, b = two_files
    result = run_cli("reduce", a, "--rank", "2", "-o", tmp_path / "r", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert {row["rank_out"] for row in report["layers"]} == {2}
    assert all(0 < row["relative_error"] < 1 for row in report["layers"])
    result = run_cli(
        "combine",
        a,
        b,
        "--method",
        "svd",
        "--rank",
        "4",
        "-w",
        "0.5",
        "-w",
        "0.5",
        "-o",
        tmp_path / "c.safetensors",
        "--json",
    )
    assert result.code == 0, result.err
    rows = json.loads(result.out)["layers"]
    assert [row["rank_out"] for row in rows] == [4, 4]
    result = run_cli("combine", a, b, "--method", "ties", "--density", "0.5", "-o", tmp_path / "t")
    assert result.code == 0
    assert "ties" in load(tmp_path / "t").manifest["provenance"]["parameters"]["method"]
    result = run_cli("reduce", a, "-o", tmp_path / "x")
    assert result.code == 2 and "give --rank, --energy or --rank-pattern" in result.err


def test_cli_errors_are_one_line(tmp_path, two_files):
    result = run_cli("combine", two_files[0], tmp_path / "missing", "-o", tmp_path / "o")
    assert result.code == 1
    assert result.error.startswith("error: ") and "missing" in result.error
    result = run_cli(
        "combine", two_files[0], two_files[1], "--method", "dare_linear", "-o", tmp_path / "o"
    )
    assert result.code == 1 and "needs a density" in result.error
