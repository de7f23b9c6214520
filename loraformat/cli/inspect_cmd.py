"""``inspect`` and ``validate``: torch-free, header-first."""

from __future__ import annotations

import click

from ..architecture import registry
from ..format.adapter import load, validate
from ..format.summary import summarize
from ._common import echo_json, json_option


@click.command("inspect")
@click.argument("adapter", type=click.Path())
@click.option("--no-norms", is_flag=True, help="Skip per-layer ‖ΔW‖ (reads the header only).")
@json_option
def inspect_command(adapter: str, no_norms: bool, as_json: bool) -> None:
    """Show an adapter's architecture, layers, ranks, alphas, dtypes, size and per-layer ‖ΔW‖.

    ADAPTER is an adapter directory (adapter.json + adapter.safetensors) or a single
    .safetensors file.
    """
    with load(adapter) as loaded:
        info = summarize(loaded, norms=not no_norms)
    # Which installed plugin reads bases of this architecture; None: handled generically.
    provider = registry().architectures().get(info["architecture"])
    info["architecture_plugin"] = provider.plugin if provider is not None else None
    if as_json:
        echo_json(info)
        return
    click.echo(f"adapter       {info['path']}")
    click.echo(f"format        loraformat {info['format_version']}")
    base = info["architecture"] + (f" ({info['base_name']})" if info["base_name"] else "")
    if provider is None:
        base += " — no installed plugin: bases are handled generically"
    click.echo(f"base          {base}")
    if info["base_fingerprint"]:
        click.echo(f"fingerprint   {info['base_fingerprint']}")
    click.echo(f"scaling       {info['scaling']}")
    ranks = ", ".join(f"r={r}×{n}" for r, n in info["ranks"].items())
    click.echo(f"layers        {info['layer_count']} ({ranks})")
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
            line = (
                f"  {row['path']:<{width}}  {row['rank']:>4}  {row['alpha']:>7g}  {shape:>13}"
                f"  {row['dtype']:<5}"
            )
            if not no_norms:
                line += f"  {row['delta_norm']:.6g}"
            click.echo(line + flags)


@click.command("validate")
@click.argument("adapter", type=click.Path())
@json_option
def validate_command(adapter: str, as_json: bool) -> None:
    """Check an adapter against the spec: schema, version, tensors, shapes, checksum, NaN/Inf.

    Exit 0 when valid; otherwise print one line per problem (file: field or tensor: problem)
    and exit 1.
    """
    problems = validate(adapter)
    if as_json:
        echo_json({"path": adapter, "valid": not problems, "problems": [str(p) for p in problems]})
    elif not problems:
        click.echo(f"{adapter}: valid")
    else:
        for problem in problems:
            click.echo(str(problem), err=True)
    if problems:
        raise SystemExit(1)
