"""``combine`` against real PEFT: ``add_weighted_adapter`` on the same adapters gives the same ΔW.

Two (three) PEFT adapters on a tiny LLaMA are read into loraformat with a small local key mapper
(independent of the interchange importer), combined here, and compared per layer with
``LoraLayer.get_delta_weight`` of the adapter PEFT's ``add_weighted_adapter`` builds. DARE's
random masks are recorded from PEFT's ``torch.bernoulli`` calls and replayed through ``masks``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from safetensors.numpy import load_file

from loraformat import Adapter, LoraLayer
from loraformat.algebra import combine

pytestmark = pytest.mark.slow

PREFIX = "base_model.model."


def peft_to_adapter(directory: Path) -> Adapter:
    """A loraformat adapter from a plain PEFT LoRA directory (r/alpha/rslora, no patterns)."""
    config = json.loads((directory / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    tensors = load_file(directory / "adapter_model.safetensors")
    layers = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = tensors[f"{PREFIX}{path}.lora_B.weight"]
        layers[path] = LoraLayer(a, b, config["lora_alpha"], a.shape[1], b.shape[0])
    scaling = "alpha/sqrt(r)" if config.get("use_rslora") else "alpha/r"
    return Adapter.from_layers("llama", layers, scaling=scaling)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    from peft import PeftModel

    base = tiny_checkpoint("llama")
    root = tmp_path_factory.mktemp("algebra-peft")
    qv = ["q_proj", "v_proj"]
    dirs = {
        "a": tiny_models.peft_adapter(
            base, "llama", root / "a", seed=1, r=4, lora_alpha=8, target_modules=qv
        ),
        # rsLoRA and another alpha: each input's own scale must be used
        "b": tiny_models.peft_adapter(
            base, "llama", root / "b", seed=2, r=4, lora_alpha=3, use_rslora=True, target_modules=qv
        ),
        # another rank, and a layer (k_proj) only this adapter has
        "c": tiny_models.peft_adapter(
            base,
            "llama",
            root / "c",
            seed=3,
            r=6,
            lora_alpha=5,
            target_modules=["q_proj", "k_proj"],
        ),
    }
    model = tiny_models.load_transformers(base, "llama")
    peft_model = PeftModel.from_pretrained(model, dirs["a"], adapter_name="a")
    peft_model.load_adapter(dirs["b"], adapter_name="b")
    peft_model.load_adapter(dirs["c"], adapter_name="c")
    ours = {name: peft_to_adapter(d) for name, d in dirs.items()}
    return peft_model, ours


def lora_modules(peft_model, adapter_name):
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, PeftLoraLayer) and adapter_name in module.lora_A:
            yield name, module


def peft_deltas(peft_model, adapter_name) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {
            name: module.get_delta_weight(adapter_name).double().numpy()
            for name, module in lora_modules(peft_model, adapter_name)
        }


def run_peft(peft_model, monkeypatch, names, weights, new, method, **kwargs):
    """PEFT's combination, recording every torch.bernoulli draw in call order."""
    draws: list[np.ndarray] = []
    real = torch.bernoulli

    def recording(*args, **kw):
        out = real(*args, **kw)
        draws.append(out.detach().double().numpy().copy())
        return out

    monkeypatch.setattr(torch, "bernoulli", recording)
    peft_model.add_weighted_adapter(names, weights, new, combination_type=method, **kwargs)
    monkeypatch.setattr(torch, "bernoulli", real)
    return peft_deltas(peft_model, new), draws


def replay(draws, peft_model, new, names, roles):
    """PEFT draws per module (named_modules order), per role, per input that has the layer."""
    table = {}
    it = iter(draws)
    for path, module in lora_modules(peft_model, new):
        present = [i for i, n in enumerate(names) if n in module.lora_A]
        for role in roles:
            for index in range(len(present)):
                table[(path, role, index)] = next(it)
    assert next(it, None) is None, "PEFT drew more masks than expected"
    return lambda path, role, index, shape: table[(path, role, index)].reshape(shape)


def exact_sum(ours, names, weights, path):
    total = 0
    for name, w in zip(names, weights, strict=True):
        if path in ours[name].specs:
            total = total + w * ours[name].delta(path, np.float64)
    return total


def rel(x, y, ref):
    return float(np.linalg.norm(x - y) / np.linalg.norm(ref))


@pytest.mark.parametrize(
    ("names", "rank"), [(("a", "b"), 3), (("a", "c"), None)], ids=["truncated", "default-rank"]
)
def test_svd_matches_peft_within_reported_error(setup, monkeypatch, names, rank):
    peft_model, ours = setup
    weights = [0.7, -0.4]
    new = f"svd_{'_'.join(names)}_{rank}"
    theirs, _ = run_peft(peft_model, monkeypatch, list(names), weights, new, "svd", svd_rank=rank)
    result, report = combine([ours[n] for n in names], weights, "svd", rank=rank, dtype="float64")
    reported = {row.path: row.relative_error for row in report}
    assert set(theirs) == set(result.layer_paths)  # k_proj, only in "c", is kept
    expected_rank = rank or 6
    for path, delta in theirs.items():
        exact = exact_sum(ours, names, weights, path)
        mine = result.delta(path, np.float64)
        stacked = sum(ours[n].specs[path].rank for n in names if path in ours[n].specs)
        assert result.specs[path].rank == min(expected_rank, stacked)
        # both are the best rank-R approximation of the same matrix
        assert rel(mine, delta, exact) <= reported[path] + 1e-5
        assert rel(mine, delta, exact) < 1e-4
        # the error reported is the error PEFT's adapter has too
        assert abs(rel(delta, exact, exact) - reported[path]) < 1e-4
        assert abs(rel(mine, exact, exact) - reported[path]) < 1e-9
    assert max(reported.values()) > 1e-3 if rank else True  # truncation really happened


def test_cat_is_exact_like_peft(setup, monkeypatch):
    peft_model, ours = setup
    names, weights = ["a", "b"], [0.5, 0.5]
    theirs, _ = run_peft(peft_model, monkeypatch, names, weights, "cat_ab", "cat")
    result, report = combine([ours[n] for n in names], weights, "cat", dtype="float64")
    for path, delta in theirs.items():
        exact = exact_sum(ours, names, weights, path)
        assert rel(result.delta(path, np.float64), exact, exact) < 1e-12
        assert rel(delta, exact, exact) < 1e-5
    assert all(row.relative_error == 0.0 for row in report)


@pytest.mark.parametrize(
    ("method", "density"),
    [
        ("linear", None),
        ("ties", 0.5),
        ("magnitude_prune", 0.4),
        ("dare_linear", 0.6),
        ("dare_ties", 0.5),
    ],
)
def test_factor_methods_match_peft(setup, monkeypatch, method, density):
    """PEFT merges the A stack and the B stack separately; so do we, with the same numbers."""
    peft_model, ours = setup
    names, weights = ["a", "b"], [0.7, -0.4]
    new = f"{method}_ab"
    kwargs = {"density": density} if density is not None else {}
    theirs, draws = run_peft(peft_model, monkeypatch, names, weights, new, method, **kwargs)
    masks = (
        replay(draws, peft_model, new, names, ["lora_A", "lora_B"]) if "dare" in method else None
    )
    result, report = combine(
        [ours[n] for n in names], weights, method, density=density, masks=masks, dtype="float64"
    )
    deviation = {row.path: row.relative_error for row in report}
    for path, delta in theirs.items():
        mine = result.delta(path, np.float64)
        assert rel(mine, delta, delta) < 1e-5, path
        exact = exact_sum(ours, names, weights, path)
        # the report states how far these methods are from Σ wᵢ·ΔWᵢ (the cross terms)
        assert abs(rel(mine, exact, exact) - deviation[path]) < 1e-9
        assert deviation[path] > 0.05


def test_linear_with_layer_in_one_input_matches_peft(setup, monkeypatch):
    peft_model, ours = setup
    # c has rank 6, a rank 4: PEFT requires equal ranks for linear, and so do we
    with pytest.raises(ValueError, match="same r"):
        peft_model.add_weighted_adapter(["a", "c"], [1.0, 1.0], "lin_ac", combination_type="linear")
    from loraformat import LoraformatError

    with pytest.raises(LoraformatError, match="needs equal ranks"):
        combine([ours["a"], ours["c"]], [1.0, 1.0], "linear")
    # a single adapter is "linear" in PEFT whatever is asked: w·s·B·A
    theirs, _ = run_peft(peft_model, monkeypatch, ["c"], [0.3], "lin_c", "linear")
    result, _ = combine([ours["c"]], [0.3], "linear")
    for path, delta in theirs.items():
        assert rel(result.delta(path, np.float64), delta, delta) < 1e-5


@pytest.mark.parametrize(
    ("method", "density"),
    [
        ("ties_svd", 0.5),
        ("magnitude_prune_svd", 0.5),
        ("dare_linear_svd", 0.7),
        ("dare_ties_svd", 0.5),
    ],
)
def test_dense_svd_methods_match_peft(setup, monkeypatch, method, density):
    peft_model, ours = setup
    names, weights = ["a", "b"], [0.6, 0.9]
    new = f"{method}_ab"
    theirs, draws = run_peft(
        peft_model, monkeypatch, names, weights, new, method, density=density, svd_rank=5
    )
    masks = replay(draws, peft_model, new, names, ["delta"]) if "dare" in method else None
    result, _ = combine(
        [ours[n] for n in names], weights, method, density=density, rank=5, masks=masks
    )
    for path, delta in theirs.items():
        assert rel(result.delta(path, np.float64), delta, delta) < 1e-4, path
