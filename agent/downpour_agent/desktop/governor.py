"""When the agent may compute, and how hard: the policy (idle, schedule, battery,
the donor's pause) and the duty cycle that holds the CPU share.

The training loop makes two calls per step::

    await governor.wait_until_allowed()   # returns at once, or when work may go on
    ... one gradient step ...
    await governor.step_done()            # sleeps off the CPU share

Step boundaries are frequent (a step takes milliseconds to a fraction of a second), so
checking the policy there pauses the agent within a second of the person returning.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

from downpour_agent.desktop import status as st
from downpour_agent.desktop.idle import IdleSource
from downpour_agent.desktop.settings import Settings, schedule_minutes


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""


class Policy:
    """Decides from the settings and the machine whether computing is allowed now.

    Parameters
    ----------
    input_idle : callable or None
        Seconds since the last input (:func:`.idle.input_idle_source`); None where
        no idle interface answers, and then ``other_load`` decides.
    other_load : callable
        Share of the CPU the other processes use, in ``[0, 1]``.
    on_battery : callable
        True when running from a battery.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        input_idle: IdleSource | None,
        other_load: Callable[[], float],
        on_battery: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
        local_now: Callable[[], dt.datetime] = dt.datetime.now,
    ) -> None:
        self.settings = settings
        self.input_idle = input_idle
        self.other_load = other_load
        self.on_battery = on_battery
        self.clock = clock
        self.local_now = local_now
        self._quiet_since: float | None = None

    def check(self) -> Verdict:
        s = self.settings
        if not s.run_on_battery and self.on_battery():
            return Verdict(False, st.ON_BATTERY)
        if s.mode == "schedule" and not self._in_schedule():
            return Verdict(False, st.OUTSIDE_SCHEDULE)
        if s.mode == "idle":
            return self._idle_verdict()
        return Verdict(True)

    def _idle_verdict(self) -> Verdict:
        idle_after = self.settings.idle_after_s
        idle_s = self.input_idle() if self.input_idle is not None else None
        if idle_s is not None:
            return Verdict(True) if idle_s >= idle_after else Verdict(False, st.PERSON_ACTIVE)
        # No idle interface: the machine counts as idle once the other processes have
        # stayed under the threshold for the idle time.
        now = self.clock()
        if self.other_load() > self.settings.busy_cpu_share:
            self._quiet_since = None
            return Verdict(False, st.MACHINE_BUSY)
        if self._quiet_since is None:
            self._quiet_since = now
        if now - self._quiet_since >= idle_after:
            return Verdict(True)
        return Verdict(False, st.MACHINE_BUSY)

    def _in_schedule(self) -> bool:
        now = self.local_now()
        minute = now.hour * 60 + now.minute
        for start, end in schedule_minutes(self.settings.schedule):
            if start <= end and start <= minute < end:
                return True
            if start > end and (minute >= start or minute < end):  # across midnight
                return True
        return False


class DutyCycle:
    """Sleeps that hold this process's CPU time to ``share`` of ``threads`` cores.

    It measures the process's own CPU time (``time.process_time``), so the average
    holds whatever the thread count, the step length or the other load: after each
    step it sleeps until ``cpu / (threads * wall) <= share`` over the window since the
    last :meth:`reset`.
    """

    def __init__(
        self,
        share: float,
        threads: int,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self.share, self.threads = share, max(1, threads)
        self.clock, self.cpu_clock = clock, cpu_clock
        self.reset()

    def reset(self) -> None:
        """Start a new window (after a pause, so paused time is not saved up)."""
        self._wall0, self._cpu0 = self.clock(), self.cpu_clock()

    def sleep_needed(self) -> float:
        """Seconds to sleep now to bring the window's average back to the share."""
        if self.share >= 1.0:
            return 0.0
        cpu = self.cpu_clock() - self._cpu0
        wall = self.clock() - self._wall0
        return max(0.0, cpu / (self.share * self.threads) - wall)


class Governor:
    """The policy, the donor's buttons and the duty cycle, for the training loop.

    Updates ``status`` (state and reason) as it pauses and resumes. Safe to drive
    :meth:`pause`, :meth:`resume` and :meth:`stop_after_unit` from another thread (the
    status page): they set flags the loop reads at the next check.
    """

    def __init__(
        self,
        policy: Policy,
        duty: DutyCycle,
        status: st.AgentStatus | None = None,
        poll_s: float = 0.2,
    ) -> None:
        self.policy = policy
        self.duty = duty
        self.status = status or st.AgentStatus()
        self.poll_s = poll_s
        self.paused_by_donor = False
        self._before_pause = (self.status.state, self.status.reason)
        self.pauses = 0

    @property
    def settings(self) -> Settings:
        return self.policy.settings

    def apply_settings(self, settings: Settings) -> None:
        """Use new settings from the next check on (the thread count needs a restart)."""
        self.policy.settings = settings
        self.duty.share = settings.cpu_share
        self.status.update(settings=settings.to_dict())

    def pause(self) -> None:
        if not self.paused_by_donor:
            self._before_pause = (self.status.state, self.status.reason)
        self.paused_by_donor = True
        # Shown at once, also while no step is running (no work, between leases).
        self.status.set_state(st.PAUSED, st.BY_DONOR)

    def resume(self) -> None:
        self.paused_by_donor = False
        if (self.status.state, self.status.reason) == (st.PAUSED, st.BY_DONOR):
            self.status.set_state(*self._before_pause)

    def stop_after_unit(self, stop: bool = True) -> None:
        self.status.update(stop_after_unit=stop)

    @property
    def stopping_after_unit(self) -> bool:
        return self.status.stop_after_unit

    def check(self) -> Verdict:
        if self.paused_by_donor:
            return Verdict(False, st.BY_DONOR)
        return self.policy.check()

    async def wait_until_allowed(self, on_poll: Callable[[], None] | None = None) -> float:
        """Return when computing is allowed; the seconds spent paused (0.0 if none).

        ``on_poll`` runs at each check while paused (e.g. to see whether the lease
        has expired meanwhile and raise).
        """
        verdict = self.check()
        if verdict.allowed:
            self.status.set_state(st.COMPUTING)
            return 0.0
        started = time.monotonic()
        self.pauses += 1
        while not verdict.allowed:
            self.status.set_state(st.PAUSED, verdict.reason)
            if on_poll is not None:
                on_poll()
            await asyncio.sleep(self.poll_s)
            verdict = self.check()
        self.duty.reset()
        self.status.set_state(st.COMPUTING)
        return time.monotonic() - started

    async def step_done(self) -> None:
        """Sleep off the CPU share after a step (or do nothing at a share of 1)."""
        delay = self.duty.sleep_needed()
        if delay > 0:
            await asyncio.sleep(delay)
