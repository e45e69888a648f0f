"""Idle detection against a real X server (Xvfb), with input injected by xdotool."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
from tests.desktop.conftest import press_key

from downpour_agent.desktop import resources
from downpour_agent.desktop import status as st
from downpour_agent.desktop.governor import DutyCycle, Governor, Policy
from downpour_agent.desktop.idle import OtherLoad, X11Idle, input_idle_source
from downpour_agent.desktop.settings import Settings

pytestmark = pytest.mark.desktop

IDLE_AFTER_S = 2.0


def busy_step(seconds: float = 0.05) -> None:
    """One work step: hash until ``seconds`` have passed."""
    end = time.perf_counter() + seconds
    block = bytes(1 << 16)
    while time.perf_counter() < end:
        hashlib.sha256(block).digest()


def test_the_screensaver_extension_counts_from_the_last_key_press(xvfb: str) -> None:
    source = X11Idle(xvfb)
    time.sleep(0.6)
    before = source()

    press_key(xvfb)
    after = source()

    assert before is not None and before >= 0.5
    assert after is not None and after < 0.3
    source.close()


def test_under_x11_the_agent_picks_the_x_server_as_its_idle_source(xvfb: str) -> None:
    source = input_idle_source()

    assert isinstance(source, X11Idle)


async def test_it_pauses_within_a_second_of_a_key_press_and_resumes_after_the_idle_time(
    xvfb: str,
) -> None:
    policy = Policy(
        Settings(mode="idle", idle_after_s=IDLE_AFTER_S),
        input_idle=X11Idle(xvfb),
        other_load=OtherLoad(),
        on_battery=resources.on_battery,
    )
    governor = Governor(policy, DutyCycle(1.0, 1), poll_s=0.1)
    step_starts: list[float] = []
    pressed_at: list[float] = []
    computing = asyncio.Event()

    async def work(until: float) -> None:
        while time.monotonic() < until:
            await governor.wait_until_allowed()
            step_starts.append(time.monotonic())
            if len(step_starts) >= 5:
                computing.set()
            await asyncio.to_thread(busy_step)
            await governor.step_done()

    async def person() -> None:
        await computing.wait()
        await asyncio.to_thread(press_key, xvfb)
        pressed_at.append(time.monotonic())

    start = time.monotonic()
    await asyncio.wait_for(asyncio.gather(work(start + IDLE_AFTER_S + 6.0), person()), 30)

    pressed = pressed_at[0]
    during = [t for t in step_starts if pressed + 1.0 <= t < pressed + IDLE_AFTER_S]
    after = [t for t in step_starts if t >= pressed + 1.0]
    assert during == [], "computed while the person was active"
    assert after, "never resumed"
    assert pressed + IDLE_AFTER_S <= after[0] <= pressed + IDLE_AFTER_S + 1.0
    assert governor.status.state == st.COMPUTING
