"""Small pieces shared by the CLI commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click

from ..format.adapter import Adapter
from ..interchange import CODECS


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    ctx.meta["as_json"] = value  # meta is shared with the group, which reports errors as JSON too
    return value


json_option = click.option("--json", "as_json", is_flag=True, callback=_remember_json,
                           help="Print a JSON report (an error too: {\"error\": ...}).")
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace OUT if it exists (default: refuse)."
)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A ``(done, total)`` callback drawing a progress bar on a TTY; ``None`` elsewhere."""
    if not sys.stderr.isatty():
        yield None
        return
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
            state["bar"], state["done"] = bar, 0
        bar.update(done - state["done"])
        state["done"] = done

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


# -- adapter inputs: every command opens them through the interchange front door ----------------

from_option = click.option(
    # eager: argument callbacks that open adapters (merge's ADAPTERS) run after it wherever it is
    "--from", "from_", type=click.Choice(list(CODECS)), is_eager=True,
    help="Format of the adapter input(s) (default: detected from the content).",
)
adapter_base_option = click.option(
    "--base", "base", type=click.Path(),
    help="Base checkpoint, for adapter formats read through it (GGUF: llama.cpp names and row "
         "order; MLX/ONNX Runtime/loralib: layer names and architecture).",
)


@contextmanager
def opened_adapters(
    paths: Sequence[str], from_: str | None = None, base: Any = None
) -> Iterator[list[Adapter]]:
    """Each path opened as a loraformat adapter, whatever its format; closed on exit."""
    from ..interchange.front_door import open_adapter

    adapters: list[Adapter] = []
    try:
        for path in paths:
            adapters.append(open_adapter(path, from_=from_, base=base))
        yield adapters
    finally:
        for adapter in adapters:
            adapter.close()
