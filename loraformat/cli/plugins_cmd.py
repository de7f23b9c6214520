"""``plugins``: what architecture plugins are installed, which failed, and which one (if any)
reads a given checkpoint."""

from __future__ import annotations

import click

from ..architecture.registry import plugin_report
from ._common import echo_json, json_option


def _handled_by(path: str) -> dict[str, object]:
    from ..base import open_base

    with open_base(path) as base:
        return {
            "checkpoint": path,
            "architecture": base.architecture,
            "plugin": None if base.generic else base.arch.plugin,
            "generic": base.generic,
        }


@click.command("plugins")
@click.option("--checkpoint", type=click.Path(exists=True),
              help="Say only which architecture reads this checkpoint, and whether a plugin does.")
@json_option
def plugins_command(checkpoint: str | None, as_json: bool) -> None:
    """List architecture plugins (entry-point group 'loraformat.plugins'): distribution, version
    and architectures. A plugin that failed to load, declares another plugin API version, or
    raised is listed as FAILED with its error; the others work regardless. A checkpoint no plugin
    recognises is handled generically (merge, unmerge, PEFT conversion)."""
    if checkpoint:  # the question asked, answered alone
        _echo_handled(_handled_by(checkpoint), as_json)
        return
    records = plugin_report()
    if as_json:
        echo_json(records)
        return
    click.echo(f"{'plugin':<12} {'distribution':<22} {'version':<9} {'status':<7} architectures")
    for record in records:
        status = "ok" if record["ok"] else "FAILED"
        click.echo(
            f"{record['name']:<12} {record['distribution'] or '-':<22} "
            f"{record['version'] or '-':<9} {status:<7} {', '.join(record['architectures']) or '-'}"
        )
        for error in record["errors"]:
            click.echo(f"    {error}")


def _echo_handled(handled: dict[str, object], as_json: bool) -> None:
    checkpoint = handled["checkpoint"]
    if as_json:
        echo_json(handled)
    elif handled["generic"]:
        click.echo(
            f"{checkpoint}: no installed plugin recognises it; handled generically as "
            f"{handled['architecture']!r} (merge, unmerge and PEFT conversion work; ONNX export, "
            "GGUF and MLX need a plugin)"
        )
    else:
        click.echo(
            f"{checkpoint}: architecture {handled['architecture']!r} from plugin "
            f"{handled['plugin']!r}"
        )
