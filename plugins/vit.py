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

``foreign_name(..., "peft")`` answers the transformers-5 name; ``layer_path(..., "peft")`` accepts
both (adapters made with transformers 4 carry the checkpoint names).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from loraformat.architecture import (
    ArchitectureInfo,
    DenseLayer,
    ExportModel,
    ExportOptions,
    hookimpl,
)
from loraformat.errors import LoraformatError

from ._common import encoder_activation, encoder_linears

ARCH = "vit"
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
_TO_MEMORY = {v: k for k, v in _LAYER_LINEARS.items()}
_ON_DISK_RE = re.compile(r"^((?:vit\.)?)encoder\.layer\.(\d+)\.(.+)$")
_IN_MEMORY_RE = re.compile(r"^((?:vit\.)?)layers\.(\d+)\.(.+)$")
_FIXED_RE = re.compile(r"^(?:(?:vit\.)?pooler\.dense|classifier)$")


def _prefix(names: Sequence[str] | Mapping[str, Any]) -> str:
    return _PREFIX if f"{_PREFIX}embeddings.cls_token" in names else ""


@hookimpl
def loraformat_architectures() -> list[ArchitectureInfo]:
    return [ArchitectureInfo(ARCH, "Vision Transformer (ViTModel, image classification)")]


@hookimpl
def loraformat_detect(config: Mapping[str, Any], tensor_names: Sequence[str]) -> str | None:
    model_type = config.get("model_type")
    if model_type is not None:
        # DeiT, BEiT & co. share ViT's names with other embeddings: trust model_type when given.
        return ARCH if model_type == ARCH else None
    names = set(tensor_names)
    for prefix in (_PREFIX, ""):
        if (
            f"{prefix}embeddings.patch_embeddings.projection.weight" in names
            and f"{prefix}encoder.layer.0.attention.attention.query.weight" in names
        ):
            return ARCH
    return None


@hookimpl
def loraformat_dense_layers(
    architecture: str, config: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]]
) -> list[DenseLayer] | None:
    if architecture != ARCH:
        return None
    p = _prefix(tensor_shapes)

    heads = (f"{p}pooler.dense", "classifier")
    return encoder_linears(tensor_shapes, f"{p}encoder.layer", _LAYER_LINEARS, heads)


@hookimpl
def loraformat_default_targets(architecture: str, config: Mapping[str, Any]) -> list[str] | None:
    # PEFT has no default for ViT; its examples target query/value (q_proj/v_proj in memory
    # under transformers 5 — see foreign_name).
    return ["query", "value"] if architecture == ARCH else None


@hookimpl
def loraformat_foreign_name(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> str | None:
    if architecture != ARCH or convention != "peft":
        return None
    if _FIXED_RE.match(layer_path):
        return layer_path
    m = _ON_DISK_RE.match(layer_path)
    if m and m.group(3) in _LAYER_LINEARS:
        return f"{m.group(1)}layers.{m.group(2)}.{_LAYER_LINEARS[m.group(3)]}"
    return None


@hookimpl
def loraformat_layer_path(
    architecture: str, config: Mapping[str, Any], foreign_name: str, convention: str
) -> str | None:
    if architecture != ARCH or convention != "peft":
        return None
    if _FIXED_RE.match(foreign_name):
        return foreign_name
    m = _IN_MEMORY_RE.match(foreign_name)
    if m and m.group(3) in _TO_MEMORY:
        return f"{m.group(1)}encoder.layer.{m.group(2)}.{_TO_MEMORY[m.group(3)]}"
    m = _ON_DISK_RE.match(foreign_name)  # transformers 4 kept the checkpoint names in memory
    if m and m.group(3) in _LAYER_LINEARS:
        return foreign_name
    return None


@hookimpl
def loraformat_foreign_row_permutation(
    architecture: str, config: Mapping[str, Any], layer_path: str, convention: str
) -> Sequence[int] | None:
    return None  # no convention ViT answers stores rows permuted


@hookimpl
def loraformat_export_model(
    architecture: str, config: Mapping[str, Any], tensors: Mapping[str, Any], options: ExportOptions
) -> ExportModel | None:
    if architecture != ARCH:
        return None
    return build_export_model(config, tensors, options)


# -- the export module --------------------------------------------------------------------------


def build_export_model(
    config: Mapping[str, Any], tensors: Mapping[str, Any], options: ExportOptions | None = None
) -> ExportModel:
    """The plain-torch ViT for ``tensors`` (name → torch.Tensor), state-dict keys = names.

    Input ``pixel_values`` [batch, channels, image_size, image_size] (batch dynamic; the image
    size is the checkpoint's, as position embeddings are not interpolated). Output ``logits``
    with a classifier, else ``last_hidden_state`` (+ ``pooler_output`` with a pooler).
    """
    import torch
    from torch import nn

    from loraformat.architecture.modules import Dense, EncoderSelfAttention

    options = options or ExportOptions()
    if options.with_past:
        raise LoraformatError(None, "vit is an encoder: it has no KV cache to export")
    p = _prefix(tensors)
    for key in ("num_attention_heads", "layer_norm_eps"):
        if key not in config:
            raise LoraformatError(None, f"vit: config.json lacks {key!r}, needed for export")
    heads = int(config["num_attention_heads"])
    eps = float(config["layer_norm_eps"])
    unknown = "vit: unsupported activation"  # encoder_activation's error adds the name and choices
    act = encoder_activation(str(config.get("hidden_act", "gelu")), unknown)
    pooler_act = encoder_activation(str(config.get("pooler_act", "tanh")), unknown)

    def shape(name: str) -> tuple[int, ...]:
        if name not in tensors:
            raise LoraformatError(None, f"vit: checkpoint lacks {name}")
        return tuple(tensors[name].shape)

    def dense(path: str) -> Dense:
        out_f, in_f = shape(path + ".weight")
        return Dense(in_f, out_f, bias=path + ".bias" in tensors)

    def layer_norm(path: str) -> nn.LayerNorm:
        return nn.LayerNorm(shape(path + ".weight")[0], eps=eps)

    def self_attention(path: str) -> EncoderSelfAttention:
        query, key, value = (dense(f"{path}.{n}") for n in ("query", "key", "value"))
        return EncoderSelfAttention(query, key, value, heads)

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
            raise LoraformatError(
                None,
                f"vit: {key} has shape {list(tensors[key].shape)}, expected {list(value.shape)}",
            )
    module.load_state_dict({k: tensors[k] for k in wanted}, strict=True, assign=True)
    module.eval().requires_grad_(False)

    _, channels, kh, kw = shape(f"{p}embeddings.patch_embeddings.projection.weight")
    patches = shape(f"{p}embeddings.position_embeddings")[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise LoraformatError(None, f"vit: {patches} patches do not form a square image")
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
