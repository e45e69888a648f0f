from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .stack import Stack


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A production deployment with short lease timings so faults resolve quickly."""
    stack = Stack(
        "production",
        Path(tmp_path_factory.mktemp("production")),
        HEARTBEAT_INTERVAL_S="1",
        LEASE_TTL_S="4",
        REAP_INTERVAL_S="1",
        UNIT_TARGET_SECONDS="5",
    )
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack("embedded", Path(tmp_path_factory.mktemp("embedded")), UNIT_TARGET_SECONDS="5")
    try:
        yield stack.start()
    finally:
        stack.stop()
