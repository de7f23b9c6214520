"""Greedy generation over an exported decoder with a KV cache, in ONNX Runtime.

The model is a ``--with-past`` export (:func:`loraformat.export.decoder.export_decoder`): inputs
``input_ids`` [batch, sequence], ``attention_mask`` [batch, past+sequence], ``position_ids``
[batch, sequence] and each layer's cache ``past_key_values.N.<name>`` (attention's ``key``/``value``
[batch, kv_heads, past, head_dim]; a linear attention's fixed-size states); outputs ``logits``
[batch, sequence, vocab] and ``present.N.<name>`` (keys and values [batch, kv_heads,
past+sequence, head_dim]) — the names optimum and ONNX Runtime's GenAI tooling use.

Generation is the end-to-end check of such an export: one *prefill* call on the whole prompt with
an empty past (sequence axis of length 0), then one call per new token with ``sequence = 1``,
feeding each call's ``present.*`` back as the next call's ``past_key_values.*``. The attention mask
grows by one column of ones per step and ``position_ids`` continue from the prompt length. The
next token is the arg-max of the last position's logits (greedy; ties go to the lowest id, as in
``torch.argmax``).

Token ids in, token ids out: no tokenizer is needed. :func:`load_tokenizer` returns a
:class:`TextTokenizer` for callers that want text: a checkpoint's ``tokenizer.json`` (the
``tokenizers`` package) or, where it has only that, its SentencePiece ``tokenizer.model`` (the
``sentencepiece`` package). :func:`eos_token_ids` reads the end-of-sequence ids a checkpoint's
``generation_config.json`` (else ``config.json``) gives, where generation stops by default.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .architecture.decoder.causal_lm import CACHE_INPUT
from .errors import LoraformatError
from .onnx_io import ort_load_error

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
Progress = Callable[[int, int], None]


@dataclass
class GenerationResult:
    """Prompt and generated ids (one row per batch item) and wall times in seconds."""

    prompt_ids: list[list[int]]
    new_ids: list[list[int]]
    prefill_s: float = 0.0
    decode_s: list[float] = field(default_factory=list)
    text: list[str] | None = None

    @property
    def ids(self) -> list[list[int]]:
        """Prompt followed by the generated tokens."""
        return [p + n for p, n in zip(self.prompt_ids, self.new_ids, strict=True)]


class DecoderSession:
    """An ONNX Runtime session over a with-past decoder export.

    ``providers`` default to CPU. ``intra_op_threads``/``inter_op_threads`` set the session's
    thread pools (``None``: ONNX Runtime's default, one intra-op thread per physical core).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> None:
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise LoraformatError(self.path, "no such ONNX model")
        _refuse_other_models(self.path)
        options = onnxruntime.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads is not None:
            options.inter_op_num_threads = inter_op_threads
        try:
            self.session = onnxruntime.InferenceSession(
                os.fspath(self.path),
                sess_options=options,
                providers=list(providers or ["CPUExecutionProvider"]),
            )
        except Exception as exc:  # ORT raises its own types for unreadable/invalid models
            raise LoraformatError(self.path, ort_load_error(self.path, exc, "load")) from exc
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in inputs]
        past = sorted(
            ((int(m[1]), order, name) for order, name in enumerate(inputs)
             if (m := CACHE_INPUT.match(name))),
        )
        if missing or not past or "logits" not in outputs:
            what = ", ".join(missing + ([] if past else ["past_key_values.N.key/value"]))
            raise LoraformatError(
                self.path,
                "not a decoder exported with a KV cache (export with --with-past): "
                + (f"missing input(s) {what}" if what else "missing output logits"),
            )
        self.past_names = [name for _, _, name in past]
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]
        absent = [n for n in self.present_names if n not in outputs]
        if absent:
            raise LoraformatError(self.path, f"the model has no output {absent[0]} for its past")
        # Each cache tensor: batch first, every other named axis grows from 0 (attention's keys
        # and values); a fixed-size state (a linear attention's) has only static axes after it.
        self.past_shapes: dict[str, tuple[int | None, ...]] = {}
        self.past_dtypes: dict[str, Any] = {}
        for name in self.past_names:
            info = inputs[name]
            dtype = _DTYPES.get(info.type)
            if dtype is None:
                raise LoraformatError(self.path, f"{name} has unsupported type {info.type}")
            dims = list(info.shape)
            if not dims:
                raise LoraformatError(self.path, f"{name} has no batch axis, got {info.shape}")
            self.past_shapes[name] = (None, *(d if isinstance(d, int) else 0 for d in dims[1:]))
            self.past_dtypes[name] = dtype
        self.output_names = ["logits", *self.present_names]
        vocab = self.session.get_outputs()[outputs.index("logits")].shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else None

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """The cache before a prefill call: keys and values of sequence length 0, other states
        zero."""
        return {
            name: np.zeros((batch, *shape[1:]), self.past_dtypes[name])
            for name, shape in self.past_shapes.items()
        }

    def step(
        self, input_ids: np.ndarray, past: dict[str, Any], past_len: int
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """One forward call: ``input_ids`` [batch, seq] after ``past_len`` cached positions.

        Returns (logits of the last position [batch, vocab], the presents as the next call's
        past, keyed by ``past_key_values.*`` names). Past values may be numpy arrays or
        ``OrtValue``s; the returned ones are ``OrtValue``s, so the cache is never copied to numpy.
        """
        import onnxruntime

        batch, seq = input_ids.shape
        feed = {
            "input_ids": onnxruntime.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(input_ids, dtype=np.int64)
            ),
            "attention_mask": onnxruntime.OrtValue.ortvalue_from_numpy(
                np.ones((batch, past_len + seq), np.int64)
            ),
            "position_ids": onnxruntime.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(
                    np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64),
                                    (batch, seq))
                )
            ),
        }
        for name, value in past.items():
            feed[name] = (
                value if isinstance(value, onnxruntime.OrtValue)
                else onnxruntime.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
            )
        out = self.session.run_with_ort_values(self.output_names, feed)
        logits = out[0].numpy()[:, -1, :]
        return logits, dict(zip(self.past_names, out[1:], strict=True))


def _as_batch(prompt_ids: Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
    if len(prompt_ids) == 0:
        raise LoraformatError(None, "the prompt is empty: give at least one token id")
    if all(isinstance(t, (int, np.integer)) for t in prompt_ids):
        return [[int(t) for t in prompt_ids]]  # type: ignore[union-attr]
    rows = [[int(t) for t in row] for row in prompt_ids]  # type: ignore[union-attr]
    if any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise LoraformatError(None, "batched prompts must be non-empty and of equal length")
    return rows


def greedy_generate(
    model: str | os.PathLike[str] | DecoderSession,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    providers: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> GenerationResult:
    """Greedy decoding of ``max_new_tokens`` tokens after ``prompt_ids``.

    ``prompt_ids`` is one prompt (a list of ids) or a batch of prompts of equal length. Generation
    stops early only when every row has produced an end id (``eos_token_id``: one or several, as
    ``generation_config.json`` may list; rows that finished first are padded with the first).
    Token ids outside the vocabulary are refused.
    """
    stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    session = model if isinstance(model, DecoderSession) else DecoderSession(model, providers)
    rows = _as_batch(prompt_ids)
    if max_new_tokens < 0:
        raise LoraformatError(None, f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = session.vocab_size
    if vocab is not None:
        bad = [t for row in rows for t in row if not 0 <= t < vocab]
        if bad:
            raise LoraformatError(
                session.path, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})"
            )
    result = GenerationResult(prompt_ids=rows, new_ids=[[] for _ in rows])
    if max_new_tokens == 0:
        return result
    ids = np.asarray(rows, dtype=np.int64)
    batch, length = ids.shape
    done = np.zeros(batch, dtype=bool)
    start = time.perf_counter()
    logits, past = session.step(ids, session.empty_past(batch), 0)
    result.prefill_s = time.perf_counter() - start
    for n in range(max_new_tokens):
        token = logits.argmax(-1)
        if stops:
            token = np.where(done, stops[0], token)
            done |= np.isin(token, stops)
        for row, t in zip(result.new_ids, token.tolist(), strict=True):
            row.append(int(t))
        if progress is not None:
            progress(n + 1, max_new_tokens)
        if n + 1 == max_new_tokens or done.all():
            break
        start = time.perf_counter()
        logits, past = session.step(token[:, None].astype(np.int64), past, length + n)
        result.decode_s.append(time.perf_counter() - start)
    return result


def _refuse_other_models(path: Path) -> None:
    """One line for a file that is some other model (a GGUF file, a checkpoint), saying what runs
    it, before ONNX Runtime answers with a raw protobuf error."""
    from . import sniff

    kind = sniff.identify(path)
    if kind.format == sniff.ONNX_MODEL or (kind.format == sniff.UNKNOWN and path.suffix == ".onnx"):
        return
    if kind.format == sniff.GGUF_MODEL:
        instead = "run it with llama.cpp (llama-cli -m FILE)"
    else:
        instead = "generate runs a decoder exported with `loraformat merge BASE ADAPTER -o x.onnx "
        instead += "--with-past` (or `loraformat export BASE -o x.onnx --with-past`)"
    raise LoraformatError(path, f"is {kind.what}, not an ONNX decoder: {instead}")


class TextTokenizer:
    """Text ↔ token ids through a checkpoint's tokenizer: ``encode(text) -> list[int]``,
    ``decode(ids) -> str``."""

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 path: Path) -> None:
        self.encode, self.decode, self.path = encode, decode, path


def _needs(package: str, path: Path) -> LoraformatError:
    return LoraformatError(path, f"reading this tokenizer needs the `{package}` package "
                                 f"(pip install {package})")


def _huggingface_tokenizer(path: Path) -> TextTokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise _needs("tokenizers", path) from None
    try:
        tok = Tokenizer.from_file(os.fspath(path))
    except Exception as exc:  # tokenizers raises its own exception type for bad JSON
        raise LoraformatError(path, f"cannot read the tokenizer: {exc}") from exc
    return TextTokenizer(lambda text: tok.encode(text).ids, tok.decode, path)


def _sentencepiece_tokenizer(path: Path) -> TextTokenizer:
    """A SentencePiece ``tokenizer.model`` as transformers' LlamaTokenizer uses it: BOS first
    when the folder's tokenizer_config.json says ``add_bos_token: true`` (as LLaMA's does)."""
    try:
        import sentencepiece
    except ImportError:
        raise _needs("sentencepiece", path) from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(os.fspath(path))
    except Exception as exc:  # sentencepiece raises OSError/RuntimeError for a bad model
        raise LoraformatError(path, f"not a SentencePiece tokenizer model ({exc})") from exc
    add_bos = _json(path.parent / "tokenizer_config.json").get("add_bos_token") is True
    bos = [sp.bos_id()] if add_bos and sp.bos_id() >= 0 else []
    size = sp.GetPieceSize()  # a model's vocabulary may be padded beyond the tokenizer's

    def decode(ids: list[int]) -> str:
        return sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < size])

    return TextTokenizer(lambda text: bos + list(sp.EncodeAsIds(text)), decode, path)


def load_tokenizer(where: str | os.PathLike[str]) -> TextTokenizer | None:
    """The tokenizer at ``where``: a ``tokenizer.json``, a SentencePiece ``tokenizer.model``, or a
    directory holding one (tokenizer.json first). ``None`` when there is none: generation works
    on ids alone. A tokenizer whose package is missing is refused naming the package."""
    path = Path(where)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
        if not found:
            return None
        path = found[0]
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        first = handle.read(1)
    if first == b"{":
        return _huggingface_tokenizer(path)
    return _sentencepiece_tokenizer(path)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def eos_token_ids(folder: str | os.PathLike[str]) -> list[int]:
    """The end-of-sequence ids of the checkpoint in ``folder``: ``generation_config.json``'s
    ``eos_token_id`` (an id or a list), else ``config.json``'s; empty when neither says."""
    for name in ("generation_config.json", "config.json"):
        value = _json(Path(folder) / name).get("eos_token_id")
        ids = value if isinstance(value, list) else [value]
        ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
        if ids:
            return ids
    return []


__all__ = [
    "DecoderSession",
    "GenerationResult",
    "TextTokenizer",
    "eos_token_ids",
    "greedy_generate",
    "load_tokenizer",
]
