"""export_with_slots on a toy architecture (a plugin registered for this module only).

The toy export module is two :class:`Dense` layers — one ``out_in`` with a bias, one ``in_out``
without — so the slot mechanism, the defaults, the names and the target selection are checked
without waiting on a real architecture; tests/test_slots_models.py does GPT-2 and LLaMA.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from cli_harness import run_cli
from safetensors.numpy import save_file
from torch import nn

import loraformat
from loraformat import LoraformatError, LoraLayer
from loraformat.architecture import (
    ArchitectureBase,
    DenseLayer,
    ExportModel,
    hookimpl,
    registry,
)
from loraformat.architecture.modules import Dense
from loraformat.base import open_base
from loraformat.export.slots import export_with_slots, resolve_targets, slotted_module
from loraformat.runtime import Session

ARCH = "toyslots"
RNG = np.random.default_rng(0)
WEIGHTS = {
    "net.up.weight": RNG.standard_normal((12, 8)).astype(np.float32),  # out_in
    "net.up.bias": RNG.standard_normal(12).astype(np.float32),
    "net.down.weight": RNG.standard_normal((12, 6)).astype(np.float32),  # in_out
    "net.norm": RNG.standard_normal(6).astype(np.float32),  # not a dense layer
}


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Module()
        self.net.up = Dense(8, 12, layout="out_in")
        self.net.down = Dense(12, 6, bias=False, layout="in_out")
        self.net.register_parameter("norm", nn.Parameter(torch.zeros(6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.down(torch.relu(self.net.up(x))) * self.net.norm


class ToySlots(ArchitectureBase):
    id = ARCH
    description = "two dense layers, for slot tests"
    targets = ("up",)

    def detect(self, checkpoint):
        return checkpoint.config.get("model_type") == ARCH

    def dense_layers(self, checkpoint):
        return [
            DenseLayer("net.up", 8, 12, "out_in", bias="net.up.bias"),
            DenseLayer("net.down", 12, 6, "in_out"),
        ]

    def export_model(self, checkpoint, tensors, options):
        module = ToyNet()
        module.load_state_dict(dict(tensors))
        return ExportModel(
            module,
            {"x": torch.randn(2, 3, 8)},
            ["x"],
            ["y"],
            {"x": {0: "batch", 1: "sequence"}, "y": {0: "batch", 1: "sequence"}},
        )


class ToyPlugin:
    LORAFORMAT_PLUGIN_API = 2

    @hookimpl
    def loraformat_architectures(self):
        return [ToySlots()]


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    reg = registry()
    reg.register(ToyPlugin(), "toyslots-test")
    root = tmp_path_factory.mktemp("toyslots")
    save_file(WEIGHTS, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": ARCH}))
    yield root
    reg.unregister("toyslots-test")


@pytest.fixture(scope="module")
def exported(toy_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("toyslots-onnx") / "slots.onnx"
    return export_with_slots(toy_base, out)


def _reference(x, deltas=None):
    """numpy forward; ΔW in math orientation (out×in) added in each layer's storage layout."""
    deltas = deltas or {}
    up = WEIGHTS["net.up.weight"] + deltas.get("net.up", 0)  # [out, in]
    down = WEIGHTS["net.down.weight"] + deltas.get("net.down", np.zeros((6, 12))).T  # [in, out]
    h = np.maximum(x.astype(np.float64) @ up.T + WEIGHTS["net.up.bias"], 0)
    return (h @ down) * WEIGHTS["net.norm"]


def _adapter(ranks, seed=1):
    rng = np.random.default_rng(seed)
    shapes = {"net.up": (8, 12), "net.down": (12, 6)}
    layers = {
        path: LoraLayer(
            A=rng.standard_normal((rank, shapes[path][0])).astype(np.float32),
            B=rng.standard_normal((shapes[path][1], rank)).astype(np.float32),
            alpha=rank * 1.5,
            in_features=shapes[path][0],
            out_features=shapes[path][1],
        )
        for path, rank in ranks.items()
    }
    return loraformat.Adapter.from_layers(ARCH, layers)


def _x(seed=0):
    return np.random.default_rng(50 + seed).standard_normal((2, 5, 8)).astype(np.float32)


@pytest.mark.slow
def test_graph_inputs_defaults_and_names(exported):
    model = onnx.load(exported.path)
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    assert inputs == {
        "x": ["batch", "sequence", 8],
        "net.up.lora_A": [8, "rank_0"],
        "net.up.lora_B": ["rank_0", 12],
        "net.down.lora_A": [12, "rank_1"],
        "net.down.lora_B": ["rank_1", 6],
    }
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    # weights under their checkpoint names and storage shapes; zero-rank defaults for the slots
    assert inits == {
        "net.up.weight": [12, 8],
        "net.up.bias": [12],
        "net.down.weight": [12, 6],
        "net.norm": [6],
        "net.up.lora_A": [8, 0],
        "net.up.lora_B": [0, 12],
        "net.down.lora_A": [12, 0],
        "net.down.lora_B": [0, 6],
    }
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["loraformat.architecture"] == ARCH
    assert json.loads(meta["loraformat.lora_slots"]) == ["net.up", "net.down"]
    assert exported.slots == ["net.up", "net.down"]


@pytest.mark.slow
def test_no_adapter_is_the_base(exported):
    x = _x()
    with Session(exported.path) as s:
        np.testing.assert_allclose(s.run({"x": x})[0], _reference(x), atol=1e-4)


@pytest.mark.slow
def test_adapters_with_different_ranks_per_slot(exported):
    """rank 3 on one slot, 5 on the other, in one call: the rank axes are independent."""
    both = _adapter({"net.up": 3, "net.down": 5})
    x = _x(1)
    with Session(exported.path) as s:
        s.load("both", both)
        deltas = {p: both.delta(p, np.float64) for p in both.layer_paths}
        np.testing.assert_allclose(
            s.run({"x": x}, adapter="both")[0], _reference(x, deltas), atol=1e-4
        )


@pytest.mark.slow
def test_targets_narrow_the_slots(toy_base, tmp_path):
    result = export_with_slots(toy_base, tmp_path / "down.onnx", targets=["down"])
    assert result.slots == ["net.down"]
    names = {i.name for i in onnx.load(result.path).graph.input}
    assert names == {"x", "net.down.lora_A", "net.down.lora_B"}
    up_only = _adapter({"net.up": 2})
    with Session(result.path) as s, pytest.raises(LoraformatError) as info:
        s.load("up", up_only)
    assert "layer net.up has no LoRA slot in down.onnx (slots: net.down)" in str(info.value)


def test_target_resolution(toy_base):
    with open_base(toy_base) as base:
        assert resolve_targets(base, None) == ["net.up", "net.down"]
        assert resolve_targets(base, ["net.down", "up"]) == ["net.up", "net.down"]
        assert resolve_targets(base, ["net.up"]) == ["net.up"]
        with pytest.raises(LoraformatError) as info:
            resolve_targets(base, ["q_proj"])
    assert str(info.value) == (
        f"{toy_base}: target 'q_proj' matches no linear layer (module names: down, up)"
    )


@pytest.mark.slow
def test_refuses_existing_output_and_bad_dtype(toy_base, exported):
    with pytest.raises(LoraformatError, match="output already exists"):
        export_with_slots(toy_base, exported.path)
    with pytest.raises(LoraformatError,
                       match="dtype must be one of float32, float16, int4, int8, got 'bfloat16'"):
        export_with_slots(toy_base, exported.path.with_name("x.onnx"), dtype="bfloat16")


def test_slotted_module_fills_and_clears_slots():
    module = ToyNet()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    slotted = slotted_module(module, ["net.down"], ["x"])
    assert slotted.state_dict().keys() == module.state_dict().keys()
    x = torch.randn(2, 8)
    a, b = torch.randn(12, 2), torch.randn(2, 6)
    with torch.no_grad():
        got = slotted(x=x, lora_0_A=a, lora_0_B=b)
        h = torch.relu(module.net.up(x))
        want = (h @ module.net.down.weight + (h @ a) @ b) * module.net.norm
    torch.testing.assert_close(got, want)
    assert module.net.down.lora_A is None and module.net.down.lora_B is None
    with pytest.raises(LoraformatError, match=r"no Dense layer at net\.norm"):
        slotted_module(module, ["net.norm"], ["x"])


@pytest.mark.slow
def test_verify_and_same_nodes_as_plain_export(toy_base, tmp_path):
    """The slot graph is the plain export plus, per slot, MatMul(x, A), MatMul(·, B) and an Add."""
    from collections import Counter

    from loraformat.export.onnx import export_onnx

    slotted = export_with_slots(toy_base, tmp_path / "slots.onnx", verify_output=True)
    assert slotted.max_abs_diff is not None and slotted.max_abs_diff <= 1e-5
    plain = export_onnx(toy_base, tmp_path / "plain.onnx")
    ops_slotted = Counter(n.op_type for n in onnx.load(slotted.path).graph.node)
    ops_plain = Counter(n.op_type for n in onnx.load(plain.path).graph.node)
    assert ops_slotted - ops_plain == Counter({"MatMul": 4, "Add": 2})
    assert not ops_plain - ops_slotted


@pytest.mark.slow
def test_cli_export_lora_slots(toy_base, tmp_path):
    out = tmp_path / "cli.onnx"
    result = run_cli("export", toy_base, "--lora-slots", "--targets", "down", "-o", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["slots"] == ["net.down"] and report["output"] == str(out)
    assert report["left_out"] == {}  # ArchitectureBase's default: the export uses every tensor
    assert {i.name for i in onnx.load(out).graph.input} == {
        "x",
        "net.down.lora_A",
        "net.down.lora_B",
    }

    result = run_cli("export", toy_base, "--targets", "down", "-o", tmp_path / "b.onnx")
    assert result.code == 2 and "--targets applies only with --lora-slots" in result.err
    args = ("--lora-slots", "--with-past", "--optimize", "-o", tmp_path / "b.onnx")
    result = run_cli("export", toy_base, *args)
    assert result.code == 2 and "--optimize cannot be combined with --lora-slots" in result.err
    result = run_cli(
        "export", toy_base, "--lora-slots", "--targets", "up,nope", "-o", tmp_path / "c.onnx"
    )
    assert result.code == 1
    assert result.error == (
        f"error: {toy_base}: target 'nope' matches no linear layer (module names: down, up)"
    )
    assert not (tmp_path / "c.onnx").exists()


@pytest.mark.slow
def test_session_checks_the_base_fingerprint(toy_base, exported):
    """The slot graph records its base's fingerprint; an adapter for another base is refused."""
    with open_base(toy_base) as base:
        fingerprint = base.checkpoint.fingerprint()
    layer = _adapter({"net.up": 2}).layer("net.up")
    right = loraformat.Adapter.from_layers(ARCH, {"net.up": layer}, fingerprint=fingerprint)
    wrong = loraformat.Adapter.from_layers(ARCH, {"net.up": layer}, fingerprint="lfp1:" + "0" * 64)
    with Session(exported.path) as s:
        assert s.base_fingerprint == fingerprint
        s.load("right", right)
        with pytest.raises(LoraformatError, match="adapter was made for another base"):
            s.load("wrong", wrong)
        assert s.adapters == ["right"]
