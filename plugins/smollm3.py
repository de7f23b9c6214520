"""SmolLM3 (Hugging Face ``SmolLM3ForCausalLM``): LLaMA's block where some layers attend without
rotary embeddings (``no_rope_layers[i] == 0``, every fourth by default), and an optional sliding
window on the layers ``layer_types`` marks.

llama.cpp converts it as ``smollm3`` through LlamaModel, which permutes the q/k rows.
"""

from __future__ import annotations

from loraformat.architecture import hookimpl
from loraformat.architecture.decoder import (
    DecoderFamily,
    DecoderSpec,
    base_spec,
    decoder_names,
    heads,
    layer_windows,
    no_rope,
    rope_from_config,
)
from loraformat.architecture.protocol import CheckpointInfo

LORAFORMAT_PLUGIN_API = 2
ROPE, NOPE = "rope", "nope"


class SmolLM3(DecoderFamily):
    id = "smollm3"
    description = "SmolLM3 decoder (GQA, SwiGLU, RoPE on all but the NoPE layers)"
    model_types = ("smollm3",)
    classes = ("SmolLM3ForCausalLM", "SmolLM3Model")
    names = decoder_names(DecoderFamily.projections)
    # PEFT has no default target_modules for SmolLM3; LLaMA's (the same projections).
    targets = ("q_proj", "v_proj")
    gguf_architecture = "smollm3"
    ort_model_type = "bert"
    llama_cpp_permutes = True

    def spec(self, checkpoint: CheckpointInfo) -> DecoderSpec:
        c = checkpoint.config
        what = "the SmolLM3 export module"
        n_layer = int(checkpoint.config_value("num_hidden_layers", what=what))
        _, _, head_dim = heads(checkpoint, what)
        uses_rope = c.get("no_rope_layers")
        if uses_rope is None:
            # transformers' default: NoPE on every no_rope_layer_interval-th layer.
            interval = int(c.get("no_rope_layer_interval") or 4)
            uses_rope = [int((i + 1) % interval != 0) for i in range(n_layer)]
        params = c.get("rope_parameters") or c.get("rope_scaling") or {}
        ropes = {ROPE: rope_from_config(params, c, head_dim, checkpoint), NOPE: no_rope()}
        rope_of = tuple(ROPE if uses_rope[i] else NOPE for i in range(n_layer))
        window = c.get("sliding_window") if c.get("use_sliding_window") else None
        windows = layer_windows(c, n_layer, window, lambda i: False)
        return base_spec(checkpoint, "SmolLM3", ropes=ropes, rope_of=rope_of, windows=windows)


@hookimpl
def loraformat_architectures() -> list[SmolLM3]:
    return [SmolLM3()]
