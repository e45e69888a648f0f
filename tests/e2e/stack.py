"""A whole Downpour deployment as real local processes (see ``tests.harness``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.harness import Deployment as Stack

__all__ = ["FAST_LEASES", "ROGUE_AGENT", "Stack", "running", "start_rogue_agent"]

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


#: The real agent CLI with tampered gradients (``--mode scale|random``).
ROGUE_AGENT = Path(__file__).with_name("rogue_agent.py")


def start_rogue_agent(
    stack: Stack, name: str, token: str, mode: str, *extra: str
) -> subprocess.Popen[bytes]:
    """Start ``rogue_agent.py --mode MODE join ...`` as ``Stack.start_agent`` starts agents."""
    return stack.start_agent(
        name, token, *extra, program=[sys.executable, str(ROGUE_AGENT), "--mode", mode]
    )
