"""Expert stacks on checkpoints no plugin covers (issue 24, item 4): the orientation of a 3-D
parameter comes from the adapter's features when the shapes decide it, else the merge is refused
in one line. The checkpoint is gpt-oss's layout under a ``model_type`` no plugin knows; the
reference is PEFT's ``merge_and_unload`` of the real model."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_moe
from cli_harness import run_cli
from safetensors.numpy import load_file
from tiny_moe import assert_same_peft_tensors, disguise, peft_adapter

from loraformat import load

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("generic-moe")
    base = tiny_moe.checkpoint("gpt_oss", root / "base")
    adapter, peft_model = peft_adapter("gpt_oss", base, root / "peft")
    peft_model.merge_and_unload().save_pretrained(root / "reference")
    toy, toy_adapter = disguise(base, adapter, root)
    return base, toy, toy_adapter, root / "reference"


def test_stacks_merge_as_peft_does(made, tmp_path):
    _, toy, adapter, reference = made
    result = run_cli("merge", toy, adapter, "-o", tmp_path / "merged")
    assert result.code == 0, result.err
    ours = load_file(tmp_path / "merged" / "model.safetensors")
    expected = load_file(reference / "model.safetensors")
    changed = [k for k in expected if "experts" in k and not np.array_equal(
        expected[k], load_file(toy / "model.safetensors")[k])]
    assert "model.layers.0.mlp.experts.gate_up_proj" in changed  # [E, in, out] stacks
    for key, value in expected.items():
        np.testing.assert_allclose(ours[key], value, rtol=0, atol=2e-6, err_msg=key)


def test_generic_round_trip_keeps_peft_nesting(made, tmp_path):
    """Without a plugin, which nested LoRA is which parameter comes from the base's shapes; the
    order is kept so that writing PEFT again nests them the same way."""
    _, toy, adapter, _ = made
    assert run_cli("convert", adapter, "-o", tmp_path / "lf", "--base", toy).code == 0
    converted = load(tmp_path / "lf")
    assert converted.architecture == "toy_moe"
    assert converted.specs["model.layers.1.mlp.experts.down_proj"].experts == tiny_moe.EXPERTS
    result = run_cli("convert", tmp_path / "lf", "-o", tmp_path / "back", "--to", "peft")
    assert result.code == 0, result.err
    assert_same_peft_tensors(adapter, tmp_path / "back")


def test_square_stack_is_refused(tmp_path):
    """[E, n, n]: input and output both n, so the shapes cannot tell which axis is the input."""
    root = tmp_path
    base = root / "base"
    _square_gpt_oss().save_pretrained(base)
    adapter, _ = peft_adapter("gpt_oss", base, root / "peft")
    toy, adapter = disguise(base, adapter, root / "disguised")
    result = run_cli("merge", toy, adapter, "-o", root / "merged")
    assert result.code == 1
    assert "model.layers.0.mlp.experts.down_proj is [4, 32, 32]" in result.error
    assert "which axis is the input cannot be told" in result.error
    assert result.error.startswith(f"error: {toy}: ")
    assert not (root / "merged").exists()


def test_unknown_parameter_order_without_base_is_refused(made, tmp_path):
    _, _, adapter, _ = made
    result = run_cli("convert", adapter, "-o", tmp_path / "lf", "--architecture", "toy_moe")
    if result.code == 2 and "No such option" in result.err:
        pytest.skip("convert has no --architecture option")
    assert result.code == 1
    assert "without the base model (--base) its shapes cannot decide" in result.error


def _square_gpt_oss():
    """gpt-oss with intermediate size = hidden size: down_proj is [E, 32, 32]."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GptOssConfig(
        intermediate_size=32, num_local_experts=tiny_moe.EXPERTS, num_experts_per_tok=2,
        head_dim=16, sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **tiny_moe.COMMON,
    )
    return tf.GptOssForCausalLM(config).eval()
