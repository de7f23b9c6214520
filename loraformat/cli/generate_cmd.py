"""``generate``: greedy decoding with an exported KV-cache decoder, the end-to-end export check."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import LoraformatError
from ._common import echo_json, json_option, progress


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated token ids, got {text!r}", param_hint="--prompt-ids"
        ) from None
    if not ids:
        raise click.BadParameter("give at least one token id", param_hint="--prompt-ids")
    return ids


@click.command("generate")
@click.argument("model", type=click.Path())
@click.option("--prompt-ids", help="Prompt token ids, comma-separated (e.g. 1,2,3).")
@click.option("--prompt", "prompt_text",
              help="Prompt text (needs --tokenizer, or a tokenizer.json or SentencePiece "
                   "tokenizer.model next to MODEL; packages `tokenizers` / `sentencepiece`).")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=32, show_default=True)
@click.option("--eos-id", type=int, default=None,
              help="Stop when this token is generated (default: the eos_token_id of "
                   "generation_config.json, else config.json, beside the tokenizer or MODEL).")
@click.option("--tokenizer", type=click.Path(),
              help="A checkpoint directory with tokenizer.json or tokenizer.model (or the file) "
                   "to encode --prompt and decode the output.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime intra-op threads (default: its own choice).")
@json_option
def generate_command(
    model: str, prompt_ids: str | None, prompt_text: str | None, max_new_tokens: int,
    eos_id: int | None, tokenizer: str | None, threads: int | None, as_json: bool,
) -> None:
    """Greedy generation with MODEL, an ONNX decoder exported with --with-past.

    Token ids in, token ids out; with a tokenizer (a checkpoint's tokenizer.json and the
    `tokenizers` package) the text is shown too.
    """
    from ..generate import DecoderSession, eos_token_ids, greedy_generate, load_tokenizer

    if (prompt_ids is None) == (prompt_text is None):
        raise click.UsageError("give exactly one of --prompt-ids and --prompt")
    where = Path(tokenizer) if tokenizer else Path(model).parent
    tok = load_tokenizer(where)
    if tokenizer and tok is None:
        raise LoraformatError(
            tokenizer, "no tokenizer here: give a tokenizer.json, a SentencePiece tokenizer.model "
            "or the checkpoint folder holding one"
        )
    if prompt_text is not None:
        if tok is None:
            raise click.UsageError(
                "--prompt needs a tokenizer (--tokenizer DIR with tokenizer.json or "
                "tokenizer.model); use --prompt-ids otherwise"
            )
        ids = tok.encode(prompt_text)
    else:
        ids = _parse_ids(prompt_ids or "")
    folders = [where if where.is_dir() else where.parent, Path(model).parent]
    stops = [eos_id] if eos_id is not None else next(
        (found for folder in folders if (found := eos_token_ids(folder))), []
    )
    session = DecoderSession(model, intra_op_threads=threads)
    with progress("generating") as report:
        result = greedy_generate(
            session, ids, max_new_tokens, eos_token_id=stops, progress=report
        )
    new = result.new_ids[0]
    text = tok.decode(new) if tok is not None else None
    decode_ms = (
        1000 * sum(result.decode_s) / len(result.decode_s) if result.decode_s else None
    )
    if as_json:
        echo_json({
            "model": str(model), "prompt_ids": result.prompt_ids[0], "new_ids": new,
            "text": text, "prefill_ms": 1000 * result.prefill_s, "decode_ms_per_token": decode_ms,
        })
        return
    click.echo(" ".join(str(t) for t in new))
    if text is not None:
        click.echo(text)
    click.echo(
        f"{len(new)} token(s); prefill {1000 * result.prefill_s:.1f} ms"
        + (f", decode {decode_ms:.1f} ms/token" if decode_ms is not None else ""),
        err=True,
    )
