"""ViT (``model_type: vit``): ViTForImageClassification, and a bare ViTModel.

Reads the Hugging Face layout, with the ``vit.`` prefix (ViTForImageClassification) or bare
(ViTModel, with its pooler). Dense layers are the attention query/key/value, the attention output,
the feed-forward pair, the pooler and the classifier, all ``nn.Linear`` ([out, in]). The
patch-embedding convolution is not a dense layer.

Names: checkpoints keep the original layout (``vit.encoder.layer.N.attention.attention.query``),
but transformers 5 renames the modules when it loads them (checked against 5.24's
``named_modules()``); PEFT adapters made with transformers 5 use the in-memory names:

=====================================================  ==================================
checkpoint layer path (``vit.`` prefix optional)        in memory, transformers ≥ 5
=====================================================  ==================================
``vit.encoder.layer.N.attention.attention.query``       ``vit.layers.N.attention.q_proj``
``vit.encoder.layer.N.attention.attention.key``         ``vit.layers.N.attention.k_proj``
``vit.encoder.layer.N.attention.attention.value``       ``vit.layers.N.attention.v_proj``
``vit.encoder.layer.N.attention.output.dense``          ``vit.layers.N.attention.o_proj``
``vit.encoder.layer.N.intermediate.dense``              ``vit.layers.N.mlp.fc1``
``vit.encoder.layer.N.output.dense``                    ``vit.layers.N.mlp.fc2``
``vit.pooler.dense``, ``classifier``                    unchanged
=====================================================  ==================================

The name table's ``peft`` column is the transformers-5 name; adapters made with transformers 4
carry the checkpoint names, which PEFT conversion accepts as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from loraformat.architecture import (
    SAME,
    ArchitectureBase,
    CheckpointInfo,
    DenseLayer,
    ExportModel,
    ExportOptions,
    LayerRepeat,
    NameTable,
    hookimpl,
)
from loraformat.architecture.plugin_tools import activation_function

from ._common import EncoderParts, detect_by_names, encoder_linears, uniform_layers

LORAFORMAT_PLUGIN_API = 2

_PREFIX = "vit."
# Per encoder layer, in checkpoint order: checkpoint suffix → transformers-5 in-memory suffix.
_LAYER_LINEARS = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}


def _prefix(names: Sequence[str] | Mapping[str, Any]) -> str:
    return _PREFIX if f"{_PREFIX}embeddings.cls_token" in names else ""


class ViT(ArchitectureBase):
    id = "vit"
    description = "Vision Transformer (ViTModel, image classification)"
    # PEFT has no default for ViT; its examples target query/value (q_proj/v_proj in memory
    # under transformers 5 — see the table).
    targets = ("query", "value")
    ort_model_type = "vit"
    names = NameTable(
        ("checkpoint", "peft"),
        [
            *((f"vit.encoder.layer.{{bid}}.{disk}", f"vit.layers.{{bid}}.{memory}")
              for disk, memory in _LAYER_LINEARS.items()),
            ("vit.pooler.dense", SAME),
            ("classifier", SAME),
        ],
        optional_prefix=_PREFIX,
    )

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        # DeiT, BEiT & co. share ViT's names with other embeddings: model_type decides.
        return detect_by_names(
            checkpoint, self.id, (_PREFIX, ""),
            "embeddings.patch_embeddings.projection.weight",
            "encoder.layer.0.attention.attention.query.weight",
        )

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        shapes = checkpoint.shapes
        p = _prefix(shapes)
        heads = (f"{p}pooler.dense", "classifier")
        return encoder_linears(shapes, f"{p}encoder.layer", _LAYER_LINEARS, heads)

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        return build_export_model(checkpoint, tensors, options)

    def layer_repeat(self, checkpoint: CheckpointInfo) -> LayerRepeat | None:
        # the export module counts its layers from the tensors it is given
        return uniform_layers(checkpoint, r"(?:^|\.)encoder\.layer\.(\d+)\.", None)


@hookimpl
def loraformat_architectures() -> list[ArchitectureBase]:
    return [ViT()]


# -- the export module --------------------------------------------------------------------------


def build_export_model(
    checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions | None = None
) -> ExportModel:
    """The plain-torch ViT for ``tensors`` (name → torch.Tensor), state-dict keys = names.

    Input ``pixel_values`` [batch, channels, image_size, image_size] (batch dynamic; the image
    size is the checkpoint's, as position embeddings are not interpolated). Output ``logits``
    with a classifier, else ``last_hidden_state`` (+ ``pooler_output`` with a pooler).
    """
    import torch
    from torch import nn


    config = checkpoint.config
    options = options or ExportOptions()
    if options.with_past:
        raise checkpoint.error("vit is an encoder: it has no KV cache to export")
    p = _prefix(tensors)
    for key in ("num_attention_heads", "layer_norm_eps"):
        if key not in config:
            raise checkpoint.config_error(f"vit: lacks {key!r}, needed for export")
    heads = int(config["num_attention_heads"])
    eps = float(config["layer_norm_eps"])
    unknown = "vit: unsupported activation"  # activation_function's error adds the name and choices
    act = activation_function(str(config.get("hidden_act", "gelu")), unknown)
    pooler_act = activation_function(str(config.get("pooler_act", "tanh")), unknown)

    parts = EncoderParts(checkpoint, tensors, "vit", heads, eps)
    shape, dense, layer_norm = parts.shape, parts.dense, parts.layer_norm
    self_attention = parts.self_attention

    class WithDense(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.dense = dense(path + ".dense")

    class Attention(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.attention = self_attention(path + ".attention")
            self.output = WithDense(path + ".output")

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return self.output.dense(self.attention(h))

    class Layer(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.attention = Attention(path + ".attention")
            self.layernorm_before = layer_norm(path + ".layernorm_before")
            self.layernorm_after = layer_norm(path + ".layernorm_after")
            self.intermediate = WithDense(path + ".intermediate")
            self.output = WithDense(path + ".output")

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            h = h + self.attention(self.layernorm_before(h))  # pre-LN
            return h + self.output.dense(act(self.intermediate.dense(self.layernorm_after(h))))

    class Encoder(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            count = 0
            while f"{path}.layer.{count}.attention.attention.query.weight" in tensors:
                count += 1
            self.layer = nn.ModuleList(Layer(f"{path}.layer.{i}") for i in range(count))

    class PatchEmbeddings(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            hidden, channels, kh, kw = shape(path + ".projection.weight")
            self.projection = nn.Conv2d(
                channels, hidden, kernel_size=(kh, kw), stride=(kh, kw),
                bias=path + ".projection.bias" in tensors,
            )

    class Embeddings(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(shape(path + ".cls_token")))
            self.position_embeddings = nn.Parameter(
                torch.zeros(shape(path + ".position_embeddings"))
            )
            self.patch_embeddings = PatchEmbeddings(path + ".patch_embeddings")

    class Body(nn.Module):
        """The modules under the ``vit.`` prefix (or at the root of a bare ViTModel)."""

        def __init__(self, p: str) -> None:
            super().__init__()
            self.embeddings = Embeddings(p + "embeddings")
            self.encoder = Encoder(p + "encoder")
            self.layernorm = layer_norm(p + "layernorm")
            if f"{p}pooler.dense.weight" in tensors:
                self.pooler = WithDense(p + "pooler")

    has_classifier = "classifier.weight" in tensors
    has_pooler = f"{p}pooler.dense.weight" in tensors

    class ViTExport(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if p:
                self.vit = Body(p)
            else:  # bare ViTModel: the body's modules live at the root, like the checkpoint
                for name, child in Body(p).named_children():
                    self.add_module(name, child)
            if has_classifier:
                self.classifier = dense("classifier")

        def forward(
            self, pixel_values: torch.Tensor
        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            body = self.vit if p else self
            emb = body.embeddings
            x = emb.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
            cls = emb.cls_token.expand(x.shape[0], -1, -1)
            h = torch.cat((cls, x), dim=1) + emb.position_embeddings
            for layer in body.encoder.layer:
                h = layer(h)
            h = body.layernorm(h)
            if has_classifier:
                return self.classifier(h[:, 0])
            if has_pooler:
                return h, pooler_act(body.pooler.dense(h[:, 0]))
            return h

    module = ViTExport()
    wanted = module.state_dict()
    for key, value in wanted.items():
        if tuple(shape(key)) != tuple(value.shape):
            raise checkpoint.error(
                f"vit: {key} has shape {list(tensors[key].shape)}, expected {list(value.shape)}",
            )
    module.load_state_dict({k: tensors[k] for k in wanted}, strict=True, assign=True)
    module.eval().requires_grad_(False)

    _, channels, kh, kw = shape(f"{p}embeddings.patch_embeddings.projection.weight")
    patches = shape(f"{p}embeddings.position_embeddings")[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise checkpoint.error(f"vit: {patches} patches do not form a square image")
    dtype = tensors[f"{p}embeddings.patch_embeddings.projection.weight"].dtype
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, channels, side * kh, side * kw, generator=generator).to(dtype)
    if has_classifier:
        outputs = ["logits"]
        axes = {"logits": {0: "batch"}}
    elif has_pooler:
        outputs = ["last_hidden_state", "pooler_output"]
        axes = {"last_hidden_state": {0: "batch"}, "pooler_output": {0: "batch"}}
    else:
        outputs = ["last_hidden_state"]
        axes = {"last_hidden_state": {0: "batch"}}
    axes["pixel_values"] = {0: "batch"}
    return ExportModel(
        module=module,
        example_inputs={"pixel_values": pixels},
        input_names=["pixel_values"],
        output_names=outputs,
        dynamic_axes=axes,
    )
