"""loraformat: a specified, framework-neutral file format for LoRA adapters.

The core (this package's ``format``) is torch-free: load, save, validate and inspect adapters.
"""

from .errors import LoraformatError, ValidationError
from .format.adapter import (
    Adapter,
    LayerSpec,
    LoraLayer,
    Problem,
    load,
    repack,
    scale_of,
    validate,
)
from .format.manifest import FORMAT_VERSION

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "Adapter",
    "LayerSpec",
    "LoraLayer",
    "LoraformatError",
    "Problem",
    "ValidationError",
    "__version__",
    "load",
    "repack",
    "scale_of",
    "validate",
]
