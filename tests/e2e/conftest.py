from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

# The desktop tests' private X server, for the desktop agent's idle test here.
from tests.desktop.conftest import xvfb  # noqa: F401

from .stack import FAST_LEASES, Stack, running


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A production deployment with short lease timings so faults resolve quickly."""
    workdir = Path(tmp_path_factory.mktemp("production"))
    with running("production", workdir, **FAST_LEASES, UNIT_TARGET_SECONDS="5") as stack:
        yield stack


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(
        "embedded", Path(tmp_path_factory.mktemp("embedded")), UNIT_TARGET_SECONDS="5"
    ) as stack:
        yield stack
