"""``plugins``: what architecture plugins are installed, and which failed."""

from __future__ import annotations

import click

from ..architecture.registry import plugin_report
from ._common import echo_json, json_option


@click.command("plugins")
@json_option
def plugins_command(as_json: bool) -> None:
    """List architecture plugins (entry-point group 'loraformat.plugins'): distribution, version
    and architectures. A plugin that failed to load, or raised inside a hook, is listed as FAILED
    with its error; the others work regardless."""
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
