"""The one hook an architecture plugin implements (pluggy, project ``"loraformat"``).

pluggy is used for discovery only: a plugin module (or object) registered through the
``loraformat.plugins`` entry-point group answers :func:`loraformat_architectures` with its
:class:`~loraformat.architecture.protocol.Architecture` objects. Everything else is a method call
on the object the core detected, dispatched by architecture id once — no hook ever sees an
architecture it does not provide. The full contract, with a worked example, is spec/PLUGINS.md.
"""

from __future__ import annotations

import pluggy

from .protocol import Architecture

hookspec = pluggy.HookspecMarker("loraformat")


@hookspec
def loraformat_architectures() -> list[Architecture]:
    """The architectures this plugin provides: objects implementing
    :class:`~loraformat.architecture.protocol.Architecture` (usually subclasses of
    :class:`~loraformat.architecture.protocol.ArchitectureBase`), ids lowercase and unique."""
