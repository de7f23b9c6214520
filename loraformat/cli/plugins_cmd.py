"""``plugins``: what architecture plugins are installed, and which failed."""

from __future__ import annotations

import click

from ..architecture import registry
from ._common import echo_json, json_option


@click.command("plugins")
@json_option
def plugins_command(as_json: bool) -> None:
    """List architecture plugins (entry-point group 'loraformat.plugins'), their versions and
    architectures. A plugin that failed to load is listed with its error."""
    reg = registry()
    reg.architectures()  # runs every plugin's hook once, so failures are recorded
    records = [record.to_json() for record in reg.records.values()]
    if as_json:
        echo_json(records)
        return
    for record in records:
        version = record["version"] or "-"
        archs = ", ".join(record["architectures"]) or "-"
        status = "ok" if record["ok"] else "FAILED"
        click.echo(f"{record['name']:<16} {version:<10} {status:<6} {archs}")
        for error in record["errors"]:
            click.echo(f"    {error}")
