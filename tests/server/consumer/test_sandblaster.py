"""A Sandblaster job over the agent socket, in process: the coordinator's pass is handed out
as whole units, each unit's first answer is kept and the others are late but credited, a
finished pass moves the store one version, and a straggler gets a backup copy."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from channels.db import database_sync_to_async
from django.utils import timezone
from tests.server.consumer.client import REPLY_TIMEOUT_S, Agents, Socket, gradients
from tests.server.helpers import job_params

from downpour.training import store
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.models import Contribution, Job, Lease, WorkUnit
from downpour.training.sandblaster import coordinate

pytestmark = pytest.mark.django_db(transaction=True)


def sandblaster_job(alice: Any, dataset: Any, units: int = 4, **overrides: Any) -> Job:
    params = job_params(
        algorithm="sandblaster", sandblaster_units=units, spot_check_fraction=0.0, **overrides
    )
    job = submit_job(alice, dataset, params)
    assert start_job(job)
    job.refresh_from_db()
    coordinate(job)  # pass 0: the starting weights, cut into units
    return job


async def answer(socket: Socket, lease: dict[str, Any], value: float = 0.01) -> list[Any]:
    """Push the lease's unit answer for every shard, as an honest agent would."""
    unit = lease["sandblaster"]
    samples = unit["stop"] - unit["start"]
    return [
        await socket.push(
            lease,
            shard,
            gradients(lease, shard, value),
            base_version=unit["version"],
            samples=samples,
            loss=0.7,
        )
        for shard in range(len(lease["layout"]))
    ]


def units_of(job: Job) -> list[WorkUnit]:
    return list(WorkUnit.objects.filter(job=job).order_by("pass_number", "pass_unit"))


async def test_a_pass_is_handed_out_as_whole_units_and_a_claim_never_makes_one(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    # Prepare
    job = await database_sync_to_async(sandblaster_job)(alice, dataset, units=4)
    sockets = await agents(2)

    # Execute: two leases each (the most an agent holds), then one more ask
    leases = [await s.lease() for s in sockets for _ in range(2)]
    more = await sockets[0].ask({"type": "request_work", "ref": 7})

    # Assert
    units = await database_sync_to_async(units_of)(job)
    assert len(units) == 4 and all(u.pass_number == 0 for u in units)
    assert sorted(lease["sandblaster"]["unit"] for lease in leases) == [0, 1, 2, 3]
    assert all(lease["algorithm"] == "sandblaster" for lease in leases)
    assert sum(u["sandblaster"]["stop"] - u["sandblaster"]["start"] for u in leases) == 60
    assert more["type"] == "no_work" and more["retry_after_s"] < 1


async def test_the_first_answer_of_a_unit_counts_and_a_second_copy_is_late_but_credited(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    # Prepare: a unit leased twice (a backup copy, issued by hand here)
    job = await database_sync_to_async(sandblaster_job)(alice, dataset, units=2)
    first, second = await agents(2)
    lease, _ = await first.lease(), await first.lease()
    unit = WorkUnit.objects.filter(id=lease["work_unit_id"])
    await database_sync_to_async(unit.update)(status="pending")
    copy = await second.lease()
    samples = lease["sandblaster"]["stop"] - lease["sandblaster"]["start"]

    # Execute
    winner = await answer(first, lease)
    loser = await answer(second, copy)
    again = await answer(first, lease)

    # Assert
    assert copy["sandblaster"] == lease["sandblaster"]
    assert all(ack["applied"] and not ack["late"] for ack in winner)
    assert all(ack["late"] and not ack["applied"] and not ack["duplicate"] for ack in loser)
    assert all(ack["duplicate"] for ack in again)
    for socket in (first, second):
        await socket.ask({"type": "heartbeat", "ref": "flush"})
        await socket.communicator.disconnect(timeout=REPLY_TIMEOUT_S)
    credits = await database_sync_to_async(
        lambda: sorted(Contribution.objects.filter(job=job).values_list("credit", flat=True))
    )()
    assert credits == [float(samples)] * 2  # each donor did the unit's work


async def test_a_unit_larger_than_the_batch_counts_and_credits_all_its_samples(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    # Prepare: 30-sample units at batch 8, and a second copy of the first unit
    job = await database_sync_to_async(sandblaster_job)(alice, dataset, units=2, batch_size=8)
    first, second = await agents(2)
    lease = await first.lease()
    unit = WorkUnit.objects.filter(id=lease["work_unit_id"])
    await database_sync_to_async(unit.update)(status="pending")
    copy = await second.lease()
    samples = lease["sandblaster"]["stop"] - lease["sandblaster"]["start"]

    # Execute
    applied = await answer(first, lease)
    late = await answer(second, copy)
    for socket in (first, second):
        await socket.ask({"type": "heartbeat", "ref": "flush"})
        await socket.communicator.disconnect(timeout=REPLY_TIMEOUT_S)

    # Assert: each donor is credited the unit's 30 samples, not one batch of 8
    assert samples == 30
    assert all(ack["applied"] for ack in applied) and all(ack["late"] for ack in late)
    credits = await database_sync_to_async(
        lambda: sorted(Contribution.objects.filter(job=job).values_list("credit", flat=True))
    )()
    assert credits == [30.0, 30.0]
    await database_sync_to_async(job.refresh_from_db)()
    assert job.samples_done == 60


async def test_a_complete_after_answering_only_shard_0_leaves_the_unit_to_be_done_again(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    # Prepare: an agent answers its unit in shard 0 only
    await database_sync_to_async(sandblaster_job)(alice, dataset, units=2)
    (only,) = await agents(1)
    lease = await only.lease()
    unit = lease["sandblaster"]
    samples = unit["stop"] - unit["start"]
    ack = await only.push(
        lease, 0, gradients(lease, 0), base_version=unit["version"], samples=samples, loss=0.5
    )
    assert ack["applied"]

    # Execute
    complete = {"type": "complete", "lease_id": lease["lease_id"], "samples": samples, "ref": 5}
    reply = await only.ask(complete)

    # Assert: the lease ends, but the unit waits for a whole answer
    assert reply["type"] == "complete_ack"
    row = await database_sync_to_async(WorkUnit.objects.get)(id=lease["work_unit_id"])
    assert row.status == WorkUnit.Status.PENDING


async def test_an_answer_computed_on_another_version_is_late(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    await database_sync_to_async(sandblaster_job)(alice, dataset, units=2)
    (only,) = await agents(1)
    lease = await only.lease()
    unit = lease["sandblaster"]

    ack = await only.push(
        lease,
        0,
        gradients(lease, 0),
        base_version=unit["version"] + 1,
        samples=unit["stop"] - unit["start"],
        loss=0.5,
    )

    assert (ack["applied"], ack["late"]) == (False, True)


async def test_a_finished_pass_moves_every_shard_one_version_and_opens_the_next(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    # Prepare
    job = await database_sync_to_async(sandblaster_job)(alice, dataset, units=2)
    (only,) = await agents(1)
    leases = [await only.lease(), await only.lease()]
    before = await database_sync_to_async(lambda: store.job_store(job).versions())()
    _, weights_before = await only.fetch(leases[0], 0)

    # Execute
    for lease in leases:
        await answer(only, lease, value=0.5)
    completed = await database_sync_to_async(coordinate)(job)
    repeated = await database_sync_to_async(coordinate)(job)

    # Assert: one step of the line search along -g, written once
    after = await database_sync_to_async(lambda: store.job_store(job).versions())()
    assert (completed, repeated) == (1, 0)
    assert after == [v + 1 for v in before]
    _, weights_after = await only.fetch(leases[0], 0)
    for name, value in weights_after.items():
        assert np.all(value < weights_before[name])  # a positive gradient: every weight drops
    units = await database_sync_to_async(units_of)(job)
    assert [(u.pass_number, u.pinned_version) for u in units[2:]] == [(1, after[0])] * 2
    await database_sync_to_async(job.refresh_from_db)()
    assert job.sandblaster_progress["pass"] == 1
    assert job.sandblaster_progress["iterations"] == 0  # the first trial awaits its pass


async def test_an_idle_agent_gets_a_backup_copy_of_the_passs_straggler(
    alice: Any, dataset: Any, agents: Agents
) -> None:
    # Prepare: the fast agent finished a unit in ~0 s; the straggler's lease is 30 s old
    job = await database_sync_to_async(sandblaster_job)(alice, dataset, units=2)
    slow, fast = await agents(2)
    straggling = await slow.lease()
    done = await fast.lease()
    await answer(fast, done)
    samples = done["sandblaster"]["stop"] - done["sandblaster"]["start"]
    complete = {"type": "complete", "lease_id": done["lease_id"], "samples": samples, "ref": 3}
    assert (await fast.ask(complete))["type"] == "complete_ack"
    await database_sync_to_async(Lease.objects.filter(id=straggling["lease_id"]).update)(
        issued_at=timezone.now() - timedelta(seconds=30)
    )

    # Execute
    backup = await fast.lease()

    # Assert
    assert backup["sandblaster"] == straggling["sandblaster"]
    await database_sync_to_async(job.refresh_from_db)()
    assert job.sandblaster_backups == 1
    await answer(fast, backup)
    complete = {"type": "complete", "lease_id": backup["lease_id"], "samples": samples, "ref": 4}
    assert (await fast.ask(complete))["type"] == "complete_ack"
    row = await database_sync_to_async(Lease.objects.get)(id=straggling["lease_id"])
    assert row.status == Lease.Status.SUPERSEDED
