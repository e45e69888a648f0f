"""What the agent reports about itself: counters, the status line built from them, and the
loops that log it and mirror it onto the desktop status page."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from downpour_agent.desktop import status as desktop

logger = logging.getLogger("downpour_agent")


@dataclass
class PushResult:
    """The server's answer to one push frame."""

    seq: int
    shard: int
    version: int
    staleness: int
    applied: bool
    duplicate: bool


@dataclass
class AgentStats:
    """Counters shown on the status line and checked by tests."""

    state: str = "starting"
    agent_id: str | None = None
    job_id: str | None = None
    lease_id: str | None = None
    steps_done: int = 0
    steps_total: int = 0
    samples_done: int = 0
    registrations: int = 0
    leases_completed: int = 0
    leases_abandoned: int = 0
    leases_returned: int = 0
    leases_resumed: int = 0
    pushes_sent: int = 0
    pushes_acked: int = 0
    pushes_stale: int = 0
    last_loss: float | None = None
    last_push: PushResult | None = None
    #: Seconds spent inside ``GradientComputer.compute``, summed since training began.
    compute_s: float = 0.0
    #: ``time.perf_counter()`` when the first gradient step started, else None.
    training_since: float | None = None

    def wall_s(self, now: float) -> float:
        """Wall seconds since the first gradient step (``now`` from ``perf_counter``)."""
        return 0.0 if self.training_since is None else now - self.training_since

    def status_line(self, samples_per_s: float, utilisation: float = 0.0, now: float = 0.0) -> str:
        """One human line: job, progress, speed, the last push's fate and utilisation.

        Training lines end with ``utilisation=U compute_s=C wall_s=W`` (docs/benchmarks.md):
        ``U`` is the share of the last interval spent computing gradients, ``C`` and ``W``
        the cumulative compute and wall seconds since training began.
        """
        if self.job_id is None:
            return f"{self.state}; {self.leases_completed} work units done"
        line = (
            f"job {self.job_id[:8]} step {self.steps_done}/{self.steps_total} "
            f"{samples_per_s:.0f} samples/s"
        )
        if self.last_loss is not None:
            line += f" loss {self.last_loss:.4g}"
        if self.last_push is not None:
            p = self.last_push
            fate = "applied" if p.applied else ("duplicate" if p.duplicate else "not applied")
            line += f" | push #{p.seq} v{p.version} staleness {p.staleness} {fate}"
        if self.pushes_stale:
            line += f" ({self.pushes_stale} stale)"
        return (
            f"{line} utilisation={utilisation:.3f} compute_s={self.compute_s:.2f} "
            f"wall_s={self.wall_s(now):.2f}"
        )


async def log_status(stats: AgentStats, interval_s: float) -> None:
    """Log one status line every ``interval_s``: samples/s and utilisation since the last."""
    last_t, last_samples, last_compute = time.perf_counter(), stats.samples_done, 0.0
    while True:
        await asyncio.sleep(interval_s)
        now = time.perf_counter()
        elapsed = max(now - max(last_t, stats.training_since or now), 1e-9)
        rate = (stats.samples_done - last_samples) / elapsed
        utilisation = min(1.0, (stats.compute_s - last_compute) / elapsed)
        last_t, last_samples, last_compute = now, stats.samples_done, stats.compute_s
        logger.info("%s", stats.status_line(rate, utilisation, now))


async def mirror_status(
    stats: AgentStats,
    status: desktop.AgentStatus,
    credit: desktop.CreditBook | None,
    interval_s: float = 1.0,
) -> None:
    """Copy progress into the status page's snapshot once a second."""
    last_t, last_samples = time.monotonic(), stats.samples_done
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        rate = (stats.samples_done - last_samples) / max(now - last_t, 1e-9)
        last_t, last_samples = now, stats.samples_done
        status.update(
            job_id=stats.job_id,
            lease_id=stats.lease_id,
            steps_done=stats.steps_done,
            steps_total=stats.steps_total,
            samples_per_s=rate,
            credit_today=credit.today if credit else 0.0,
            credit_total=credit.total if credit else 0.0,
        )
        if status.state == desktop.PAUSED:
            continue  # the governor owns the paused state and its reason
        if stats.state in ("connecting", "reconnecting"):
            status.set_state(desktop.DISCONNECTED)
        elif stats.state.startswith("idle ("):
            status.set_state(desktop.NO_WORK)
        elif stats.state == "stopped":
            status.set_state(desktop.STOPPED)
