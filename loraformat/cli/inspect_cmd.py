"""``inspect`` and ``validate``: torch-free, header-first."""

from __future__ import annotations

import click

from ..architecture import registry
from ..format.summary import summarize
from ..interchange.front_door import check_adapter, read_adapter
from ._common import adapter_base_option, echo_json, from_option, json_option


@click.command("inspect")
@click.argument("adapter", type=click.Path())
@click.option("--no-norms", is_flag=True, help="Skip per-layer ‖ΔW‖ (reads the header only).")
@from_option
@adapter_base_option
@json_option
def inspect_command(
    adapter: str, no_norms: bool, from_: str | None, base: str | None, as_json: bool
) -> None:
    """Show an adapter's architecture, layers, ranks, alphas, dtypes, size and per-layer ‖ΔW‖.

    ADAPTER is a loraformat adapter (directory or single .safetensors) or any format `convert`
    reads (PEFT, loralib, .onnx_adapter, GGUF, MLX), detected from its content; a foreign one is
    shown as it converts, with what converting changes.
    """
    # lossy: show a foreign adapter even where converting would drop something, and say what
    loaded, report = read_adapter(adapter, from_=from_, base=base, lossy=True)
    with loaded:
        info = summarize(loaded, norms=not no_norms)
    info["path"] = info["path"] or adapter
    info["read_format"] = report.source_format
    if report.source_format != "loraformat":
        info["conversion"] = {"notes": report.notes, "lossy": report.lossy}
    # Which installed plugin reads bases of this architecture; None: handled generically.
    provider = registry().architectures().get(info["architecture"])
    info["architecture_plugin"] = provider.plugin if provider is not None else None
    if as_json:
        echo_json(info)
        return
    click.echo(f"adapter       {info['path']}")
    if report.source_format == "loraformat":
        click.echo(f"format        loraformat {info['format_version']}")
    else:
        click.echo(f"format        {report.source_format} (shown as loraformat "
                   f"{info['format_version']} after converting)")
        for note in report.notes:
            click.echo(f"converting    {note}")
        for change in report.lossy:
            click.echo(f"converting    would lose: {change}")
        if not report.notes and not report.lossy:
            click.echo("converting    exact: nothing changes")
    base = info["architecture"] + (f" ({info['base_name']})" if info["base_name"] else "")
    if provider is None:
        base += " — no installed plugin: bases are handled generically"
    click.echo(f"base          {base}")
    if info["base_fingerprint"]:
        click.echo(f"fingerprint   {info['base_fingerprint']}")
    click.echo(f"scaling       {info['scaling']}")
    ranks = ", ".join(f"r={r}×{n}" for r, n in info["ranks"].items())
    click.echo(f"layers        {info['layer_count']} ({ranks})")
    if info["expert_layer_count"]:
        experts = sorted({row["experts"] for row in info["layers"] if "experts" in row})
        click.echo(f"experts       {info['expert_layer_count']} layer(s) of "
                   f"{'/'.join(map(str, experts))} experts (rank per expert; ‖ΔW‖ over all "
                   "experts)")
    click.echo(f"dtypes        {', '.join(f'{d}×{n}' for d, n in info['dtypes'].items())}")
    click.echo(f"parameters    {info['parameters']:,}")
    if info["size_bytes"] is not None:
        click.echo(f"size          {info['size_bytes']:,} bytes")
    if info["replacements"]:
        click.echo(f"replacements  {', '.join(info['replacements'])}")
    if info["layers"]:
        width = max(len(row["path"]) for row in info["layers"])
        header = f"  {'layer':<{width}}  {'rank':>4}  {'alpha':>7}  {'in×out':>13}  dtype"
        click.echo("\n" + header + ("  ‖ΔW‖" if not no_norms else ""))
        for row in info["layers"]:
            shape = f"{row['in_features']}×{row['out_features']}"
            flags = "".join(
                f" [{flag}]" for flag in ("dora", "lora_bias") if row.get(flag)
            ) + (" [embedding]" if row["kind"] == "embedding" else "")
            if "experts" in row:
                flags += f" [{row['experts']} experts"
                if "expert_delta_norms" in row:
                    norms = row["expert_delta_norms"]
                    flags += f", ‖ΔW_e‖ {min(norms):.4g}…{max(norms):.4g}"
                flags += "]"
            line = (
                f"  {row['path']:<{width}}  {row['rank']:>4}  {row['alpha']:>7g}  {shape:>13}"
                f"  {row['dtype']:<5}"
            )
            if not no_norms:
                line += f"  {row['delta_norm']:.6g}"
            click.echo(line + flags)


@click.command("validate")
@click.argument("adapter", type=click.Path())
@from_option
@adapter_base_option
@json_option
def validate_command(adapter: str, from_: str | None, base: str | None, as_json: bool) -> None:
    """Check an adapter against the spec: schema, version, tensors, shapes, checksum, NaN/Inf.

    A foreign adapter (PEFT, loralib, .onnx_adapter, GGUF, MLX) is checked against its own
    format's rules: everything its reader enforces, plus finite values. Exit 0 when valid;
    otherwise print one line per problem (file: field or tensor: problem) and exit 1.
    """
    fmt, problems = check_adapter(adapter, from_=from_, base=base)
    if as_json:
        echo_json({"path": adapter, "format": fmt, "valid": not problems,
                   "problems": [str(p) for p in problems]})
    elif not problems:
        click.echo(f"{adapter}: valid" + ("" if fmt == "loraformat" else f" ({fmt})"))
    else:
        for problem in problems:
            click.echo(str(problem), err=True)
    if problems:
        raise SystemExit(1)
