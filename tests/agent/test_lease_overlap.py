"""Lease-end overlap: the next local-steps lease is claimed while the last round computes,
and starts before the finished lease's last push and ``complete`` are through."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.agent.fakeserver import (
    FakeServer,
    governor,
    heartbeats_for,
    make_agent,
    run_agent,
    until,
)

from downpour_agent import local_training, lookahead
from downpour_agent.connection import EXIT_OK
from downpour_agent.local_steps import replay_local_round
from downpour_agent.protocol import LocalSteps
from downpour_agent.trainer import GradientComputer

pytest.importorskip("keras")

LOCAL = {"inner_optimizer": "sgd-momentum", "inner_learning_rate": 0.05}


def _two_round_leases(server: FakeServer, count: int) -> None:
    """A first lease of one round (an agent's first lease does not claim ahead), then
    ``count`` leases of the same job, each of two rounds; rounds of 8 steps (batch 8)."""
    lease = dict(server.lease_template)
    lease["hyper"] = {**lease["hyper"], "n_fetch": 8, "n_push": 8}
    lease.update(steps=16, algorithm="local-steps", local_steps=LOCAL)
    server.work = [{**lease, "steps": 8}] + [dict(lease) for _ in range(count)]


FIRST = {("lease-1", 0, 0), ("lease-1", 0, 1)}


def _index(server: FakeServer, **match: Any) -> list[int]:
    return [
        i
        for i, msg in enumerate(server.received)
        if all(msg.get(key) == value for key, value in match.items())
    ]


async def test_the_next_lease_starts_before_the_last_push_and_its_round_replays(
    server: FakeServer, tmp_path: Path, model_config: dict[str, Any], shard_body: bytes
) -> None:
    # Prepare: after a first lease, three leases of two rounds; 50 steps a second, so a round
    # (160 ms) outlasts the fetch sent behind its push, as the server's choice of H makes it
    # on a real link. The fake server, as the real one, lets an agent hold two leases, and
    # answers a complete 0.1 s late: a lease claimed before that would find two held.
    _two_round_leases(server, 3)
    server.complete_delay_s = 0.1
    agent = make_agent(server, tmp_path, max_steps_per_second=50.0)

    # Execute
    code = await run_agent(agent)

    # Assert: at each of the two lease ends, the next lease was asked for before the last
    # push went out (and after the lease before had completed: no third lease was asked
    # for), and after that push came the next lease's fetch, then the lease's complete.
    assert code == EXIT_OK
    asks = _index(server, type="request_work")  # the n-th got lease n (checked below)
    for n, (finishing, following) in enumerate((("lease-2", "lease-3"), ("lease-3", "lease-4"))):
        last_push = _index(server, type="push", lease_id=finishing, seq=1)
        complete = _index(server, type="complete", lease_id=finishing)
        fetched = _index(server, type="fetch", lease_id=following)
        assert len(last_push) == 2 and len(complete) == 1
        assert asks[2 + n] < last_push[0]  # claimed ahead
        assert fetched[0] < fetched[1] < last_push[0]  # started up in the last round
        behind = [i for i in fetched if last_push[-1] < i < complete[0]]
        assert len(behind) == 2, (finishing, fetched, last_push, complete)
    # One request per lease: none was refused for a lease still held.
    assert (
        len([ask for ask in asks if ask < _index(server, type="fetch", lease_id="lease-4")[0]]) == 4
    )
    # Every round of every lease applied once, each lease completed with its samples.
    assert server.applied == FIRST | {
        (lease, seq, shard)
        for lease in ("lease-2", "lease-3", "lease-4")
        for seq in (0, 1)
        for shard in (0, 1)
    }
    assert [m["samples"] for m in server.of_type("complete")] == [64, 128, 128, 128]
    assert server.outstanding == {}

    # Lease 3's first round started on its first fetch and rebased onto the fetch
    # behind the last push: its push names that load, and a worker replaying the round from
    # what the server served reproduces the pseudo-gradient (a spot check passes).
    first = [
        (msg, t) for msg, t in server.pushes if msg["lease_id"] == "lease-3" and msg["seq"] == 0
    ]
    base = {msg["shard"]: msg["base_version"] for msg, _ in first}
    loads = first[0][0]["loads"]
    assert len(loads) == 1 and 0 < loads[0][0] < 8
    assert all(loads[0][1][shard] == base[shard] + 1 for shard in (0, 1))  # lease-2's last push
    pushed = {name: value for _, tensors in first for name, value in tensors.items()}
    with np.load(io.BytesIO(shard_body)) as archive:
        x, y = archive["x"], archive["y"]
    worker = GradientComputer(model_config, "sparse_categorical_crossentropy")
    worker.set_weights({k: v for s in (0, 1) for k, v in server.served[(s, base[s])].items()})
    arrived = {k: v for s in (0, 1) for k, v in server.served[(s, loads[0][1][s])].items()}
    expected, samples = replay_local_round(
        worker,
        LocalSteps(LOCAL["inner_optimizer"], LOCAL["inner_learning_rate"]),
        x,
        y,
        batch_size=8,
        seed=42,
        first_step=0,
        steps=8,
        loads=[(loads[0][0], arrived)],
    )
    assert samples == 64
    for name, value in expected.items():
        np.testing.assert_allclose(pushed[name], value, rtol=1e-5, atol=1e-6)


async def test_a_stop_while_the_next_lease_is_claimed_hands_both_back(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: after a first lease, two more; slow steps, so the stop lands in lease 2 (its
    # last two rounds, in which lease 3 is claimed).
    _two_round_leases(server, 2)
    agent = make_agent(server, tmp_path, max_steps_per_second=10.0)
    run = asyncio.create_task(agent.run())

    # Execute: stop once lease 3 has been claimed ahead.
    async with asyncio.timeout(30):
        while len(server.of_type("request_work")) < 3:  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # its answer is on the way back
    steps_then, lease_then = agent.stats.steps_done, agent.stats.lease_id
    await agent.shutdown()
    code = await asyncio.wait_for(run, 30)

    # Assert: the stop came in lease 2; no lease is left on the server: lease 2
    # and lease 3, claimed ahead, were both given back.
    assert code == EXIT_OK
    assert lease_then == "lease-2" and steps_then < 16
    returned = {m["lease_id"] for m in server.of_type("return_lease")}
    assert returned == {"lease-2", "lease-3"}
    assert [m["lease_id"] for m in server.of_type("complete")] == ["lease-1"]
    assert server.outstanding == {}


async def test_a_connection_cut_after_the_handover_loses_nothing_and_applies_nothing_twice(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: after a first lease, two more; the server closes the first connection right
    # after lease 2's last push (six push frames: three rounds of two shards), so its complete and
    # lease 3's fetch behind the push are never answered.
    _two_round_leases(server, 2)
    server.drop_after_pushes = 6
    agent = make_agent(server, tmp_path, max_steps_per_second=50.0)

    # Execute
    with caplog.at_level("INFO", logger="downpour_agent"):
        code = await run_agent(agent)

    # Assert: the handover had happened (lease 3 was claimed ahead); after the
    # reconnect both leases were resumed and completed, every round applied exactly once.
    assert code == EXIT_OK and server.connections == 2
    assert {m["lease_id"] for m in server.of_type("resume")} == {"lease-2", "lease-3"}
    assert "lease lease-3 starts while lease lease-2's last push goes out" in caplog.text
    assert server.applied == FIRST | {
        (lease, seq, shard)
        for lease in ("lease-2", "lease-3")
        for seq in (0, 1)
        for shard in (0, 1)
    }
    sent = [(m["lease_id"], m["seq"], m["shard"]) for m, _ in server.pushes]
    assert len(sent) == len(set(sent))  # no round was sent twice (none applied twice)
    completed = sorted(m["lease_id"] for m in server.of_type("complete"))
    assert completed == ["lease-1", "lease-2", "lease-3"]
    assert [m["samples"] for m in server.of_type("complete")] == [64, 128, 128]
    assert server.outstanding == {} and server.orphaned == {}


async def test_stop_after_this_unit_with_the_next_lease_claimed_completes_it_and_returns_that(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: after a first lease, two more; the donor's governor, which never pauses.
    _two_round_leases(server, 2)
    gov = governor()
    agent = make_agent(
        server, tmp_path, governor=gov, max_steps_per_second=50.0, exit_when_idle_s=None
    )
    run = asyncio.create_task(agent.run())

    # Execute: "stop after this unit" once lease 3 has been claimed ahead and started up
    # (its first fetch went out) while lease 2's last round computes.
    async with asyncio.timeout(30):
        while not _index(server, type="fetch", lease_id="lease-3"):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    on_lease_then = agent.stats.lease_id
    gov.stop_after_unit()
    code = await asyncio.wait_for(run, 30)

    # Assert: the unit the agent was on, lease 2, completed, with no handover (the agent was
    # stopping); lease 3, claimed ahead, was handed back; nothing is left on the server.
    assert code == EXIT_OK and on_lease_then == "lease-2"
    assert [m["lease_id"] for m in server.of_type("complete")] == ["lease-1", "lease-2"]
    last_push = _index(server, type="push", lease_id="lease-2", seq=1)
    assert [i for i in _index(server, type="fetch", lease_id="lease-3") if i > last_push[0]] == []
    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-3"]
    assert server.outstanding == {} and len(server.work) == 0


async def test_a_stop_after_the_handover_lets_the_last_complete_through_and_returns_the_next(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: after a first lease, two more; completes answered 0.3 s late, so the stop
    # comes while lease 2's complete, sent behind its last push, is on its way.
    _two_round_leases(server, 2)
    server.complete_delay_s = 0.3
    agent = make_agent(server, tmp_path, max_steps_per_second=50.0, exit_when_idle_s=None)
    run = asyncio.create_task(agent.run())

    # Execute: stop once lease 3 has started on the handover (its fetch behind lease 2's
    # last push went out).
    async with asyncio.timeout(30):
        while True:  # polls the fake server's record: no event is set for a fetch
            last_push = _index(server, type="push", lease_id="lease-2", seq=1)
            behind = [
                i
                for i in _index(server, type="fetch", lease_id="lease-3")
                if last_push and i > last_push[-1]
            ]
            if behind:
                break
            await asyncio.sleep(0.01)
    await agent.shutdown()
    code = await asyncio.wait_for(run, 30)

    # Assert: lease 2's complete went through and the agent saw it acknowledged; lease 3
    # went back; nothing is left on the server.
    assert code == EXIT_OK
    assert [m["lease_id"] for m in server.of_type("complete")] == ["lease-1", "lease-2"]
    assert agent.stats.leases_completed == 2
    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-3"]
    assert server.outstanding == {}


def _then_another_job(server: FakeServer) -> None:
    """One more lease, of another job, for the agent to move on to."""
    other = {**server.work[-1], "job_id": "other-job", "steps": 8}
    server.work.append(other)


def _named(messages: list[dict[str, Any]], lease_id: str) -> set[str]:
    """The types of the messages that name ``lease_id``."""
    return {m["type"] for m in messages if m.get("lease_id") == lease_id}


def _moved_on(server: FakeServer, completed: list[str]) -> None:
    """The agent completed ``completed`` (in order), the other job's lease last, and left
    nothing held or unissued on the server."""
    assert [m["lease_id"] for m in server.of_type("complete")] == completed
    assert server.outstanding == {} and server.work == []


def _agent_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name.startswith("downpour_agent") and r.levelno >= logging.WARNING
    ]


@pytest.mark.parametrize("event", ["job_paused", "job_finished"])
async def test_a_job_that_ends_while_its_next_lease_is_claimed_forgets_that_lease(
    server: FakeServer, tmp_path: Path, event: str
) -> None:
    # Prepare: after a first lease, a lease of three rounds and one more of the same job,
    # then a lease of another job. The job ends (as the server pauses or finishes it) when
    # lease 2's second round's push arrives: lease 3 was claimed in that round (one of the
    # last two) and waits for the last one to start up.
    _two_round_leases(server, 2)
    server.work[1]["steps"] = 24
    _then_another_job(server)
    server.end_job_on_push = ("lease-2", 1, event)
    agent = make_agent(server, tmp_path, max_steps_per_second=50.0)

    # Execute
    code = await run_agent(agent)

    # Assert: lease 3 had been claimed before the job ended, and the agent never named it
    # again: no fetch, push, complete or return for a lease the server already took back.
    # It moved on to the other job's lease and completed it; nothing is left on the server.
    assert code == EXIT_OK and server.ended_at is not None
    assert _index(server, type="request_work")[2] < server.ended_at
    assert server.ended == {"lease-2": event, "lease-3": event}
    after = server.received[server.ended_at + 1 :]
    assert _named(after, "lease-3") <= {"heartbeat"}, after
    _moved_on(server, ["lease-1", "lease-4"])


async def test_a_job_paused_at_the_handover_stops_the_lease_it_was_handed_to(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: as above, but the job is paused when lease 2's last push arrives: lease 3
    # has started on the handover, with its fetch behind that push.
    _two_round_leases(server, 2)
    _then_another_job(server)
    server.end_job_on_push = ("lease-2", 1, "job_paused")
    agent = make_agent(server, tmp_path, max_steps_per_second=50.0)

    # Execute
    with caplog.at_level("INFO", logger="downpour_agent"):
        code = await run_agent(agent)

    # Assert: lease 3 had been handed over to (its first fetch went out before the push);
    # after the pause it pushed nothing and was neither completed nor returned. Lease 2's
    # complete, sent behind its push, was refused with the pause, which the donor reads as
    # the job's course, not as a fault. The agent completed the other job's lease.
    assert code == EXIT_OK and server.ended_at is not None
    assert _index(server, type="fetch", lease_id="lease-3")[0] < server.ended_at
    after = server.received[server.ended_at + 1 :]
    named = _named(after, "lease-3")
    assert named <= {"fetch", "heartbeat"}, named
    _moved_on(server, ["lease-1", "lease-2", "lease-4"])
    assert agent.stats.leases_completed == 2
    assert "lease lease-2 ended with its job" in caplog.text
    assert not _agent_warnings(caplog), caplog.text


async def test_a_pause_while_the_next_lease_is_claimed_keeps_both_and_loses_nothing(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: after a first lease, two more; the donor's governor.
    _two_round_leases(server, 2)
    gov = governor()
    agent = make_agent(server, tmp_path, governor=gov, max_steps_per_second=50.0)
    run = asyncio.create_task(agent.run())

    # Execute: the donor pauses once lease 3 is claimed ahead, for five of its heartbeats.
    await until(lambda: lookahead.claimed_lease_id(agent) == "lease-3")
    gov.pause()
    await until(lambda: agent.stats.state == "paused")
    steps_when_paused, beats = agent.stats.steps_done, heartbeats_for(server, "lease-3")
    await until(lambda: heartbeats_for(server, "lease-3") >= beats + 5)
    steps_after_pause = agent.stats.steps_done
    gov.resume()
    code = await asyncio.wait_for(run, 60)

    # Assert: nothing computed while paused; the claimed lease was kept alive by heartbeats
    # and, like the one in hand, completed in full after the pause; each round applied once.
    assert code == EXIT_OK
    assert steps_after_pause == steps_when_paused
    assert server.of_type("return_lease") == []
    assert [m["samples"] for m in server.of_type("complete")] == [64, 128, 128]
    assert server.applied == FIRST | {
        (lease, seq, shard)
        for lease in ("lease-2", "lease-3")
        for seq in (0, 1)
        for shard in (0, 1)
    }
    sent = [(m["lease_id"], m["seq"], m["shard"]) for m, _ in server.pushes]
    assert len(sent) == len(set(sent))
    assert server.outstanding == {}


async def test_a_pause_that_outlasts_the_leases_hands_back_both_the_current_and_the_claimed(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: as above, but leases live 1 s (the pause outlasts them); the agent stays up
    # after the pause, with no work left.
    _two_round_leases(server, 2)
    for lease in server.work:
        lease["expires_in_s"] = 1.0
    gov = governor()
    agent = make_agent(server, tmp_path, governor=gov, max_steps_per_second=50.0)
    run = asyncio.create_task(agent.run())

    # Execute: the donor pauses once lease 3 is claimed ahead, until both leases are back.
    await until(lambda: lookahead.claimed_lease_id(agent) == "lease-3")
    gov.pause()
    await until(lambda: len(server.of_type("return_lease")) == 2)
    gov.resume()
    code = await asyncio.wait_for(run, 60)

    # Assert: lease 2 went back after its pause outlasted it, then lease 3, which never
    # computed (it pushed nothing); nothing is left on the server.
    assert code == EXIT_OK
    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-2", "lease-3"]
    assert [m["lease_id"] for m in server.of_type("complete")] == ["lease-1"]
    assert [m for m, _ in server.pushes if m["lease_id"] == "lease-3"] == []
    assert agent.stats.leases_returned == 2
    assert server.outstanding == {}


async def test_a_job_that_ends_while_the_handover_waits_for_the_next_leases_fetch_moves_on(
    server: FakeServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: as above; lease 3's first fetch goes unanswered until lease 2's last round
    # has ended and the handover waits for that fetch. Then the job ends: the agent hears
    # job_paused, and the fetch is refused.
    _two_round_leases(server, 2)
    _then_another_job(server)
    handover_waits = asyncio.Event()
    take_first_fetch = local_training.take_first_fetch

    async def watched(*args: Any, **kwargs: Any) -> Any:
        handover_waits.set()
        return await take_first_fetch(*args, **kwargs)

    monkeypatch.setattr(local_training, "take_first_fetch", watched)
    server.end_job_on_fetch = ("lease-3", "job_paused", handover_waits)
    agent = make_agent(server, tmp_path, max_steps_per_second=50.0)

    # Execute
    with caplog.at_level("INFO", logger="downpour_agent"):
        code = await run_agent(agent)

    # Assert: the handover failed quietly and the agent moved on to the other job on the
    # same connection (the wait for the fetch was not cancelled under the lease's loop,
    # which would end the connection); lease 3 was never started or handed back.
    assert code == EXIT_OK and server.ended_at is not None
    assert server.connections == 1
    assert "no handover to lease lease-3" in caplog.text
    assert server.ended == {"lease-2": "job_paused", "lease-3": "job_paused"}
    named = _named(server.received, "lease-3")
    assert named <= {"fetch", "heartbeat"}, named
    _moved_on(server, ["lease-1", "lease-4"])
    assert not _agent_warnings(caplog), caplog.text


async def test_a_job_that_ends_as_its_next_lease_is_claimed_forgets_that_lease(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: as above, but the job ends right as lease 3 is claimed ahead: the lease and
    # job_paused go out back to back, and the agent may read both before the claim's task
    # has taken the lease.
    _two_round_leases(server, 2)
    _then_another_job(server)
    server.end_job_after_lease = ("lease-3", "job_paused")
    agent = make_agent(server, tmp_path, max_steps_per_second=50.0)

    # Execute
    code = await run_agent(agent)

    # Assert: lease 3 was never started or handed back; the agent moved on to the other
    # job's lease and completed it.
    assert code == EXIT_OK and server.ended_at is not None
    assert server.ended == {"lease-2": "job_paused", "lease-3": "job_paused"}
    named = _named(server.received, "lease-3")
    assert named <= {"heartbeat"}, named
    _moved_on(server, ["lease-1", "lease-4"])
