"""The loraformat adapter itself, as a codec: directory ↔ single ``.safetensors`` file.

The content (manifest and tensor bytes) is carried unchanged; only the container differs.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LoraformatError
from ..format import manifest as mf
from ..format.adapter import Adapter, load
from ..format.safetensors_io import read_header_only
from ._common import Context


class NativeCodec:
    name = "loraformat"
    description = "loraformat adapter: a directory or one .safetensors file"
    writes_directory = False
    options = ()

    def sniff(self, path: Path) -> bool:
        if path.is_dir():
            return (path / mf.MANIFEST_FILE).is_file()
        if path.suffix != ".safetensors":
            return False
        try:
            _, metadata = read_header_only(path)
        except LoraformatError:
            return False
        return mf.METADATA_KEY in metadata

    def read(self, path: Path, ctx: Context) -> Adapter:
        adapter = load(path)
        ctx.report.layers = len(adapter.specs)
        return adapter

    def write(self, adapter: Adapter, path: Path, ctx: Context) -> None:
        if ctx.base is not None:
            check_against_base(adapter, ctx)
        ctx.report.layers = len(adapter.specs)
        adapter.save(path, overwrite=True)  # convert() has already applied the overwrite rule


def check_against_base(adapter: Adapter, ctx: Context) -> None:
    layers = ctx.base.layers_for(adapter.specs)
    for path, spec in adapter.specs.items():
        dense = layers.get(path)
        if dense is None:
            raise LoraformatError(adapter.path, f"layer {path!r} is not a layer of the base")
        if (dense.in_features, dense.out_features) != (spec.in_features, spec.out_features):
            raise LoraformatError(
                adapter.path,
                f"layer {path!r} is {spec.in_features}→{spec.out_features}, base has "
                f"{dense.in_features}→{dense.out_features}",
            )


CODEC = NativeCodec()
