"""The edges a new user hits walking through the README (issue 26): each test failed before its
fix. Tiny LLaMA and Qwen2 checkpoints of the same shapes and names, so only what the files say
about their model can tell them apart."""

from __future__ import annotations

import pytest
import tiny_families
import tiny_models
from cli_harness import run_cli


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("walkthrough")
    llama = tiny_models.llama(root / "llama")
    qwen2 = tiny_families.qwen2(root / "qwen2")
    return {
        "root": root,
        "llama": llama,
        "qwen2": qwen2,
        "llama_peft": tiny_models.peft_adapter(
            llama, "llama", root / "llama_peft", target_modules=["q_proj", "v_proj"]
        ),
        "qwen2_peft": tiny_families.peft_adapter(qwen2, "qwen2", root / "qwen2_peft"),
    }


def _one_error(result, *parts: str) -> str:
    assert result.code == 1, (result.out, result.err)
    line = result.error
    for part in parts:
        assert part in line, line
    return line


# -- 2. wrong base ------------------------------------------------------------------------------


def test_peft_adapter_of_another_architecture_is_refused(models, tmp_path):
    out = tmp_path / "merged"
    r = run_cli("merge", models["llama"], models["qwen2_peft"], "-o", out)
    assert r.error == (f"error: {models['qwen2_peft']}: adapter is for architecture 'qwen2', "
                       f"but the base {models['llama']} is 'llama'")
    assert not out.exists()
    ok = run_cli("merge", models["qwen2"], models["qwen2_peft"], "-o", tmp_path / "right")
    assert ok.code == 0, ok.err


@pytest.mark.parametrize("target", ["mlx", "onnx_adapter"])
def test_nameless_formats_say_architecture_unknown(models, tmp_path, target):
    """MLX and ONNX Runtime adapters whose names many families share: unknown without --base,
    and read through --base they take the base's architecture."""
    out = tmp_path / ("a.onnx_adapter" if target == "onnx_adapter" else "a_mlx")
    r = run_cli("convert", models["qwen2_peft"], "--base", models["qwen2"], "-o", out,
                "--to", target)
    assert r.code == 0, r.err
    if target == "mlx":  # loraformat's own MLX writer records the architecture: drop it
        import json

        config = json.loads((out / "adapter_config.json").read_text())
        del config["loraformat"]
        (out / "adapter_config.json").write_text(json.dumps(config))
    converted = tmp_path / "lf.safetensors"
    r = run_cli("convert", out, "-o", converted)
    _one_error(r, "architecture unknown", "llama, ", "mistral, ", "qwen2, ", "--base BASE")
    assert not converted.exists()
    r = run_cli("convert", out, "--base", models["qwen2"], "-o", converted)
    assert r.code == 0, r.err
    assert "base          qwen2" in run_cli("inspect", converted).out


def test_mlx_adapter_recording_its_architecture_is_refused_by_another_base(models, tmp_path):
    mlx = tmp_path / "a_mlx"
    assert run_cli("convert", models["qwen2_peft"], "--base", models["qwen2"], "-o", mlx,
                   "--to", "mlx").code == 0
    r = run_cli("convert", mlx, "--base", models["llama"], "-o", tmp_path / "x.safetensors")
    _one_error(r, "adapter is for architecture 'qwen2'", "is 'llama'")


# -- 3. double merge ----------------------------------------------------------------------------


def _merge_twice(base, adapter, first, second):
    r = run_cli("merge", base, adapter, "-o", first)
    assert r.code == 0, r.err
    r = run_cli("merge", first, adapter, "-o", second)
    _one_error(r, f"error: {first}: already has the adapter", "merged into it",
               "use --force to merge it again")
    assert not second.exists()
    forced = run_cli("merge", first, adapter, "-o", second, "--force")
    assert forced.code == 0, forced.err


@pytest.mark.slow
def test_double_merge_refused_checkpoint_and_its_onnx_export(models, tmp_path):
    """The safetensors record survives export: a merged checkpoint's ONNX export refuses too;
    unmerging takes the adapter off the record."""
    once = tmp_path / "once"
    _merge_twice(models["llama"], models["llama_peft"], once, tmp_path / "twice")
    assert run_cli("export", once, "-o", tmp_path / "once.onnx").code == 0
    r = run_cli("merge", tmp_path / "once.onnx", models["llama_peft"], "-o", tmp_path / "x.onnx")
    _one_error(r, "already has the adapter")
    unmerged = tmp_path / "unmerged"
    assert run_cli("unmerge", once, models["llama_peft"], "-o", unmerged).code == 0
    assert run_cli("merge", unmerged, models["llama_peft"], "-o", tmp_path / "again").code == 0


@pytest.mark.slow
def test_double_merge_refused_onnx(models, tmp_path):
    base = tmp_path / "base.onnx"
    assert run_cli("export", models["llama"], "-o", base).code == 0
    _merge_twice(base, models["llama_peft"], tmp_path / "once.onnx", tmp_path / "twice.onnx")
    # the checkpoint → ONNX merge records it as well
    int4 = tmp_path / "int4.onnx"
    r = run_cli("merge", models["llama"], models["llama_peft"], "-o", int4, "--dtype", "int4")
    assert r.code == 0, r.err
    _one_error(run_cli("merge", int4, models["llama_peft"], "-o", tmp_path / "y.onnx"),
               "already has the adapter")


def test_double_merge_refused_gguf(models, tmp_path):
    import json

    import gguf
    from test_merge_gguf import hf_tensors, write_model

    from loraformat.merge.plan import MERGED_KEY

    config = json.loads((models["llama"] / "config.json").read_text())
    base = write_model(hf_tensors(models["llama"]), config, tmp_path / "base.gguf", "Q8_0")
    once, twice = tmp_path / "once.gguf", tmp_path / "twice.gguf"
    _merge_twice(base, models["llama_peft"], once, twice)
    before, after = gguf.GGUFReader(str(base)), gguf.GGUFReader(str(twice))
    assert len(json.loads(after.fields[MERGED_KEY].contents())) == 2
    for name, field in before.fields.items():  # every other key-value kept
        if not name.startswith("GGUF."):
            assert after.fields[name].contents() == field.contents(), name


@pytest.mark.slow
def test_double_merge_refused_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_merge_bnb import TARGETS, _llama64, _quantize

    base = _llama64(tmp_path / "float")
    adapter = tiny_models.peft_adapter(base, "llama", tmp_path / "peft", target_modules=TARGETS)
    nf4 = _quantize(base, tmp_path / "nf4", "nf4", True)
    _merge_twice(nf4, adapter, tmp_path / "once", tmp_path / "twice")
    requantized = tmp_path / "requantized"
    assert run_cli("merge", nf4, adapter, "-o", requantized, "--requantize").code == 0
    _one_error(run_cli("merge", requantized, adapter, "-o", tmp_path / "x"),
               "already has the adapter")


# -- 6. missing parent folders ------------------------------------------------------------------


@pytest.mark.slow
def test_missing_parent_folders_are_made(models, tmp_path):
    adapter = tmp_path / "deep" / "lf" / "adapter"
    commands = [
        ["convert", models["llama_peft"], "--base", models["llama"], "-o", adapter],
        ["merge", models["llama"], adapter, "-o", tmp_path / "a" / "b" / "merged"],
        ["merge", models["llama"], adapter, "-o", tmp_path / "c" / "d" / "model.onnx"],
        ["export", models["llama"], "-o", tmp_path / "e" / "f" / "base.onnx"],
        ["scale", adapter, "0.5", "-o", tmp_path / "g" / "h" / "half"],
        ["stack", adapter, adapter, "-o", tmp_path / "i" / "j" / "stacked"],
    ]
    for argv in commands:
        r = run_cli(*argv)
        assert r.code == 0, (argv, r.err)
        assert argv[-1].exists(), argv


def test_failed_write_leaves_no_folders(models, tmp_path):
    """A refused merge (another architecture) made no folders, even though the output's parent
    folders did not exist."""
    out = tmp_path / "x" / "y" / "merged"
    r = run_cli("merge", models["llama"], models["qwen2_peft"], "-o", out)
    assert r.code == 1 and not (tmp_path / "x").exists()


def test_atomic_writers_remove_the_folders_they_made_when_the_write_fails(tmp_path):
    from loraformat.atomic import atomic_dir, atomic_file

    for writer in (atomic_file, atomic_dir):
        with pytest.raises(RuntimeError), writer(tmp_path / "p" / "q" / "out"):
            assert (tmp_path / "p" / "q").is_dir()
            raise RuntimeError("killed mid-write")
        assert list(tmp_path.iterdir()) == []


# -- 9. the small list --------------------------------------------------------------------------


def test_algebra_commands_report_json(models, tmp_path):
    import json

    adapter = tmp_path / "lf"
    assert run_cli("convert", models["llama_peft"], "--base", models["llama"], "-o",
                   adapter).code == 0
    for argv in (["stack", adapter, adapter, "-w", "0.5", "-w", "0.5"],
                 ["subtract", adapter, adapter], ["scale", adapter, "2"]):
        out = tmp_path / argv[0]
        r = run_cli(*argv, "-o", out, "--json")
        assert r.code == 0, r.err
        report = json.loads(r.out)
        assert report["output"] == str(out) and len(report["layers"]) == 4
        want = 8 if argv[0] in ("stack", "subtract") else 4  # ranks concatenate
        assert {row["rank"] for row in report["layers"]} == {want}


def test_merge_takes_w_like_stack(models, tmp_path):
    half = run_cli("merge", models["llama"], models["llama_peft"], "-w", "0.5", "-o",
                   tmp_path / "half")
    assert half.code == 0, half.err


def test_inspect_json_error_is_json(tmp_path):
    import json

    junk = tmp_path / "junk.txt"
    junk.write_text("junk")
    r = run_cli("inspect", junk, "--json")
    assert r.code == 1 and json.loads(r.out)["error"].startswith(f"{junk}: is a file of no format")
    assert r.error.startswith(f"error: {junk}: is a file of no format")


def test_plugins_checkpoint_prints_only_the_answer(models):
    import json

    r = run_cli("plugins", "--checkpoint", models["qwen2"])
    assert r.out == f"{models['qwen2']}: architecture 'qwen2' from plugin 'qwen2'\n"
    data = json.loads(run_cli("plugins", "--checkpoint", models["qwen2"], "--json").out)
    assert data == {"checkpoint": str(models["qwen2"]), "architecture": "qwen2",
                    "plugin": "qwen2", "generic": False}


def test_errors_name_options_in_each_callers_words(models, tmp_path):
    """The command line says --lossy / --overwrite; Python says lossy=True / overwrite=True."""
    import loraformat
    from loraformat import interchange
    from loraformat.errors import LoraformatError

    native = tmp_path / "lf"
    assert run_cli("convert", models["llama_peft"], "--base", models["llama"], "-o",
                   native).code == 0
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep")
    with pytest.raises(LoraformatError) as python:
        loraformat.repack(native, taken)
    assert str(python.value).endswith("output already exists (use overwrite=True to replace it)")
    cli = run_cli("convert", native, "-o", taken)
    assert cli.error.endswith("output already exists (use --overwrite to replace it)")
    # a lossy conversion: a DoRA adapter to an ONNX Runtime adapter
    from loraformat.format.adapter import load

    with load(native) as adapter:
        layers = {p: adapter.layer(p) for p in adapter.layer_paths}
    import numpy as np

    for layer in layers.values():
        layer.magnitude = np.ones(layer.out_features, np.float32)
    from loraformat.format.adapter import Adapter

    Adapter.from_layers("llama", layers).save(tmp_path / "dora")
    with pytest.raises(LoraformatError) as python:
        interchange.convert(tmp_path / "dora", tmp_path / "x.onnx_adapter")
    assert str(python.value).endswith("rerun with lossy=True to convert anyway")
    cli = run_cli("convert", tmp_path / "dora", "-o", tmp_path / "x.onnx_adapter")
    assert cli.error.endswith("rerun with --lossy to convert anyway")


# -- code health --------------------------------------------------------------------------------


def test_write_peft_is_loaded_by_peft_with_the_same_outputs(models, tmp_path):
    """``write_peft`` (the Python API of the PEFT writer): PEFT loads what it writes, with the
    logits of the adapter it was read from; an existing output is refused in Python's words."""
    import torch
    from peft import PeftModel

    from loraformat.errors import LoraformatError
    from loraformat.interchange.peft import read_peft, write_peft

    adapter = read_peft(models["llama_peft"], base=models["llama"])
    out = write_peft(adapter, tmp_path / "peft")
    with pytest.raises(LoraformatError, match="use overwrite=True"):
        write_peft(adapter, out)
    inputs = tiny_models.example_inputs("llama")
    logits = []
    for path in (models["llama_peft"], out):
        model = PeftModel.from_pretrained(tiny_models.load_transformers(models["llama"], "llama"),
                                          path)
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    base = tiny_models.load_transformers(models["llama"], "llama")
    with torch.no_grad():
        assert (base(**inputs).logits - logits[0]).abs().max() > 1e-3  # the adapter matters


# -- 4. survival of an int4 export --------------------------------------------------------------


def _dequantize_matmulnbits(model, weight: str):
    """W (out × in) from a MatMulNBits node's initializers, by the operator's definition:
    4-bit values low nibble first, per block of K, w = (q − zero point) · scale."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node
                if n.op_type == "MatMulNBits" and n.input[1] == weight + "_Q4")
    k = next(a.i for a in node.attribute if a.name == "K")
    block = next(a.i for a in node.attribute if a.name == "block_size")
    packed = inits[weight + "_Q4"]
    n, blocks = packed.shape[:2]
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block).astype(np.float32)
    scales = inits[weight + "_scales"].reshape(n, blocks, 1).astype(np.float32)
    zp = inits[weight + "_zero_points"].reshape(n, -1)
    zero = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks, None]
    return ((q - zero) * scales).reshape(n, blocks * block)[:, :k]


@pytest.mark.slow
def test_int4_export_reports_survival_like_an_int4_base(models, tmp_path):
    """Share = ⟨Q(W') − Q(W), ΔW⟩ / ‖ΔW‖², recomputed from the two written files (the base and
    the merged model, both int4) and PEFT's merged weights."""
    import json

    import numpy as np
    import onnx
    import torch
    from peft import PeftModel

    base, merged = tmp_path / "base.onnx", tmp_path / "merged.onnx"
    assert run_cli("export", models["llama"], "-o", base, "--dtype", "int4").code == 0
    r = run_cli("merge", models["llama"], models["llama_peft"], "-o", merged, "--dtype", "int4",
                "--json")
    assert r.code == 0, r.err
    survival = json.loads(r.out)["survival"]
    text = run_cli("merge", models["llama"], models["llama_peft"], "-o", tmp_path / "t.onnx",
                   "--dtype", "int4")
    assert "overall" in text.out and "share" in text.out
    peft = PeftModel.from_pretrained(tiny_models.load_transformers(models["llama"], "llama"),
                                     models["llama_peft"])
    with torch.no_grad():
        want_w = {k: v.numpy().copy() for k, v in peft.merge_and_unload().state_dict().items()}
    plain = {k: v.numpy() for k, v in
             tiny_models.load_transformers(models["llama"], "llama").state_dict().items()}
    before, after = onnx.load(str(base)), onnx.load(str(merged))
    assert len(survival["layers"]) == 4
    for row in survival["layers"]:
        name = row["tensor"]
        delta = want_w[name] - plain[name]
        change = _dequantize_matmulnbits(after, name) - _dequantize_matmulnbits(before, name)
        share = float(np.sum(change * delta) / np.sum(delta * delta))
        assert row["share"] == pytest.approx(min(1.0, share), abs=1e-4), name
        assert row["delta_norm"] == pytest.approx(float(np.linalg.norm(delta)), rel=1e-4)


# -- 5. generate --------------------------------------------------------------------------------


def _sentencepiece_model(folder):
    """A tiny SentencePiece model (40 pieces, inside the tiny models' 96-token vocabulary),
    trained here: a base with only tokenizer.model, as many LLaMA-family checkpoints ship."""
    import io

    sentencepiece = pytest.importorskip("sentencepiece")
    text = ["the quick brown fox jumps over the lazy dog", "a merged adapter answers in kind",
            "low rank updates to every projection", "tokens stream out one by one"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=40, model_type="unigram",
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder / "tokenizer.model"


@pytest.fixture(scope="module")
def decoder(models):
    """A with-past export of the merged tiny LLaMA, beside a copy of the base's folder with only
    a SentencePiece tokenizer.model."""
    import shutil

    root = models["root"] / "decoder"
    folder = root / "checkpoint"
    shutil.copytree(models["llama"], folder)
    _sentencepiece_model(folder)
    model = root / "model.onnx"
    r = run_cli("merge", folder, models["llama_peft"], "-o", model, "--with-past")
    assert r.code == 0, r.err
    return model, folder


@pytest.mark.slow
def test_generate_prompt_with_only_a_sentencepiece_model(decoder):
    """--prompt encodes as transformers' LlamaTokenizer does with the same tokenizer.model (BOS
    first, as tokenizer_config.json asks), through --tokenizer DIR and --tokenizer FILE alike."""
    import json

    from transformers import LlamaTokenizer

    from loraformat.generate import greedy_generate

    model, folder = decoder
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    reference = LlamaTokenizer.from_pretrained(folder)
    prompt = "the lazy fox"
    want = reference.encode(prompt)
    assert want[0] == 1 and len(want) > 2
    expected = greedy_generate(model, want, 5).new_ids[0]
    for given in (folder, folder / "tokenizer.model"):
        r = run_cli("generate", model, "--prompt", prompt, "--tokenizer", given,
                    "--max-new-tokens", "5", "--eos-id", "-1", "--json")
        assert r.code == 0, r.err
        report = json.loads(r.out)
        assert report["prompt_ids"] == want and report["new_ids"] == expected
        assert report["text"] == reference.decode(expected)


@pytest.mark.slow
def test_generate_stops_at_the_generation_config_eos(decoder):
    import json

    from loraformat.generate import greedy_generate

    model, folder = decoder
    free = greedy_generate(model, [1, 5, 9], 12).new_ids[0]
    stop = free[3]
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = 95 if stop != 95 else 94  # generation_config.json wins
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop, 93]}))
    r = run_cli("generate", model, "--prompt-ids", "1,5,9", "--tokenizer", folder,
                "--max-new-tokens", "12", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["new_ids"] == free[: free.index(stop) + 1]


def test_generate_names_a_gguf_model_and_what_runs_it(models, tmp_path):
    import json

    from test_merge_gguf import hf_tensors, write_model

    config = json.loads((models["llama"] / "config.json").read_text())
    gguf_model = write_model(hf_tensors(models["llama"]), config, tmp_path / "m.gguf", "F32")
    r = run_cli("generate", gguf_model, "--prompt-ids", "1,2")
    assert r.error == (f"error: {gguf_model}: is a llama.cpp GGUF model, not an ONNX decoder: "
                       "run it with llama.cpp (llama-cli -m FILE)")


def test_sentencepiece_tokenizer_without_the_package_names_it(tmp_path, monkeypatch):
    import sys

    from loraformat.errors import LoraformatError
    from loraformat.generate import load_tokenizer

    path = _sentencepiece_model(tmp_path)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(LoraformatError) as err:
        load_tokenizer(path)
    assert str(err.value) == (f"{path}: reading this tokenizer needs the `sentencepiece` "
                              "package (pip install sentencepiece)")


# -- 7. attention_mask in the plain export -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_plain_export_takes_a_padded_batch(models, tmp_path, family):
    """A left-padded and a right-padded row give, at their real tokens, the logits transformers
    gives for the unpadded rows — and the logits transformers gives for the padded batch with
    its mask and positions counted from it."""
    import numpy as np
    import onnxruntime as ort
    import torch

    base = models.get(family) or tiny_models.gpt2(tmp_path / "gpt2")
    out = tmp_path / "model.onnx"
    assert run_cli("export", base, "-o", out).code == 0
    model = (tiny_families.load_transformers(base) if family == "qwen2"
             else tiny_models.load_transformers(base, family))
    session = ort.InferenceSession(str(out))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    short, full = [7, 3, 41, 9], [12, 5, 60, 2, 33, 8]
    ids = np.array([[0, 0, *short], full])  # left padding
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6])
    right = np.array([[*short, 0, 0], full])
    right_mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6])
    got_left = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    got_right = session.run(None, {"input_ids": right, "attention_mask": right_mask})[0]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row])).logits[0].numpy() for row in (short, full)]
        positions = torch.tensor((mask.cumsum(-1) - 1).clip(min=0))
        batch = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      position_ids=positions).logits.numpy()
    for got, at in ((got_left, slice(2, 6)), (got_right, slice(0, 4))):
        np.testing.assert_allclose(got[0, at], alone[0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[1], alone[1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_left[0, 2:], batch[0, 2:], atol=1e-4, rtol=0)
    # the padding matters: without the mask the short row's logits differ
    unmasked = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert np.abs(unmasked[0, 2:] - alone[0]).max() > 1e-3


# -- 8. the README's Session snippet --------------------------------------------------------------


def _readme_blocks(language: str) -> list[str]:
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.mark.slow
def test_readme_session_snippet_runs_as_written(models, tmp_path, monkeypatch):
    """The README's shell lines for the slot graph and the adapter, then its Python block, run
    as written in a folder holding base/ and adapter/ (an adapter on all seven projections):
    the task's logits are PEFT's for the same adapter."""
    import shlex
    import shutil

    import numpy as np
    import torch
    from peft import PeftModel

    shell = "\n".join(_readme_blocks("sh"))
    wanted = ("loraformat export base/ --lora-slots -o slots.onnx",
              "loraformat convert adapter/ -o task.onnx_adapter --base base/")
    lines = [line.split("#")[0].strip() for line in shell.splitlines()]
    assert all(w in lines for w in wanted), "the README's slot lines changed"
    (snippet,) = [b for b in _readme_blocks("python") if "Session(" in b and "adapter=" in b]
    shutil.copytree(models["llama"], tmp_path / "base")
    peft_dir = tiny_models.peft_adapter(
        models["llama"], "llama", tmp_path / "peft",
        target_modules=list(tiny_families.PROJECTIONS["qwen2"]),
    )
    monkeypatch.chdir(tmp_path)
    assert run_cli("convert", "peft", "-o", "adapter/", "--base", "base/").code == 0
    for line in wanted:
        r = run_cli(*shlex.split(line)[1:])
        assert r.code == 0, (line, r.err)
    scope: dict = {}
    exec(snippet, scope)
    peft = PeftModel.from_pretrained(tiny_models.load_transformers(models["llama"], "llama"),
                                     peft_dir)
    with torch.no_grad():
        want = peft(input_ids=torch.tensor([[1, 2, 3]])).logits.numpy()
    np.testing.assert_allclose(scope["task_logits"], want, atol=1e-4, rtol=0)
    assert np.abs(scope["base_logits"] - want).max() > 1e-3


def test_quantized_base_declares_the_architecture_of_a_silent_adapter(models, tmp_path):
    """A PEFT adapter without auto_mapping (as hand-made configs have it) merged into a GGUF
    model takes the architecture the GGUF declares; one whose auto_mapping names another family
    is refused naming both."""
    import json
    import shutil

    from test_merge_gguf import hf_tensors, write_model

    config = json.loads((models["llama"] / "config.json").read_text())
    base = write_model(hf_tensors(models["llama"]), config, tmp_path / "base.gguf", "Q8_0")
    silent = shutil.copytree(models["llama_peft"], tmp_path / "silent")
    peft_config = json.loads((silent / "adapter_config.json").read_text())
    peft_config["auto_mapping"] = None
    (silent / "adapter_config.json").write_text(json.dumps(peft_config))
    assert run_cli("merge", base, silent, "-o", tmp_path / "m.gguf").code == 0
    r = run_cli("merge", base, models["qwen2_peft"], "-o", tmp_path / "x.gguf")
    _one_error(r, "adapter is for architecture 'qwen2'", "'llama'")
