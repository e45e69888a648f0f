"""The desktop governor in the agent's loop, against a FakeServer: a lease survives a
pause shorter than its life and goes back cleanly after a longer one, with nothing lost
and nothing applied twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.agent.fakeserver import FakeServer, governor, heartbeats_for, make_agent, until

from downpour_agent.connection import EXIT_OK
from downpour_agent.desktop import status as st

pytest.importorskip("keras")


async def test_a_short_pause_keeps_the_lease_alive_and_loses_nothing(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare
    server.lease_template.update(steps=40)
    server.work = [dict(server.lease_template)]
    gov = governor()
    agent = make_agent(server, tmp_path, governor=gov, max_steps_per_second=40.0)
    run = asyncio.create_task(agent.run())

    # Execute: the donor pauses after the first push, for ten heartbeats
    await until(lambda: server.first_push.is_set())
    gov.pause()
    await until(lambda: gov.status.state == st.PAUSED and agent.stats.state == "paused")
    steps_when_paused = agent.stats.steps_done
    beats = heartbeats_for(server, "lease-1")
    await until(lambda: heartbeats_for(server, "lease-1") >= beats + 10)
    steps_after_pause = agent.stats.steps_done
    gov.resume()
    code = await asyncio.wait_for(run, 60)

    # Assert
    assert code == EXIT_OK
    assert steps_after_pause == steps_when_paused, "computed while paused"
    assert server.of_type("return_lease") == []
    [complete] = server.of_type("complete")
    assert complete["lease_id"] == "lease-1" and complete["samples"] == 40 * 8
    seqs = [(m["seq"], m["shard"]) for m in server.of_type("push")]
    assert len(seqs) == len(set(seqs)) == 20 * 2  # 20 rounds of two shards, each once
    assert len(server.applied) == 40
    assert gov.pauses == 1


async def test_a_pause_longer_than_the_lease_hands_it_back_cleanly(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: leases live 0.5 s; a second one is waiting
    server.lease_template.update(steps=40, expires_in_s=0.5)
    server.work = [dict(server.lease_template), dict(server.lease_template)]
    gov = governor()
    agent = make_agent(server, tmp_path, governor=gov, max_steps_per_second=40.0)
    run = asyncio.create_task(agent.run())

    # Execute
    await until(lambda: server.first_push.is_set())
    gov.pause()
    await until(lambda: len(server.of_type("return_lease")) == 1)
    pushed_before_return = len(server.of_type("push"))
    gov.resume()
    code = await asyncio.wait_for(run, 60)

    # Assert: lease-1 went back once, lease-2 was done in full, no push applied twice
    assert code == EXIT_OK
    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]
    assert [m["lease_id"] for m in server.of_type("complete")] == ["lease-2"]
    lease_1_pushes = [m for m in server.of_type("push") if m["lease_id"] == "lease-1"]
    assert len(lease_1_pushes) == pushed_before_return
    keys = [(m["lease_id"], m["seq"], m["shard"]) for m in server.of_type("push")]
    assert len(keys) == len(set(keys)) == len(server.applied)
    assert agent.stats.leases_returned == 1


async def test_stop_after_this_unit_finishes_the_lease_then_stops(
    server: FakeServer, tmp_path: Path
) -> None:
    server.lease_template.update(steps=20)
    server.work = [dict(server.lease_template), dict(server.lease_template)]
    gov = governor()
    agent = make_agent(
        server, tmp_path, governor=gov, max_steps_per_second=40.0, exit_when_idle_s=None
    )
    run = asyncio.create_task(agent.run())

    await until(lambda: server.first_push.is_set())
    gov.stop_after_unit()
    code = await asyncio.wait_for(run, 60)

    assert code == EXIT_OK
    assert [m["lease_id"] for m in server.of_type("complete")] == ["lease-1"]
    assert server.of_type("return_lease") == []
    assert len(server.work) == 1  # the second unit was never asked for
