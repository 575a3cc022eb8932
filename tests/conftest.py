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


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the marks into each test's group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--dist loadgroup` (the gpu suite's processes, tools/gpu-session.sh): each file's tests on one process, as
    `--dist loadfile` puts them (a module's fixtures, a model loaded and compiled, made once), except a file that
    sets SPREAD_TESTS = True: its tests share nothing and each compiles its own kernels, so they go to whichever
    process is free. Why: test_qmatvec_int8.py's gpu tests took ~19 s each on one process, 40 of them past a call's
    480 s (H100, 2026-12-06), while the other processes had finished."""
    if not getattr(config.option, "loadgroup", False):  # xdist sets it on a worker of a loadgroup run
        return
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and not getattr(module, "SPREAD_TESTS", False):
            item.add_marker(pytest.mark.xdist_group(module.__name__))
