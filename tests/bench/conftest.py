"""Suites written on the fly, and arena storages: SQLite files and fresh PostgreSQL databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def write_suite(tmp_path: Path) -> Callable[..., Path]:
    """Write a suite YAML from keyword fields (a tiny valid suite by default)."""

    def write(**fields) -> Path:
        suite = {"name": "t" + uuid.uuid4().hex[:8], "datasets": ["digits"],
                 "models": ["linear", "mlp-tiny"], "budget": {"epochs": 1}, "seeds": [0, 1],
                 "baseline": {"model": "mlp-tiny"}, **fields}
        path = tmp_path / f"{suite['name']}.yaml"
        path.write_text(yaml.safe_dump(suite))
        return path

    return write


def _postgres_url() -> str:
    url = os.environ.get("NNARENA_TEST_POSTGRES")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("NNARENA_TEST_POSTGRES is not set: run the tests with `make test`, "
                        "which starts PostgreSQL (scripts/test-services.sh)")
        pytest.skip("no PostgreSQL (run `make test` to start one)")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty storage URL of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'arena.db'}"
        return
    import psycopg

    url = _postgres_url()
    name = "nnarena_" + uuid.uuid4().hex[:10]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        yield url.rsplit("/", 1)[0] + "/" + name
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
