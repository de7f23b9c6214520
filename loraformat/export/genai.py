"""Folders ONNX Runtime GenAI opens as written: ``genai_config.json`` and the base's tokenizer
beside a KV-cache export.

``onnxruntime_genai.Model(folder)`` reads ``folder/genai_config.json``: the decoder's file name,
its input and output names (the per-layer cache as ``past_key_values.%d.key`` /
``present.%d.key`` patterns), its shape facts (head size, KV heads, layers), the model's special
tokens and the search defaults. ``og.Tokenizer`` reads the Hugging Face tokenizer files in the
same folder. :func:`write_genai_folder` writes the config and copies those files from the base.

Everything that depends on the graph is read from the written ONNX file, not assumed, so one
writer serves the traced decoders and emitted ones alike: the names and the layer count come from
the graph's inputs and outputs, the KV heads and head size from the cache inputs' shapes, and
``past_present_share_buffer`` (one cache buffer of the full context, updated in place) is true
only when the graph attends with ``com.microsoft`` GroupQueryAttention, the one attention op
that takes such a buffer. The rest comes from the base's ``config.json`` and
``generation_config.json`` (the latter wins, as in transformers): vocabulary, context length,
bos/eos/pad and the search defaults. ``model.type`` is the family ORT GenAI dispatches on (the
architecture's name before ``For``, lower-cased, as ONNX Runtime GenAI's model builder names it);
a family that ONNX Runtime GenAI 0.18 does not run is written all the same and said in one line
(:attr:`GenaiFolder.note`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..architecture.decoder.causal_lm import CACHE_INPUT
from ..atomic import atomic_file
from ..errors import LoraformatError

GENAI_CONFIG = "genai_config.json"
#: The tokenizer and chat-template files a Hugging Face checkpoint may carry, copied when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
#: ``model.type`` values ONNX Runtime GenAI 0.18 runs as decoder-only language models.
GENAI_DECODER_TYPES = frozenset({
    "chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gemma4_text", "gpt2", "gptoss",
    "granite", "granitemoehybrid", "hunyuandensev1", "internlm2", "lfm2", "lfm2_moe", "llama",
    "mistral", "mistral3_text", "nemotron", "olmo", "phi", "phi3", "phi3small", "phimoe", "qwen2",
    "qwen3", "qwen3_5_text", "qwen3_5_moe_text", "smollm3",
})
#: Architectures whose ``model.type`` is not their name before ``For``: the text-only Gemma 3, and
#: families GenAI 0.18 has no type for whose exported graph holds all of their arithmetic itself
#: (post-norms, windows, query temperature), so GenAI's plain decoder pipeline runs it.
MODEL_TYPE_EXCEPTIONS = {
    "Gemma3ForCausalLM": "gemma3_text",
    "Olmo2ForCausalLM": "llama",
    "Olmo3ForCausalLM": "llama",
    "Ministral3ForCausalLM": "mistral",
    # A multimodal checkpoint exports its language model: GenAI's text decoder type for it.
    "Mistral3ForConditionalGeneration": "mistral3_text",
    "Qwen3_5ForCausalLM": "qwen3_5_text",
    "Qwen3_5ForConditionalGeneration": "qwen3_5_text",
    # GenAI reads each layer's cache shape off the graph; Gemma 4's KV-shared layers, the last
    # ones, have no cache inputs, so the cache layers are still 0..N-1.
    "Gemma4ForCausalLM": "gemma4_text",
    "Gemma4ForConditionalGeneration": "gemma4_text",
}
#: transformers' defaults for the search options GenAI reads (written when the base says nothing).
SEARCH_DEFAULTS: dict[str, Any] = {
    "diversity_penalty": 0.0, "do_sample": False, "length_penalty": 1.0,
    "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
    "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
}


@dataclass
class GenaiFolder:
    """What :func:`write_genai_folder` wrote beside the model."""

    config: Path | None  # None: none written (``note`` says why)
    tokenizer_files: list[str] = field(default_factory=list)
    model_type: str = ""
    past_present_share_buffer: bool = False
    note: str | None = None  # what the folder cannot do, in one line

    def to_json(self) -> dict[str, Any]:
        return {
            "config": str(self.config) if self.config else None,
            "model_type": self.model_type,
            "tokenizer_files": self.tokenizer_files,
            "past_present_share_buffer": self.past_present_share_buffer, "note": self.note,
        }


def genai_outputs(model_path: str | os.PathLike[str], base_dir: str | os.PathLike[str]) -> list[
        Path]:
    """The files :func:`write_genai_folder` would write beside ``model_path`` (the config and the
    tokenizer files ``base_dir`` has), for an overwrite check before the export starts."""
    folder, base = Path(model_path).parent, Path(base_dir)
    return [folder / GENAI_CONFIG] + [
        folder / name for name in TOKENIZER_FILES
        if (base / name).is_file() and not _same_file(base / name, folder / name)
    ]


def check_genai_outputs(
    model_path: str | os.PathLike[str], base_dir: str | os.PathLike[str], overwrite: bool
) -> None:
    """Refuse, before anything is written, to replace an existing GenAI config or tokenizer file
    beside ``model_path`` unless ``overwrite``."""
    if overwrite:
        return
    for path in genai_outputs(model_path, base_dir):
        if path.exists():
            raise LoraformatError(path, "already exists beside the model (use --overwrite to "
                                  "replace it, or --no-genai-config to write none)")


def genai_config(
    model_path: str | os.PathLike[str], config: Mapping[str, Any],
    generation: Mapping[str, Any] | None = None, eos_token_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """The ``genai_config.json`` content for the KV-cache decoder at ``model_path`` of a base whose
    ``config.json`` is ``config`` (``generation``: its ``generation_config.json``;
    ``eos_token_ids``: end tokens the tokenizer adds to the config's, e.g. a chat model's
    end-of-turn token)."""
    import onnx

    path = Path(model_path)
    text = config.get("text_config")
    if isinstance(text, Mapping):  # a multimodal base: the export is its language model
        config = {**config, **text, "architectures": config.get("architectures")}
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name for o in graph.output}
    layers = sorted({int(m.group(1)) for n in inputs if (m := CACHE_INPUT.match(n))})
    # Layers with keys and values; a hybrid decoder's others carry their own state.
    kv_layers = [i for i in layers if f"past_key_values.{i}.key" in inputs]
    if (not kv_layers or layers != list(range(len(layers)))
            or "input_ids" not in inputs):
        raise LoraformatError(path, "not a KV-cache decoder (input_ids and past_key_values.N.* "
                              "inputs for layers 0..N-1, keys among them): GenAI cannot run it")
    first_key = f"past_key_values.{kv_layers[0]}.key"
    kv_heads, head_size = (_static_dim(inputs[first_key], axis) for axis in (1, 3))
    heads = _config_int(config, path, "num_attention_heads", "n_head")
    hidden = _config_int(config, path, "hidden_size", "n_embd")
    kv_heads = kv_heads or int(config.get("num_key_value_heads") or heads)
    head_size = head_size or int(config.get("head_dim") or hidden // heads)
    context = _config_int(config, path, "seq_length", "max_position_embeddings", "n_positions")
    share_buffer = any(node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft"
                       for node in graph.node)
    merged = {**config, **{k: v for k, v in (generation or {}).items() if v is not None}}
    eos = merged.get("eos_token_id")
    eos_list = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    eos_list += [t for t in eos_token_ids if t not in eos_list]
    pad = merged.get("pad_token_id")
    model: dict[str, Any] = {
        "type": genai_model_type(config),
        "context_length": context,
        "vocab_size": int(config.get("vocab_size") or _static_dim(
            next(o for o in graph.output if o.name == "logits"), 2)),
        "decoder": {
            "filename": path.name,
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "head_size": head_size,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "num_hidden_layers": len(layers),
            "inputs": {
                **{n: n for n in ("input_ids", "attention_mask", "position_ids") if n in inputs},
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
        },
    }
    first = kv_layers[0]
    missing = {"logits", f"present.{first}.key", f"present.{first}.value"} - outputs
    if missing:
        raise LoraformatError(path, f"not a KV-cache decoder: no output {sorted(missing)[0]!r}")
    if merged.get("bos_token_id") is not None:
        model["bos_token_id"] = merged["bos_token_id"]
    if eos_list:
        model["eos_token_id"] = eos_list[0] if len(eos_list) == 1 else eos_list
        model["pad_token_id"] = eos_list[0] if pad is None else pad
    elif pad is not None:
        model["pad_token_id"] = pad
    search = {k: merged.get(k, default) for k, default in SEARCH_DEFAULTS.items()}
    search["top_k"] = search["top_k"] if search["top_k"] is not None else 50
    search["top_p"] = search["top_p"] if search["top_p"] is not None else 1.0
    search.update(early_stopping=True, max_length=context, min_length=0,
                  past_present_share_buffer=share_buffer)
    return {"model": model, "search": search}


def genai_model_type(config: Mapping[str, Any]) -> str:
    """ORT GenAI's ``model.type`` for a base's ``config.json``: its architecture's name before
    ``For``, lower-cased (:data:`MODEL_TYPE_EXCEPTIONS` aside); ``model_type`` when the config
    names no architecture."""
    names = config.get("architectures") or []
    if not names:
        return str(config.get("model_type", ""))
    name = str(names[0])
    return MODEL_TYPE_EXCEPTIONS.get(name, name.split("For")[0].lower())


def write_genai_folder(
    model_path: str | os.PathLike[str], base_dir: str | os.PathLike[str], *,
    overwrite: bool = True,
) -> GenaiFolder:
    """Write ``genai_config.json`` beside the KV-cache decoder ``model_path`` (see the module
    docstring) and copy the tokenizer files of the checkpoint directory ``base_dir`` there.

    Each file is written atomically; an existing one is replaced only with ``overwrite``."""
    model = Path(model_path)
    base = Path(base_dir)
    check_genai_outputs(model, base, overwrite)
    config = _read_json(base / "config.json")
    if config is None:
        raise LoraformatError(base, "no config.json: cannot write genai_config.json (the model's "
                              "heads, vocabulary and special tokens come from it)")
    generation = _read_json(base / "generation_config.json")
    content = genai_config(model, config, generation, _tokenizer_eos_ids(base))
    target = model.parent / GENAI_CONFIG
    with atomic_file(target) as handle:
        handle.write((json.dumps(content, indent=4) + "\n").encode())
    copied = []
    for name in TOKENIZER_FILES:
        source, dest = base / name, model.parent / name
        if not source.is_file():
            continue
        copied.append(name)
        if _same_file(source, dest):
            continue
        with source.open("rb") as src, atomic_file(dest) as handle:
            shutil.copyfileobj(src, handle)
    model_type = content["model"]["type"]
    folder = GenaiFolder(target, copied, model_type,
                         content["search"]["past_present_share_buffer"])
    if model_type not in GENAI_DECODER_TYPES:
        folder.note = (f"model.type {model_type!r} ({base.name}) is not a decoder ONNX Runtime "
                       "GenAI 0.18 runs: og.Model will refuse the folder")
    elif "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        folder.note = f"{base} has no tokenizer files: og.Tokenizer cannot open the folder"
    return folder


# -- helpers ------------------------------------------------------------------------------------


def _config_int(config: Mapping[str, Any], model: Path, *keys: str) -> int:
    """The first of ``keys`` the base's config.json gives, as an int."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise LoraformatError(model, f"the base's config.json gives no {' or '.join(keys)} (an "
                          "integer): cannot write genai_config.json")


def _static_dim(value: Any, axis: int) -> int | None:
    dims = value.type.tensor_type.shape.dim
    return int(dims[axis].dim_value) if len(dims) > axis and dims[axis].dim_value else None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraformatError(path, f"unreadable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LoraformatError(path, "not a JSON object")
    return data


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _tokenizer_eos_ids(base: Path) -> list[int]:
    """The id of the tokenizer's ``eos_token`` (a chat model's end of turn, which config.json
    often does not list) when ``tokenizer.json`` has it as an added token; else none."""
    settings = _read_json(base / "tokenizer_config.json") or {}
    eos = settings.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    tokenizer = _read_json(base / "tokenizer.json") if eos else None
    for token in (tokenizer or {}).get("added_tokens", []):
        if isinstance(token, dict) and token.get("content") == eos and isinstance(
                token.get("id"), int):
            return [token["id"]]
    return []


__all__ = [
    "GENAI_CONFIG", "GENAI_DECODER_TYPES", "TOKENIZER_FILES", "GenaiFolder", "check_genai_outputs",
    "genai_config", "genai_model_type", "genai_outputs", "write_genai_folder",
]
