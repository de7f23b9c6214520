"""``merge`` and ``unmerge``: adapters into (or out of) a base checkpoint or ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._common import echo_json, json_option, overwrite_option, progress
from .export_cmd import EXPORT_DTYPES, echo_verify, quant_from_options, quantization_options

_DTYPES = click.Choice(EXPORT_DTYPES)


def _is_onnx(path: str) -> bool:
    return Path(path).suffix == ".onnx"


def _report(kind: str, result: Any, adapters: tuple[str, ...], as_json: bool) -> None:
    data = {
        "output": str(result.path),
        "adapters": list(adapters),
        "tensors_changed": result.tensors_changed,
    }
    for key in ("layers", "shards", "external_data", "opset", "dtype", "nodes", "initializers",
                "max_abs_diff", "verify_provider", "tolerance", "unshared", "quantized_layers",
                "cosine"):
        if hasattr(result, key):
            value = getattr(result, key)
            data[key] = str(value) if isinstance(value, Path) else value
    if as_json:
        echo_json(data)
        return
    click.echo(
        f"{kind} {len(adapters)} adapter(s) into {result.path}: {result.tensors_changed} tensor(s) "
        "changed"
        + (f", {result.layers} layer(s)" if hasattr(result, "layers") else "")
        + (f", {result.shards} shard(s)" if hasattr(result, "shards") else "")
    )
    if hasattr(result, "opset"):
        click.echo(
            f"onnx: opset {result.opset}, {result.dtype}, {result.nodes} nodes, "
            f"{result.initializers} initializers"
            + (f", weights in {result.external_data}" if result.external_data else "")
        )
    if getattr(result, "max_abs_diff", None) is not None:
        echo_verify(result)


@click.command("merge")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="A directory (merged checkpoint), a .safetensors file (single-file base), "
                   "or a .onnx file (ONNX model).")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight of each adapter, in order (repeat once per adapter; default 1).")
@click.option("--dtype", type=_DTYPES, default=None,
              help="ONNX export: weight and activation dtype (default float32); int4/int8: "
              "dense layers as ONNX Runtime MatMulNBits, the rest float32.")
@click.option("--opset", type=int, default=None,
              help="ONNX export: opset version (default 18).")
@click.option("--verify", is_flag=True,
              help="ONNX export: compare ONNX Runtime with torch on random inputs before writing.")
@click.option("--force", is_flag=True,
              help="Merge even if the adapter names a different base fingerprint.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge even if an adapter holds NaN/Inf.")
@click.option("--unshare", is_flag=True,
              help="ONNX surgery: give an adapted layer its own copy of a weight the graph shares "
                   "with other layers (default: refuse).")
@click.option("--with-past", is_flag=True,
              help="ONNX export of a decoder: KV-cache inputs/outputs (past_key_values.N.key/value "
                   "→ present.N.key/value) for prefill and decode; see `loraformat generate`.")
@click.option("--optimize", is_flag=True,
              help="With --with-past: fuse for ONNX Runtime (attention, SkipLayerNorm, "
              "FastGelu, RMSNorm).")
@quantization_options
@overwrite_option
@json_option
def merge_command(
    base: str, adapters: tuple[str, ...], out: str, weights: tuple[float, ...], dtype: str,
    opset: int | None, verify: bool, force: bool, allow_nonfinite: bool, unshare: bool,
    overwrite: bool, as_json: bool, with_past: bool = False, optimize: bool = False,
    block_size: int | None = None, symmetric: bool = False, accuracy_level: int | None = None,
    quantize_lm_head: bool = False,
) -> None:
    """Merge ADAPTERS into BASE: W' = W + Σ wᵢ·scaleᵢ·BᵢAᵢ (fp32 accumulation, base dtype).

    BASE is a Hugging Face checkpoint directory (single or sharded safetensors) or an ONNX model
    (.onnx, merged by initializer surgery, no torch). Each ADAPTER is a loraformat adapter or a
    PEFT adapter directory. OUT decides the product: a directory gets a merged checkpoint (same
    shards and names, config copied), a .onnx file an ONNX model with the same graph as the base
    and merged weights.
    """
    quant = quant_from_options(dtype, block_size, symmetric, accuracy_level, quantize_lm_head)
    if optimize and not with_past:
        raise click.UsageError("--optimize applies only with --with-past")
    if with_past:
        if _is_onnx(base) or not _is_onnx(out):
            raise click.UsageError("--with-past exports a checkpoint BASE to -o ....onnx")
        from ..export.decoder import export_decoder
        from ..export.onnx import DEFAULT_OPSET

        with progress("merging") as bar:
            result = export_decoder(
                base, out, adapters=list(adapters), weights=list(weights),
                dtype=dtype or "float32", opset=opset or DEFAULT_OPSET, optimize=optimize,
                verify_output=verify, force=force, allow_nonfinite=allow_nonfinite,
                overwrite=overwrite, progress=bar, quant=quant,
            )
        _report("merged", result, adapters, as_json)
        return
    if _is_onnx(base):
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
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="A directory (checkpoint), .safetensors file, or .onnx file (ONNX base).")
@click.option("--weight", "weights", multiple=True, type=float,
              help="The weights the adapters were merged with (default 1).")
@click.option("--allow-nonfinite", is_flag=True, help="Proceed even if an adapter holds NaN/Inf.")
@overwrite_option
@json_option
def unmerge_command(
    base: str, adapters: tuple[str, ...], out: str, weights: tuple[float, ...],
    allow_nonfinite: bool, overwrite: bool, as_json: bool,
) -> None:
    """Subtract ADAPTERS from BASE, a model they were merged into: W = W' − Σ wᵢ·scaleᵢ·BᵢAᵢ.

    Exact up to float rounding. BASE is a *merged* model, so the adapter's base fingerprint is
    not checked. DoRA layers and replaced tensors cannot be unmerged and are refused.
    """
    if _is_onnx(base):
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
