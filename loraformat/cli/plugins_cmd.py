"""``plugins``: what architecture plugins are installed, and which failed."""

from __future__ import annotations

from typing import Any

import click

from ..architecture import registry
from ._common import echo_json, json_option


def plugin_report() -> list[dict[str, Any]]:
    """One entry per plugin: name, distribution, version, architectures, ok, errors.

    Every loaded plugin is asked to detect an empty checkpoint first, so a plugin that raises
    inside a hook shows up with its error even before a real checkpoint reaches it.
    """
    reg = registry()
    reg.health_check()
    return [reg.records[name].to_json() for name in sorted(reg.records)]


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
