"""``export``: a base checkpoint to ONNX (the plain base; options shape the graph)."""

from __future__ import annotations

from pathlib import Path

import click

from ..architecture import ExportOptions
from ._common import echo_json, json_option, overwrite_option, progress


def export_options(**kwargs: object) -> ExportOptions:
    """The :class:`~loraformat.architecture.ExportOptions` for the command's options.

    One place to turn new flags (KV cache, LoRA slots) into export options.
    """
    return ExportOptions(**kwargs)  # type: ignore[arg-type]


@click.command("export")
@click.argument("base", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="The .onnx file.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Weight and activation dtype.")
@click.option("--opset", type=int, default=None, help="ONNX opset version (default 18).")
@click.option("--verify", is_flag=True,
              help="Compare ONNX Runtime with torch on random inputs before writing.")
@click.option("--lora-slots", is_flag=True,
              help="Hot-swappable graph: LoRA A/B inputs (with zero-rank defaults) on every "
              "targeted dense layer, for .onnx_adapter files / loraformat.runtime.Session.")
@click.option("--targets", multiple=True, metavar="NAMES",
              help="With --lora-slots: layer paths or module names (q_proj, c_attn), comma-"
              "separated or repeated; default every dense layer.")
@click.option("--with-past", is_flag=True,
              help="Decoder with a KV cache: past_key_values.N.key/value inputs, present.N.key/"
                   "value outputs, attention_mask and position_ids (prefill and decode).")
@click.option("--optimize", is_flag=True,
              help="With --with-past: fuse for ONNX Runtime (attention, SkipLayerNorm, "
              "FastGelu, RMSNorm).")
@overwrite_option
@json_option
def export_command(
    base: str, out: str, dtype: str, opset: int | None, verify: bool, overwrite: bool,
    as_json: bool, lora_slots: bool = False, targets: tuple[str, ...] = (),
    with_past: bool = False, optimize: bool = False,
) -> None:
    """Export the base checkpoint BASE to the ONNX model OUT (dynamic batch/sequence axes).

    Initializer names equal the checkpoint's tensor names, so `loraformat merge OUT.onnx ADAPTER`
    can later merge adapters into it without torch.
    """
    from ..export.onnx import DEFAULT_OPSET, export_onnx

    if targets and not lora_slots:
        raise click.UsageError("--targets applies only with --lora-slots")
    if optimize and not with_past:
        raise click.UsageError("--optimize applies only with --with-past")
    if lora_slots:
        if optimize:
            raise click.UsageError("--optimize cannot be combined with --lora-slots")
        _export_slots(base, out, dtype, opset or DEFAULT_OPSET, verify, overwrite, as_json, targets,
                      with_past)
        return
    if with_past:
        _export_decoder(base, out, dtype, opset or DEFAULT_OPSET, verify, optimize, overwrite,
                        as_json)
        return
    result = export_onnx(
        base, out, dtype=dtype, opset=opset or DEFAULT_OPSET, options=export_options(),
        verify_output=verify, overwrite=overwrite,
    )
    if as_json:
        echo_json({
            "output": str(result.path),
            "external_data": str(result.external_data) if result.external_data else None,
            "opset": result.opset, "dtype": result.dtype, "nodes": result.nodes,
            "initializers": result.initializers, "inputs": result.input_names,
            "outputs": result.output_names, "max_abs_diff": result.max_abs_diff,
            "verify_provider": result.verify_provider,
        })
        return
    click.echo(
        f"exported {Path(base)} to {result.path}: opset {result.opset}, {result.dtype}, "
        f"{result.nodes} nodes, inputs {', '.join(result.input_names)}"
        + (f", weights in {result.external_data}" if result.external_data else "")
    )
    if result.max_abs_diff is not None:
        click.echo(
            f"verify: max abs diff {result.max_abs_diff:.3g} between ONNX Runtime "
            f"({result.verify_provider}) and torch on random inputs (tolerance "
            f"{result.tolerance:.3g}): ok"
        )


def _export_slots(
    base: str, out: str, dtype: str, opset: int, verify: bool, overwrite: bool, as_json: bool,
    targets: tuple[str, ...], with_past: bool = False,
) -> None:
    """``export --lora-slots [--with-past]``: see :func:`.slots.export_with_slots`."""
    from ..export.slots import export_with_slots

    names = [t.strip() for item in targets for t in item.split(",") if t.strip()]
    with progress("exporting") as report:
        result = export_with_slots(
            base, out, targets=names or None, dtype=dtype, opset=opset, verify_output=verify,
            overwrite=overwrite, progress=report, with_past=with_past,
        )
    if as_json:
        echo_json(result.to_json())
        return
    click.echo(
        f"exported {Path(base)} to {result.path} with {len(result.slots)} LoRA slot(s): opset "
        f"{result.opset}, {result.dtype}, inputs {', '.join(result.input_names)} + "
        "<layer>.lora_A/.lora_B"
        + (f", weights in {result.external_data}" if result.external_data else "")
    )
    if result.max_abs_diff is not None:
        click.echo(
            f"verify: max abs diff {result.max_abs_diff:.3g} between ONNX Runtime (no adapter) "
            f"and torch on random inputs (tolerance {result.tolerance:.3g}): ok"
        )


def _export_decoder(
    base: str, out: str, dtype: str, opset: int, verify: bool, optimize: bool, overwrite: bool,
    as_json: bool,
) -> None:
    """``export --with-past``: see :func:`loraformat.export.decoder.export_decoder`."""
    from ..export.decoder import export_decoder

    with progress("exporting") as report:
        result = export_decoder(
            base, out, dtype=dtype, opset=opset, optimize=optimize, verify_output=verify,
            overwrite=overwrite, progress=report,
        )
    if as_json:
        echo_json(result.to_json())
        return
    click.echo(
        f"exported {Path(base)} to {result.path} with a KV cache: opset {result.export.opset}, "
        f"{result.export.dtype}, {result.nodes} nodes"
        + (f", fused {result.fusions}" if result.optimized else "")
        + (f", weights in {result.export.external_data}" if result.export.external_data else "")
    )
    if result.max_abs_diff is not None:
        click.echo(
            f"verify: max abs diff {result.max_abs_diff:.3g} between ONNX Runtime "
            f"({result.verify_provider}) and torch on a prefill and a decode step (tolerance "
            f"{result.tolerance:.3g}): ok"
        )
