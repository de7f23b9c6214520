"""Architecture plugins: the v2 contract (:mod:`.protocol`, :mod:`.names`), the registry that
finds plugins and dispatches to their architectures, the generic architecture for checkpoints no
plugin recognises, and the data they exchange (:mod:`.layers`)."""

from .layers import DenseLayer, ExpertStorage, ExportModel, ExportOptions, FusedPart
from .names import SAME, NameTable
from .protocol import (
    PLUGIN_API_VERSION,
    Architecture,
    ArchitectureBase,
    CheckpointInfo,
    LayerRepeat,
    ModelShape,
)
from .registry import (
    ENTRY_POINT_GROUP,
    PluginArchitecture,
    PluginRecord,
    Registry,
    detect,
    get_architecture,
    hookimpl,
    plugin_report,
    registry,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGIN_API_VERSION",
    "SAME",
    "Architecture",
    "ArchitectureBase",
    "CheckpointInfo",
    "DenseLayer",
    "ExpertStorage",
    "ExportModel",
    "ExportOptions",
    "FusedPart",
    "LayerRepeat",
    "ModelShape",
    "NameTable",
    "PluginArchitecture",
    "PluginRecord",
    "Registry",
    "detect",
    "get_architecture",
    "hookimpl",
    "plugin_report",
    "registry",
]
