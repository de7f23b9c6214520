"""BERT (``model_type: bert``): BertModel and the encoder-with-head variants.

Reads the Hugging Face layout, with the ``bert.`` prefix (BertForSequenceClassification,
BertForTokenClassification) or bare (BertModel). Dense layers are the attention query/key/value,
the attention output, the feed-forward pair, the pooler and the classifier, all ``nn.Linear``
([out, in]); the word-embedding table is offered as an ``embedding`` layer ([vocab, hidden]).

Names: transformers 5 keeps BERT's checkpoint names in memory (checked against 5.24's
``named_modules()``), so PEFT's module names equal the layer paths. BERT has no GGUF/MLX names here.
"""

from __future__ import annotations

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

_PREFIX = "bert."
# Per encoder layer, in checkpoint order.
_LAYER_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def _prefix(names: Sequence[str] | Mapping[str, Any]) -> str:
    return _PREFIX if f"{_PREFIX}embeddings.word_embeddings.weight" in names else ""


class Bert(ArchitectureBase):
    id = "bert"
    description = "BERT encoder (BertModel, sequence/token classification)"
    # PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["bert"].
    targets = ("query", "value")
    ort_model_type = "bert"
    # transformers does not rename BERT modules on load: PEFT names are the paths. No GGUF/MLX.
    names = NameTable(
        ("checkpoint", "peft"),
        [
            ("bert.embeddings.word_embeddings", SAME),
            *((f"bert.encoder.layer.{{bid}}.{sub}", SAME) for sub in _LAYER_LINEARS),
            ("bert.pooler.dense", SAME),
            ("classifier", SAME),
        ],
        optional_prefix=_PREFIX,
    )

    def detect(self, checkpoint: CheckpointInfo) -> bool:
        # RoBERTa & co. share BERT's names but not its position ids: model_type decides.
        return detect_by_names(
            checkpoint, self.id, (_PREFIX, ""),
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.attention.self.query.weight",
        )

    def dense_layers(self, checkpoint: CheckpointInfo) -> list[DenseLayer]:
        shapes = checkpoint.shapes
        p = _prefix(shapes)
        layers: list[DenseLayer] = []
        word = shapes.get(f"{p}embeddings.word_embeddings.weight")
        if word is not None and len(word) == 2:
            layers.append(
                DenseLayer(
                    f"{p}embeddings.word_embeddings", in_features=word[0], out_features=word[1],
                    layout="in_out", kind="embedding",
                )
            )
        heads = (f"{p}pooler.dense", "classifier")
        return layers + encoder_linears(shapes, f"{p}encoder.layer", _LAYER_LINEARS, heads)

    def export_model(
        self, checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions
    ) -> ExportModel:
        return build_export_model(checkpoint, tensors, options)

    def layer_repeat(self, checkpoint: CheckpointInfo) -> LayerRepeat | None:
        # the export module counts its layers from the tensors it is given
        return uniform_layers(checkpoint, r"(?:^|\.)encoder\.layer\.(\d+)\.", None)


@hookimpl
def loraformat_architectures() -> list[ArchitectureBase]:
    return [Bert()]


# -- the export module --------------------------------------------------------------------------


def build_export_model(
    checkpoint: CheckpointInfo, tensors: Mapping[str, Any], options: ExportOptions | None = None
) -> ExportModel:
    """The plain-torch BERT for ``tensors`` (name → torch.Tensor), state-dict keys = names."""
    config = checkpoint.config
    import torch
    from torch import nn


    options = options or ExportOptions()
    if options.with_past:
        raise checkpoint.error("bert is an encoder: it has no KV cache to export")
    p = _prefix(tensors)
    if f"{p}embeddings.word_embeddings.weight" not in tensors:
        raise checkpoint.error("bert: checkpoint has no embeddings.word_embeddings.weight")
    for key in ("num_attention_heads", "layer_norm_eps"):
        if key not in config:
            raise checkpoint.config_error(f"bert: lacks {key!r}, needed for export")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise checkpoint.config_error(
            f"bert: position_embedding_type {config['position_embedding_type']!r} is not "
            "supported (only 'absolute')"
        )
    heads = int(config["num_attention_heads"])
    eps = float(config["layer_norm_eps"])
    act = activation_function(str(config.get("hidden_act", "gelu")), "bert: unsupported hidden_act")
    architectures = list(config.get("architectures") or [])

    parts = EncoderParts(checkpoint, tensors, "bert", heads, eps)
    shape, dense, layer_norm = parts.shape, parts.dense, parts.layer_norm
    self_attention = parts.self_attention

    class Output(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.dense = dense(path + ".dense")
            self.LayerNorm = layer_norm(path + ".LayerNorm")

        def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return self.LayerNorm(self.dense(x) + residual)

    class Intermediate(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.dense = dense(path + ".dense")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return act(self.dense(x))

    class Attention(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.self = self_attention(path + ".self")
            self.output = Output(path + ".output")

        def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return self.output(self.self(h, mask), h)

    class Layer(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.attention = Attention(path + ".attention")
            self.intermediate = Intermediate(path + ".intermediate")
            self.output = Output(path + ".output")

        def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            h = self.attention(h, mask)  # post-LN: residual inside Output
            return self.output(self.intermediate(h), h)

    class Encoder(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            count = 0
            while f"{path}.layer.{count}.attention.self.query.weight" in tensors:
                count += 1
            self.layer = nn.ModuleList(Layer(f"{path}.layer.{i}") for i in range(count))

    class Embeddings(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(*shape(path + ".word_embeddings.weight"))
            self.position_embeddings = nn.Embedding(*shape(path + ".position_embeddings.weight"))
            self.token_type_embeddings = nn.Embedding(
                *shape(path + ".token_type_embeddings.weight")
            )
            self.LayerNorm = layer_norm(path + ".LayerNorm")

    class Pooler(nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.dense = dense(path + ".dense")

    class Body(nn.Module):
        """The modules under the ``bert.`` prefix (or at the root of a bare BertModel)."""

        def __init__(self, p: str) -> None:
            super().__init__()
            self.embeddings = Embeddings(p + "embeddings")
            self.encoder = Encoder(p + "encoder")
            if f"{p}pooler.dense.weight" in tensors:
                self.pooler = Pooler(p + "pooler")

    has_classifier = "classifier.weight" in tensors
    has_pooler = f"{p}pooler.dense.weight" in tensors
    # Token classification heads apply the classifier per token on an encoder without a pooler.
    per_token = any("TokenClassification" in a for a in architectures) or (
        has_classifier and not has_pooler
    )

    class BertExport(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            if p:
                self.bert = Body(p)
            else:  # bare BertModel: the body's modules live at the root, like the checkpoint
                body = Body(p)
                for name, child in body.named_children():
                    self.add_module(name, child)
            if has_classifier:
                self.classifier = dense("classifier")

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            body = self.bert if p else self
            emb = body.embeddings
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            h = (
                emb.word_embeddings(input_ids)
                + emb.token_type_embeddings(token_type_ids)
                + emb.position_embeddings(positions)[None]
            )
            h = emb.LayerNorm(h)
            # [batch, 1, 1, keys]: True where a key may be attended (attention_mask non-zero).
            mask = None if attention_mask is None else attention_mask[:, None, None, :] != 0
            for layer in body.encoder.layer:
                h = layer(h, mask)
            if has_classifier:
                if per_token:
                    return self.classifier(h)
                return self.classifier(torch.tanh(body.pooler.dense(h[:, 0])))
            if has_pooler:
                return h, torch.tanh(body.pooler.dense(h[:, 0]))
            return h

    module = BertExport()
    wanted = module.state_dict()
    missing = [k for k in wanted if k not in tensors]
    if missing:
        raise checkpoint.error(f"bert: checkpoint lacks {', '.join(missing[:5])}")
    for key, value in wanted.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise checkpoint.error(
                f"bert: {key} has shape {list(tensors[key].shape)}, expected {list(value.shape)}",
            )
    module.load_state_dict({k: tensors[k] for k in wanted}, strict=True, assign=True)
    module.eval().requires_grad_(False)

    vocab, _ = shape(f"{p}embeddings.word_embeddings.weight")
    max_pos = shape(f"{p}embeddings.position_embeddings.weight")[0]
    seq = min(8, max_pos)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, seq), generator=generator)
    attention_mask = torch.ones(2, seq, dtype=torch.int64)
    attention_mask[1, seq - 2 :] = 0  # one padded row, so the mask path is exercised
    example = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros(2, seq, dtype=torch.int64),
    }
    seq_axes = {0: "batch", 1: "sequence"}
    if has_classifier:
        outputs = ["logits"]
        axes = {"logits": dict(seq_axes) if per_token else {0: "batch"}}
    elif has_pooler:
        outputs = ["last_hidden_state", "pooler_output"]
        axes = {"last_hidden_state": dict(seq_axes), "pooler_output": {0: "batch"}}
    else:
        outputs = ["last_hidden_state"]
        axes = {"last_hidden_state": dict(seq_axes)}
    for name in example:
        axes[name] = dict(seq_axes)
    return ExportModel(
        module=module,
        example_inputs=example,
        input_names=list(example),
        output_names=outputs,
        dynamic_axes=axes,
    )
