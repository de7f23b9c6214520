"""The ``loraformat`` command line: a thin layer over the Python API.

Each command lives in its own module and is imported only when run, so ``inspect`` and
``validate`` start without importing torch.
"""

from __future__ import annotations

import importlib
import sys
import traceback

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


class LazyGroup(click.Group):
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
    """Entry point: one line and exit 1 for a user error; the traceback only with --debug."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="loraformat", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except LoraformatError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            traceback.print_exc()
        click.echo(
            f"error: internal error {type(exc).__name__}: {exc} (rerun with --debug for details)",
            err=True,
        )
        sys.exit(1)
