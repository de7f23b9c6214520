"""The survival report's figures against hand-computed values, with a rounding quantizer whose
result is known exactly (grid step 1)."""

from __future__ import annotations

import numpy as np
import pytest

from loraformat.quant.survival import LayerSurvival, SurvivalReport, measure


def _round(x: np.ndarray) -> np.ndarray:
    return np.round(x).astype(np.int8)


def _back(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32)


def test_change_below_half_a_step_does_not_survive():
    w = np.array([[1.0, -2.0], [0.0, 3.0]], np.float32)  # on the grid, as a stored base is
    figures, q = measure("t", w, w + 0.3, _round, _back, qtype="INT")
    np.testing.assert_array_equal(q, w.astype(np.int8))  # rounded back to W
    assert figures.delta_norm == pytest.approx(0.6)  # ‖0.3·ones(2,2)‖
    assert figures.error_norm == pytest.approx(0.6)
    assert figures.carried == pytest.approx(0.0) and figures.share == pytest.approx(0.0)


def test_change_above_half_a_step_overshoots():
    w = np.zeros((3, 4), np.float32)
    figures, _ = measure("t", w, w + 0.7, _round, _back)
    # the stored change is 1 everywhere: ⟨1, 0.7⟩ / ‖0.7‖² = 1/0.7, more than all of ΔW: the
    # share says all of it (capped at 1, in the table too: never "142.9%")
    assert figures.carried / figures.delta_norm**2 == pytest.approx(1 / 0.7, rel=1e-6)
    assert figures.share == 1.0
    report = SurvivalReport([figures])
    assert report.share == 1.0 and report.table()[-1].endswith("100.0%")
    assert figures.error_norm == pytest.approx(0.3 * np.sqrt(12), rel=1e-6)


def test_unquantized_base_uses_q_of_w():
    w = np.full((2, 2), 0.4, np.float32)  # Q(W) = 0, not W
    figures, _ = measure("t", w, w + 0.2, _round, _back)  # Q(W') = 1
    assert figures.carried == pytest.approx(4 * 1 * 0.2, rel=1e-6)
    with_stored, _ = measure("t", w, w + 0.2, _round, _back, stored=w)
    assert with_stored.carried == pytest.approx(4 * 0.6 * 0.2, rel=1e-6)


def test_identity_quantizer_keeps_everything_and_zero_delta_counts_as_kept():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((70000,)).astype(np.float32)  # more than one chunk
    d = rng.standard_normal((70000,)).astype(np.float32) * np.float32(1e-3)
    figures, _ = measure("t", w, w + d, lambda x: x, lambda x: x)
    assert figures.share == pytest.approx(1.0, abs=1e-3) and figures.error_norm == 0
    zero, _ = measure("z", w, w, lambda x: x, lambda x: x)
    assert zero.delta_norm == 0 and zero.share == 1.0


def test_report_weights_layers_and_warns():
    report = SurvivalReport(threshold=0.5, advice="do X")
    report.add(LayerSurvival("a", "Q4_0", delta_norm=1.0, error_norm=0.1, carried=0.1))
    report.add(LayerSurvival("b", "Q4_0", delta_norm=3.0, error_norm=0.1, carried=9.0))
    assert report.share == pytest.approx(9.1 / 10)  # ‖ΔW‖²-weighted
    assert [i.name for i in report.low()] == ["a"]
    warning = report.warning()
    assert warning is not None and "1 of 2" in warning and "a 10%" in warning
    assert warning.endswith("do X") and "\n" not in warning
    data = report.to_json()
    assert data["layers"][1] == {"tensor": "b", "type": "Q4_0", "delta_norm": 3.0,
                                 "requant_error": 0.1, "share": 1.0}
    assert data["warning"] == warning
    lines = report.table()
    assert len(lines) == 4 and lines[-1].startswith("overall") and "91.0%" in lines[-1]
    assert SurvivalReport().warning() is None and SurvivalReport().share == 1.0
