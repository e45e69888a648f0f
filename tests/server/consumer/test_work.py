"""The agent socket in process: work, pushes, lease ends, server events, restarts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from channels.db import database_sync_to_async
from django.utils import timezone
from tests.server.consumer.client import (
    REPLY_TIMEOUT_S,
    Socket,
    forget_backends,
    gradients,
    lease_row,
    open_socket,
    push_every_round,
)
from tests.server.helpers import job_params

from downpour.agents import push
from downpour.agents.consumers import STORE_NOT_READY
from downpour.agents.limits import limits
from downpour.donors.models import Agent
from downpour.paramstore import DEFAULT_MAX_GRAD_NORM
from downpour.training import store
from downpour.training.actions.jobs import finish_job, start_job, submit_job
from downpour.training.actions.leases import reap_expired_leases
from downpour.training.actions.recovery import checkpoint_job, checkpoint_running_jobs
from downpour.training.models import Job, Lease, WorkUnit
from downpour_agent.protocol import (
    ERROR_TEXTS,
    CloseCode,
    ErrorCode,
)

pytestmark = pytest.mark.django_db(transaction=True)

# --- work -------------------------------------------------------------------------------


async def test_no_running_job_means_no_work(registered: Socket) -> None:
    reply = await registered.ask({"type": "request_work", "ref": 2})
    assert reply == {
        "type": "no_work",
        "retry_after_s": 2.0,
        "reason": "no_jobs",
        "message": "no job is running",
        "ref": 2,
    }


async def test_request_work_leases_a_unit_described_by_the_lease_message(
    running_job: Job, registered: Socket, settings: Any
) -> None:
    lease = await registered.lease()
    row = await lease_row(lease["lease_id"])
    assert lease["ref"] == 1
    assert lease["job_id"] == str(running_job.id) and lease["work_unit_id"] == str(row.unit_id)
    assert lease["steps"] == row.unit.steps and lease["seed"] == row.unit.seed
    assert lease["model"] == running_job.model_config and lease["loss"] == running_job.loss
    assert lease["hyper"] == {
        "batch_size": 32,
        "n_fetch": 1,
        "n_push": 1,
        "learning_rate": 0.05,
        "compression": "none",
    }
    assert lease["dataset"]["url"] == f"/api/agent/shards/{row.unit.shard_id}/"
    assert len(lease["layout"]) == 2 and all(lease["layout"])
    assert lease["expires_in_s"] == settings.LEASE_TTL_S
    assert row.status == Lease.Status.ACTIVE


async def test_fetch_answers_a_params_frame_with_the_shards_weights(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    await registered.send({"type": "fetch", "lease_id": lease["lease_id"], "shard": 1, "ref": 8})
    msg, tensors = await registered.recv()
    assert msg == {
        "type": "params",
        "lease_id": lease["lease_id"],
        "shard": 1,
        "version": 0,
        "ref": 8,
    }
    version, weights = store.job_store(running_job).fetch(1)
    assert version == 0 and weights.keys() == tensors.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(tensors[name], value)
    assert [v["name"] for v in lease["layout"][1]] == list(tensors)


async def test_fetch_of_a_shard_outside_the_layout_gets_unknown_shard(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    reply = await registered.ask(
        {"type": "fetch", "lease_id": lease["lease_id"], "shard": 2, "ref": 1}
    )
    assert (reply["code"], reply["ref"]) == ("unknown_shard", 1)


async def test_fetch_of_an_unknown_lease_gets_unknown_lease(
    running_job: Job, registered: Socket
) -> None:
    reply = await registered.ask(
        {"type": "fetch", "lease_id": "00000000-0000-4000-8000-000000000000", "shard": 0}
    )
    assert reply["code"] == "unknown_lease"
    reply = await registered.ask({"type": "fetch", "lease_id": "not-a-uuid", "shard": 0})
    assert reply["code"] == "unknown_lease"


async def test_a_good_push_is_applied_once_and_its_replay_is_a_duplicate(
    running_job: Job, registered: Socket
) -> None:
    # Prepare
    lease = await registered.lease()
    version, before = await registered.fetch(lease, 0)
    grads = gradients(lease, 0)
    # Execute
    first = await registered.push(lease, 0, grads, seq=5, base_version=version, ref=11)
    replay = await registered.push(lease, 0, grads, seq=5, base_version=version, ref=12)
    # Assert
    assert first == {
        "type": "push_ack",
        "lease_id": lease["lease_id"],
        "seq": 5,
        "shard": 0,
        "version": version + 1,
        "staleness": 0,
        "applied": True,
        "duplicate": False,
        "ref": 11,
    }
    # The replay is measured against the version its own first copy made.
    assert replay == {**first, "staleness": 1, "applied": False, "duplicate": True, "ref": 12}
    after_version, after = await registered.fetch(lease, 0)
    assert after_version == version + 1
    assert any(not np.array_equal(before[k], after[k]) for k in before)


async def test_a_wrong_shape_is_refused_and_nothing_is_applied(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    grads = gradients(lease, 0)
    grads[next(iter(grads))] = np.zeros((3, 3), np.float32)
    reply = await registered.push(lease, 0, grads, ref=1)
    assert (reply["type"], reply["code"], reply["ref"]) == ("error", "wrong_shape", 1)
    assert (await registered.fetch(lease, 0))[0] == 0


async def test_a_missing_tensor_is_refused_as_wrong_shape(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    grads = gradients(lease, 0)
    del grads[next(iter(grads))]
    assert (await registered.push(lease, 0, grads))["code"] == "wrong_shape"


async def test_a_wrong_dtype_is_refused(running_job: Job, registered: Socket) -> None:
    lease = await registered.lease()
    grads = {k: v.astype(np.float64) for k, v in gradients(lease, 1).items()}
    assert (await registered.push(lease, 1, grads))["code"] == "wrong_dtype"


async def test_a_non_finite_gradient_is_refused_and_nothing_is_applied(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    _, before = await registered.fetch(lease, 1)
    grads = gradients(lease, 1)
    grads[next(iter(grads))].flat[0] = np.inf
    reply = await registered.push(lease, 1, grads)
    assert reply["code"] == "non_finite"
    version, after = await registered.fetch(lease, 1)
    assert version == 0
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    await registered.still_usable()


async def test_a_3e38_gradient_is_refused_as_non_finite_and_nothing_is_applied(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0, 3e38), ref=4)
    assert (reply["type"], reply["code"], reply["ref"]) == ("error", "non_finite", 4)
    assert "overflow" in reply["message"]
    assert (await registered.fetch(lease, 0))[0] == 0
    await registered.still_usable()


def _accumulator_growth(job: Job, shard: int) -> float:
    """How much the shard's sum of squared gradients grew from its initial 0.1 each."""
    accumulators = store.job_store(job).snapshot()[shard].accumulators.astype(np.float64)
    return float(accumulators.sum()) - 0.1 * accumulators.size


async def test_a_huge_gradient_is_clipped_to_the_jobs_default_norm(
    running_job: Job, registered: Socket
) -> None:
    assert running_job.max_grad_norm == DEFAULT_MAX_GRAD_NORM
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0, 1e18))
    assert reply["applied"]
    grown = await database_sync_to_async(_accumulator_growth)(running_job, 0)
    assert grown == pytest.approx(DEFAULT_MAX_GRAD_NORM**2, rel=1e-4)


async def test_a_base_version_ahead_of_the_shard_is_refused_as_stale(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0), base_version=5)
    assert reply["code"] == "stale_gradient"
    assert (await registered.fetch(lease, 0))[0] == 0


async def test_a_push_older_than_max_staleness_is_refused_as_stale(
    alice: Any, dataset: Any, registered: Socket
) -> None:
    # Prepare: a job that accepts no staleness at all, and one push that moves shard 0 on.
    job = await database_sync_to_async(submit_job)(
        alice, dataset, job_params(max_staleness=0, spot_check_fraction=0.0)
    )
    assert await database_sync_to_async(start_job)(job)
    lease = await registered.lease()
    assert (await registered.push(lease, 0, gradients(lease, 0), seq=0))["applied"]
    # Execute
    reply = await registered.push(lease, 0, gradients(lease, 0), seq=1, base_version=0)
    # Assert
    assert reply["code"] == "stale_gradient"
    assert (await registered.fetch(lease, 0))[0] == 1


@pytest.mark.parametrize(
    "loads",
    [
        pytest.param([[0, [0, 0]]], id="more-than-n-push-minus-one"),
    ],
)
async def test_bad_loads_are_refused_as_bad_message(
    running_job: Job, registered: Socket, loads: Any
) -> None:
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0), loads=loads, ref=3)
    assert reply == {
        "type": "error",
        "code": "bad_message",
        "message": (
            "push: loads must be at most n_push - 1 pairs [step offset, [a version per shard]]"
        ),
        "ref": 3,
    }
    assert (await registered.fetch(lease, 0))[0] == 0


async def test_loads_that_are_not_a_list_are_refused(running_job: Job, registered: Socket) -> None:
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0), loads="0,0")
    assert reply["code"] == "bad_message" and "loads" in reply["message"]


@pytest.mark.parametrize(
    "loads",
    [
        pytest.param([[1, [0]]], id="a-version-too-few"),
        pytest.param([[1, [0, -1]]], id="a-negative-version"),
        pytest.param([[True, [0, 0]]], id="a-bool-offset"),
        pytest.param([[1, [0, 0], 2]], id="not-a-pair"),
    ],
)
async def test_loads_of_the_wrong_form_are_refused(
    alice: Any, dataset: Any, registered: Socket, loads: Any
) -> None:
    job = await database_sync_to_async(submit_job)(
        alice, dataset, job_params(n_push=3, spot_check_fraction=0.0)
    )
    assert await database_sync_to_async(start_job)(job)
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0), loads=loads)
    assert reply["code"] == "bad_message" and reply["message"].startswith("push: loads")
    good = await registered.push(lease, 0, gradients(lease, 0), loads=[[1, [0, 0]]])
    assert good["type"] == "push_ack" and good["applied"]


async def test_a_push_on_a_lease_of_another_agent_is_refused(
    running_job: Job, registered: Socket, token: str
) -> None:
    lease = await registered.lease()
    communicator, _, _ = await open_socket(token)
    other = Socket(communicator)
    assert (await other.register("pc-2"))["type"] == "registered"
    assert (await other.push(lease, 0, gradients(lease, 0)))["code"] == "lease_not_yours"
    await other.still_usable()
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)


async def test_a_push_on_an_expired_lease_is_refused(
    running_job: Job, registered: Socket, token: str
) -> None:
    # Prepare: the lease expires and the reaper takes it back.
    lease = await registered.lease()
    await database_sync_to_async(
        lambda: Lease.objects.filter(id=lease["lease_id"]).update(expires_at=timezone.now())
    )()
    assert await database_sync_to_async(reap_expired_leases)() == 1
    heartbeat = await registered.ask({"type": "heartbeat", "lease_id": lease["lease_id"]})
    assert heartbeat["code"] == "lease_expired"
    # Execute: the same agent on a new socket, whose consumer reads the lease afresh (the
    # old one trusts its copy until the lease's own deadline).
    communicator, _, _ = await open_socket(token)
    again = Socket(communicator)
    assert (await again.register())["type"] == "registered"
    reply = await again.push(lease, 0, gradients(lease, 0))
    # Assert
    assert reply == {
        "type": "error",
        "code": "lease_expired",
        "message": ERROR_TEXTS[ErrorCode.LEASE_EXPIRED],
    }
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)


# --- heartbeat, complete, return --------------------------------------------------------


async def test_a_heartbeat_extends_the_lease_it_names(
    running_job: Job, registered: Socket, settings: Any
) -> None:
    lease = await registered.lease()
    before = (await lease_row(lease["lease_id"])).expires_at
    reply = await registered.ask({"type": "heartbeat", "lease_id": lease["lease_id"], "ref": 4})
    assert reply == {
        "type": "heartbeat_ack",
        "lease_id": lease["lease_id"],
        "expires_in_s": settings.LEASE_TTL_S,
        "ref": 4,
    }
    assert (await lease_row(lease["lease_id"])).expires_at > before


async def test_complete_finishes_the_unit_and_records_the_agents_contribution(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    samples = await push_every_round(registered, lease)
    reply = await registered.ask(
        {"type": "complete", "lease_id": lease["lease_id"], "samples": samples, "ref": 6}
    )
    assert reply == {"type": "complete_ack", "lease_id": lease["lease_id"], "ref": 6}
    row = await lease_row(lease["lease_id"])
    assert row.status == Lease.Status.COMPLETED and row.unit.status == WorkUnit.Status.DONE
    # 20 rounds of one step over 2 shards, batches of 30 (a shard's 30 samples, batch 32).
    assert row.pushes_accepted == 40 and samples == 20 * 30
    job = await database_sync_to_async(Job.objects.get)(id=running_job.id)
    assert job.pushes_accepted == 40 and job.samples_done == samples


async def test_a_heartbeat_that_crossed_its_leases_complete_is_acknowledged_not_refused(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: the agent completes a lease; its heartbeat timer had already named it.
    lease = await registered.lease()
    samples = await push_every_round(registered, lease)
    await registered.send(
        {"type": "complete", "lease_id": lease["lease_id"], "samples": samples, "ref": 1}
    )
    await registered.send({"type": "heartbeat", "lease_id": lease["lease_id"], "ref": 2})
    # Execute
    completed, _ = await registered.recv()
    heartbeat, _ = await registered.recv()
    # Assert: the complete went through and the late heartbeat is a plain ack, no error.
    assert completed == {"type": "complete_ack", "lease_id": lease["lease_id"], "ref": 1}
    assert heartbeat == {"type": "heartbeat_ack", "ref": 2}
    # ...while another agent's heartbeat on a lease it never held is still refused.
    other = await registered.ask({"type": "heartbeat", "lease_id": str(running_job.id), "ref": 3})
    assert other["type"] == "error" and other["ref"] == 3


async def test_a_second_complete_is_refused_and_nothing_is_credited_or_refunded_twice(
    running_job: Job, registered: Socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a worked lease, completed once; claim refunds counted.
    refunds: list[str] = []
    monkeypatch.setattr(limits(), "refund_claim", refunds.append)
    lease = await registered.lease()
    samples = await push_every_round(registered, lease)
    complete = {"type": "complete", "lease_id": lease["lease_id"], "samples": samples}
    assert (await registered.ask({**complete, "ref": 1}))["type"] == "complete_ack"
    before = await database_sync_to_async(Job.objects.get)(id=running_job.id)
    # Execute: the same complete again, as a client that lost the ack might send it.
    again = await registered.ask({**complete, "ref": 2})
    # Assert: refused, and the job's samples, pushes and the refund counted once.
    assert (again["type"], again["code"], again["ref"]) == ("error", "lease_expired", 2)
    after = await database_sync_to_async(Job.objects.get)(id=running_job.id)
    assert (after.samples_done, after.pushes_accepted) == (
        before.samples_done,
        before.pushes_accepted,
    )
    assert after.samples_done == samples
    assert len(refunds) == 1
    await registered.still_usable()


async def test_a_returned_lease_can_neither_be_completed_nor_kept_alive(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: a worked lease, handed back (Ctrl-C) before its complete was sent.
    lease = await registered.lease()
    samples = await push_every_round(registered, lease)
    returned = await registered.ask({"type": "return_lease", "lease_id": lease["lease_id"]})
    assert returned["type"] == "lease_returned", returned
    before = await database_sync_to_async(Job.objects.get)(id=running_job.id)
    # Execute
    heartbeat = await registered.ask({"type": "heartbeat", "lease_id": lease["lease_id"], "ref": 1})
    complete = await registered.ask(
        {"type": "complete", "lease_id": lease["lease_id"], "samples": samples, "ref": 2}
    )
    # Assert: the heartbeat that crossed the return is a plain ack that extends nothing; the
    # complete is refused, and the unit waits in the queue for the next claim. (The pushes
    # were applied, so they count; the unit's next lease trains it again.)
    assert heartbeat == {"type": "heartbeat_ack", "ref": 1}
    assert (complete["type"], complete["code"]) == ("error", "lease_expired"), complete
    row = await lease_row(lease["lease_id"])
    assert row.status == Lease.Status.RETURNED and row.unit.status == WorkUnit.Status.PENDING
    after = await database_sync_to_async(Job.objects.get)(id=running_job.id)
    assert after.samples_done == before.samples_done == samples  # applied pushes, once


async def test_return_lease_puts_the_unit_back_in_the_queue(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    reply = await registered.ask({"type": "return_lease", "lease_id": lease["lease_id"]})
    assert reply == {"type": "lease_returned", "lease_id": lease["lease_id"]}
    row = await lease_row(lease["lease_id"])
    assert row.status == Lease.Status.RETURNED and row.unit.status == WorkUnit.Status.PENDING
    reply = await registered.ask({"type": "fetch", "lease_id": lease["lease_id"], "shard": 0})
    assert reply["code"] == "lease_expired"


# --- server-initiated -------------------------------------------------------------------


async def test_a_finished_job_is_announced_and_its_lease_refused(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    assert await database_sync_to_async(finish_job)(running_job, Job.Status.DONE, "by alice")
    event, _ = await registered.recv()
    assert event == {
        "type": "job_finished",
        "job_id": str(running_job.id),
        "message": f"job {running_job.id} has finished",
    }
    reply = await registered.push(lease, 0, gradients(lease, 0))
    assert (reply["code"], reply["message"]) == (
        "job_finished",
        ERROR_TEXTS[ErrorCode.JOB_FINISHED],
    )


async def test_a_ban_is_announced_and_the_socket_closed_as_forbidden(registered: Socket) -> None:
    agent = await database_sync_to_async(Agent.objects.get)(name="pc-1")
    await database_sync_to_async(push.notify_agent_banned)(str(agent.id), "a spot check failed")
    event, _ = await registered.recv()
    assert event == {
        "type": "error",
        "code": "banned",
        "message": "this agent is banned: a spot check failed",
    }
    assert await registered.closed_with() == CloseCode.FORBIDDEN


# --- a store emptied by a restart -------------------------------------------------------


def restart_the_store() -> None:
    """What a restart of the embedded server does to its in-memory store: empties it."""
    forget_backends()


async def test_a_job_with_a_checkpoint_is_restored_by_the_socket_itself(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: a checkpoint at version 1 of shard 0, then one more push it lacks.
    lease = await registered.lease()
    assert (await registered.push(lease, 0, gradients(lease, 0), seq=0))["applied"]
    await database_sync_to_async(checkpoint_job)(running_job)
    assert (await registered.push(lease, 0, gradients(lease, 0), seq=1, base_version=1))["applied"]
    restart_the_store()
    # Execute
    version, _ = await registered.fetch(lease, 0)
    # Assert
    assert version == 1
    assert store.job_store(running_job).versions() == [1, 0]


async def test_a_job_with_no_checkpoint_waits_for_a_worker_to_restart_it(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: one unit done, then the store is lost with no checkpoint to restore.
    done = await registered.lease()
    samples = await push_every_round(registered, done)
    reply = await registered.ask(
        {"type": "complete", "lease_id": done["lease_id"], "samples": samples}
    )
    assert reply["type"] == "complete_ack"
    lease = await registered.lease()
    restart_the_store()
    # Execute
    reply = await registered.ask(
        {"type": "fetch", "lease_id": lease["lease_id"], "shard": 0, "ref": 2}
    )
    # Assert: a retryable refusal, and the socket restarted nothing (that builds the model).
    assert reply == {"type": "error", "code": "unknown_job", "message": STORE_NOT_READY, "ref": 2}
    assert (await lease_row(done["lease_id"])).unit.status == WorkUnit.Status.DONE
    # The worker's periodic pass restarts the job from its initial weights.
    assert await database_sync_to_async(checkpoint_running_jobs)() == 1
    assert (await lease_row(done["lease_id"])).unit.status == WorkUnit.Status.PENDING
    assert (await registered.fetch(lease, 0))[0] == 0
