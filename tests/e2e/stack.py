"""A whole Downpour deployment as real local processes (see ``downpour.localrun``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from downpour.localrun import Deployment as Stack

__all__ = ["FAST_LEASES", "Stack", "running"]

#: Lease timings short enough that expiry and reissue happen within a test.
FAST_LEASES = {"HEARTBEAT_INTERVAL_S": "1", "LEASE_TTL_S": "4", "REAP_INTERVAL_S": "1"}


@contextmanager
def running(mode: str, workdir: Path, **settings: str) -> Iterator[Stack]:
    """A started deployment, stopped (processes, database, keys) however the block ends."""
    stack = Stack(mode, workdir, **settings)
    try:
        yield stack.start()
    finally:
        stack.stop()
