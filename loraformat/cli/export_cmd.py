"""``export``: a base checkpoint to ONNX (the plain base; options shape the graph)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..architecture import ExportOptions
from ..export.runner import runner_name
from ._common import echo_json, json_option, overwrite_option, progress

#: ``--dtype`` of an ONNX export: floats, or weight-only int4/int8 (MatMulNBits) dense layers.
EXPORT_DTYPES = ("float32", "float16", "bfloat16", "int4", "int8")


def quantization_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--block-size``, ``--symmetric``, ``--accuracy-level``, ``--quantize-lm-head``,
    ``--quantize-embeddings`` (for ``--dtype int4/int8``); the command receives them as keyword
    arguments."""
    options = [
        click.option("--block-size", type=int, default=None,
                     help="int4/int8: elements per quantization block along the input features "
                     "(power of two ≥ 16; default 32)."),
        click.option("--symmetric", is_flag=True,
                     help="int4/int8: symmetric blocks (no zero points; default asymmetric)."),
        click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
                     help="int4/int8: MatMulNBits accuracy_level, the compute type ONNX Runtime "
                     "may use (1 fp32, 2 fp16, 3 bf16, 4 int8; default 4, 0 leaves it unset)."),
        click.option("--quantize-lm-head/--float-lm-head", default=None,
                     help="int4/int8: quantize lm_head too, or keep it float. Default: quantized "
                     "in a --with-past decoder of a built-in family (logits' cosine to fp32 as "
                     "ONNX Runtime's own quantizer's; decode reads the head every token), float "
                     "elsewhere."),
        click.option("--quantize-embeddings", is_flag=True,
                     help="int4: embedding tables as GatherBlockQuantized (default: float; a "
                     "table tied to the LM head keeps a float copy for the head)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def quant_from_options(
    dtype: str | None, block_size: int | None, symmetric: bool, accuracy_level: int | None,
    quantize_lm_head: bool | None,
    quantize_embeddings: bool = False,
) -> Any:
    """The :class:`~loraformat.export.quantize.QuantOptions` the flags ask for; None for float
    dtypes (where the flags are a usage error)."""
    from ..export.quantize import QuantOptions

    given = (block_size is not None or symmetric or accuracy_level is not None
             or quantize_lm_head is not None or quantize_embeddings)
    if dtype not in ("int4", "int8"):
        if given:
            raise click.UsageError(
                "--block-size, --symmetric, --accuracy-level, --quantize/float-lm-head and "
                "--quantize-embeddings apply to --dtype int4/int8"
            )
        return None
    try:
        return QuantOptions(
            bits=4 if dtype == "int4" else 8,
            block_size=32 if block_size is None else block_size,
            symmetric=symmetric,
            accuracy_level=4 if accuracy_level is None else (accuracy_level or None),
            lm_head=quantize_lm_head,
            embeddings=quantize_embeddings,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


genai_option = click.option(
    "--no-genai-config", "no_genai", is_flag=True,
    help="With --with-past: write no genai_config.json and copy no tokenizer files beside the "
    "model (default: both, so onnxruntime_genai.Model(folder) opens it).")


def genai_base_dir(base: str) -> Path:
    """The checkpoint directory holding BASE's config.json and tokenizer files."""
    path = Path(base)
    return path if path.is_dir() else path.parent


def check_genai(out: str, base: str, overwrite: bool, no_genai: bool) -> None:
    """Before a --with-past export: refuse to replace OUT, then the GenAI files beside it,
    without --overwrite (see :func:`loraformat.export.genai.check_genai_outputs`)."""
    if not no_genai:
        from ..atomic import check_output
        from ..export.genai import check_genai_outputs

        check_output(out, overwrite)
        check_genai_outputs(out, genai_base_dir(base), overwrite)


def write_genai(out: Path, base: str, no_genai: bool) -> Any:
    """After a --with-past export: genai_config.json and the tokenizer beside OUT (None with
    --no-genai-config). The model is written by then: what stops the config is a warning."""
    if no_genai:
        return None
    from ..errors import LoraformatError
    from ..export.genai import GenaiFolder, write_genai_folder

    try:
        return write_genai_folder(out, genai_base_dir(base), overwrite=True)
    except LoraformatError as exc:
        return GenaiFolder(None, note=f"no genai_config.json written: {exc}")


def echo_genai(folder: Any) -> None:
    """The line saying what :func:`write_genai` wrote, and its note (stderr) if it has one."""
    if folder is None:
        return
    files = folder.tokenizer_files
    if folder.config is not None:
        click.echo(f"genai: {folder.config} (model.type {folder.model_type})"
                   + (f", tokenizer: {', '.join(files)}" if files else ", no tokenizer files"))
    if folder.note:
        click.echo(f"warning: {folder.note}", err=True)


def export_options(**kwargs: object) -> ExportOptions:
    """The :class:`~loraformat.architecture.ExportOptions` for the command's options.

    One place to turn new flags (KV cache, LoRA slots) into export options.
    """
    return ExportOptions(**kwargs)  # type: ignore[arg-type]


@click.command("export")
@click.argument("base", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="The .onnx file.")
@click.option("--dtype", type=click.Choice(EXPORT_DTYPES), default="float32",
              show_default=True,
              help="Weight and activation dtype; int4/int8: dense layers as ONNX Runtime "
              "MatMulNBits (weight-only, blockwise), everything else float32. bfloat16 runs "
              "in ONNX Runtime on CUDA only (--verify on CPU uses onnx's reference evaluator).")
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
                   "value outputs, attention_mask and position_ids (prefill and decode). "
                   "Built-in decoder families are written op by op (GroupQueryAttention, packed "
                   "q/k/v); other models are traced.")
@click.option("--optimize", is_flag=True,
              help="With --with-past: fuse a traced decoder for ONNX Runtime (attention, "
              "SkipLayerNorm, FastGelu, RMSNorm); a built-in decoder family's graph is written "
              "fused already (GroupQueryAttention, packed projections), so it changes nothing.")
@quantization_options
@genai_option
@overwrite_option
@json_option
def export_command(
    base: str, out: str, dtype: str, opset: int | None, verify: bool, overwrite: bool,
    as_json: bool, lora_slots: bool = False, targets: tuple[str, ...] = (),
    with_past: bool = False, optimize: bool = False, block_size: int | None = None,
    symmetric: bool = False, accuracy_level: int | None = None,
    quantize_lm_head: bool | None = None,
    quantize_embeddings: bool = False, no_genai: bool = False,
) -> None:
    """Export the base checkpoint BASE to the ONNX model OUT (dynamic batch/sequence axes).

    Initializer names equal the checkpoint's tensor names, so `loraformat merge OUT.onnx ADAPTER`
    can later merge adapters into it without torch.
    """
    from ..export.onnx import DEFAULT_OPSET, export_onnx

    quant = quant_from_options(
        dtype, block_size, symmetric, accuracy_level, quantize_lm_head, quantize_embeddings
    )
    if targets and not lora_slots:
        raise click.UsageError("--targets applies only with --lora-slots")
    if optimize and not with_past:
        raise click.UsageError("--optimize applies only with --with-past")
    if no_genai and not with_past:
        raise click.UsageError("--no-genai-config applies only with --with-past")
    if with_past:
        check_genai(out, base, overwrite, no_genai)
    if lora_slots:
        if optimize:
            raise click.UsageError("--optimize cannot be combined with --lora-slots")
        _export_slots(base, out, dtype, opset or DEFAULT_OPSET, verify, overwrite, as_json, targets,
                      with_past, quant, no_genai)
        return
    if with_past:
        _export_decoder(base, out, dtype, opset or DEFAULT_OPSET, verify, optimize, overwrite,
                        as_json, quant, no_genai)
        return
    with progress("exporting") as report:
        result = export_onnx(
            base, out, dtype=dtype, quant=quant, opset=opset or DEFAULT_OPSET,
            options=export_options(), verify_output=verify, overwrite=overwrite, progress=report,
        )
    if as_json:
        echo_json({
            "output": str(result.path),
            "external_data": str(result.external_data) if result.external_data else None,
            "opset": result.opset, "dtype": result.dtype, "nodes": result.nodes,
            "initializers": result.initializers, "inputs": result.input_names,
            "outputs": result.output_names, "max_abs_diff": result.max_abs_diff,
            "verify_provider": result.verify_provider, "tolerance": result.tolerance,
            "quantized_layers": result.quantized_layers, "cosine": result.cosine,
            "traced": result.traced, "left_out": result.left_out,
        })
        return
    click.echo(
        f"exported {Path(base)} to {result.path}: opset {result.opset}, {result.dtype}, "
        f"{result.nodes} nodes, inputs {', '.join(result.input_names)}"
        + (f", weights in {result.external_data}" if result.external_data else "")
    )
    click.echo(f"graph: {result.traced}")
    echo_left_out(result.left_out)
    echo_verify(result)


def echo_left_out(left_out: dict[str, int]) -> None:
    """The line naming the stored tensors an ONNX export left out (a multimodal checkpoint's
    towers), by group; nothing when it kept them all."""
    if left_out:
        click.echo("left out of the ONNX model: " + ", ".join(
            f"{group} ({n} tensor{'s' if n > 1 else ''})" for group, n in left_out.items()))


def echo_verify(result: Any) -> None:
    """The ``--verify`` line of an :class:`~loraformat.export.onnx.ExportResult`."""
    if result.max_abs_diff is None:
        return
    if getattr(result, "min_cosine", None) is not None:
        click.echo(
            f"verify: {result.dtype} logits in {runner_name(result.verify_provider)} vs fp32 "
            f"torch on random inputs: cosine {result.cosine:.5f} (needs {result.min_cosine}), "
            f"max abs diff {result.max_abs_diff:.3g}: ok"
        )
        return
    click.echo(
        f"verify: max abs diff {result.max_abs_diff:.3g} between "
        f"{runner_name(result.verify_provider)} and torch on random inputs (tolerance "
        f"{result.tolerance:.3g}): ok"
    )


def _export_slots(
    base: str, out: str, dtype: str, opset: int, verify: bool, overwrite: bool, as_json: bool,
    targets: tuple[str, ...], with_past: bool = False, quant: Any = None, no_genai: bool = False,
) -> None:
    """``export --lora-slots [--with-past]``: see :func:`.slots.export_with_slots`."""
    from ..export.slots import export_with_slots

    names = [t.strip() for item in targets for t in item.split(",") if t.strip()]
    with progress("exporting") as report:
        result = export_with_slots(
            base, out, targets=names or None, dtype=dtype, opset=opset, verify_output=verify,
            overwrite=overwrite, progress=report, with_past=with_past, quant=quant,
        )
    genai = write_genai(result.path, base, no_genai or not with_past)
    if as_json:
        echo_json({**result.to_json(), "genai": genai.to_json() if genai else None})
        return
    click.echo(
        f"exported {Path(base)} to {result.path} with {len(result.slots)} LoRA slot(s): opset "
        f"{result.opset}, {result.dtype}, inputs {', '.join(result.input_names)} + "
        "<layer>.lora_A/.lora_B"
        + (f", weights in {result.external_data}" if result.external_data else "")
    )
    echo_left_out(result.left_out)
    if result.max_abs_diff is not None:
        click.echo(
            f"verify: max abs diff {result.max_abs_diff:.3g} between ONNX Runtime (no adapter) "
            "and torch on random inputs " + (
                f"(tolerance {result.tolerance:.3g}): ok" if result.tolerance is not None
                else f"(int4/int8: logits' cosine {result.cosine:.5f}): ok")
        )
    echo_genai(genai)


def _export_decoder(
    base: str, out: str, dtype: str, opset: int, verify: bool, optimize: bool, overwrite: bool,
    as_json: bool, quant: Any = None, no_genai: bool = False,
) -> None:
    """``export --with-past``: see :func:`loraformat.export.decoder.export_decoder`."""
    from ..export.decoder import export_decoder

    with progress("exporting") as report:
        result = export_decoder(
            base, out, dtype=dtype, opset=opset, optimize=optimize, verify_output=verify,
            overwrite=overwrite, progress=report, quant=quant,
        )
    genai = write_genai(result.path, base, no_genai)
    if as_json:
        echo_json({**result.to_json(), "genai": genai.to_json() if genai else None})
        return
    click.echo(
        f"exported {Path(base)} to {result.path} with a KV cache: opset {result.export.opset}, "
        f"{result.export.dtype}, {result.nodes} nodes"
        + (f", fused {result.fusions}" if result.optimized else "")
        + (f", weights in {result.export.external_data}" if result.export.external_data else "")
    )
    echo_left_out(result.left_out)
    if result.max_abs_diff is not None:
        click.echo(
            f"verify: max abs diff {result.max_abs_diff:.3g} between "
            f"{runner_name(result.verify_provider)} and torch on a prefill and a decode step "
            f"(tolerance "
            f"{result.tolerance:.3g}): ok"
        )
    echo_genai(genai)
