"""Shared: mnist5k accuracy of an MLP with a sparsity method; dense trained once per session."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nnarena.cell import Cell, run_cell

# The arena's MLP 784-256-256-10 with Adam 1e-3, batch 64; 10 epochs (the suite's 15 cost 50%
# more test time and change the figures by tenths of a point).
MNIST5K_MLP = {"dataset": "mnist5k", "model": "mlp", "model_kwargs": {"width": 256, "depth": 2}}
MNIST5K_TRAINER = {"epochs": 10, "lr": 1e-3, "batch_size": 64, "measure": False}


def _accuracies(method: str = "none", **kwargs: object) -> list[float]:
    """Test accuracy of seeds 0-2 on mnist5k with sparsity method ``method``."""
    accuracies = []
    for seed in range(3):
        result = run_cell(Cell(**MNIST5K_MLP, sparsity=method, sparsity_kwargs=kwargs,
                               trainer=MNIST5K_TRAINER, seed=seed))
        assert result.status == "ok", result.reason
        accuracies.append(result.metrics["test_accuracy"])
    return accuracies


@pytest.fixture(scope="session")
def mnist5k_accuracies() -> Callable[..., list[float]]:
    """``(method="none", **sparsity_kwargs) -> test accuracies of seeds 0-2`` on mnist5k."""
    return _accuracies


@pytest.fixture(scope="session")
def mnist5k_dense() -> list[float]:
    """Dense backprop's test accuracy on mnist5k, seeds 0-2."""
    return _accuracies()
