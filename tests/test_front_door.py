"""One front door for inputs (issue 17): every adapter-taking command reads every format by content.

- Every command run on a PEFT directory (written by real PEFT), a GGUF LoRA, an ``.onnx_adapter``
  and an MLX adapter gives exactly what it gives on that file converted to loraformat
  (``convert F -o ref/``), or refuses in one line naming what it needs (``--base``).
- The X-where-Y matrix: every adapter format and every base kind given where another is expected
  is refused in one line naming what the file is.
- Inputs are never modified; a hostile pickle is never executed; headers that claim absurd sizes
  are refused without allocating.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tiny_models

from loraformat import sniff
from loraformat.checkpoint import Checkpoint
from loraformat.cli import main
from loraformat.errors import LoraformatError
from loraformat.format.adapter import load
from loraformat.interchange import convert
from loraformat.interchange.front_door import FORMAT_WHAT, identify_adapter, read_adapter

FOREIGN = ["peft", "gguf", "onnx_adapter", "mlx"]


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    def run(*args: object) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


def _onnx_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph), path)
    return path


def _gguf_model(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def fx(tiny_checkpoint, tmp_path_factory):
    """Inputs (under ``inputs/``, hashed to prove nothing modifies them) and each foreign
    adapter's loraformat conversion ``ref[F]`` (the reference every command is compared with)."""
    base = tiny_checkpoint("llama")
    root = tmp_path_factory.mktemp("front-door")
    inputs = root / "inputs"
    inputs.mkdir()
    # alpha 6, r 4: scale 1.5, so folding it into B (onnx_adapter) is not a power-of-two no-op
    files = {"peft": tiny_models.peft_adapter(
        base, "llama", inputs / "peft", target_modules=["q_proj", "v_proj"], lora_alpha=6)}
    convert(files["peft"], inputs / "native", to="loraformat", base=base)
    files["gguf"] = inputs / "a.gguf"
    files["onnx_adapter"] = inputs / "a.onnx_adapter"
    files["mlx"] = inputs / "mlx"
    for fmt in ("gguf", "onnx_adapter", "mlx"):
        convert(inputs / "native", files[fmt], to=fmt, base=base)
    refs = root / "refs"
    refs.mkdir()
    ref = {}
    for fmt, path in files.items():
        ref[fmt] = refs / fmt
        convert(path, ref[fmt], to="loraformat", base=base)
    convert(inputs / "native", refs / "half", to="loraformat")  # another adapter for 2-input ops
    with load(refs / "half") as native:
        from loraformat.algebra.ops import scale

        scale(native, 0.5).save(refs / "half2")
    return {"base": base, "root": root, "inputs": inputs, "files": files, "ref": ref,
            "other": refs / "half2", "digest": _digest(inputs), "n": [0]}


def _out(fx, suffix: str = "") -> Path:
    fx["n"][0] += 1
    out = fx["root"] / "out"
    out.mkdir(exist_ok=True)
    return out / f"o{fx['n'][0]}{suffix}"


def _same_adapter(a: Path, b: Path) -> None:
    with load(a) as x, load(b) as y:
        assert x.layer_paths == y.layer_paths and x.architecture == y.architecture
        for path in x.layer_paths:
            assert x.specs[path] == y.specs[path], path
            np.testing.assert_array_equal(x.delta(path), y.delta(path))


def _same_checkpoint(a: Path, b: Path) -> None:
    with Checkpoint(a) as x, Checkpoint(b) as y:
        assert x.names() == y.names()
        for name in x.names():
            np.testing.assert_array_equal(x.numpy(name), y.numpy(name), err_msg=name)


def _one_line(result: Result, path: Path | str, *needles: str) -> str:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 1 and len(lines) == 1, (result.code, result.err, result.out)
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- every command, every foreign format: equal to the converted adapter -------------------------

ALGEBRA = {  # command → argv builder (adapter, other, out)
    "stack": lambda a, o, out: ["stack", a, a, "-w", "0.5", "-w", "0.25", "-o", out],
    "subtract": lambda a, o, out: ["subtract", a, o, "-o", out],
    "scale": lambda a, o, out: ["scale", a, "-0.5", "-o", out],
    "reduce": lambda a, o, out: ["reduce", a, "--rank", "2", "-o", out],
    "combine": lambda a, o, out: ["combine", a, o, "--method", "svd", "--rank", "4", "-o", out],
    "convert": lambda a, o, out: ["convert", a, "-o", out, "--to", "loraformat"],
}


@pytest.mark.parametrize("fmt", FOREIGN)
@pytest.mark.parametrize("command", list(ALGEBRA))
def test_adapter_commands_equal_the_converted_adapter(fx, cli, fmt, command):
    file, ref = fx["files"][fmt], fx["ref"][fmt]
    got, want = _out(fx), _out(fx)
    r = cli(*ALGEBRA[command](file, fx["other"], got), "--base", fx["base"])
    assert r.code == 0, r.err
    r = cli(*ALGEBRA[command](ref, fx["other"], want))
    assert r.code == 0, r.err
    _same_adapter(got, want)


@pytest.mark.parametrize("fmt", FOREIGN)
def test_merge_and_unmerge_equal_the_converted_adapter(fx, cli, fmt):
    file, ref, base = fx["files"][fmt], fx["ref"][fmt], fx["base"]
    got, want = _out(fx), _out(fx)
    assert cli("merge", base, file, "-o", got).code == 0
    assert cli("merge", base, ref, "-o", want).code == 0
    _same_checkpoint(got, want)
    with Checkpoint(base) as b, Checkpoint(got) as m:  # the merge did something
        assert any(not np.array_equal(b.numpy(n), m.numpy(n)) for n in b.names())
    back_got, back_want = _out(fx), _out(fx)
    r = cli("unmerge", want, file, "-o", back_got)
    assert r.code == 0, r.err
    assert cli("unmerge", want, ref, "-o", back_want).code == 0
    _same_checkpoint(back_got, back_want)


def test_merging_a_peft_directory_equals_peft_merge_and_unload(fx, cli):
    """Against the independent reference: PEFT's own merge of the directory PEFT wrote."""
    from peft import PeftModel

    out = _out(fx)
    assert cli("merge", fx["base"], fx["files"]["peft"], "-o", out).code == 0
    model = PeftModel.from_pretrained(
        tiny_models.load_transformers(fx["base"], "llama"), fx["files"]["peft"]
    ).merge_and_unload()
    want = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    with Checkpoint(out) as merged:
        for name in merged.names():
            np.testing.assert_allclose(merged.numpy(name), want[name], atol=1e-6, rtol=0,
                                       err_msg=name)


@pytest.mark.parametrize("fmt", FOREIGN)
def test_inspect_shows_the_format_read_and_what_converting_changes(fx, cli, fmt):
    r = cli("inspect", fx["files"][fmt], "--base", fx["base"], "--json")
    assert r.code == 0, r.err
    got = json.loads(r.out)
    want = json.loads(cli("inspect", fx["ref"][fmt], "--json").out)
    assert got["read_format"] == fmt and want["read_format"] == "loraformat"
    assert got["layers"] == want["layers"] and got["architecture"] == "llama"
    assert got["path"] == str(fx["files"][fmt]) and got["conversion"]["lossy"] == []
    text = cli("inspect", fx["files"][fmt], "--base", fx["base"]).out
    assert f"format        {fmt} (shown as loraformat" in text
    if fmt == "onnx_adapter":  # the scale was folded into B by the writer: reading says so
        assert got["conversion"]["notes"] == [
            "ONNX Runtime adapters fold the scale into B: read back with alpha = rank (scale 1)"
        ]
        assert "converting    ONNX Runtime adapters fold the scale into B" in text
    else:
        assert got["conversion"]["notes"] == [] and "converting    exact" in text


def test_inspect_lists_what_converting_would_lose(tmp_path, fx, cli):
    """A PEFT aLoRA adapter converts only with loss: inspect shows it instead of refusing."""
    peft = tmp_path / "alora"
    shutil.copytree(fx["files"]["peft"], peft)
    config = json.loads((peft / "adapter_config.json").read_text())
    config["alora_invocation_tokens"] = [1, 2]
    (peft / "adapter_config.json").write_text(json.dumps(config))
    got = json.loads(cli("inspect", peft, "--json", "--no-norms").out)
    assert got["read_format"] == "peft"
    assert len(got["conversion"]["lossy"]) == 1 and "aLoRA" in got["conversion"]["lossy"][0]
    r = cli("stack", peft, "-o", tmp_path / "out")  # a command that converts refuses it
    _one_line(r, peft, "aLoRA invocation tokens", "--lossy")


@pytest.mark.parametrize("fmt", FOREIGN)
def test_validate_checks_a_foreign_file_by_its_own_rules(tmp_path, fx, cli, fmt):
    r = cli("validate", fx["files"][fmt], "--base", fx["base"])
    assert r.code == 0 and r.out.strip() == f"{fx['files'][fmt]}: valid ({fmt})", r.err
    if fmt == "peft":  # break a rule of PEFT's own format: tensors of rank 4, config says 8
        bad = tmp_path / "bad"
        shutil.copytree(fx["files"]["peft"], bad)
        config = json.loads((bad / "adapter_config.json").read_text())
        config["r"] = 8
        (bad / "adapter_config.json").write_text(json.dumps(config))
        r = cli("validate", bad, "--json")
        assert r.code == 1
        report = json.loads(r.out)
        assert report["format"] == "peft" and not report["valid"]
        assert report["problems"] == [
            f"{bad / 'adapter_model.safetensors'}: module "
            "'model.layers.0.self_attn.q_proj': tensors have rank 4 but adapter_config.json "
            "gives 8"
        ]


def test_peft_and_mlx_read_without_base(fx, cli):
    """Both say their model (PEFT's auto_mapping, loraformat's MLX extra): no base needed."""
    for fmt in ("peft", "mlx"):
        got = json.loads(cli("inspect", fx["files"][fmt], "--json").out)
        want = json.loads(cli("inspect", fx["ref"][fmt], "--json").out)
        assert got["layers"] == want["layers"] and got["base_fingerprint"] is None


NO_BASE = {  # commands that take --base, run without it
    "inspect": lambda a, o, out: ["inspect", a],
    "validate": lambda a, o, out: ["validate", a],
    **ALGEBRA,
}


NEEDS = {
    "gguf": "is a llama.cpp GGUF LoRA adapter, read through its base model (llama.cpp's tensor "
            "names and q/k row order depend on the model): pass --base BASE",
    # q/v-only LLaMA names are shared by LLaMA relatives: the names alone cannot say which
    "onnx_adapter": "architecture unknown: an .onnx_adapter does not say which model it is for "
                    "(its layer names fit arcee, gemma2, gemma3, gemma4, gpt_oss, granite, llama, "
                    "ministral3, mistral, mixtral, olmo2, olmo3, qwen2, qwen2_moe, qwen3, "
                    "qwen3_5, qwen3_moe, smollm3); "
                    "pass the base model (--base BASE)",
}


@pytest.mark.parametrize("fmt", list(NEEDS))
@pytest.mark.parametrize("command", list(NO_BASE))
def test_refused_without_base_naming_it(fx, cli, fmt, command):
    """The issue's first example, `inspect x.onnx_adapter` on a file `convert` wrote, now reads
    it with --base (above) and without one says it needs it, in the adapter's terms."""
    file = fx["files"][fmt]
    out = _out(fx)
    r = cli(*NO_BASE[command](file, fx["other"], out))
    line = f"{file}: {NEEDS[fmt]}"
    if command == "validate":  # validate prints problems, one per line, without "error: "
        assert r.code == 1 and r.err.strip() == line
    else:
        assert _one_line(r, file) == "error: " + line
    assert not out.exists()


def test_onnx_base_cannot_read_gguf_and_says_pass_base(tmp_path, fx, cli):
    model = _onnx_model(tmp_path / "m.onnx")
    r = cli("merge", model, fx["files"]["gguf"], "-o", tmp_path / "x.onnx")
    _one_line(r, fx["files"]["gguf"], FORMAT_WHAT["gguf"], "an ONNX or bitsandbytes 4-bit BASE "
              "cannot say its names", "pass --base CHECKPOINT")


def test_onnx_adapter_names_shared_by_families_leave_it_unknown(fx, cli, tmp_path):
    """LLaMA's layer names (an MLP gate_proj included) are Qwen2's, Mistral's and Gemma's too:
    without the base an .onnx_adapter of them is not guessed to be LLaMA (issue 26), and with
    it, it reads as the base's architecture."""
    from loraformat.base import open_base
    from loraformat.format.adapter import Adapter, LoraLayer

    rng = np.random.default_rng(0)
    with open_base(fx["base"]) as base:
        layers = {
            p: LoraLayer(rng.standard_normal((2, d.in_features)).astype(np.float32),
                         rng.standard_normal((d.out_features, 2)).astype(np.float32), 2.0,
                         d.in_features, d.out_features)
            for p, d in base.layers.items() if p.endswith(("gate_proj", "q_proj"))
        }
    Adapter.from_layers("llama", layers).save(tmp_path / "native")
    out = tmp_path / "g.onnx_adapter"
    convert(tmp_path / "native", out, base=fx["base"])
    r = cli("inspect", out, "--json")
    assert r.code == 1 and "architecture unknown" in r.err and "qwen2" in r.err
    want = json.loads(cli("inspect", out, "--json", "--base", fx["base"]).out)
    assert want["architecture"] == "llama" and len(want["layers"]) == len(layers)


def test_peft_weights_file_reads_through_its_directory(fx):
    weights = fx["files"]["peft"] / "adapter_model.safetensors"
    assert identify_adapter(weights) == ("peft", fx["files"]["peft"])
    adapter, report = read_adapter(weights, base=fx["base"])
    with adapter:
        assert report.source_format == "peft" and adapter.layer_paths == load(
            fx["ref"]["peft"]).layer_paths


@pytest.mark.slow
def test_session_loads_every_format_like_the_converted_adapter(fx, tmp_path):
    """The runtime Session opens adapters through the same door: each foreign file gives the
    outputs of its loraformat conversion on a LoRA-slot graph (an .onnx_adapter is mapped by ORT
    as is, the others converted in memory)."""
    from loraformat.export.slots import export_with_slots
    from loraformat.runtime import Session

    result = export_with_slots(fx["base"], tmp_path / "slots.onnx")
    ids = np.random.default_rng(0).integers(0, 96, (2, 5)).astype(np.int64)
    with Session(result.path) as session:
        base_out = session.run({"input_ids": ids})[0]
        for fmt in FOREIGN:
            session.load(f"{fmt}-file", fx["files"][fmt], base=fx["base"])
            session.load(f"{fmt}-ref", fx["ref"][fmt])
            got = session.run({"input_ids": ids}, adapter=f"{fmt}-file")[0]
            want = session.run({"input_ids": ids}, adapter=f"{fmt}-ref")[0]
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
            assert np.abs(got - base_out).max() > 1e-3  # the adapter acts
        with pytest.raises(LoraformatError, match="is a model checkpoint directory, not a LoRA"):
            session.load("base", fx["base"])


def test_a_codec_added_to_the_interchange_is_asked_by_its_own_sniff(fx, tmp_path, monkeypatch):
    """A new foreign format is one module in the interchange: the front door asks its sniff
    (before its own identification), and reads through it."""
    import sys
    import types

    from loraformat import interchange

    class ToyCodec:
        name, description, options = "toy", "toy adapter", ()

        def sniff(self, path):
            return path.name.endswith(".toy")

        def read(self, path, ctx):
            ctx.note("read by the toy codec")
            return load(fx["ref"]["peft"])

    module = types.ModuleType("toy_codec")
    module.CODEC = ToyCodec()
    monkeypatch.setitem(sys.modules, "toy_codec", module)
    monkeypatch.setitem(interchange.CODECS, "toy", "toy_codec")
    path = tmp_path / "a.toy"
    path.write_bytes(b"toy")
    adapter, report = read_adapter(path)
    with adapter:
        assert report.source_format == "toy" and report.notes == ["read by the toy codec"]
    assert identify_adapter(fx["files"]["peft"]) == ("peft", fx["files"]["peft"])


# -- the X-where-Y matrix -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(fx, tmp_path_factory):
    """One file of every kind, with the phrase that must name it."""
    root = tmp_path_factory.mktemp("zoo")
    inputs, base = fx["inputs"], fx["base"]
    lonely = root / "lonely"
    lonely.mkdir()
    shutil.copy(fx["files"]["peft"] / "adapter_model.safetensors", lonely)
    convert(inputs / "native", root / "single.safetensors")
    convert(inputs / "native", root / "loralib.safetensors", to="loralib", base=base)
    import torch

    torch.save({"w": torch.zeros(2)}, root / "weights.pt")
    (root / "junk.bin").write_bytes(b"hello, not a model")
    return {
        "loraformat dir": (inputs / "native", "a loraformat adapter directory"),
        "loraformat file": (root / "single.safetensors",
                            "a loraformat adapter (single .safetensors)"),
        "peft dir": (fx["files"]["peft"], "a PEFT adapter directory"),
        "peft weights alone": (lonely / "adapter_model.safetensors",
                               "PEFT adapter weights (adapter_model.safetensors) without "
                               "adapter_config.json beside it"),
        "mlx": (fx["files"]["mlx"], "an MLX-LM adapter directory"),
        "gguf lora": (fx["files"]["gguf"], "a llama.cpp GGUF LoRA adapter"),
        "onnx_adapter": (fx["files"]["onnx_adapter"], "an ONNX Runtime adapter (.onnx_adapter)"),
        "loralib": (root / "loralib.safetensors", "a loralib (microsoft/LoRA) checkpoint"),
        "checkpoint dir": (base, "a model checkpoint directory"),
        "safetensors model": (base / "model.safetensors",
                              "a model checkpoint (single .safetensors)"),
        "onnx model": (_onnx_model(root / "model.onnx"), "an ONNX model (.onnx)"),
        "gguf model": (_gguf_model(root / "model.gguf"), "a llama.cpp GGUF model"),
        "pickle": (root / "weights.pt", "a pickled torch checkpoint (.pt/.bin)"),
        "junk": (root / "junk.bin", "a file of no format loraformat knows"),
    }


ADAPTERS = ["loraformat dir", "loraformat file", "peft dir", "mlx", "gguf lora", "onnx_adapter",
            "loralib"]
BASES = ["checkpoint dir", "safetensors model", "onnx model", "gguf model"]
KINDS = [*ADAPTERS, "peft weights alone", *BASES, "pickle", "junk"]


@pytest.mark.parametrize("kind", KINDS)
def test_identify_names_every_kind(zoo, kind):
    path, what = zoo[kind]
    assert sniff.identify(path).what.startswith(what)


def test_content_decides_not_the_extension(zoo, tmp_path):
    """Every file kind renamed to a neutral name (or another format's suffix) is still
    recognised as what it is."""
    for kind in KINDS:
        path, what = zoo[kind]
        if path.is_dir() or kind == "peft weights alone":  # these are placed by their directory
            continue
        for name in ("blob", "blob.safetensors", "blob.onnx_adapter"):
            renamed = tmp_path / name
            shutil.copy(path, renamed)
            assert sniff.identify(renamed).what.startswith(what), (kind, name)


def test_gguf_without_general_type_is_a_model(tmp_path):
    """llama.cpp's own default: a GGUF file that does not say its type is a model."""
    import gguf

    path = tmp_path / "untyped.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    kind = sniff.identify(path)
    assert (kind.role, kind.format, kind.what) == ("base", "gguf", "a llama.cpp GGUF model")


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ADAPTERS])
def test_not_an_adapter_where_an_adapter_is_expected(zoo, cli, fx, kind):
    path, what = zoo[kind]
    expected = {
        "peft weights alone": f"is {what}: its rank and scale are in that config file; give the "
                              "directory that holds both",
        "pickle": f"is {what} without '<module>.lora_A' tensors: not a LoRA adapter",
        "junk": f"is {what} (first bytes",
    }.get(kind, f"is {what}, not a LoRA adapter")
    for argv in (["inspect", path], ["stack", path, "-o", _out(fx)],
                 ["merge", fx["base"], path, "-o", _out(fx)],
                 ["convert", path, "-o", _out(fx), "--to", "peft"]):
        _one_line(cli(*argv), path, expected)


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in BASES[:3]])
def test_not_a_base_where_a_base_is_expected(zoo, cli, fx, kind):
    path, what = zoo[kind]
    adapter = fx["inputs"] / "native"
    r = cli("merge", path, adapter, "-o", _out(fx))
    if kind == "gguf model":  # a base: merged as such, and this one lacks the adapter's layers
        _one_line(r, adapter, f"is not a layer of the base {path}")
    else:
        _one_line(r, path, f"is {what}", "not a model; a base is a checkpoint directory, "
                  "a .safetensors model, an .onnx model or a .gguf model")
    # convert's --base: a GGUF model is a base adapters are read through, the rest are refused
    r = cli("convert", adapter, "-o", _out(fx), "--to", "peft", "--base", path)
    if kind == "gguf model":
        _one_line(r, adapter, "is not a layer of the base")
    else:
        _one_line(r, path, f"is {what}")


def test_onnx_model_where_a_checkpoint_is_expected(zoo, cli, fx):
    path, what = zoo["onnx model"]
    r = cli("export", path, "-o", _out(fx, ".onnx"))
    _one_line(r, path, f"is {what}; a base here must be a checkpoint directory or a .safetensors "
              "model")


@pytest.mark.parametrize("kind", ADAPTERS)
def test_forced_format_that_the_content_contradicts(zoo, cli, kind):
    path, what = zoo[kind]
    actual = sniff.identify(path).format
    for forced in FORMAT_WHAT:
        if forced == actual:
            continue
        r = cli("inspect", path, "--from", forced)
        _one_line(r, path, f"is {what}, not {FORMAT_WHAT[forced]} (--from {forced}); drop "
                  f"--from or pass --from {actual}")


# -- guarantees ---------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hostile_pickle_is_never_executed(tmp_path, cli):
    marker = tmp_path / "pwned"
    evil = tmp_path / "adapter.pt"
    evil.write_bytes(pickle.dumps({"x.lora_A": _Evil(marker)}, protocol=2))
    assert sniff.identify(evil).format == sniff.PICKLE  # identification never unpickles
    for command in ("inspect", "validate"):
        r = cli(command, evil)
        assert r.code == 1 and "refused to unpickle" in r.err
    assert not marker.exists()


def test_absurd_headers_are_refused_without_allocating(tmp_path, cli):
    # a GGUF header claiming 2^60 key/values whose first key is 2^62 bytes long
    gguf = tmp_path / "claims.gguf"
    gguf.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little")
                     + (1 << 60).to_bytes(8, "little") + (1 << 62).to_bytes(8, "little"))
    assert sniff.identify(gguf).what == "a GGUF file whose header cannot be read"
    # a safetensors header size beyond the file: not taken for safetensors by its content...
    blob = tmp_path / "claims.bin"
    blob.write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    _one_line(cli("inspect", blob), blob, "a file of no format loraformat knows")
    # ...and under its own suffix the strict reader refuses it before allocating
    named = tmp_path / "claims.safetensors"
    named.write_bytes(blob.read_bytes())
    _one_line(cli("inspect", named), named, "exceeds the 104857600-byte limit")


def test_inputs_were_never_modified(fx):
    """Runs last in this module: every command above read these inputs."""
    assert _digest(fx["inputs"]) == fx["digest"]
