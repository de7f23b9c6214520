"""PEFT LoHa, LoKr, AdaLoRA and VeRA adapters, made by real peft on a tiny LLaMA, convert to exact
low-rank loraformat layers: merging the result gives PEFT's merge_and_unload logits (1e-4); every
layer's written rank is the exact factorisation's (r² for LoHa, rank₁·rank₂ for LoKr) or, beyond
min(in, out), the lossless refactoring; ``--rank``/``--energy`` reduce in the same pass and the
reported error equals the error of the dense best approximation computed by numpy from PEFT's own
ΔW (``get_delta_weight``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_models
import torch
from cli_harness import run_cli

from loraformat.base import open_base
from loraformat.errors import LoraformatError
from loraformat.format.adapter import load, validate
from loraformat.interchange import Context
from loraformat.interchange.peft import read_peft
from loraformat.interchange.peft_variants import (
    khatri_rao_cols,
    khatri_rao_rows,
    loha_factors,
    lokr_factors,
)
from loraformat.merge import merge_checkpoint

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _configs():
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, VeraConfig

    return {
        # r=6: r² = 36 > min(in, out) of every target: the lossless refactoring path
        "loha": LoHaConfig(r=6, alpha=3, target_modules=TARGETS, init_weights=False),
        # rank/alpha patterns resolved per module as PEFT does
        "loha-small": LoHaConfig(r=2, alpha=4, target_modules=TARGETS, init_weights=False,
                                 rank_pattern={"v_proj": 3}, alpha_pattern={"down_proj": 7}),
        # decompose_both: w1 = w1_a·w1_b on down_proj, full w1 elsewhere, w2 always factored
        "lokr": LoKrConfig(r=2, alpha=4, target_modules=TARGETS, decompose_both=True,
                           init_weights=False),
        # r=8: w2 (and w1) full matrices, written W·I or I·W
        "lokr-full": LoKrConfig(r=8, alpha=3, target_modules=TARGETS, init_weights=False),
        "adalora": AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=TARGETS,
                                 total_step=10),
        "vera": VeraConfig(r=8, target_modules=TARGETS, save_projection=True),
    }


def _make(base, name, out):
    from peft import get_peft_model

    torch.manual_seed(7)
    model = get_peft_model(tiny_models.load_transformers(base, "llama"), _configs()[name])
    with torch.no_grad():  # ΔW ≠ 0 for every factor, including the zero-initialised ones
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out)
    return out


def _peft_reference(base, adapter_dir, inputs):
    """(merge_and_unload logits, module name → PEFT's dense ΔW in float64)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_models.load_transformers(base, "llama"), adapter_dir)
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            key = name.removeprefix("base_model.model.")
            with torch.no_grad():
                deltas[key] = module.get_delta_weight("default").double().numpy()
    merged = model.merge_and_unload()
    with torch.no_grad():
        return merged(**inputs).logits, deltas


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module",
                params=["loha", "loha-small", "lokr", "lokr-full", "adalora", "vera"])
def variant(request, llama, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    adapter_dir = _make(llama, request.param, root / "peft")
    inputs = tiny_models.example_inputs("llama")
    logits, deltas = _peft_reference(llama, adapter_dir, inputs)
    return request.param, root, adapter_dir, inputs, logits, deltas


@pytest.mark.slow
def test_converted_and_merged_equals_peft(variant, llama):
    name, root, adapter_dir, inputs, expected, deltas = variant
    with open_base(llama) as base:
        ctx = Context(base=base)
        adapter = read_peft(adapter_dir, context=ctx)
        adapter.save(root / "converted")
        merge_checkpoint(base, [root / "converted"], root / "merged")
    assert validate(root / "converted") == []
    with torch.no_grad():
        base_out = tiny_models.load_transformers(llama, "llama")(**inputs).logits
        got = tiny_models.load_transformers(root / "merged", "llama")(**inputs).logits
    assert (expected - base_out).abs().max() > 1e-2  # the adapter changes the outputs
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # each layer's ΔW (never formed by the conversion) equals PEFT's, and its rank is reported
    with load(root / "converted") as converted:
        assert set(converted.layer_paths) == set(deltas)
        for path in converted.layer_paths:
            np.testing.assert_allclose(converted.delta(path, np.float64), deltas[path],
                                       rtol=0, atol=1e-6 * np.abs(deltas[path]).max())
            rank = converted.specs[path].rank
            note = next(n for n in ctx.report.notes if n.startswith(f"{path}: "))
            assert note.endswith(f"→ rank {rank}") or f"→ rank {rank} (" in note
            # a layer as large as its weight says so, with the way to a low-rank one
            full = rank == min(*deltas[path].shape)
            assert ("full rank" in note and "--rank N" in note) == full
            assert rank == min(_exact_rank(name, deltas[path].shape), *deltas[path].shape)


@pytest.mark.slow
def test_adalora_pruned_by_its_rank_allocator(llama, tmp_path):
    """Real AdaLoRA training: the allocator prunes ranks (some to 0, which PEFT saves as empty
    tensors); ranknum stays init_r. The conversion skips rank-0 layers and still equals PEFT."""
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_models.load_transformers(llama, "llama"), AdaLoraConfig(
        init_r=6, target_r=2, lora_alpha=8, target_modules=TARGETS, total_step=20, tinit=2,
        tfinal=4, deltaT=1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = tiny_models.example_inputs("llama")
    for step in range(20):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    with torch.no_grad():  # a larger update than 20 tiny steps give, so the check has teeth
        for param in model.parameters():
            if param.requires_grad:  # pruned entries of lora_E are dropped on save anyway
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(tmp_path / "peft")
    ranks = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert any(sum(mask) == 0 for mask in ranks.values())  # the allocator did prune
    expected, deltas = _peft_reference(llama, tmp_path / "peft", inputs)
    with open_base(llama) as base:
        ctx = Context(base=base)
        read_peft(tmp_path / "peft", context=ctx).save(tmp_path / "converted")
        merge_checkpoint(base, [tmp_path / "converted"], tmp_path / "merged")
    with torch.no_grad():
        base_out = tiny_models.load_transformers(llama, "llama")(**inputs).logits
        got = tiny_models.load_transformers(tmp_path / "merged", "llama")(**inputs).logits
    assert (expected - base_out).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    written = set(load(tmp_path / "converted").layer_paths)
    assert written == {p for p, d in deltas.items() if np.abs(d).max() > 0}
    assert any("rank 0 (pruned by AdaLoRA)" in n for n in ctx.report.notes)


def _exact_rank(name, shape):
    if name == "loha-small":
        return 9 if shape == (16, 32) else 4  # v_proj has rank 3 by the pattern
    if name == "lokr-full":  # full w1 (4×4 or 4×8) and full w2: rank(W1)·rank(W2) = min dims
        return min(shape)
    return {"loha": 36, "adalora": 6, "vera": 8}.get(name) or (
        # LoKr r=2: w2 factored (rank 2); w1 factored (rank 2) only on down_proj (64 inputs)
        4 if shape[1] == 64 else 2 * min(4, 4))


@pytest.mark.slow
@pytest.mark.parametrize("option", [("--rank", "2"), ("--energy", "0.9")])
def test_cli_reduces_in_the_same_pass_and_reports_the_error(variant, llama, option):
    _, root, adapter_dir, _, _, deltas = variant
    out = root / f"reduced{option[0]}"
    result = run_cli("convert", adapter_dir, "-o", out, "--base", llama, *option, "--json",
                     "--overwrite")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    ranks = load(out).manifest["provenance"]["variant_ranks"]
    with load(out) as reduced:
        for path in reduced.layer_paths:
            dense = deltas[path]
            s = np.linalg.svd(dense, compute_uv=False)
            k = reduced.specs[path].rank
            if option[0] == "--rank":
                assert k == min(2, int(np.sum(s > 1e-9 * s[0])))
            else:  # the smallest rank keeping 90% of Σσ²
                assert np.sum(s[: k] ** 2) >= 0.9 * np.sum(s**2) * (1 - 1e-9)
                assert k == 1 or np.sum(s[: k - 1] ** 2) < 0.9 * np.sum(s**2)
            best = np.sqrt(np.sum(s[k:] ** 2) / np.sum(s**2))  # Eckart–Young, dense numpy
            actual = np.linalg.norm(reduced.delta(path, np.float64) - dense) / np.linalg.norm(dense)
            assert ranks[path]["relative_error"] == pytest.approx(best, rel=1e-4, abs=1e-6)
            assert actual == pytest.approx(best, rel=1e-4, abs=1e-6)
            if ranks[path]["written"] < ranks[path]["exact"]:
                assert any(n.startswith(f"{path}: ") and "relative error" in n
                           for n in report["notes"])


def test_factorisations_equal_the_dense_products():
    rng = np.random.default_rng(0)
    b1, b2 = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    a1, a2 = rng.standard_normal((3, 5)), rng.standard_normal((2, 5))
    assert khatri_rao_rows(b1, b2).shape == (6, 6) and khatri_rao_cols(a1, a2).shape == (6, 5)
    f = loha_factors(b1, a1, b2, a2, 0.5)
    np.testing.assert_allclose(f.scale * f.B @ f.A, 0.5 * (b1 @ a1) * (b2 @ a2), atol=1e-12)
    w1 = rng.standard_normal((2, 3))  # full w1, factored w2
    b, a = rng.standard_normal((4, 2)), rng.standard_normal((2, 5))
    f = lokr_factors(w1, None, None, None, b, a, 2.0)
    assert f.A.shape[0] == 2 * 2  # rank(W1)=2 (W1 = I·W1) × rank 2
    np.testing.assert_allclose(f.scale * f.B @ f.A, 2.0 * np.kron(w1, b @ a), atol=1e-12)


@pytest.mark.slow
def test_refusals(llama, tmp_path):
    adapter_dir = _make(llama, "vera", tmp_path / "vera")
    with pytest.raises(LoraformatError, match="VeRA conversion needs the base model"):
        read_peft(adapter_dir, architecture="llama")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["save_projection"] = False
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraformatError, match="save_projection: false"):
        read_peft(adapter_dir, base=llama)
    config["peft_type"] = "IA3"
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraformatError, match="peft_type is 'IA3'; only LoRA"):
        read_peft(adapter_dir, base=llama)
    lora = tiny_models.peft_adapter(llama, "llama", tmp_path / "lora", target_modules=["q_proj"])
    with pytest.raises(LoraformatError, match="--rank/--energy apply to PEFT LoHa"):
        read_peft(lora, context=Context(options={"rank": 2}))
