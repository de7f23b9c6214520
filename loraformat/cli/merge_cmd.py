"""``merge`` and ``unmerge``: adapters into (or out of) a base checkpoint or ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import sniff
from ..format.adapter import Adapter
from ._common import echo_json, from_option, json_option, overwrite_option, progress
from .export_cmd import (
    EXPORT_DTYPES,
    check_genai,
    echo_genai,
    echo_left_out,
    echo_verify,
    genai_option,
    quant_from_options,
    quantization_options,
    write_genai,
)

_DTYPES = click.Choice(EXPORT_DTYPES)


def _is_onnx(path: str) -> bool:
    """For outputs, whose kind their suffix chooses (BASE is told by content: _base_kind)."""
    return Path(path).suffix == ".onnx"


#: A checkpoint directory quantized by bitsandbytes (``sniff`` calls it a checkpoint).
BNB4_CHECKPOINT = "bnb4"
#: A checkpoint directory with MXFP4 expert weights (published gpt-oss).
MXFP4_CHECKPOINT = "mxfp4"
_QUANTIZED = (sniff.GGUF_MODEL, BNB4_CHECKPOINT, MXFP4_CHECKPOINT)
#: Quantized checkpoints: their tensors do not say a float checkpoint's names and shapes.
_PACKED = (BNB4_CHECKPOINT, MXFP4_CHECKPOINT)


def _base_kind(base: str) -> str:
    """What BASE is, by content: a checkpoint directory (bitsandbytes-quantized or not), a single
    .safetensors, an ONNX model or a GGUF model; anything else is refused in one line saying what
    it is."""
    from ..merge.bnb import is_bnb4
    from ..merge.mxfp4 import is_mxfp4

    kind = sniff.require_base(
        base, (sniff.CHECKPOINT, sniff.SAFETENSORS_MODEL, sniff.ONNX_MODEL, sniff.GGUF_MODEL)
    ).format
    if kind == sniff.CHECKPOINT and is_bnb4(base):
        return BNB4_CHECKPOINT
    return MXFP4_CHECKPOINT if kind == sniff.CHECKPOINT and is_mxfp4(base) else kind


def _bnb_architecture(base: str) -> str | None:
    """The architecture a bitsandbytes checkpoint's config.json declares, by installed id; None
    when no plugin knows it."""
    from ..architecture import CheckpointInfo, detect
    from ..checkpoint import Checkpoint

    with Checkpoint(base) as checkpoint:
        found = detect(CheckpointInfo(config=checkpoint.config))
    return found.id if found is not None else None


def _open_adapters(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple:
    """The ADAPTER arguments as loraformat adapters, converted here at the boundary (a PEFT
    directory or any other format, named through BASE unless BASE is an ONNX graph), closed when
    the command ends."""
    from ..interchange import open_adapter
    from ..interchange.front_door import NeedsBase

    ctx.meta["adapter_arguments"] = values  # as the user wrote them, for the report
    base = ctx.params.get("base")
    ctx.meta["base_kind"] = kind = _base_kind(base) if base is not None else None
    onnx = kind == sniff.ONNX_MODEL
    # Foreign adapters are read through --base, else through BASE where it says their names and
    # row order (a float checkpoint, a GGUF model); an ONNX graph or a bitsandbytes 4-bit
    # checkpoint does not.
    names_from = ctx.params.get("names_base") or (
        None if base is None or onnx or kind in _PACKED else base
    )
    # ... but a bitsandbytes checkpoint says its architecture, which an adapter that does not say
    # its own takes
    declared = _bnb_architecture(base) if names_from is None and kind in _PACKED else None
    opened = []
    for value in values:
        try:
            adapter = open_adapter(value, base=names_from, from_=ctx.params.get("from_"),
                                   architecture=declared)
        except NeedsBase as exc:  # say why BASE itself could not serve
            if kind not in (sniff.ONNX_MODEL, *_PACKED):
                raise
            raise NeedsBase(
                exc.path, exc.needs, "an ONNX or bitsandbytes 4-bit BASE cannot say its names: "
                "pass --base CHECKPOINT (the float checkpoint or the .gguf model it came from)"
            ) from None
        ctx.call_on_close(adapter.close)
        opened.append(adapter)
    return tuple(opened)


def _given_base_kind() -> str | None:
    """What the ADAPTERS callback found BASE to be (:func:`_base_kind`)."""
    return click.get_current_context().meta.get("base_kind")


def _base_is_onnx() -> bool:
    return _given_base_kind() == sniff.ONNX_MODEL


def _report(
    kind: str, result: Any, adapters: tuple[Adapter, ...], as_json: bool, genai: Any = None
) -> None:
    """Print what ``result`` (every merge/export result gives its own ``to_json()``) says, and
    the GenAI folder a --with-past export wrote (``genai``)."""
    given = click.get_current_context().meta.get("adapter_arguments", ())
    data = {"adapters": list(given), **result.to_json()}
    if genai is not None:
        data["genai"] = genai.to_json()
    survival = getattr(result, "survival", None)  # quantized merges: what the adapter kept
    if as_json:
        echo_json(data)
        return
    click.echo(
        f"{kind} {len(adapters)} adapter(s) into {data['output']}: {data['tensors_changed']} "
        "tensor(s) changed"
        + (f", {data['layers']} layer(s)" if "layers" in data else "")
        + (f", {data['shards']} shard(s)" if "shards" in data else "")
    )
    if "opset" in data:
        click.echo(
            f"onnx: opset {data['opset']}, {data['dtype']}, {data['nodes']} nodes"
            + (f", {data['initializers']} initializers" if "initializers" in data else "")
            + (f", weights in {data['external_data']}" if data.get("external_data") else "")
        )
    if data.get("traced"):
        click.echo(f"graph: {data['traced']}")
    echo_left_out(data.get("left_out") or {})
    if getattr(result, "max_abs_diff", None) is not None:
        echo_verify(result)
    if survival is not None:
        for line in survival.table():
            click.echo(line)
    if survival is not None and survival.warning():
        click.echo(f"warning: {survival.warning()}", err=True)
    echo_genai(genai)


def _merge_quantized(
    base: str, adapters: tuple[Adapter, ...], out: str, weights: tuple[float, ...],
    qtype: str | None, requantize: bool, force: bool, allow_nonfinite: bool, overwrite: bool,
    onnx_options: bool,
) -> Any:
    """Merge into a GGUF or bitsandbytes 4-bit base; None when BASE is neither."""
    kind = _given_base_kind()
    if onnx_options and kind in _QUANTIZED:
        raise click.UsageError("--dtype, --opset, --verify, --with-past and --unshare apply to "
                               "checkpoint and ONNX bases, not GGUF or bitsandbytes ones")

    common = dict(weights=list(weights), force=force, allow_nonfinite=allow_nonfinite,
                  overwrite=overwrite)
    if kind == sniff.GGUF_MODEL:
        from ..merge.gguf import merge_gguf

        if requantize:
            raise click.UsageError("--requantize is for bitsandbytes bases; a GGUF base is "
                                   "always requantized (choose the type with --type)")
        with progress("merging") as bar:
            return merge_gguf(base, list(adapters), out, qtype=qtype, progress=bar, **common)
    if kind == BNB4_CHECKPOINT:
        from ..merge.bnb import merge_bnb

        if qtype:
            raise click.UsageError("--type is for GGUF bases; use --requantize for 4-bit output")
        with progress("merging") as bar:
            return merge_bnb(base, list(adapters), out, requantize=requantize, progress=bar,
                             **common)
    if kind == MXFP4_CHECKPOINT:
        from ..merge.mxfp4 import merge_mxfp4

        if qtype:
            raise click.UsageError("--type is for GGUF bases; use --requantize for MXFP4 output")
        with progress("merging") as bar:
            return merge_mxfp4(base, list(adapters), out, requantize=requantize, progress=bar,
                               **common)
    return None


@click.command("merge")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path(),
                callback=_open_adapters)
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="A directory (merged checkpoint), a .safetensors file (single-file base), "
                   "a .onnx file (ONNX model), or a .gguf file (GGUF base).")
@click.option("-w", "--weight", "weights", multiple=True, type=float,
              help="Weight of each adapter, in order (repeat once per adapter; default 1).")
@click.option("--base", "names_base", type=click.Path(), is_eager=True,
              help="The model adapters whose format needs one (GGUF, loralib, ...) are read "
                   "through, as for `convert`: a checkpoint or a .gguf model (default: BASE, "
                   "unless it is ONNX or bitsandbytes 4-bit).")
@click.option("--dtype", type=_DTYPES, default=None,
              help="ONNX export: weight and activation dtype (default float32); int4/int8: "
              "dense layers as ONNX Runtime MatMulNBits, the rest float32; bfloat16 runs in "
              "ONNX Runtime on CUDA only.")
@click.option("--opset", type=int, default=None,
              help="ONNX export: opset version (default 18).")
@click.option("--verify", is_flag=True,
              help="ONNX export: compare ONNX Runtime with torch on random inputs before writing.")
@click.option("--force", is_flag=True,
              help="Merge even if the adapter names a different base fingerprint, or BASE "
                   "records it as merged already.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge even if an adapter holds NaN/Inf.")
@click.option("--unshare", is_flag=True,
              help="ONNX surgery: give an adapted layer its own copy of a weight the graph shares "
                   "with other layers (default: refuse).")
@click.option("--with-past", is_flag=True,
              help="ONNX export of a decoder: KV-cache inputs/outputs (past_key_values.N.key/value "
                   "→ present.N.key/value) for prefill and decode; see `loraformat generate`. "
                   "Built-in decoder families are written op by op (GroupQueryAttention, packed "
                   "q/k/v); other models are traced.")
@click.option("--optimize", is_flag=True,
              help="With --with-past: fuse a traced decoder for ONNX Runtime (attention, "
              "SkipLayerNorm, FastGelu, RMSNorm); a built-in decoder family's graph is written "
              "fused already (GroupQueryAttention, packed projections), so it changes nothing.")
@click.option("--type", "qtype", default=None, metavar="TYPE",
              help="GGUF base: the type adapted tensors are written in (default: their own; "
                   "F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0).")
@click.option("--requantize", is_flag=True,
              help="bitsandbytes 4-bit or MXFP4 (gpt-oss) base: write the same quantized "
                   "layout (default: a float checkpoint, the QLoRA recipe).")
@from_option
@quantization_options
@genai_option
@overwrite_option
@json_option
def merge_command(
    base: str, adapters: tuple[Adapter, ...], out: str, weights: tuple[float, ...], dtype: str,
    opset: int | None, verify: bool, force: bool, allow_nonfinite: bool, unshare: bool,
    overwrite: bool, as_json: bool, with_past: bool = False, optimize: bool = False,
    qtype: str | None = None, requantize: bool = False, from_: str | None = None,
    names_base: str | None = None, block_size: int | None = None, symmetric: bool = False,
    accuracy_level: int | None = None,
    quantize_lm_head: bool | None = None,
    quantize_embeddings: bool = False, no_genai: bool = False,
) -> None:
    """Merge ADAPTERS into BASE: W' = W + Σ wᵢ·scaleᵢ·BᵢAᵢ (fp32 accumulation, base dtype).

    BASE is a Hugging Face checkpoint directory (single or sharded safetensors), an ONNX model
    (.onnx, merged by initializer surgery, no torch), a llama.cpp GGUF model (-o x.gguf; adapted
    tensors requantized to their type) or a bitsandbytes 4-bit or MXFP4 (gpt-oss) checkpoint
    (float output, or --requantize), told apart by content; quantized merges report how much of
    the adapter survived. Each ADAPTER is in
    any format `convert` reads (loraformat, PEFT, loralib, .onnx_adapter, GGUF, MLX; detected
    from its content, or --from), read through --base where the format needs it (default: BASE,
    a checkpoint or a GGUF model). OUT decides the
    product: a directory gets a merged checkpoint (same shards and names, config copied), a .onnx
    file an ONNX model with the same graph as the base and merged weights.
    """
    quant = quant_from_options(
        dtype, block_size, symmetric, accuracy_level, quantize_lm_head, quantize_embeddings
    )
    if optimize and not with_past:
        raise click.UsageError("--optimize applies only with --with-past")
    if no_genai and not with_past:
        raise click.UsageError("--no-genai-config applies only with --with-past")
    quantized = _merge_quantized(base, adapters, out, weights, qtype, requantize, force,
                                 allow_nonfinite, overwrite,
                                 bool(dtype or opset or verify or with_past or unshare))
    if quantized is not None:
        _report("merged", quantized, adapters, as_json)
        return
    if qtype or requantize:
        raise click.UsageError("--type applies to a GGUF base, --requantize to a bitsandbytes "
                               "4-bit or MXFP4 base")
    if with_past:
        if _base_is_onnx() or not _is_onnx(out):
            raise click.UsageError("--with-past exports a checkpoint BASE to -o ....onnx")
        from ..export.decoder import export_decoder
        from ..export.onnx import DEFAULT_OPSET

        check_genai(out, base, overwrite, no_genai)
        with progress("merging") as bar:
            result = export_decoder(
                base, out, adapters=list(adapters), weights=list(weights),
                dtype=dtype or "float32", opset=opset or DEFAULT_OPSET, optimize=optimize,
                verify_output=verify, force=force, allow_nonfinite=allow_nonfinite,
                overwrite=overwrite, progress=bar, quant=quant,
            )
        _report("merged", result, adapters, as_json, write_genai(result.path, base, no_genai))
        return
    if _base_is_onnx():
        from ..merge.onnx_surgery import merge_onnx

        if not _is_onnx(out):
            raise click.UsageError("an ONNX base merges into an ONNX output (-o ....onnx)")
        if dtype or opset or verify:
            raise click.UsageError(
                "--dtype, --opset and --verify apply to exporting a checkpoint; surgery keeps "
                "the ONNX base's graph, opset and dtype"
            )
        with progress("merging") as bar:
            result = merge_onnx(
                base, list(adapters), out, weights=list(weights), force=force,
                allow_nonfinite=allow_nonfinite, unshare=unshare, overwrite=overwrite,
                progress=bar,
            )
    elif _is_onnx(out):
        from ..export.onnx import DEFAULT_OPSET, export_onnx

        with progress("merging") as bar:
            result = export_onnx(
                base, out, adapters=list(adapters), weights=list(weights), dtype=dtype or "float32",
                quant=quant, opset=opset or DEFAULT_OPSET, verify_output=verify, force=force,
                allow_nonfinite=allow_nonfinite, overwrite=overwrite, progress=bar,
            )
    else:
        if dtype or opset or verify:
            raise click.UsageError("--dtype, --opset and --verify apply to ONNX output (-o x.onnx)")
        from ..merge.checkpoint import merge_checkpoint

        with progress("merging") as bar:
            result = merge_checkpoint(
                base, list(adapters), out, weights=list(weights), force=force,
                allow_nonfinite=allow_nonfinite, overwrite=overwrite, progress=bar,
            )
    _report("merged", result, adapters, as_json)


@click.command("unmerge")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path(),
                callback=_open_adapters)
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="A directory (checkpoint), .safetensors file, or .onnx file (ONNX base).")
@click.option("-w", "--weight", "weights", multiple=True, type=float,
              help="The weights the adapters were merged with (default 1).")
@click.option("--allow-nonfinite", is_flag=True, help="Proceed even if an adapter holds NaN/Inf.")
@from_option
@overwrite_option
@json_option
def unmerge_command(
    base: str, adapters: tuple[Adapter, ...], out: str, weights: tuple[float, ...],
    allow_nonfinite: bool, overwrite: bool, as_json: bool, from_: str | None = None,
) -> None:
    """Subtract ADAPTERS from BASE, a model they were merged into: W = W' − Σ wᵢ·scaleᵢ·BᵢAᵢ.

    Exact up to float rounding. BASE is a *merged* model, so the adapter's base fingerprint is
    not checked. DoRA layers and replaced tensors cannot be unmerged and are refused.
    """
    if _given_base_kind() in _QUANTIZED:
        raise click.UsageError(
            "unmerge from a quantized model (GGUF, bitsandbytes) is not supported: the merge "
            "requantized the weights, so subtracting the adapter does not give the base back"
        )
    if _base_is_onnx():
        from ..merge.onnx_surgery import merge_onnx

        if not _is_onnx(out):
            raise click.UsageError("an ONNX base unmerges into an ONNX output (-o ....onnx)")
        with progress("unmerging") as bar:
            result = merge_onnx(
                base, list(adapters), out, weights=list(weights), subtract=True,
                allow_nonfinite=allow_nonfinite, overwrite=overwrite, progress=bar,
            )
    else:
        if _is_onnx(out):
            raise click.UsageError(
                "unmerge writes a checkpoint; to get ONNX, unmerge then run `loraformat export`"
            )
        from ..merge.checkpoint import unmerge_checkpoint

        with progress("unmerging") as bar:
            result = unmerge_checkpoint(
                base, list(adapters), out, weights=list(weights),
                allow_nonfinite=allow_nonfinite, overwrite=overwrite, progress=bar,
            )
    _report("unmerged", result, adapters, as_json)
