"""OLMo 3 (Hugging Face ``Olmo3ForCausalLM``): OLMo 2's block with sliding-window layers (three
of every four by default) and a rope per layer kind.

Its tensors are OLMo 2's, so only the config tells them apart; llama.cpp converts it as
``olmo2`` (no q/k row permutation) and records the window pattern.
"""

from __future__ import annotations

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    FULL,
    SLIDING,
    DecoderSpec,
    base_spec,
    heads,
    layer_kinds,
    rope_from_config,
)
from loraformat.architecture.protocol import CheckpointInfo

from .olmo2 import Olmo2, olmo_common

LORAFORMAT_PLUGIN_API = 2


class Olmo3(Olmo2):
    id = "olmo3"
    description = "OLMo 3 decoder (OLMo 2's block, sliding-window and full layers)"
    model_types = ("olmo3",)
    classes = ("Olmo3ForCausalLM", "Olmo3Model")

    def detect_tensors(self, checkpoint: CheckpointInfo) -> bool:
        return False

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        c = checkpoint.config
        n_layer = int(checkpoint.config_value("num_hidden_layers", what="the OLMo 3 export module"))
        _, _, head_dim = heads(checkpoint, "the OLMo 3 export module")
        # Without layer_types, transformers' OLMo 3 slides on all layers but every fourth.
        kinds = layer_kinds(c, n_layer, lambda i: (i + 1) % 4 != 0)
        params = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if FULL not in params and SLIDING not in params:
            params = {kind: params for kind in (FULL, SLIDING)}
        ropes = {k: rope_from_config(params[k] or {}, c, head_dim, checkpoint) for k in set(kinds)}
        window = c.get("sliding_window")
        windows = tuple(window if k == SLIDING else None for k in kinds)
        return base_spec(
            checkpoint, "OLMo 3", ropes=ropes, rope_of=kinds, windows=windows, **olmo_common()
        )


@hookimpl
def loraformat_architectures() -> list[Olmo3]:
    return [Olmo3()]
