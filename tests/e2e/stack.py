"""A whole Downpour deployment as real local processes (see ``tests.harness``)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.harness import Deployment as Stack

__all__ = [
    "FAST_LEASES",
    "ROGUE_AGENT",
    "Stack",
    "held",
    "registrations",
    "running",
    "start_rogue_agent",
    "wait_registered",
]

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
    stack: Stack,
    name: str,
    token: str,
    mode: str,
    *extra: str,
    honest_steps: int = 2,
    factor: float | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``rogue_agent.py --mode MODE join ...`` as ``Stack.start_agent`` starts agents."""
    program = [sys.executable, str(ROGUE_AGENT), "--mode", mode]
    if factor is not None:
        program += ["--factor", repr(factor)]
    return stack.start_agent(
        name, token, *extra, program=[*program, "--honest-steps", str(honest_steps)]
    )


def registrations(stack: Stack, name: str) -> int:
    """How many times agent ``name`` has registered: its log says so at each connect."""
    log = stack.workdir / f"{name}.log"
    return log.read_text(errors="replace").count("registered as agent") if log.exists() else 0


def wait_registered(stack: Stack, *names: str, times: int = 1, timeout: float = 180) -> None:
    """Wait until each agent in ``names`` has registered ``times`` times."""
    stack.wait_for(
        f"{', '.join(names)} to register {times} time(s)",
        lambda: all(registrations(stack, name) >= times for name in names),
        timeout,
    )


@contextmanager
def held(stack: Stack, job_id: str) -> Iterator[None]:
    """Keep a job paused while the block starts its agents; then run it, its clock from zero.

    An agent imports TensorFlow and benchmarks the machine before it registers: 5 s on an
    idle machine, 20 s or more on a busy one. Without the hold, a quick job can finish
    before its last agent joins, and a time budget (counted from the job's start) is spent
    waiting for agents instead of training.
    """
    stack.wait_for("the job to start", lambda: stack.job(job_id)["status"] == "running", 120)
    stack.query("UPDATE training_job SET status = 'paused' WHERE id = %s RETURNING id", [job_id])
    yield
    stack.query(
        "UPDATE training_job SET status = 'running', started_at = %s WHERE id = %s RETURNING id",
        [stack.now(), job_id],
    )
