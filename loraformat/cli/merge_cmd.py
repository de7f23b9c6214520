"""``merge`` and ``unmerge``: adapters into (or out of) a base checkpoint or ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import sniff
from ..errors import LoraformatError
from ..format.adapter import Adapter
from ._common import (
    echo_json,
    from_option,
    json_option,
    opened_adapters,
    overwrite_option,
    progress,
)

_DTYPES = click.Choice(["float32", "float16"])


def _is_onnx(path: str) -> bool:
    """For outputs, whose kind their suffix chooses (BASE is told by content: _onnx_base)."""
    return Path(path).suffix == ".onnx"


def _onnx_base(base: str) -> bool:
    """Whether BASE is an ONNX model (else a checkpoint directory or single .safetensors), by
    content; anything else is refused in one line saying what it is."""
    kind = sniff.require_base(
        base, (sniff.CHECKPOINT, sniff.SAFETENSORS_MODEL, sniff.ONNX_MODEL, sniff.GGUF_MODEL)
    )
    if kind.format == sniff.GGUF_MODEL:
        # The one place a GGUF-model merge plugs in (quantized bases); until then, refused.
        raise LoraformatError(
            base, f"is {kind.what}: merging into a GGUF base is not supported yet; merge into "
            "the safetensors checkpoint it was converted from"
        )
    return kind.format == sniff.ONNX_MODEL


def _open(
    adapters: tuple[str, ...], from_: str | None, base: str, onnx_base: bool
) -> list[Adapter]:
    """ADAPTERS in any format, read through BASE where the format needs it (an ONNX graph has
    no config to read names or row order through); closed when the command ends."""
    from ..interchange.front_door import NeedsBase

    cm = opened_adapters(adapters, from_, None if onnx_base else base)
    try:
        return click.get_current_context().with_resource(cm)
    except NeedsBase as exc:
        raise NeedsBase(
            exc.path, exc.needs, "an ONNX BASE has no checkpoint to read it through: convert it "
            "first (loraformat convert ADAPTER -o DIR --base CHECKPOINT)"
        ) from None


def _report(kind: str, result: Any, adapters: tuple[str, ...], as_json: bool) -> None:
    data = {
        "output": str(result.path),
        "adapters": list(adapters),
        "tensors_changed": result.tensors_changed,
    }
    for key in ("layers", "shards", "external_data", "opset", "dtype", "nodes", "initializers",
                "max_abs_diff", "verify_provider", "tolerance", "unshared"):
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
        click.echo(
            f"verify: max abs diff {result.max_abs_diff:.3g} between ONNX Runtime "
            f"({result.verify_provider}) and torch on random inputs (tolerance "
            f"{result.tolerance:.3g}): ok"
        )


@click.command("merge")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="A directory (merged checkpoint), a .safetensors file (single-file base), "
                   "or a .onnx file (ONNX model).")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight of each adapter, in order (repeat once per adapter; default 1).")
@click.option("--dtype", type=_DTYPES, default=None,
              help="ONNX export: weight and activation dtype (default float32).")
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
@from_option
@overwrite_option
@json_option
def merge_command(
    base: str, adapters: tuple[str, ...], out: str, weights: tuple[float, ...], dtype: str,
    opset: int | None, verify: bool, force: bool, allow_nonfinite: bool, unshare: bool,
    overwrite: bool, as_json: bool, with_past: bool = False, optimize: bool = False,
    from_: str | None = None,
) -> None:
    """Merge ADAPTERS into BASE: W' = W + Σ wᵢ·scaleᵢ·BᵢAᵢ (fp32 accumulation, base dtype).

    BASE is a Hugging Face checkpoint directory (single or sharded safetensors) or an ONNX model
    (.onnx, merged by initializer surgery, no torch), told apart by content. Each ADAPTER is in
    any format `convert` reads (loraformat, PEFT, loralib, .onnx_adapter, GGUF, MLX; detected
    from its content, or --from), read through BASE where the format needs it. OUT decides the
    product: a directory gets a merged checkpoint (same shards and names, config copied), a .onnx
    file an ONNX model with the same graph as the base and merged weights.
    """
    if optimize and not with_past:
        raise click.UsageError("--optimize applies only with --with-past")
    onnx_base = _onnx_base(base)
    opened = _open(adapters, from_, base, onnx_base)
    if with_past:
        if onnx_base or not _is_onnx(out):
            raise click.UsageError("--with-past exports a checkpoint BASE to -o ....onnx")
        from ..export.decoder import export_decoder
        from ..export.onnx import DEFAULT_OPSET

        with progress("merging") as bar:
            result = export_decoder(
                base, out, adapters=opened, weights=list(weights),
                dtype=dtype or "float32", opset=opset or DEFAULT_OPSET, optimize=optimize,
                verify_output=verify, force=force, allow_nonfinite=allow_nonfinite,
                overwrite=overwrite, progress=bar,
            )
        _report("merged", result, adapters, as_json)
        return
    if onnx_base:
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
                base, opened, out, weights=list(weights), force=force,
                allow_nonfinite=allow_nonfinite, unshare=unshare, overwrite=overwrite,
                progress=bar,
            )
    elif _is_onnx(out):
        from ..export.onnx import DEFAULT_OPSET, export_onnx

        with progress("merging") as bar:
            result = export_onnx(
                base, out, adapters=opened, weights=list(weights), dtype=dtype or "float32",
                opset=opset or DEFAULT_OPSET, verify_output=verify, force=force,
                allow_nonfinite=allow_nonfinite, overwrite=overwrite, progress=bar,
            )
    else:
        if dtype or opset or verify:
            raise click.UsageError("--dtype, --opset and --verify apply to ONNX output (-o x.onnx)")
        from ..merge.checkpoint import merge_checkpoint

        with progress("merging") as bar:
            result = merge_checkpoint(
                base, opened, out, weights=list(weights), force=force,
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
@from_option
@overwrite_option
@json_option
def unmerge_command(
    base: str, adapters: tuple[str, ...], out: str, weights: tuple[float, ...],
    allow_nonfinite: bool, overwrite: bool, as_json: bool, from_: str | None = None,
) -> None:
    """Subtract ADAPTERS from BASE, a model they were merged into: W = W' − Σ wᵢ·scaleᵢ·BᵢAᵢ.

    Exact up to float rounding. BASE is a *merged* model, so the adapter's base fingerprint is
    not checked. DoRA layers and replaced tensors cannot be unmerged and are refused. ADAPTERS
    are read as for `merge`.
    """
    onnx_base = _onnx_base(base)
    opened = _open(adapters, from_, base, onnx_base)
    if onnx_base:
        from ..merge.onnx_surgery import merge_onnx

        if not _is_onnx(out):
            raise click.UsageError("an ONNX base unmerges into an ONNX output (-o ....onnx)")
        with progress("unmerging") as bar:
            result = merge_onnx(
                base, opened, out, weights=list(weights), subtract=True,
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
                base, opened, out, weights=list(weights),
                allow_nonfinite=allow_nonfinite, overwrite=overwrite, progress=bar,
            )
    _report("unmerged", result, adapters, as_json)
