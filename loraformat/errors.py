"""The one exception type the library raises for bad input.

Every failure a user can cause (a missing file, bad JSON, a wrong shape, a refused merge) is a
:class:`LoraformatError` whose ``str()`` is one line naming the file and the problem. The CLI turns
it into that line and exit status 1; anything else escaping is a bug.
"""

from __future__ import annotations

import os
import re

_OPTION = re.compile(r"\[\[(\w+)\]\]")


def option(name: str) -> str:
    """A flag the caller can set, named inside a message: each caller reads its own words,
    ``--allow-nonfinite`` on the command line (:meth:`LoraformatError.for_cli`) and
    ``allow_nonfinite=True`` in Python (``str()``)."""
    return f"[[{name}]]"


def _render(text: str, cli: bool) -> str:
    if cli:
        return _OPTION.sub(lambda m: "--" + m.group(1).replace("_", "-"), text)
    return _OPTION.sub(lambda m: m.group(1) + "=True", text)


class LoraformatError(Exception):
    """A user-facing error: ``<path>: <problem>`` on one line. ``message`` keeps the
    :func:`option` markers, so a message built from another keeps them too."""

    def __init__(self, path: str | os.PathLike[str] | None, message: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.message = " ".join(str(message).split())  # always one line
        super().__init__(self._line(cli=False))

    def _line(self, cli: bool) -> str:
        message = _render(self.message, cli)
        return f"{self.path}: {message}" if self.path else message

    def for_cli(self) -> str:
        """The line as the command line says it (options as ``--flag``)."""
        return self._line(cli=True)


class ValidationError(LoraformatError):
    """Raised by loaders when a file is structurally unusable; ``problems`` lists every finding."""

    def __init__(self, path: str | os.PathLike[str] | None, problems: list[str]) -> None:
        self.problems = list(problems)
        first = self.problems[0] if self.problems else "invalid"
        more = f" (and {len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
        super().__init__(path, first + more)
