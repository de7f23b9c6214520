"""Architecture plugins: hook specifications, the registry, and the data they exchange."""

from .layers import ArchitectureInfo, DenseLayer, ExportModel, ExportOptions, FusedPart
from .registry import (
    ENTRY_POINT_GROUP,
    Registry,
    default_targets,
    dense_layers,
    detect,
    export_model,
    foreign_name,
    hookimpl,
    layer_path,
    plugin_report,
    registry,
    row_permutation,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ArchitectureInfo",
    "DenseLayer",
    "ExportModel",
    "ExportOptions",
    "FusedPart",
    "Registry",
    "default_targets",
    "dense_layers",
    "detect",
    "export_model",
    "foreign_name",
    "hookimpl",
    "layer_path",
    "plugin_report",
    "registry",
    "row_permutation",
]
