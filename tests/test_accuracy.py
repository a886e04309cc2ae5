"""Accuracy on real data: the numbers the foundation promises (seconds each on two cores)."""

from __future__ import annotations

import pytest

from nnarena.cell import Cell, run_cell

pytestmark = pytest.mark.slow


def _accuracy(dataset: str, model: str, epochs: float, **model_kwargs) -> float:
    cell = Cell(dataset=dataset, model=model, model_kwargs=model_kwargs,
                trainer={"epochs": epochs, "lr": 1e-3, "batch_size": 64})
    result = run_cell(cell)
    assert result.status == "ok", result.reason
    return result.metrics["test_accuracy"]


def test_backprop_mlp_on_digits() -> None:
    assert _accuracy("digits", "mlp", 15) >= 0.95


def test_backprop_mlp_on_mnist5k() -> None:
    assert _accuracy("mnist5k", "mlp", 15) >= 0.92


def test_mlp_clearly_beats_a_linear_model_on_mnist1d(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NNARENA_CACHE_DIR", str(tmp_path))
    linear = _accuracy("mnist1d", "linear", 30)
    mlp = _accuracy("mnist1d", "mlp", 30)
    assert mlp >= linear + 0.15, (mlp, linear)
