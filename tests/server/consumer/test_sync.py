"""A synchronous job over the agent socket, in process: leases for N + b agents, first N
gradients win, late ones are acknowledged and credited, a waiting fetch, the timeout."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from channels.db import database_sync_to_async
from tests.server.consumer.client import (
    REPLY_TIMEOUT_S,
    Agents,
    Socket,
    gradients,
    round_samples,
)
from tests.server.helpers import job_params

from downpour.agents import syncwait
from downpour.training import store
from downpour.training.actions import control
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.models import Contribution, Job

pytestmark = pytest.mark.django_db(transaction=True)


def waiting_fetches() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if "_fetch_when_ready" in repr(t)]


async def two_sync_leases(
    alice: Any, dataset: Any, agents: Agents
) -> tuple[Socket, Socket, dict[str, Any], dict[str, Any]]:
    """A sync job (N = 2, b = 1) and two agents, each holding one of its leases."""
    await database_sync_to_async(sync_job)(alice, dataset)
    first, second = await agents(2)
    return first, second, await first.lease(), await second.lease()


def sync_job(alice: Any, dataset: Any, **rule: Any) -> Job:
    params = {"sync_workers": 2, "sync_backups": 1, "sync_step_timeout_s": 30.0, **rule}
    job = submit_job(
        alice, dataset, job_params(algorithm="sync", spot_check_fraction=0.0, **params)
    )
    assert start_job(job)
    job.refresh_from_db()
    return job


async def test_a_sync_job_leases_to_n_plus_b_agents_one_lease_each(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    await database_sync_to_async(sync_job)(alice, dataset, sync_workers=1, sync_backups=1)
    first, second, third = await agents(3)

    lease = await first.lease()
    again = await first.ask({"type": "request_work", "ref": 2})
    other = await second.lease()
    refused = await third.ask({"type": "request_work", "ref": 3})

    assert lease["algorithm"] == "sync" and other["algorithm"] == "sync"
    assert again["type"] == "no_work"  # one lease of a sync job per agent
    assert refused["type"] == "no_work"  # N + b = 2 agents already hold one


async def test_the_first_n_gradients_step_the_shard_and_a_late_one_is_dropped_and_credited(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    job = await database_sync_to_async(sync_job)(alice, dataset)
    sockets = await agents(3)
    leases = [await s.lease() for s in sockets]

    acks = [
        await s.push(lease, 0, gradients(lease, 0, 0.1), ref=i)
        for i, (s, lease) in enumerate(zip(sockets, leases, strict=True))
    ]

    assert [(a["applied"], a["late"], a["version"]) for a in acks] == [
        (True, False, 0),
        (True, False, 1),
        (False, True, 1),
    ]
    assert acks[2]["duplicate"] is False and acks[2]["staleness"] == 1
    replay = await sockets[2].push(leases[2], 0, gradients(leases[2], 0, 0.1))
    assert (replay["applied"], replay["late"], replay["duplicate"]) == (False, True, True)
    counts = store.job_sync(job).counts()  # type: ignore[union-attr]
    assert (counts.steps, counts.timeouts, counts.late) == (1, 0, 1)

    # The late donor is credited for the round, once, like the others.
    await sockets[2].ask({"type": "heartbeat", "ref": "flush"})
    for s in sockets:
        await s.communicator.disconnect(timeout=REPLY_TIMEOUT_S)
    credits = await database_sync_to_async(
        lambda: sorted(Contribution.objects.filter(job=job).values_list("credit", flat=True))
    )()
    assert credits == [float(round_samples(leases[0], 0))] * 3


async def test_a_fetch_with_min_version_waits_for_the_step_without_blocking_the_socket(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    first, second, lease_a, lease_b = await two_sync_leases(alice, dataset, agents)
    await first.push(lease_a, 0, gradients(lease_a, 0))

    await first.send(
        {"type": "fetch", "lease_id": lease_a["lease_id"], "shard": 0, "min_version": 1, "ref": 9}
    )
    heartbeat = await first.ask({"type": "heartbeat", "ref": "meanwhile"})
    assert heartbeat["type"] == "heartbeat_ack"  # answered while the fetch waits
    await second.push(lease_b, 0, gradients(lease_b, 0))
    msg, tensors = await first.recv()

    assert (msg["type"], msg["version"], msg["ref"]) == ("params", 1, 9)
    assert [v["name"] for v in lease_a["layout"][0]] == list(tensors)


async def test_a_fetch_waits_no_further_than_the_next_step(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    # Held for a version no step is about to write, it would poll for 15 s; it is answered
    # at the next step instead (the agent asks again if it wants more). Not refused: an
    # honest agent holds a version ahead of the shard after a restore took the shard back.
    first, second, lease_a, lease_b = await two_sync_leases(alice, dataset, agents)
    await first.push(lease_a, 0, gradients(lease_a, 0))

    await first.send(
        {"type": "fetch", "lease_id": lease_a["lease_id"], "shard": 0, "min_version": 50, "ref": 5}
    )
    heartbeat = await first.ask({"type": "heartbeat", "ref": "meanwhile"})
    # Answered after the fetch was read, and so after its target (version 1) was fixed.
    assert heartbeat["type"] == "heartbeat_ack"  # it waits (the step is not there yet)
    await second.push(lease_b, 0, gradients(lease_b, 0))  # the step's N-th: version 1
    started = time.monotonic()
    msg, _ = await first.recv()

    assert (msg["type"], msg["version"], msg["ref"]) == ("params", 1, 5)
    assert time.monotonic() - started < 5  # not held to the 15 s limit


async def test_a_waiting_fetch_is_refused_at_once_when_the_job_is_paused(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    # A fetch waiting for a step of a job that is then paused would poll the store for up
    # to 15 s. It stops at its next poll and is refused with the job's code.
    job = await database_sync_to_async(sync_job)(alice, dataset)
    first, _ = await agents(2)
    lease = await first.lease()
    await first.push(lease, 0, gradients(lease, 0))
    await first.send(
        {"type": "fetch", "lease_id": lease["lease_id"], "shard": 0, "min_version": 1, "ref": 7}
    )
    heartbeat = await first.ask({"type": "heartbeat", "ref": "meanwhile"})
    assert heartbeat["type"] == "heartbeat_ack" and len(waiting_fetches()) == 1

    assert await database_sync_to_async(control.pause_job)(job)
    announced, _ = await first.recv()

    started = time.monotonic()
    refused, _ = await first.recv()

    assert announced["type"] == "job_paused"
    assert (refused["type"], refused["code"], refused["ref"]) == ("error", "job_paused", 7)
    assert time.monotonic() - started < 5  # not held to the 15 s limit
    assert waiting_fetches() == []


async def test_a_step_that_waits_past_its_timeout_applies_what_arrived(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    job = await database_sync_to_async(sync_job)(alice, dataset, sync_step_timeout_s=0.5)
    (only,) = await agents(1)
    lease = await only.lease()
    started = time.monotonic()
    await only.push(lease, 0, gradients(lease, 0))

    await only.send({"type": "fetch", "lease_id": lease["lease_id"], "shard": 0, "min_version": 1})
    msg, _ = await only.recv()

    assert msg["version"] == 1
    assert 0.5 <= time.monotonic() - started < 5
    counts = store.job_sync(job).counts()  # type: ignore[union-attr]
    assert (counts.steps, counts.timeouts) == (1, 1)


async def test_a_second_gradient_of_one_lease_in_one_step_is_refused(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    await database_sync_to_async(sync_job)(alice, dataset)
    (only,) = await agents(1)
    lease = await only.lease()
    await only.push(lease, 0, gradients(lease, 0), seq=0)

    reply = await only.push(lease, 0, gradients(lease, 0), seq=1, ref=4)

    assert (reply["type"], reply["code"], reply["ref"]) == ("error", "stale_gradient", 4)
    assert "already has a gradient in step 0" in reply["message"]


async def test_a_downpour_lease_names_no_algorithm_and_its_acks_no_late(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    ack = await registered.push(lease, 0, gradients(lease, 0))

    assert "algorithm" not in lease and "late" not in ack
    assert ack["applied"] is True


async def test_waiting_fetches_end_with_the_socket(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    await database_sync_to_async(sync_job)(alice, dataset)
    (only,) = await agents(1)
    lease = await only.lease()
    await only.send({"type": "fetch", "lease_id": lease["lease_id"], "shard": 0, "min_version": 5})
    await asyncio.sleep(0.1)

    await only.communicator.disconnect(timeout=REPLY_TIMEOUT_S)
    await asyncio.sleep(0.1)

    assert all(t.done() for t in waiting_fetches())


async def test_min_version_on_a_downpour_lease_is_refused_and_nothing_waits(
    running_job: Job, registered: Socket
) -> None:
    # A waiting fetch polls the store until it is answered: a downpour agent never needs
    # one, so it is refused before anything waits.
    lease = await registered.lease()

    reply = await registered.ask(
        {"type": "fetch", "lease_id": lease["lease_id"], "shard": 0, "min_version": 10**6, "ref": 3}
    )

    assert (reply["type"], reply["code"], reply["ref"]) == ("error", "bad_message", 3)
    assert "min_version is for sync and sandblaster jobs" in reply["message"]
    assert not waiting_fetches()
    plain = await registered.ask({"type": "fetch", "lease_id": lease["lease_id"], "shard": 0})
    assert plain["type"] == "params"  # the lease is still served


async def test_a_second_waiting_fetch_of_one_shard_is_refused_and_the_first_still_answered(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    first, second, lease_a, lease_b = await two_sync_leases(alice, dataset, agents)
    await first.push(lease_a, 0, gradients(lease_a, 0))
    wait = {"type": "fetch", "lease_id": lease_a["lease_id"], "shard": 0, "min_version": 1}
    await first.send({**wait, "ref": 1})

    refused = await first.ask({**wait, "ref": 2})
    again = await first.ask({**wait, "ref": 3})

    assert [(r["code"], r["ref"]) for r in (refused, again)] == [("rate_limited", 2)] + [
        ("rate_limited", 3)
    ]
    assert "already waiting" in refused["message"]
    await second.push(lease_b, 0, gradients(lease_b, 0))
    msg, _ = await first.recv()
    assert (msg["type"], msg["version"], msg["ref"]) == ("params", 1, 1)
    # Answered, the slot is free again: the next step's fetch of the shard may wait.
    await first.send({**wait, "min_version": 2, "ref": 4})
    heartbeat = await first.ask({"type": "heartbeat", "ref": 5})
    assert (heartbeat["type"], heartbeat["ref"]) == ("heartbeat_ack", 5)
    assert len(waiting_fetches()) == 1


async def test_each_shard_of_a_lease_may_wait_at_once(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    # What an honest sync agent does: one waiting fetch per shard, all at once.
    first, second, lease_a, lease_b = await two_sync_leases(alice, dataset, agents)
    shards = range(len(lease_a["layout"]))
    assert len(shards) == 2
    for shard in shards:
        await first.push(lease_a, shard, gradients(lease_a, shard))
        await first.send(
            {"type": "fetch", "lease_id": lease_a["lease_id"], "shard": shard, "min_version": 1}
            | {"ref": shard}
        )
    heartbeat = await first.ask({"type": "heartbeat", "ref": "meanwhile"})
    assert heartbeat["type"] == "heartbeat_ack"  # neither fetch was refused

    for shard in shards:
        await second.push(lease_b, shard, gradients(lease_b, shard))
    answers = sorted([(await first.recv())[0] for _ in shards], key=lambda m: m["ref"])

    assert [(m["type"], m["shard"], m["version"], m["ref"]) for m in answers] == [
        ("params", 0, 1, 0),
        ("params", 1, 1, 1),
    ]


async def test_a_waiting_fetch_that_fails_unexpectedly_is_answered(
    alice: Any, dataset: Any, agents: Agents, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a Redis outage would fail the poll: the agent hears of it instead of waiting out
    # its own timeout, and the slot is freed.
    await database_sync_to_async(sync_job)(alice, dataset)
    (only,) = await agents(1)
    lease = await only.lease()

    def outage(*args: Any) -> bool:
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(syncwait, "_reached", outage)
    wait = {"type": "fetch", "lease_id": lease["lease_id"], "shard": 0, "min_version": 1}
    reply = await only.ask({**wait, "ref": 7})

    assert (reply["type"], reply["code"], reply["ref"]) == ("error", "internal", 7)
    assert "Redis" not in reply.get("message", "")  # details stay in the server log
    monkeypatch.undo()
    await only.send({**wait, "min_version": 0, "ref": 8})  # already there: answered at once
    msg, _ = await only.recv()
    assert (msg["type"], msg["ref"]) == ("params", 8)
