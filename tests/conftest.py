"""Shared fixtures: two threads (the CI machine has two cores) and a seeded RNG per test."""

from __future__ import annotations

import os

import pytest
import torch

from nnarena.data import DataBundle, make_bundle

# Two threads (the CI machine has two cores), or one per worker when pytest-xdist runs two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def blobs() -> DataBundle:
    """A tiny, easy 3-class problem with image-shaped inputs (1, 4, 4)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    return make_bundle("blobs", x.numpy(), y.numpy(), task="classification", seed=0,
                       input_shape=(1, 4, 4))
