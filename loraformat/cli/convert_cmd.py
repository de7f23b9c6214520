"""``convert``: any supported LoRA format to any other, through the loraformat adapter."""

from __future__ import annotations

import click

from ._common import echo_json, json_option, overwrite_option, progress

FORMATS = ["loraformat", "peft", "loralib", "onnx_adapter", "gguf", "mlx"]


@click.command("convert")
@click.argument("input_path", metavar="IN", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Output file or directory.")
@click.option("--from", "from_", type=click.Choice(FORMATS), help="Input format (default: detect).")
@click.option("--to", type=click.Choice(FORMATS),
              help="Output format (default: by suffix: .gguf, .onnx_adapter, .pt/.pth/.bin = "
                   "loralib, .safetensors or a directory = loraformat).")
@click.option("--base", type=click.Path(), help="Base model checkpoint: checks layer names and "
              "shapes; needed for GGUF (llama.cpp names, row order) and to detect the "
              "architecture of loralib/ONNX Runtime adapters.")
@click.option("--lossy", is_flag=True, help="Convert to the nearest form the target can hold "
              "(dropping DoRA magnitudes, lora_bias, replaced tensors... as needed) and list "
              "what changed. Without it such conversions are refused.")
@click.option("--alpha", type=float, help="loralib input: the lora_alpha it was trained with.")
@click.option("--rank", type=int, help="loralib input: r (checked against the tensors). PEFT "
              "LoHa/LoKr/AdaLoRA/VeRA input: reduce every layer to this rank (as `reduce`).")
@click.option("--energy", type=float, help="PEFT LoHa/LoKr/AdaLoRA/VeRA input: keep the "
              "smallest rank holding this fraction of Σσ² per layer (as `reduce`).")
@click.option("--enable-lora", help="loralib input: MergedLinear parts, e.g. true,false,true.")
@click.option("--architecture", help="Architecture id when there is no --base (e.g. llama).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "float64"]),
              help="ONNX Runtime adapter output: tensor dtype (must match the graph's slots).")
@overwrite_option
@json_option
def convert_command(
    input_path: str,
    output: str,
    from_: str | None,
    to: str | None,
    base: str | None,
    lossy: bool,
    alpha: float | None,
    rank: int | None,
    energy: float | None,
    enable_lora: str | None,
    architecture: str | None,
    dtype: str | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Convert the LoRA adapter IN to another format, written to OUT.

    Formats: loraformat (directory or single .safetensors), peft (Hugging Face PEFT directory),
    loralib (microsoft/LoRA .pt/.safetensors), onnx_adapter (ONNX Runtime, for a graph from
    `loraformat export --lora-slots`), gguf (llama.cpp), mlx (MLX-LM directory).

    Pickled inputs (PEFT adapter_model.bin, loralib .pt) are read only with
    torch.load(weights_only=True), which cannot run code from the file.
    """
    from ..interchange import convert
    from ..interchange.front_door import check_base_given, identify_adapter

    from_, source = identify_adapter(input_path, from_)  # by content; one line if not an adapter
    check_base_given(input_path, from_, base)
    options = {"alpha": alpha, "rank": rank, "energy": energy, "enable_lora": enable_lora,
               "architecture": architecture, "dtype": dtype}
    with progress("converting") as callback:
        report = convert(
            source, output, from_, to, base=base, lossy=lossy, overwrite=overwrite,
            progress=callback, **{k: v for k, v in options.items() if v is not None},
        )
    if as_json:
        echo_json(report.to_json())
        return
    click.echo(f"{report.source_format} → {report.target_format}: {report.layers} layer(s) "
               f"written to {report.target}")
    for note in report.notes:
        click.echo(f"note: {note}")
    for change in report.lossy:
        click.echo(f"lossy: {change}", err=True)
