"""The one way tests run the command line: ``loraformat ARGS`` in this process, exactly as the
executable does (click's standalone mode, so errors are the one line a user sees and exit codes
are real), with stdout and stderr kept apart."""

from __future__ import annotations

from dataclasses import dataclass

from click.testing import CliRunner

from loraformat.cli import cli


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    @property
    def error(self) -> str:
        """The one error line (asserts there is exactly one)."""
        lines = self.error_lines
        assert len(lines) == 1, self.err
        return lines[0]


def run_cli(*args: object) -> CliResult:
    """Run ``loraformat ARGS``; a bug in the harness itself (not the CLI) propagates."""
    result = CliRunner().invoke(
        cli, [str(a) for a in args], prog_name="loraformat", catch_exceptions=False
    )
    return CliResult(result.exit_code, result.stdout, result.stderr)
