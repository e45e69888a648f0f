"""When the agent may compute: idle, load, schedule, battery, the donor's pause; and the
duty cycle's arithmetic. The probes are plain values a test sets, as the machine would."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

from downpour_agent.desktop import status as st
from downpour_agent.desktop.governor import DutyCycle, Governor, Policy, Verdict
from downpour_agent.desktop.settings import Settings


class Machine:
    """What the policy reads: input idle time, other processes' load, battery, time."""

    def __init__(self) -> None:
        self.idle_s: float | None = 1000.0
        self.load = 0.0
        self.battery = False
        self.now = 0.0
        self.local = dt.datetime(2025, 1, 6, 12, 0)  # noqa: DTZ001 (local wall time)

    def policy(self, **settings: object) -> Policy:
        return Policy(
            Settings().replace(**settings),
            input_idle=lambda: self.idle_s,
            other_load=lambda: self.load,
            on_battery=lambda: self.battery,
            clock=lambda: self.now,
            local_now=lambda: self.local,
        )


def test_it_computes_when_the_person_has_been_away_for_the_idle_time() -> None:
    machine = Machine()
    policy = machine.policy(idle_after_s=180)

    machine.idle_s = 181.0
    assert policy.check().allowed
    machine.idle_s = 2.0
    assert policy.check() == Verdict(False, st.PERSON_ACTIVE)


def test_without_an_idle_source_it_waits_for_the_other_load_to_stay_low() -> None:
    machine = Machine()
    policy = machine.policy(idle_after_s=60, busy_cpu_share=0.25)
    policy.input_idle = None

    machine.load = 0.6
    assert policy.check().reason == st.MACHINE_BUSY
    machine.load, machine.now = 0.1, 10.0
    assert not policy.check().allowed  # quiet, but not for long enough yet
    machine.now = 71.0
    assert policy.check().allowed
    machine.load = 0.5
    assert not policy.check().allowed


def test_on_battery_it_stops_unless_the_donor_allows_it() -> None:
    machine = Machine()
    machine.battery = True

    assert machine.policy(mode="always").check().reason == st.ON_BATTERY
    assert machine.policy(mode="always", run_on_battery=True).check().allowed


def test_a_schedule_across_midnight_covers_the_night_only() -> None:
    machine = Machine()
    policy = machine.policy(mode="schedule", schedule=("22:00-07:00",))

    for hour, allowed in [(23, True), (3, True), (7, False), (12, False), (21, False)]:
        machine.local = machine.local.replace(hour=hour)
        assert policy.check().allowed is allowed, hour
    assert policy.check().reason == st.OUTSIDE_SCHEDULE


def test_always_ignores_the_person() -> None:
    machine = Machine()
    machine.idle_s = 0.0

    assert machine.policy(mode="always").check().allowed


def test_the_duty_cycle_sleeps_so_cpu_over_threads_times_wall_is_the_share() -> None:
    clock, cpu = [0.0], [0.0]
    duty = DutyCycle(0.25, threads=2, clock=lambda: clock[0], cpu_clock=lambda: cpu[0])

    clock[0], cpu[0] = 0.1, 0.2  # 0.1 s of two busy threads
    sleep = duty.sleep_needed()

    assert abs(sleep - 0.3) < 1e-9  # 0.2 cpu-s over (2 threads x 0.4 s) = 0.25
    clock[0] += sleep
    assert duty.sleep_needed() == 0.0


def test_a_full_share_never_sleeps() -> None:
    duty = DutyCycle(1.0, threads=4)
    sum(range(200_000))

    assert duty.sleep_needed() == 0.0


async def test_the_donors_pause_holds_the_loop_until_resume() -> None:
    machine = Machine()
    governor = Governor(machine.policy(mode="always"), DutyCycle(1.0, 1), poll_s=0.01)
    governor.pause()

    waiting = asyncio.create_task(governor.wait_until_allowed())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    assert (governor.status.state, governor.status.reason) == (st.PAUSED, st.BY_DONOR)
    governor.resume()
    paused_s = await asyncio.wait_for(waiting, 1.0)

    assert paused_s >= 0.1
    assert governor.status.state == st.COMPUTING


async def test_new_settings_take_effect_at_the_next_check() -> None:
    machine = Machine()
    machine.idle_s = 0.0
    governor = Governor(machine.policy(mode="always"), DutyCycle(1.0, 1), poll_s=0.01)

    governor.apply_settings(governor.settings.replace(mode="idle", cpu_share=0.5))

    assert governor.check().reason == st.PERSON_ACTIVE
    assert governor.duty.share == 0.5
    assert governor.status.settings["mode"] == "idle"


async def test_the_poll_callback_runs_while_paused() -> None:
    machine = Machine()
    machine.idle_s = 0.0
    governor = Governor(machine.policy(), DutyCycle(1.0, 1), poll_s=0.01)
    polls: list[float] = []

    def on_poll() -> None:
        polls.append(time.monotonic())
        if len(polls) == 3:
            machine.idle_s = 1000.0

    await asyncio.wait_for(governor.wait_until_allowed(on_poll), 1.0)

    assert len(polls) == 3
