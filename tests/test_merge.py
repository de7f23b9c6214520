"""Streamed merge into a checkpoint: the math against numpy and real PEFT, sharding, unmerge,
and every refusal's message.

Reference: ``PeftModel.from_pretrained(base, dir).merge_and_unload()`` of the same PEFT adapter;
the merged checkpoint is loaded by transformers and must give the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import cli_harness
import ml_dtypes
import numpy as np
import pytest
import tiny_models
import torch

from loraformat import LoraLayer
from loraformat.checkpoint import Checkpoint
from loraformat.errors import LoraformatError
from loraformat.format.adapter import Adapter
from loraformat.format.adapter import load as load_adapter
from loraformat.format.safetensors_io import SafetensorsFile
from loraformat.interchange import open_adapter
from loraformat.interchange.peft import read_peft
from loraformat.merge import Contribution, merge_checkpoint, merge_weight, unmerge_checkpoint
from loraformat.merge.plan import MERGED_KEY, adapter_id

# -- shared helpers (test_export*.py imports these) -----------------------------------------------

#: One PEFT configuration per architecture, together covering Conv1D (fan_in_fan_out), rsLoRA,
#: embedding LoRA, lora_bias, modules_to_save (replacements), DoRA and alpha patterns.
PEFT_CASES = {
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc", "wte"], fan_in_fan_out=True,
                 use_rslora=True),
    "bert": dict(target_modules=["query", "value", "dense"], lora_bias=True,
                 modules_to_save=["classifier"]),
    "llama": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                  "down_proj"], use_dora=True, alpha_pattern={"v_proj": 16}),
    "vit": dict(target_modules=["q_proj", "v_proj", "fc1"], modules_to_save=["classifier"]),
}


def make_peft_adapter(base: Path, arch: str, out: Path, seed: int = 5, **lora) -> Path:
    """A real PEFT adapter with every trainable tensor perturbed (DoRA magnitudes included, so
    the row normalisation is exercised, and modules_to_save copies, so replacements are)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_models.load_transformers(base, arch)
    torch.manual_seed(seed)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
                if "magnitude" in name:
                    param.abs_()
    peft_model.save_pretrained(out)
    return out


def model_inputs(arch: str) -> dict[str, torch.Tensor]:
    """Inputs for both transformers and the exported graphs (masks spelled out: BERT's, and the
    decoders' plain exports take one too)."""
    inputs = tiny_models.example_inputs(arch, batch=2, seq=7)
    if arch in ("bert", "gpt2", "llama"):
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if arch == "bert":
        inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    return inputs


def logits(model, arch: str) -> np.ndarray:
    kwargs = dict(model_inputs(arch))
    if arch in ("gpt2", "llama"):
        kwargs["use_cache"] = False
    with torch.no_grad():
        return model(**kwargs).logits.numpy()


def peft_merged_logits(base: Path, arch: str, peft_dir: Path) -> np.ndarray:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_models.load_transformers(base, arch), peft_dir)
    return logits(model.merge_and_unload().eval(), arch)


def checkpoint_logits(path: Path, arch: str) -> np.ndarray:
    return logits(tiny_models.load_transformers(path, arch), arch)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case(tiny_checkpoint, tmp_path_factory):
    """``case(arch)`` → (base dir, PEFT dir, loraformat adapter dir, PEFT-merged logits)."""
    cache: dict[str, tuple] = {}

    def build(arch: str):
        if arch not in cache:
            base = tiny_checkpoint(arch)
            root = tmp_path_factory.mktemp(f"merge-{arch}")
            peft_dir = make_peft_adapter(base, arch, root / "peft", **PEFT_CASES[arch])
            native = read_peft(peft_dir, base=base).save(root / "adapter")
            cache[arch] = (base, peft_dir, native, peft_merged_logits(base, arch, peft_dir))
        return cache[arch]

    return build


def run_cli(*args: object) -> tuple[int, str]:
    """(exit status, the error line without ``error: ``, or stdout when it succeeded)."""
    result = cli_harness.run_cli(*args)
    if result.code:
        return result.code, result.error.removeprefix("error: ")
    return 0, result.out


# -- the math of one weight, against numpy -----------------------------------------------------


def _layer(rng, rows, cols, r, out_rows=None, **kw):
    b_rows = rows if out_rows is None else sum(b - a for a, b in out_rows)
    return LoraLayer(
        A=rng.standard_normal((r, cols)).astype(np.float32),
        B=rng.standard_normal((b_rows, r)).astype(np.float32),
        alpha=2.0, in_features=cols, out_features=rows, out_rows=out_rows, **kw,
    )


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_weight_two_adapters_and_out_rows_match_numpy(layout):
    rng = np.random.default_rng(0)
    out_f, in_f = 12, 7
    w_math = rng.standard_normal((out_f, in_f)).astype(np.float32)
    stored = w_math if layout == "out_in" else np.ascontiguousarray(w_math.T)
    full = _layer(rng, out_f, in_f, 3)
    parts = _layer(rng, out_f, in_f, 2, out_rows=[(0, 3), (8, 12)])
    merged = merge_weight(stored, layout, [Contribution(full, 0.5, 2.0), Contribution(parts, 1.5)])
    expected = w_math.astype(np.float64) + 2.0 * 0.5 * (full.B @ full.A)
    delta = 1.5 * (parts.B.astype(np.float64) @ parts.A)
    expected[0:3] += delta[0:3]
    expected[8:12] += delta[3:7]
    got = merged if layout == "out_in" else merged.T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert merged.dtype == np.float32 and merged.shape == stored.shape
    np.testing.assert_array_equal(stored, w_math if layout == "out_in" else w_math.T)  # untouched


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_merge_into_out_equals_the_plain_merge(layout):
    """The streaming path (read-only source, result in a separate buffer) gives the same bits."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 12)).astype(np.float32)
    w.flags.writeable = False
    cases = [
        [Contribution(_layer(rng, 12, 12, 2), 0.5)],
        [Contribution(_layer(rng, 12, 12, 2), 0.5), Contribution(_layer(rng, 12, 12, 3), -1.0)],
        [Contribution(_layer(rng, 12, 12, 2, out_rows=[(2, 5)]), 1.0)],
        [Contribution(_layer(rng, 12, 12, 2, magnitude=np.ones(12, np.float32)), 1.0, 0.5)],
        [],
    ]
    for contributions in cases:
        out = np.full_like(w, np.nan)
        got = merge_weight(w, layout, contributions, out=out)
        assert got is out
        np.testing.assert_array_equal(out, merge_weight(w, layout, contributions))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_bases_round_once(dtype):
    """fp32 accumulation, one cast at the end: the result is the fp32 sum, rounded."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 16)).astype(dtype)
    layers = [_layer(rng, 16, 16, 2) for _ in range(3)]
    merged = merge_weight(w, "out_in", [Contribution(layer, 0.01) for layer in layers])
    exact = w.astype(np.float32) + sum(0.01 * (x.B @ x.A) for x in layers)
    assert merged.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(merged, exact.astype(dtype))


def test_dora_formula_and_weight():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    layer = _layer(rng, 6, 5, 2, magnitude=rng.uniform(0.5, 2, 6).astype(np.float32))
    v = w.astype(np.float64) + 0.7 * (layer.B @ layer.A)
    dora = layer.magnitude[:, None] / np.linalg.norm(v, axis=1, keepdims=True) * v
    np.testing.assert_allclose(merge_weight(w, "out_in", [Contribution(layer, 0.7)]), dora,
                               rtol=1e-5)
    # in_out storage: rows of the math orientation are columns of the stored weight
    np.testing.assert_allclose(
        merge_weight(np.ascontiguousarray(w.T), "in_out", [Contribution(layer, 0.7)]).T, dora,
        rtol=1e-5,
    )
    half = merge_weight(w, "out_in", [Contribution(layer, 0.7, weight=0.5)])
    np.testing.assert_allclose(half, w + 0.5 * (dora - w), rtol=1e-5, atol=1e-6)


# -- whole checkpoints against PEFT ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama", "vit"])
def test_merged_checkpoint_equals_peft_merge_and_unload(case, arch, tmp_path):
    base, _peft_dir, native, expected = case(arch)
    result = merge_checkpoint(base, [native], tmp_path / "merged")
    assert result.tensors_changed > 0
    got = checkpoint_logits(tmp_path / "merged", arch)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(checkpoint_logits(base, arch) - expected).max() > 1e-3  # the adapter matters
    # config and every non-weight file come along; tensor names and dtypes are the base's
    assert json.loads((tmp_path / "merged" / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text()
    )
    with Checkpoint(base) as a, Checkpoint(tmp_path / "merged") as b:
        assert a.shard_of == b.shard_of
        assert all(a.info(n).dtype == b.info(n).dtype for n in a.names())


@pytest.mark.slow
def test_peft_directory_is_accepted_directly(case, tmp_path):
    base, peft_dir, _native, expected = case("gpt2")
    code, out = run_cli("merge", base, peft_dir, "-o", tmp_path / "m")
    assert code == 0, out
    np.testing.assert_allclose(checkpoint_logits(tmp_path / "m", "gpt2"), expected, atol=1e-4)


@pytest.mark.slow
def test_sharded_base_gives_sharded_output(case, tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama", max_shard_size="20KB")
    assert (base / "model.safetensors.index.json").is_file()
    _, peft_dir, _, _ = case("llama")
    expected = peft_merged_logits(base, "llama", peft_dir)
    # merge takes loraformat adapters; PEFT is converted at the boundary
    with pytest.raises(LoraformatError, match="is a PEFT adapter; merges take loraformat adapters"):
        merge_checkpoint(base, [peft_dir], tmp_path / "m")
    with open_adapter(peft_dir, base=base) as adapter:
        merge_checkpoint(base, [adapter], tmp_path / "m")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1
    assert sorted(p.name for p in (tmp_path / "m").glob("*.safetensors")) == shards
    assert (tmp_path / "m" / "model.safetensors.index.json").read_bytes() == (
        base / "model.safetensors.index.json"
    ).read_bytes()
    np.testing.assert_allclose(checkpoint_logits(tmp_path / "m", "llama"), expected, atol=1e-4)


def test_untouched_tensors_and_header_are_byte_identical(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("gpt2")
    adapter = _native_adapter(base, tmp_path, ["transformer.h.0.attn.c_attn"])
    merge_checkpoint(base, [adapter], tmp_path / "m")
    src, dst = SafetensorsFile(base / "model.safetensors"), SafetensorsFile(
        tmp_path / "m" / "model.safetensors"
    )
    try:
        # the header's tensor entries are the base's; its metadata records the adapter merged in
        assert dst.tensors == src.tensors
        record = json.dumps([adapter_id(load_adapter(adapter))])
        assert dst.metadata == {**src.metadata, MERGED_KEY: record}
        changed = [n for n in src.tensors if bytes(src.raw(n)) != bytes(dst.raw(n))]
        assert changed == ["transformer.h.0.attn.c_attn.weight"]
    finally:
        src.close()
        dst.close()


def test_unmerge_restores_the_base(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("gpt2")
    adapter = _native_adapter(base, tmp_path, ["transformer.h.0.attn.c_attn",
                                               "transformer.h.1.mlp.c_proj"])
    merge_checkpoint(base, [adapter, adapter], tmp_path / "m", weights=[0.5, 1.0])
    code, out = run_cli("unmerge", tmp_path / "m", adapter, adapter, "--weight", "0.5",
                        "--weight", "1", "-o", tmp_path / "u")
    assert code == 0, out
    with Checkpoint(base) as a, Checkpoint(tmp_path / "m") as m, Checkpoint(tmp_path / "u") as u:
        name = "transformer.h.0.attn.c_attn.weight"
        assert np.abs(m.numpy(name) - a.numpy(name)).max() > 1e-2
        for n in a.names():
            # float rounding: a few ulps of the merged value, which is the largest one involved
            ulps = 4 * np.finfo(np.float32).eps * max(1.0, float(np.abs(m.numpy(n)).max()))
            np.testing.assert_allclose(u.numpy(n), a.numpy(n), atol=ulps, rtol=0)


def test_progress_reports_every_changed_tensor(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("gpt2")
    adapter = _native_adapter(base, tmp_path, ["transformer.h.0.attn.c_attn",
                                               "transformer.h.1.attn.c_attn"])
    seen = []
    merge_checkpoint(base, [adapter], tmp_path / "m", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 2), (1, 2), (2, 2)]


# -- refusals ------------------------------------------------------------------------------------


def _native_adapter(base: Path, tmp: Path, paths, *, arch="gpt2", fingerprint=None, name="a",
                    bad=False, **extra) -> Path:
    rng = np.random.default_rng(7)
    layers = {}
    with Checkpoint(base) as ckpt:
        for path in paths:
            fan_in, fan_out = ckpt.info(path + ".weight").shape  # GPT-2 Conv1D: [in, out]
            a = rng.standard_normal((2, fan_in)).astype(np.float32)
            if bad:
                a[0, 0] = np.nan
            layers[path] = LoraLayer(
                A=a, B=rng.standard_normal((fan_out, 2)).astype(np.float32),
                alpha=4.0, in_features=fan_in, out_features=fan_out, **extra,
            )
    adapter = Adapter.from_layers(arch, layers, fingerprint=fingerprint)
    return adapter.save(tmp / name, overwrite=True)


@pytest.fixture
def gpt2_base(tiny_checkpoint):
    return tiny_checkpoint("gpt2")


def test_refuses_a_layer_the_base_lacks(gpt2_base, tmp_path):
    ok = load_adapter(_native_adapter(gpt2_base, tmp_path, ["transformer.h.0.attn.c_attn"]))
    spec = dict(ok.manifest["layers"]["transformer.h.0.attn.c_attn"])
    layer = ok.layer("transformer.h.0.attn.c_attn")
    adapter = Adapter.from_layers("gpt2", {"transformer.h.9.attn.c_attn": layer}).save(
        tmp_path / "missing"
    )
    assert spec["in_features"] == 32
    code, message = run_cli("merge", gpt2_base, adapter, "-o", tmp_path / "o")
    assert code == 1
    assert "adapter layer 'transformer.h.9.attn.c_attn' is not a layer of the base" in message
    assert not (tmp_path / "o").exists()


def test_refuses_a_shape_mismatch(gpt2_base, tmp_path):
    rng = np.random.default_rng(0)
    layer = LoraLayer(A=rng.standard_normal((2, 48)).astype(np.float32),
                      B=rng.standard_normal((96, 2)).astype(np.float32), alpha=1.0,
                      in_features=48, out_features=96)
    adapter = Adapter.from_layers("gpt2", {"transformer.h.0.attn.c_attn": layer}).save(
        tmp_path / "wrong"
    )
    code, message = run_cli("merge", gpt2_base, adapter, "-o", tmp_path / "o")
    assert code == 1
    assert "shape mismatch at layer 'transformer.h.0.attn.c_attn': adapter is 48→96" in message
    assert "base transformer.h.0.attn.c_attn.weight is 32→96" in message


def test_refuses_an_architecture_mismatch(gpt2_base, tmp_path):
    adapter = _native_adapter(gpt2_base, tmp_path, ["transformer.h.0.attn.c_attn"], arch="llama")
    code, message = run_cli("merge", gpt2_base, adapter, "-o", tmp_path / "o")
    assert code == 1
    assert "adapter is for architecture 'llama', but the base" in message
    assert "is 'gpt2'" in message


def test_refuses_another_base_fingerprint_unless_forced(gpt2_base, tmp_path):
    other = "lfp1:" + "0" * 64
    adapter = _native_adapter(gpt2_base, tmp_path, ["transformer.h.0.attn.c_attn"],
                              fingerprint=other)
    code, message = run_cli("merge", gpt2_base, adapter, "-o", tmp_path / "o")
    assert code == 1
    assert "adapter was made for base fingerprint lfp1:000000000000" in message
    assert "use --force to merge anyway" in message
    code, message = run_cli("merge", gpt2_base, adapter, "-o", tmp_path / "o", "--force")
    assert code == 0, message
    # the right fingerprint needs no --force; unmerge never checks it (its base is merged)
    with Checkpoint(gpt2_base) as ckpt:
        right = ckpt.fingerprint()
    good = _native_adapter(gpt2_base, tmp_path, ["transformer.h.0.attn.c_attn"],
                           fingerprint=right, name="good")
    assert run_cli("merge", gpt2_base, good, "-o", tmp_path / "g")[0] == 0
    assert run_cli("unmerge", tmp_path / "g", good, "-o", tmp_path / "u")[0] == 0


def test_force_does_not_override_other_refusals(gpt2_base, tmp_path):
    adapter = _native_adapter(gpt2_base, tmp_path, ["transformer.h.0.attn.c_attn"], arch="bert")
    code, message = run_cli("merge", gpt2_base, adapter, "-o", tmp_path / "o", "--force")
    assert code == 1 and "adapter is for architecture 'bert'" in message


def test_refuses_nonfinite_values_unless_allowed(gpt2_base, tmp_path):
    adapter = _native_adapter(gpt2_base, tmp_path, ["transformer.h.0.attn.c_attn"], bad=True)
    code, message = run_cli("merge", gpt2_base, adapter, "-o", tmp_path / "o")
    assert code == 1
    assert (
        "tensor 'transformer.h.0.attn.c_attn.lora_A' has 1 non-finite value(s) (NaN/Inf)"
        in message
    )
    assert "use --allow-nonfinite" in message
    code, message = run_cli(
        "merge", gpt2_base, adapter, "-o", tmp_path / "o", "--allow-nonfinite"
    )
    assert code == 0, message


def test_refuses_an_existing_output_unless_overwrite(gpt2_base, tmp_path):
    adapter = _native_adapter(gpt2_base, tmp_path, ["transformer.h.0.attn.c_attn"])
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    code, message = run_cli("merge", gpt2_base, adapter, "-o", tmp_path / "o")
    assert code == 1 and "output already exists (use --overwrite to replace it)" in message
    assert (tmp_path / "o" / "keep").exists()
    assert run_cli("merge", gpt2_base, adapter, "-o", tmp_path / "o", "--overwrite")[0] == 0
    assert not (tmp_path / "o" / "keep").exists()
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_refuses_the_wrong_number_of_weights(gpt2_base, tmp_path):
    adapter = _native_adapter(gpt2_base, tmp_path, ["transformer.h.0.attn.c_attn"])
    code, message = run_cli("merge", gpt2_base, adapter, "--weight", "1", "--weight", "2",
                            "-o", tmp_path / "o")
    assert code == 1 and "2 weight(s) given for 1 adapter(s)" in message


def test_unmerge_refuses_dora_and_replacements(gpt2_base, tmp_path):
    rng = np.random.default_rng(0)
    dora = _native_adapter(gpt2_base, tmp_path, ["transformer.h.0.attn.c_proj"], name="dora",
                           magnitude=rng.uniform(1, 2, 32).astype(np.float32))
    code, message = run_cli("unmerge", gpt2_base, dora, "-o", tmp_path / "o")
    assert code == 1 and "is DoRA; a DoRA merge cannot be undone" in message
    with Checkpoint(gpt2_base) as ckpt:
        ln = np.array(ckpt.numpy("transformer.ln_f.weight"))
    repl = Adapter.from_layers("gpt2", {}, replacements={"transformer.ln_f.weight": ln * 2})
    repl.save(tmp_path / "repl")
    code, message = run_cli("unmerge", gpt2_base, tmp_path / "repl", "-o", tmp_path / "o")
    assert code == 1 and "a replaced tensor cannot be unmerged" in message
    # merging it replaces the tensor exactly
    merge_checkpoint(gpt2_base, [tmp_path / "repl"], tmp_path / "m")
    with Checkpoint(tmp_path / "m") as m:
        np.testing.assert_array_equal(m.numpy("transformer.ln_f.weight"), ln * 2)


def test_refuses_lora_bias_on_a_layer_without_bias(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama")
    rng = np.random.default_rng(0)
    layer = LoraLayer(A=rng.standard_normal((2, 32)).astype(np.float32),
                      B=rng.standard_normal((32, 2)).astype(np.float32), alpha=1.0,
                      in_features=32, out_features=32,
                      lora_bias=np.ones(32, dtype=np.float32))
    Adapter.from_layers("llama", {"model.layers.0.self_attn.q_proj": layer}).save(tmp_path / "a")
    code, message = run_cli("merge", base, tmp_path / "a", "-o", tmp_path / "o")
    assert code == 1
    assert "has a lora_bias, but the base layer has no bias tensor" in message


def test_refuses_writing_over_the_base(gpt2_base, tmp_path):
    adapter = _native_adapter(gpt2_base, tmp_path, ["transformer.h.0.attn.c_attn"])
    with pytest.raises(LoraformatError, match="output is the base itself"):
        unmerge_checkpoint(gpt2_base, [adapter], gpt2_base, overwrite=True)


def test_bf16_checkpoint_streams_through_fp32(gpt2_base, tmp_path):
    """A bf16 base is merged in fp32 and rounded once; untouched tensors are copied bit for bit."""
    from loraformat.format.safetensors_io import write_safetensors

    base = tmp_path / "bf16"
    base.mkdir()
    (base / "config.json").write_bytes((gpt2_base / "config.json").read_bytes())
    with Checkpoint(gpt2_base) as ckpt:
        arrays = {n: np.asarray(ckpt.numpy(n)).astype(ml_dtypes.bfloat16) for n in ckpt.names()}
    write_safetensors(base / "model.safetensors", arrays, {"format": "pt"})
    path = "transformer.h.1.mlp.c_fc"
    adapter_dir = _native_adapter(gpt2_base, tmp_path, [path])
    merge_checkpoint(base, [adapter_dir], tmp_path / "m")
    adapter = load_adapter(adapter_dir)
    expected = (arrays[path + ".weight"].astype(np.float32) + adapter.delta(path).T).astype(
        ml_dtypes.bfloat16
    )
    with Checkpoint(tmp_path / "m") as merged:
        assert merged.info(path + ".weight").dtype == "BF16"
        np.testing.assert_array_equal(merged.numpy(path + ".weight"), expected)
        np.testing.assert_array_equal(merged.numpy("transformer.wte.weight"),
                                      arrays["transformer.wte.weight"])
