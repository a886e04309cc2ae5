"""Fixtures for the dataset tests: no test writes to the user's real cache folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nnarena-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(session_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Shared across the session so MNIST-1D is generated once; tests of the cache itself point
    # NNARENA_CACHE_DIR at their own tmp_path.
    monkeypatch.setenv("NNARENA_CACHE_DIR", str(session_cache))
