"""Folders ONNX Runtime GenAI opens as written (loraformat.export.genai).

The reference is transformers' ``generate`` (greedy) on PEFT's merged model, and the
``tokenizers`` package for the tokenizer: a ``--with-past`` export's folder, untouched, must
greedy-decode the same tokens in ``onnxruntime_genai`` (merged, or a ``--lora-slots`` model with
the adapter switched on by ``og.Adapters``), and ``og.Tokenizer`` must encode like ``tokenizers``.
The tiny checkpoints get weights of standard deviation ~0.15 so attention is far from uniform.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_families
import tiny_models
from cli_harness import run_cli

from loraformat.errors import LoraformatError
from loraformat.export.genai import (
    GENAI_CONFIG,
    genai_config,
    genai_model_type,
    write_genai_folder,
)

pytest.importorskip("onnxruntime_genai")

NEW_TOKENS = 24
PROMPT = [5, 17, 33, 9, 71, 44, 12, 60, 3, 88]  # 10 tokens: past Phi-3's 8-token original context
BUILDERS = {"llama": tiny_models.llama, **tiny_families.BUILDERS}
SLOW = pytest.mark.slow
FAMILIES = [
    "llama", *(pytest.param(f, marks=SLOW) for f in tiny_families.FAMILIES),
]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
TEXT = "the cat ate a hat"


def og():
    import onnxruntime  # noqa: F401  (onnxruntime_genai finds the ORT library it loads)
    import onnxruntime_genai

    return onnxruntime_genai


def sharpen(checkpoint: Path, factor: float = 7.5) -> None:
    """Every matrix of the checkpoint × ``factor`` (std 0.02 → 0.15): attention not uniform."""
    from safetensors.numpy import load_file, save_file

    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    save_file({k: v * factor if v.ndim == 2 else v for k, v in tensors.items()}, path,
              metadata={"format": "pt"})


def add_tokenizer(checkpoint: Path) -> Path:
    """A byte-level BPE tokenizer trained here (no downloads), GPT-2 style, with a chat template
    and special-tokens map: the files a Hugging Face checkpoint carries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["the cat sat on the mat", "a dog ate the hat"] * 10, trainer)
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (checkpoint / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", **special})
    )
    (checkpoint / "special_tokens_map.json").write_text(json.dumps(special))
    (checkpoint / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return checkpoint


@pytest.fixture(scope="module")
def family_setup(tmp_path_factory):
    """``family_setup(family)`` → (base, PEFT adapter, merged tokens, base tokens), built once."""
    cache: dict[str, tuple[Path, Path, list[int], list[int]]] = {}

    def build(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"genai-{family}")
            base = BUILDERS[family](root / "base")
            sharpen(base)
            add_tokenizer(base)
            adapter = tiny_families.peft_adapter(
                base, "qwen2", root / "peft",
                target_modules=tiny_families.PROJECTIONS.get(family,
                                                             tiny_families.PROJECTIONS["qwen2"]),
            )
            cache[family] = (base, adapter, reference_tokens(base, adapter),
                             reference_tokens(base, None))
        return cache[family]

    return build


def reference_tokens(base: Path, adapter: Path | None) -> list[int]:
    """transformers' greedy ``generate`` on PEFT's merged model (the base when no adapter)."""
    import torch
    from peft import PeftModel

    model = tiny_families.load_transformers(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0,
        )
    return out[0, len(PROMPT):].tolist()


def genai_tokens(folder: Path, adapter_file: Path | None = None) -> list[int]:
    """ORT GenAI's greedy tokens for PROMPT from ``folder`` as it is on disk; with
    ``adapter_file`` loaded through ``og.Adapters`` and made active."""
    genai = og()
    model = genai.Model(str(folder))
    params = genai.GeneratorParams(model)
    total = len(PROMPT) + NEW_TOKENS
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = genai.Generator(model, params)
    if adapter_file is not None:
        adapters = genai.Adapters(model)
        adapters.load(str(adapter_file), "a")
        generator.set_active_adapter(adapters, "a")
    generator.append_tokens([PROMPT])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(PROMPT):]


def merged_folder(family_setup, family: str, folder: Path) -> Path:
    """`loraformat merge BASE ADAPTER -o folder/model.onnx --with-past` (asserting it worked)."""
    base, adapter, *_ = family_setup(family)
    result = run_cli("merge", base, adapter, "-o", folder / "model.onnx", "--with-past")
    assert result.code == 0, result.err
    assert f"genai: {folder / GENAI_CONFIG} (model.type " in result.out
    return folder


@pytest.fixture(scope="module")
def llama_folder(family_setup, tmp_path_factory):
    """The merged LLaMA export's folder, shared by the tests that only read it."""
    return merged_folder(family_setup, "llama", tmp_path_factory.mktemp("genai-llama-merged"))


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_folder_generates_like_transformers(family_setup, llama_folder, family, tmp_path):
    base, _, merged, plain = family_setup(family)
    assert merged != plain  # the adapter changes the tokens: the test can fail
    folder = llama_folder if family == "llama" else merged_folder(family_setup, family, tmp_path)
    assert genai_tokens(folder) == merged
    config = json.loads((folder / GENAI_CONFIG).read_text())
    # GenAI 0.18 has no type for OLMo 2/3 or Ministral 3: its plain decoder runs their graphs
    expected = {"gemma3": "gemma3_text", "olmo2": "llama", "olmo3": "llama",
                "ministral3": "mistral"}.get(family, family)
    assert config["model"]["type"] == expected
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        assert (folder / name).read_bytes() == (base / name).read_bytes()


@pytest.mark.parametrize("family", ["llama", *(pytest.param(f, marks=SLOW) for f in (
    "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3"))])
def test_slot_folder_switched_by_og_adapters(family_setup, family, tmp_path):
    """`export --lora-slots --with-past`: og.Adapters with the converted .onnx_adapter gives the
    merged model's tokens, no active adapter the base's."""
    base, adapter, merged, plain = family_setup(family)
    folder = tmp_path / "slots"
    folder.mkdir()
    result = run_cli("export", base, "-o", folder / "model.onnx", "--lora-slots", "--with-past")
    assert result.code == 0, result.err
    file = tmp_path / "a.onnx_adapter"
    assert run_cli("convert", adapter, "-o", file, "--base", base).code == 0
    assert genai_tokens(folder, file) == merged
    assert genai_tokens(folder) == plain


@SLOW
def test_multimodal_mistral3_folder_runs_its_language_model(tmp_path):
    """A Mistral3ForConditionalGeneration export is its language model: the writer reads the
    sizes from text_config and names GenAI's text decoder (mistral3_text); og's greedy tokens
    are transformers' multimodal model's on text."""
    import torch
    from transformers import Mistral3ForConditionalGeneration

    base = tiny_families.mistral3_multimodal(tmp_path / "base")
    folder = tmp_path / "genai"
    result = run_cli("export", base, "-o", folder / "model.onnx", "--with-past")
    assert result.code == 0, result.err
    model = json.loads((folder / GENAI_CONFIG).read_text())["model"]
    assert model["type"] == "mistral3_text" and model["decoder"]["num_hidden_layers"] == 2
    reference = Mistral3ForConditionalGeneration.from_pretrained(
        base, attn_implementation="eager").eval()
    ids = torch.tensor([PROMPT])
    want = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=NEW_TOKENS, pad_token_id=0)[0, len(PROMPT):]
    assert genai_tokens(folder) == want.tolist()


def test_tokenizer_opened_by_og_encodes_like_tokenizers(family_setup, llama_folder):
    from tokenizers import Tokenizer

    base, *_ = family_setup("llama")
    genai = og()
    tokenizer = genai.Tokenizer(genai.Model(str(llama_folder)))
    want = Tokenizer.from_file(str(base / "tokenizer.json")).encode(TEXT).ids
    assert [int(t) for t in tokenizer.encode(TEXT)] == want
    assert tokenizer.decode(np.array(want, dtype=np.int32)) == TEXT


def test_config_from_generation_config_and_graph(family_setup, llama_folder, tmp_path):
    """generation_config wins over config.json (bos/eos/pad, search defaults); the tokenizer's
    end-of-turn token joins eos; head size, KV heads and layers come from the graph."""
    base, *_ = family_setup("llama")
    src = tmp_path / "base"
    shutil.copytree(base, src, ignore=shutil.ignore_patterns("*.safetensors"))
    (src / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": [7, 8], "pad_token_id": 0, "do_sample": True,
        "temperature": 0.6, "top_p": 0.9, "top_k": None, "repetition_penalty": 1.1,
    }))
    folder = tmp_path / "out"
    folder.mkdir()
    shutil.copy(llama_folder / "model.onnx", folder / "model.onnx")  # weights inside: tiny
    written = write_genai_folder(folder / "model.onnx", src)
    assert written.note is None and written.past_present_share_buffer is False
    config = json.loads((folder / GENAI_CONFIG).read_text())
    model, search = config["model"], config["search"]
    eos_id = json.loads((base / "tokenizer.json").read_text())["added_tokens"][2]["id"]  # </s>
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (
        1, [7, 8, eos_id], 0)
    assert (search["do_sample"], search["temperature"], search["top_p"], search["top_k"],
            search["repetition_penalty"]) == (True, 0.6, 0.9, 50, 1.1)
    assert search["past_present_share_buffer"] is False  # a traced graph: no GQA
    decoder = model["decoder"]
    assert (decoder["head_size"], decoder["num_key_value_heads"], decoder["num_hidden_layers"],
            decoder["num_attention_heads"], decoder["hidden_size"]) == (8, 2, 2, 4, 32)
    assert model["context_length"] == search["max_length"] == 128
    assert decoder["filename"] == "model.onnx"


def gqa_graph(path: Path, layers: int = 3, kv_heads: int = 2, head: int = 16) -> Path:
    """A graph with a KV-cache decoder's interface and a com.microsoft GroupQueryAttention node
    (never run: the config is read from the graph alone)."""
    import onnx
    from onnx import TensorProto, helper

    def value(name: str, dtype: int, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, dtype, shape)

    cache = ["batch", kv_heads, "past", head]
    inputs = [value("input_ids", TensorProto.INT64, ["batch", "seq"]),
              value("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [value("logits", TensorProto.FLOAT, ["batch", "seq", 96])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(value(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, cache))
            outputs.append(value(f"present.{i}.{kind}", TensorProto.FLOAT, cache))
    node = helper.make_node("GroupQueryAttention", ["input_ids"], ["logits"],
                            domain="com.microsoft")
    graph = helper.make_graph([node], "g", inputs, outputs)
    onnx.save(helper.make_model(graph), path)
    return path


def test_share_buffer_only_with_group_query_attention(tmp_path):
    config = {"architectures": ["Qwen3ForCausalLM"], "num_attention_heads": 8,
              "hidden_size": 64, "max_position_embeddings": 256, "eos_token_id": 5}
    got = genai_config(gqa_graph(tmp_path / "m.onnx"), config)
    assert got["search"]["past_present_share_buffer"] is True
    decoder = got["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"],
            decoder["head_size"]) == (3, 2, 16)
    assert set(decoder["inputs"]) == {"input_ids", "attention_mask", "past_key_names",
                                      "past_value_names"}  # no position_ids in this graph
    assert got["model"]["vocab_size"] == 96 and got["model"]["pad_token_id"] == 5


def test_unknown_family_said_in_one_line(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "architectures": ["NewLMForCausalLM"], "num_attention_heads": 8, "hidden_size": 64,
        "max_position_embeddings": 256,
    }))
    folder = write_genai_folder(gqa_graph(tmp_path / "m.onnx"), base)
    assert folder.model_type == "newlm"
    assert folder.note == ("model.type 'newlm' (base) is not a decoder ONNX Runtime GenAI 0.18 "
                           "runs: og.Model will refuse the folder")
    assert genai_model_type({"architectures": ["Gemma3ForCausalLM"]}) == "gemma3_text"


def test_existing_config_refused(family_setup, tmp_path):
    base, *_ = family_setup("llama")
    (tmp_path / GENAI_CONFIG).write_text("{}")
    result = run_cli("export", base, "-o", tmp_path / "model.onnx", "--with-past")
    assert result.code == 1
    assert result.error == (f"error: {tmp_path / GENAI_CONFIG}: already exists beside the model "
                            "(use --overwrite to replace it, or --no-genai-config to write none)")
    assert not (tmp_path / "model.onnx").exists()  # refused before exporting
    assert run_cli("export", base, "-o", tmp_path / "x.onnx", "--no-genai-config").code == 2


@SLOW
def test_no_genai_config(family_setup, tmp_path):
    base, *_ = family_setup("llama")
    (tmp_path / GENAI_CONFIG).write_text("{}")
    result = run_cli("export", base, "-o", tmp_path / "model.onnx", "--with-past",
                     "--no-genai-config")
    assert result.code == 0, result.err
    assert (tmp_path / GENAI_CONFIG).read_text() == "{}"
    assert not (tmp_path / "tokenizer.json").exists()


def test_not_a_decoder_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [x], [helper.make_tensor_value_info("logits", TensorProto.INT64,
                                                                  ["b", "s"])])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(LoraformatError, match="not a KV-cache decoder"):
        genai_config(tmp_path / "m.onnx", {"num_attention_heads": 1, "hidden_size": 8,
                                           "max_position_embeddings": 8})


def test_base_without_config_json_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    with pytest.raises(LoraformatError, match=r"no config\.json: cannot write genai_config\.json"):
        write_genai_folder(gqa_graph(tmp_path / "m.onnx"), base)
    (base / "config.json").write_text(json.dumps({"n_embd": 64, "n_positions": 32}))
    with pytest.raises(LoraformatError, match="gives no num_attention_heads or n_head"):
        write_genai_folder(gqa_graph(tmp_path / "m.onnx"), base)
    assert not (tmp_path / GENAI_CONFIG).exists()
