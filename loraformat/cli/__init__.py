"""The ``loraformat`` command line: a thin layer over the Python API.

Each command lives in its own module and is imported only when run, so ``inspect`` and
``validate`` start without importing torch.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import sys
import threading
import traceback
from typing import IO, Any, NoReturn

import click

from ..errors import LoraformatError

# command name → "module:attribute", loaded lazily.
COMMANDS: dict[str, str] = {
    "inspect": "loraformat.cli.inspect_cmd:inspect_command",
    "validate": "loraformat.cli.inspect_cmd:validate_command",
    "plugins": "loraformat.cli.plugins_cmd:plugins_command",
    "merge": "loraformat.cli.merge_cmd:merge_command",
    "unmerge": "loraformat.cli.merge_cmd:unmerge_command",
    "export": "loraformat.cli.export_cmd:export_command",
    "convert": "loraformat.cli.convert_cmd:convert_command",
    "stack": "loraformat.cli.algebra_cmd:stack_command",
    "subtract": "loraformat.cli.algebra_cmd:subtract_command",
    "scale": "loraformat.cli.algebra_cmd:scale_command",
    "reduce": "loraformat.cli.algebra_cmd:reduce_command",
    "combine": "loraformat.cli.algebra_cmd:combine_command",
    "extract": "loraformat.cli.algebra_cmd:extract_command",
    "generate": "loraformat.cli.generate_cmd:generate_command",
}


class CommandError(click.ClickException):
    """A failure at the command-line boundary, carrying the exception it reports.

    A :class:`LoraformatError` is the user's problem: its one line. Anything else is a bug: one
    line saying so. Either way exit status 1; with ``--debug`` the traceback comes first."""

    exit_code = 1

    def __init__(self, error: BaseException, debug: bool = False, as_json: bool = False) -> None:
        self.error = error
        self.debug = debug
        self.as_json = as_json
        if isinstance(error, LoraformatError):
            message = error.for_cli()
        else:
            message = (
                f"internal error {type(error).__name__}: {error} (rerun with --debug for details)"
            )
        super().__init__(message)

    def show(self, file: IO[Any] | None = None) -> None:
        if self.debug:
            traceback.print_exception(self.error, file=file or sys.stderr)
        if self.as_json:  # a --json caller reads stdout: the error is JSON there as well
            click.echo(json.dumps({"error": self.message}, indent=2))
        click.echo(f"error: {self.message}", err=True, file=file)


class LazyGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        # click shows a ClickException as one line and exits with its code; everything the
        # library raises becomes one here, with --debug read from this group's own context.
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            raise CommandError(exc, debug=bool(ctx.params.get("debug")),
                               as_json=bool(ctx.meta.get("as_json"))) from exc

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._importable(name))

    @staticmethod
    def _importable(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None or not self._importable(name):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback when a command fails.")
@click.version_option(package_name="loraformat")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """loraformat: one file format for LoRA adapters, and the tools to work on them.

    Inspect and validate adapters, merge them into a base model (safetensors or ONNX), combine
    them, and convert to and from PEFT, loralib, ONNX Runtime, GGUF and MLX.
    """
    ctx.obj = {"debug": debug}


def main(argv: list[str] | None = None) -> None:
    """Entry point: click's standalone mode (one line and exit 1 for an error, 2 for a usage
    error; the traceback only with --debug)."""
    cli.main(args=argv, prog_name="loraformat")


def run() -> NoReturn:
    """The ``loraformat`` executable: :func:`main`, then end the process without tearing the
    interpreter down.

    Teardown after an export frees the object graphs torch, its exporter and sympy built up, a
    noticeable share of an export's time (README, "Why the design is as it is") spent after the
    output is complete, renamed and synced. So once :func:`main` returns, the exit handlers run
    as usual (temporary directories, logging, child processes), stdout and stderr are flushed,
    and the process ends with :func:`os._exit`. With a non-daemon thread still running (or on a
    Python without CPython's ``atexit._run_exitfuncs``), it exits the ordinary way."""
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = _exit_status(exit_.code)
    threads = [t for t in threading.enumerate()
               if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; others may lack it
    if threads or run_exit_handlers is None:
        sys.exit(code)
    run_exit_handlers()  # what interpreter shutdown would run first
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what Python reports then
            code = code or 120
    os._exit(code)


def _exit_status(code: object) -> int:
    """The process status ``sys.exit(code)`` gives: None is 0, an int itself, anything else is
    printed to stderr and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
