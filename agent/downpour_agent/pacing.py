"""Step pacing: what every training loop waits for before it computes a step.

Two things hold a step back, and they are counted differently:

* **The donor's pause** (the desktop governor: the machine in use, on battery, outside the
  schedule, or the pause button). The lease is kept while heartbeats go on, unless the pause
  outlasts it. Paused seconds are returned, so a round's compute rate leaves them out.
* **The ``--max-steps-per-second`` throttle.** It paces the steps; its waits are part of a
  round's wall time, because a capped agent really does compute that slowly.
"""

from __future__ import annotations

import asyncio
import logging
import time

from downpour_agent.desktop.governor import Governor
from downpour_agent.leases import ActiveLease
from downpour_agent.stats import AgentStats

logger = logging.getLogger("downpour_agent")


class PauseOutlastedLease(Exception):
    """The agent stayed paused for longer than its lease lives: give the lease back."""


class StepPacer:
    """The gate before each step of any lease; one per agent, so a throttle's spacing
    carries over from one lease to the next."""

    def __init__(
        self, governor: Governor | None, max_steps_per_second: float | None, stats: AgentStats
    ) -> None:
        self.governor = governor
        self.max_steps_per_second = max_steps_per_second
        self.stats = stats
        self._next_step_at = 0.0

    async def before_step(self, active: ActiveLease) -> float:
        """Wait for the governor's permission and the throttle, and start the training clock.
        Returns the seconds paused (not those throttled: a throttle paces the steps, a pause
        stops them)."""
        paused_s = await self.wait_for_permission(active)
        rate = self.max_steps_per_second
        if rate:
            now = time.monotonic()
            if self._next_step_at > now:
                await asyncio.sleep(self._next_step_at - now)
            self._next_step_at = max(now, self._next_step_at) + 1.0 / rate
        if self.stats.training_since is None:
            self.stats.training_since = time.perf_counter()
        return paused_s

    async def wait_for_permission(self, active: ActiveLease) -> float:
        """At a step boundary: pause while the governor says so, keeping the lease (the
        heartbeat task goes on) unless the pause outlasts it. Returns the seconds paused."""
        governor = self.governor
        if governor is None:
            return 0.0
        started = time.monotonic()

        def outlasted() -> None:
            active.check()
            if time.monotonic() - started > active.lease.expires_in_s:
                raise PauseOutlastedLease
            self.stats.state = "paused"

        paused_s = await governor.wait_until_allowed(outlasted)
        if paused_s:
            self.stats.state = "training"
            logger.info("resuming after a pause of %.1f s", paused_s)
        return float(paused_s or 0.0)
