"""Interchange codecs on their own: round trips loraformat → X → loraformat for every format on
all four architectures, the foreign files checked with the foreign libraries' own readers
(gguf.GGUFReader, onnxruntime.AdapterFormat, safetensors, torch.load), lossy refusals and their
messages, and format detection.

Which round trips are bitwise: every codec returns the original tensors bit for bit when the
target can hold the adapter's scales as they are (PEFT always; GGUF with one alpha, or rsLoRA
with one rank; MLX with one scale; ONNX Runtime adapters when the scale is 1, since ORT folds
the scale into B). Where a scale must be folded into B the round trip is exact in ΔW up to one
float32 rounding, and the tests say so.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from loraformat import interchange
from loraformat.base import open_base
from loraformat.errors import LoraformatError
from loraformat.format.adapter import Adapter, LoraLayer, load

ARCHS = ["gpt2", "llama", "bert", "vit"]


@pytest.fixture(scope="module")
def bases(tiny_checkpoint):
    opened = {arch: open_base(tiny_checkpoint(arch)) for arch in ARCHS}
    yield opened
    for base in opened.values():
        base.close()


def linear_paths(base, count=None):
    paths = [p for p, layer in base.layers.items() if layer.kind == "linear"]
    blocks = [p for p in paths if any(ch.isdigit() for ch in p)]
    return blocks[:count] if count else blocks


def make_adapter(base, paths, *, rank=4, alpha=8.0, scaling="alpha/r", seed=0,
                 dtype=np.float32, per_layer=None, replacements=None):
    """Random non-zero A/B on real layers. ``per_layer[path]`` overrides rank/alpha/dora/...."""
    rng = np.random.default_rng(seed)
    layers = {}
    for path in paths:
        dense = base.layers[path]
        opts = dict((per_layer or {}).get(path, {}))
        r = opts.pop("rank", rank)
        rows = dense.out_features
        out_rows = opts.pop("out_rows", None)
        if out_rows is not None:
            rows = sum(b - a for a, b in out_rows)
        layer = LoraLayer(
            A=rng.standard_normal((r, dense.in_features)).astype(dtype),
            B=rng.standard_normal((rows, r)).astype(dtype),
            alpha=float(opts.pop("alpha", alpha)),
            in_features=dense.in_features,
            out_features=dense.out_features,
            kind=dense.kind,
            out_rows=out_rows,
        )
        if opts.pop("dora", False):
            layer.magnitude = (rng.random(dense.out_features) + 0.5).astype(dtype)
        if opts.pop("lora_bias", False):
            layer.lora_bias = rng.standard_normal(dense.out_features).astype(dtype)
        assert not opts, opts
        layers[path] = layer
    return Adapter.from_layers(
        base.architecture, layers, scaling=scaling, replacements=replacements,
        fingerprint=base.checkpoint.fingerprint(),
    )


def assert_bitwise(a: Adapter, b: Adapter, *, manifest=True):
    """Same layers, scales, tensors (dtype and bytes)."""
    assert sorted(a.specs) == sorted(b.specs)
    if manifest:
        assert a.scaling == b.scaling
        for path, spec in a.specs.items():
            assert spec == b.specs[path], path
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        x, y = np.asarray(a.tensors[name]), np.asarray(b.tensors[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name


def assert_same_delta(a: Adapter, b: Adapter, rtol=1e-6):
    assert sorted(a.specs) == sorted(b.specs)
    for path in a.specs:
        da, db = a.delta(path, np.float64), b.delta(path, np.float64)
        np.testing.assert_allclose(db, da, rtol=rtol, atol=rtol * np.abs(da).max(), err_msg=path)


def roundtrip(adapter, tmp_path, suffix, fmt, base=None, **options):
    out = tmp_path / f"out{suffix}"
    report = interchange.from_adapter(adapter, out, fmt, base=base, **options)
    assert interchange.detect_format(out) == fmt
    back = interchange.to_adapter(out, fmt, base=base, **options)
    return back, report, out


# -- loraformat itself ----------------------------------------------------------------------


def test_native_directory_and_single_file_are_bitwise_equal(bases, tmp_path):
    adapter = make_adapter(bases["llama"], linear_paths(bases["llama"], 3))
    adapter.save(tmp_path / "dir")
    rep = interchange.convert(tmp_path / "dir", tmp_path / "one.safetensors")
    assert rep.source_format == rep.target_format == "loraformat"
    assert interchange.detect_format(tmp_path / "one.safetensors") == "loraformat"
    interchange.convert(tmp_path / "one.safetensors", tmp_path / "dir2", to="loraformat")
    for other in ("one.safetensors", "dir2"):
        assert_bitwise(adapter, load(tmp_path / other))
    with pytest.raises(LoraformatError, match="already exists"):
        interchange.convert(tmp_path / "dir", tmp_path / "one.safetensors")


# -- PEFT ----------------------------------------------------------------------------------


def _peft_features(base):
    """An adapter using everything PEFT can carry on this architecture."""
    paths = linear_paths(base, 4)
    per = {paths[0]: {"rank": 2, "alpha": 3.0}, paths[1]: {"alpha": 5.5}}
    replacements = {}
    if base.architecture == "llama":
        per.update({p: {"dora": True} for p in paths})
    if base.architecture == "bert":
        per.update({p: {**per.get(p, {}), "lora_bias": True} for p in paths})
        replacements["classifier.weight"] = np.ones((3, 32), np.float32)
    if base.architecture == "gpt2":
        bias = base.layers[paths[2]].bias
        replacements[bias] = np.full(base.checkpoint.info(bias).shape, 0.5, np.float32)
        paths.append("transformer.wte")
    return paths, per, replacements


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scaling", ["alpha/r", "alpha/sqrt(r)"])
def test_peft_round_trip_is_bitwise(bases, tmp_path, arch, scaling):
    base = bases[arch]
    paths, per, replacements = _peft_features(base)
    if scaling == "alpha/sqrt(r)":
        per = {p: {k: v for k, v in o.items() if k != "rank"} for p, o in per.items()}
    adapter = make_adapter(base, paths, scaling=scaling, per_layer=per, replacements=replacements)
    back, _, out = roundtrip(adapter, tmp_path, "", "peft", base=base.path)
    assert_bitwise(adapter, back)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] == (scaling == "alpha/sqrt(r)")
    assert config["use_dora"] == (arch == "llama")
    assert config["lora_bias"] == (arch == "bert")
    if arch == "bert":
        assert config["modules_to_save"] == ["classifier"]
    if arch == "gpt2":
        assert config["fan_in_fan_out"] is True and config["bias"] == "lora_only"
    # Without the base, the architecture is detected and features come from the shapes.
    assert_bitwise(adapter, interchange.to_adapter(out, "peft", architecture=arch))


def test_peft_names_are_transformers_in_memory_names_for_vit(bases, tmp_path):
    base = bases["vit"]
    adapter = make_adapter(base, linear_paths(base, 2))
    out = tmp_path / "vit_peft"
    interchange.from_adapter(adapter, out, "peft", base=base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert all(".layers." in name and "encoder" not in name for name in config["target_modules"])
    assert_bitwise(adapter, interchange.to_adapter(out, base=base))


def test_peft_pattern_semantics_first_match_wins():
    from peft.utils.other import get_pattern_key as reference

    from loraformat.interchange.peft import get_pattern_key

    keys = ["layers.1.self_attn.q_proj", "q_proj", "v_proj"]
    for name in ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
                 "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"]:
        assert get_pattern_key(keys, name) == reference(keys, name)


def test_peft_out_rows_refused_then_expanded_with_lossy(bases, tmp_path):
    base = bases["gpt2"]
    path = "transformer.h.0.attn.c_attn"
    adapter = make_adapter(base, [path], per_layer={path: {"out_rows": [(0, 32), (64, 96)]}})
    with pytest.raises(LoraformatError, match=r"out_rows.*PEFT has no such form.*--lossy"):
        interchange.from_adapter(adapter, tmp_path / "p", "peft", base=base)
    assert not (tmp_path / "p").exists()
    report = interchange.from_adapter(adapter, tmp_path / "p", "peft", base=base, lossy=True)
    assert any("out_rows" in line for line in report.lossy)
    back = interchange.to_adapter(tmp_path / "p", base=base)
    assert back.specs[path].out_rows is None
    assert_same_delta(adapter, back, rtol=0)


def test_peft_legacy_bin_reads_like_safetensors(bases, tmp_path):
    from safetensors.torch import load_file

    base = bases["llama"]
    adapter = make_adapter(base, linear_paths(base, 2))
    out = tmp_path / "peft"
    interchange.from_adapter(adapter, out, "peft", base=base)
    state = load_file(out / "adapter_model.safetensors")
    (out / "adapter_model.safetensors").unlink()
    torch.save(state, out / "adapter_model.bin")
    assert_bitwise(adapter, interchange.to_adapter(out, base=base))


def test_peft_bin_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    out = tmp_path / "peft"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                         "lora_alpha": 8}))
    torch.save({"x": Evil()}, out / "adapter_model.bin")
    with pytest.raises(LoraformatError, match="weights_only=True"):
        interchange.to_adapter(out, architecture="llama")


def test_peft_errors_name_the_problem(tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(LoraformatError, match="peft_type is 'IA3'"):
        interchange.to_adapter(out)
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                         "lora_alpha": 8}))
    with pytest.raises(LoraformatError, match=r"neither adapter_model\.safetensors"):
        interchange.to_adapter(out, architecture="llama")


def test_peft_alora_is_lossy(bases, tmp_path):
    base = bases["llama"]
    adapter = make_adapter(base, linear_paths(base, 1))
    out = tmp_path / "p"
    interchange.from_adapter(adapter, out, "peft", base=base)
    config = json.loads((out / "adapter_config.json").read_text())
    config["alora_invocation_tokens"] = [5, 6]
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraformatError, match="aLoRA invocation tokens"):
        interchange.to_adapter(out, base=base)
    assert_bitwise(adapter, interchange.to_adapter(out, base=base, lossy=True))


# -- ONNX Runtime adapter ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_adapter_round_trip_bitwise_at_scale_one(bases, tmp_path, arch):
    import onnxruntime as ort

    base = bases[arch]
    paths = linear_paths(base, 3)
    adapter = make_adapter(base, paths, rank=4, alpha=4.0, per_layer={paths[0]: {"rank": 2,
                                                                                   "alpha": 2.0}})
    back, _, out = roundtrip(adapter, tmp_path, ".onnx_adapter", "onnx_adapter", base=base)
    assert_bitwise(adapter, back)
    params = ort.AdapterFormat.read_adapter(str(out)).get_parameters()
    for path in paths:
        dense = base.layers[path]
        a = params[path + ".lora_A"].numpy()
        b = params[path + ".lora_B"].numpy()
        assert a.shape == (dense.in_features, adapter.specs[path].rank)
        assert b.shape == (adapter.specs[path].rank, dense.out_features)


def test_onnx_adapter_folds_scale_and_expands_out_rows(bases, tmp_path):
    import onnxruntime as ort

    base = bases["gpt2"]
    fused = "transformer.h.0.attn.c_attn"
    adapter = make_adapter(base, [fused, "transformer.h.0.mlp.c_fc"], alpha=6.0,
                           scaling="alpha/sqrt(r)",
                           per_layer={fused: {"out_rows": [(0, 32), (64, 96)]}})
    back, report, out = roundtrip(adapter, tmp_path, ".onnx_adapter", "onnx_adapter", base=base)
    assert any("folded" in n for n in report.notes)
    assert_same_delta(adapter, back)
    b = ort.AdapterFormat.read_adapter(str(out)).get_parameters()[fused + ".lora_B"].numpy()
    assert b.shape == (4, 96) and not b[:, 32:64].any()
    expected = (adapter.layer(fused).B * adapter.scale(fused)).T
    np.testing.assert_allclose(b[:, 64:], expected[:, 32:], rtol=1e-6)


def test_onnx_adapter_refuses_dora_unless_lossy(bases, tmp_path):
    base = bases["llama"]
    paths = linear_paths(base, 2)
    adapter = make_adapter(base, paths, per_layer={paths[0]: {"dora": True}})
    with pytest.raises(LoraformatError, match=r"DoRA magnitudes on 1 layer.*--lossy"):
        interchange.from_adapter(adapter, tmp_path / "a.onnx_adapter", base=base)
    assert not (tmp_path / "a.onnx_adapter").exists()
    report = interchange.from_adapter(adapter, tmp_path / "a.onnx_adapter", base=base, lossy=True)
    assert report.lossy and "DoRA" in report.lossy[0]


def test_onnx_adapter_needs_architecture(tmp_path, bases):
    adapter = make_adapter(bases["llama"], linear_paths(bases["llama"], 1), alpha=4)
    out = tmp_path / "a.onnx_adapter"
    interchange.from_adapter(adapter, out)
    with pytest.raises(LoraformatError, match="does not say its model"):
        interchange.to_adapter(out)


# -- GGUF --------------------------------------------------------------------------------------


def _llama_cpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``permute`` of a weight's rows, written independently."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(
        shape
    )


def _model_ne(dense, gguf_name):
    """The ne llama.cpp gives the model tensor: [in, out]; token_embd is [dim, vocab]."""
    if gguf_name.startswith("token_embd"):
        return dense.out_features, dense.in_features
    return dense.in_features, dense.out_features


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scaling", ["alpha/r", "alpha/sqrt(r)"])
def test_gguf_round_trip_and_llama_cpp_loader_checks(bases, tmp_path, arch, scaling):
    from gguf import GGUFReader

    from loraformat.architecture import get_architecture

    base = bases[arch]
    paths = linear_paths(base)
    embedding = "model.embed_tokens" if arch == "llama" else "transformer.wte"
    paths.append(embedding)
    per = {paths[0]: {"rank": 2}} if scaling == "alpha/r" else {}
    adapter = make_adapter(base, paths, scaling=scaling, per_layer=per, alpha=6.0)
    back, report, out = roundtrip(adapter, tmp_path, ".gguf", "gguf", base=base)
    assert_bitwise(adapter, back)
    assert not report.notes  # one alpha covers every layer: nothing folded

    reader = GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == arch
    file_alpha = fields["adapter.lora.alpha"]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(paths)
    config = base.config
    for path in paths:
        dense, spec = base.layers[path], adapter.specs[path]
        name = get_architecture(arch).names.foreign(path, "gguf") + ".weight"
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        model_ne = _model_ne(dense, name)
        if name.startswith("token_embd"):  # llama.cpp's flipped check for embeddings
            assert model_ne[0] == b.shape[1] and model_ne[1] == a.shape[1]
        else:
            assert model_ne[0] == a.shape[0] and model_ne[1] == b.shape[1]
            assert a.shape[1] == b.shape[0]
        rank = int(b.shape[0])  # llama.cpp: rank = b->ne[0]
        assert rank == spec.rank
        assert math.isclose(file_alpha / rank, adapter.scale(path), rel_tol=1e-6)
        if arch == "llama" and path.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads"] if path.endswith("q_proj") else config[
                "num_key_value_heads"]
            expected = _llama_cpp_permute(np.asarray(adapter.layer(path).B), heads)
            np.testing.assert_array_equal(np.asarray(b.data), expected)


def test_gguf_folds_differing_alphas(bases, tmp_path):
    base = bases["llama"]
    paths = linear_paths(base, 3)
    adapter = make_adapter(base, paths, per_layer={paths[0]: {"alpha": 3.0}})
    back, report, _ = roundtrip(adapter, tmp_path, ".gguf", "gguf", base=base)
    assert any("folded into B for 1 layer" in n for n in report.notes)
    assert_same_delta(adapter, back)


def test_gguf_refusals(bases, tmp_path):
    adapter = make_adapter(bases["bert"], linear_paths(bases["bert"], 1))
    with pytest.raises(LoraformatError, match=r"gives no llama\.cpp"):
        interchange.from_adapter(adapter, tmp_path / "b.gguf", base=bases["bert"])
    adapter = make_adapter(bases["llama"], linear_paths(bases["llama"], 1))
    with pytest.raises(LoraformatError, match="needs the base model"):
        interchange.from_adapter(adapter, tmp_path / "l.gguf")
    biased = make_adapter(bases["llama"], linear_paths(bases["llama"], 1),
                          per_layer={linear_paths(bases["llama"], 1)[0]: {"lora_bias": True}})
    with pytest.raises(LoraformatError, match="lora_bias on 1 layer"):
        interchange.from_adapter(biased, tmp_path / "l.gguf", base=bases["llama"])
    interchange.from_adapter(adapter, tmp_path / "l.gguf", base=bases["llama"])
    with pytest.raises(LoraformatError, match=r"architecture 'llama', the base is 'gpt2'"):
        interchange.to_adapter(tmp_path / "l.gguf", base=bases["gpt2"])


@pytest.mark.parametrize("arch", ["bert", "vit"])
@pytest.mark.parametrize("fmt,suffix,what", [("gguf", ".gguf", "llama.cpp"), ("mlx", "", "MLX")])
def test_architectures_without_foreign_names_are_refused(bases, tmp_path, arch, fmt, suffix,
                                                         what):
    adapter = make_adapter(bases[arch], linear_paths(bases[arch], 2))
    with pytest.raises(LoraformatError, match=f"the '{arch}' plugin gives no {what}"):
        interchange.from_adapter(adapter, tmp_path / f"x{suffix}", fmt, base=bases[arch])
    assert not (tmp_path / f"x{suffix}").exists()


# -- MLX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mlx_round_trip_bitwise_with_mixed_ranks_and_dora(bases, tmp_path, arch):
    base = bases[arch]
    paths = linear_paths(base)
    per = {paths[0]: {"rank": 2, "alpha": 4.0}}  # same scale 2.0, smaller rank → padded
    if arch == "llama":
        per = {p: {**per.get(p, {}), "dora": True} for p in paths}
    adapter = make_adapter(base, paths, per_layer=per)
    back, _, out = roundtrip(adapter, tmp_path, "", "mlx", base=base)
    assert_bitwise(adapter, back)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == ("dora" if arch == "llama" else "lora")
    assert config["lora_parameters"]["rank"] == 4 and config["lora_parameters"]["scale"] == 2.0
    assert config["num_layers"] == 2  # every block of the tiny model, counted from the last
    from loraformat.architecture import get_architecture
    from loraformat.format.safetensors_io import SafetensorsFile

    with SafetensorsFile(out / "adapters.safetensors") as st:
        names = st.keys()
        for path in paths:
            module = get_architecture(arch).names.foreign(path, "mlx")
            assert module + ".lora_a" in names
            a, b = st.numpy(module + ".lora_a"), st.numpy(module + ".lora_b")
            dense = base.layers[path]
            assert a.shape == (dense.in_features, 4) and b.shape == (4, dense.out_features)
            # MLX computes x·lora_a·lora_b·scale: the same ΔW as scale·B·A.
            np.testing.assert_allclose((a @ b * 2.0).T, adapter.delta(path), rtol=1e-5,
                                       atol=1e-5)
    # Without loraformat's own member (a plain mlx-lm file): same ΔW, alpha/r form.
    config.pop("loraformat")
    (out / "adapter_config.json").write_text(json.dumps(config))
    plain = interchange.to_adapter(out, base=base)
    assert_same_delta(adapter, plain, rtol=0)


def test_mlx_folds_differing_scales(bases, tmp_path):
    base = bases["llama"]
    paths = linear_paths(base, 3)
    adapter = make_adapter(base, paths, per_layer={paths[1]: {"alpha": 1.0}})
    back, report, _ = roundtrip(adapter, tmp_path, "", "mlx", base=base)
    assert any("folded into lora_b for 1 layer" in n for n in report.notes)
    assert_same_delta(adapter, back)


def test_mlx_old_alpha_is_refused(bases, tmp_path):
    base = bases["llama"]
    adapter = make_adapter(base, linear_paths(base, 1))
    out = tmp_path / "m"
    interchange.from_adapter(adapter, out, "mlx", base=base)
    config = json.loads((out / "adapter_config.json").read_text())
    config["lora_parameters"] = {"rank": 4, "alpha": 16, "dropout": 0.0}
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraformatError, match=r"'alpha' but no 'scale'.*without guessing"):
        interchange.to_adapter(out, base=base)


# -- loralib -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_loralib_round_trip_plain_linear(bases, tmp_path, arch, suffix):
    base = bases[arch]
    adapter = make_adapter(base, linear_paths(base, 3), alpha=16.0)
    out = tmp_path / f"lora{suffix}"
    report = interchange.from_adapter(adapter, out, "loralib", base=base)
    assert any("--alpha 16 --rank 4" in n for n in report.notes)
    assert interchange.detect_format(out) == "loralib"
    if suffix == ".pt":
        with pytest.raises(LoraformatError, match="--alpha"):
            interchange.to_adapter(out, base=base)
        back = interchange.to_adapter(out, base=base, alpha=16)
        state = torch.load(out, weights_only=True)
        assert sorted(state) == sorted(
            f"{p}.lora_{x}" for p in linear_paths(base, 3) for x in "AB"
        )
    else:
        back = interchange.to_adapter(out, base=base)  # the metadata records alpha and r
    assert_bitwise(adapter, back)


def test_loralib_merged_linear_matches_loralib_math(bases, tmp_path):
    """A GPT-2 c_attn MergedLinear checkpoint (enable_lora=[True, False, True], fan_in_fan_out):
    loraformat's ΔW equals loralib's own formula, computed here the way loralib does (grouped
    conv1d of A by B, zero-padded into the enabled parts, times lora_alpha/r)."""
    base = bases["gpt2"]
    r, alpha, k, part, d = 4, 32.0, 2, 32, 32
    g = torch.Generator().manual_seed(0)
    state = {}
    for n in range(2):
        state[f"transformer.h.{n}.attn.c_attn.lora_A"] = torch.randn(r * k, d, generator=g)
        state[f"transformer.h.{n}.attn.c_attn.lora_B"] = torch.randn(part * k, r, generator=g)
    state["transformer.h.0.mlp.c_fc.lora_A"] = torch.randn(r, d, generator=g)
    state["transformer.h.0.mlp.c_fc.lora_B"] = torch.randn(4 * d, r, generator=g)
    src = tmp_path / "gpt2_lora.pt"
    torch.save({"model_state_dict": state}, src)

    with pytest.raises(LoraformatError, match="enable_lora"):
        interchange.to_adapter(src, base=base, alpha=alpha)
    adapter = interchange.to_adapter(src, base=base, alpha=alpha, enable_lora="true,false,true")
    spec = adapter.specs["transformer.h.0.attn.c_attn"]
    assert spec.out_rows == ((0, 32), (64, 96)) and spec.rank == 8 and spec.alpha == 64
    for n in range(2):
        a = state[f"transformer.h.{n}.attn.c_attn.lora_A"]
        b = state[f"transformer.h.{n}.attn.c_attn.lora_B"]
        grouped = torch.nn.functional.conv1d(a.unsqueeze(0), b.unsqueeze(-1), groups=k)[0]
        full = torch.zeros(3 * part, d)
        full[[*range(0, 32), *range(64, 96)]] = grouped
        expected = (full * (alpha / r)).numpy()
        np.testing.assert_allclose(adapter.delta(f"transformer.h.{n}.attn.c_attn"), expected,
                                   rtol=1e-5, atol=1e-5)
    # And back: loraformat → loralib gives the original tensors, bitwise.
    out = tmp_path / "again.pt"
    interchange.from_adapter(adapter, out, "loralib")
    again = torch.load(out, weights_only=True)
    assert sorted(again) == sorted(state)
    for key in state:
        assert torch.equal(again[key], state[key]), key


def test_loralib_spec_vector_fused(tmp_path):
    """spec/vectors: the fused GPT-2 c_attn adapter and the same adapter as loralib stores it."""
    from pathlib import Path

    from loraformat.format.safetensors_io import write_safetensors

    vectors = Path(__file__).resolve().parent.parent / "spec" / "vectors"
    expected = load(vectors / "fused")
    stored, _ = interchange._common.read_safetensors(
        vectors / "expected" / "fused.loralib.safetensors"
    )
    src = tmp_path / "fused_lora.safetensors"
    write_safetensors(src, stored)  # keyed by module, as loralib's state_dict
    got = interchange.to_adapter(src, "loralib", architecture="gpt2", alpha=4,
                                 enable_lora="[true, false, true]")
    assert_bitwise(expected, got)
    out = tmp_path / "again.safetensors"
    interchange.from_adapter(expected, out, "loralib")
    again, metadata = interchange._common.read_safetensors(out)
    assert metadata == {"lora_alpha": "4.0", "r": "2", "enable_lora": "[true, false, true]"}
    for key, value in stored.items():
        assert again[key].tobytes() == value.tobytes()


def test_loralib_folds_scales_pads_ranks_and_carries_embeddings(bases, tmp_path):
    base = bases["gpt2"]
    paths = [*linear_paths(base, 3), "transformer.wte"]
    adapter = make_adapter(base, paths, scaling="alpha/sqrt(r)",
                           per_layer={paths[0]: {"rank": 2}, paths[1]: {"alpha": 3.0}})
    report = interchange.from_adapter(adapter, tmp_path / "x.safetensors", "loralib", base=base)
    assert any("folded into lora_B" in n for n in report.notes)
    assert any("zero-padded to 4 for 1 layer" in n for n in report.notes)
    back = interchange.to_adapter(tmp_path / "x.safetensors", "loralib", base=base)
    assert back.specs["transformer.wte"].kind == "embedding"
    assert {s.rank for s in back.specs.values()} == {4}
    assert_same_delta(adapter, back)


def test_loralib_refuses_dora_unless_lossy(bases, tmp_path):
    base = bases["llama"]
    paths = linear_paths(base, 2)
    adapter = make_adapter(base, paths, per_layer={paths[0]: {"dora": True}})
    with pytest.raises(LoraformatError, match=r"to loralib without loss: DoRA magnitudes on 1"):
        interchange.from_adapter(adapter, tmp_path / "x.pt", base=base)
    report = interchange.from_adapter(adapter, tmp_path / "x.pt", base=base, lossy=True)
    assert report.lossy and "DoRA" in report.lossy[0]
    back = interchange.to_adapter(tmp_path / "x.pt", base=base, alpha=8)
    assert not any(s.dora for s in back.specs.values())


# -- dtypes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("fmt,suffix", [("peft", ""), ("gguf", ".gguf"), ("mlx", ""),
                                        ("loralib", ".pt"), ("loralib", ".safetensors")])
def test_half_precision_round_trips_keep_dtype_and_bits(bases, tmp_path, dtype, fmt, suffix):
    import ml_dtypes

    base = bases["llama"]
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    adapter = make_adapter(base, linear_paths(base, 3), dtype=np_dtype)
    options = {"alpha": 8.0} if suffix == ".pt" else {}
    back, _, _ = roundtrip(adapter, tmp_path, suffix, fmt, base=base, **options)
    assert_bitwise(adapter, back)


def test_onnx_adapter_bfloat16_becomes_float32(bases, tmp_path):
    import ml_dtypes

    base = bases["llama"]
    adapter = make_adapter(base, linear_paths(base, 1), alpha=4.0, dtype=ml_dtypes.bfloat16)
    back, report, _ = roundtrip(adapter, tmp_path, ".onnx_adapter", "onnx_adapter", base=base)
    assert any("bfloat16 tensors written as float32" in n for n in report.notes)
    for name in back.tensors:
        assert back.tensors.dtype(name) == "F32"
        np.testing.assert_array_equal(back.tensors[name],
                                      np.asarray(adapter.tensors[name]).astype(np.float32))


# -- detection and the convert entry point ------------------------------------------------------


def test_detect_format_refuses_unknown(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(LoraformatError, match="not a LoRA adapter in any known format"):
        interchange.detect_format(tmp_path / "x.txt")
    with pytest.raises(LoraformatError, match="no such file"):
        interchange.detect_format(tmp_path / "missing")
    with pytest.raises(LoraformatError, match="unknown format 'safetensorz'"):
        interchange.codec("safetensorz")


def test_convert_chain_peft_to_every_format_and_back(bases, tmp_path):
    """PEFT → GGUF → MLX → loralib → ONNX adapter → loraformat with the CLI's entry point:
    every hop with one alpha/scale 1 is exact."""
    base = bases["llama"]
    adapter = make_adapter(base, linear_paths(base), alpha=4.0)  # scale 1
    adapter.save(tmp_path / "start")
    hops = [("peft", "p"), ("gguf", "g.gguf"), ("mlx", "m"), ("loralib", "l.pt"),
            ("onnx_adapter", "o.onnx_adapter"), ("loraformat", "end.safetensors")]
    src = tmp_path / "start"
    for fmt, name in hops:
        report = interchange.convert(src, tmp_path / name, to=fmt, base=base.path,
                                     alpha=4.0 if src.suffix == ".pt" else None)
        assert report.target_format == fmt and report.layers == len(adapter.specs)
        src = tmp_path / name
    assert_bitwise(adapter, load(src), manifest=False)
    assert_same_delta(adapter, load(src), rtol=0)


def test_options_that_do_not_apply_are_refused(bases, tmp_path):
    adapter = make_adapter(bases["llama"], linear_paths(bases["llama"], 1))
    adapter.save(tmp_path / "a")
    with pytest.raises(LoraformatError, match="option 'alpha' does not apply"):
        interchange.convert(tmp_path / "a", tmp_path / "b", to="peft", alpha=3)
    with pytest.raises(LoraformatError, match="output is the input"):
        interchange.convert(tmp_path / "a", tmp_path / "a", overwrite=True)
