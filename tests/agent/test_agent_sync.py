"""The agent on a synchronous lease against a FakeServer: one round per step on the weights
of one version, then a fetch of every shard for the next version."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from tests.agent.fakeserver import FakeServer, make_agent, run_agent

from downpour_agent.connection import EXIT_OK

keras = pytest.importorskip("keras")


async def test_each_round_runs_on_one_version_and_waits_for_the_next(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: 7 steps in rounds of 2 (the last round has 1 step), n_fetch ignored.
    server.work = [{**server.lease_template, "algorithm": "sync"}]
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert
    assert code == EXIT_OK
    pushes = [msg for msg, _ in server.pushes]
    assert [(p["seq"], p["shard"]) for p in pushes] == [(s, h) for s in range(4) for h in (0, 1)]
    assert all("loads" not in p for p in pushes)  # no weights loaded within a round
    # The fake store applies each push at once: round k runs on version k of each shard.
    assert [p["base_version"] for p in pushes] == [k for k in range(4) for _ in (0, 1)]
    fetches = server.of_type("fetch")
    assert [f.get("min_version") for f in fetches] == [None, None] + [
        v for v in (1, 2, 3) for _ in (0, 1)
    ]
    [complete] = server.of_type("complete")
    assert complete["samples"] == 7 * 8


async def test_an_answer_below_min_version_is_asked_for_again(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: the first round's pushes are acknowledged but not applied at once, as when
    # the step waits for other agents; the step completes a moment later.
    server.work = [{**server.lease_template, "algorithm": "sync", "steps": 3}]

    def hold(msg: dict[str, object]) -> dict[str, object] | None:
        if msg["seq"] != 0:
            return None
        return {
            "type": "push_ack",
            "lease_id": msg["lease_id"],
            "seq": 0,
            "shard": msg["shard"],
            "version": 0,
            "staleness": 0,
            "applied": True,
            "duplicate": False,
            "late": False,
        }

    server.push_reply = hold

    async def complete_the_step_later() -> None:
        # The fake server has no event for fetches: poll what it received.
        while len(server.of_type("fetch")) < 6:  # noqa: ASYNC110
            # the first fetches, then asked again
            await asyncio.sleep(0.01)
        server.versions = [1, 1]

    completer = asyncio.create_task(complete_the_step_later())
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)
    await completer

    # Assert: fetches for version 1 were repeated until the step completed.
    assert code == EXIT_OK
    waits = [f for f in server.of_type("fetch") if f.get("min_version") == 1]
    assert len(waits) >= 4
    second_round = [msg for msg, _ in server.pushes if msg["seq"] == 1]
    assert [p["base_version"] for p in second_round] == [1, 1]
