"""Shared test fixtures: where the oracle data lives (../shared/oracles beside the checkout, or $WORKER_ORACLES)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def find_oracles() -> Path | None:
    candidates = [os.environ.get("WORKER_ORACLES"), REPO / "shared" / "oracles", REPO.parent / "shared" / "oracles"]
    for c in candidates:
        if c and Path(c, "README.md").is_file():
            return Path(c)
    return None


def oracles_dir() -> Path:
    """The oracle folder, or a skip that says how to provide it (a user's fresh clone has no ../shared)."""
    found = find_oracles()
    if found is None:
        pytest.skip("oracle data not found: set WORKER_ORACLES or place shared/oracles beside the checkout")
    return found


@pytest.fixture(scope="session")
def oracles() -> Path:
    return oracles_dir()
