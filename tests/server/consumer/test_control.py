"""Job control and authority as an agent's socket sees them (issue 9, blockers 1 and 3).

Pausing is not finishing, a resumed job is served again, claims are bounded, and revoking
a token, banning an agent or deactivating an account cuts its live sockets off at once.
"""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connections
from tests.server.consumer.client import REPLY_TIMEOUT_S, Socket, open_socket

from downpour.agents import consumers
from downpour.donors.models import Agent, AgentToken
from downpour.training.actions import control
from downpour.training.actions.leases import reap_expired_leases
from downpour.training.models import Job, Lease, WorkUnit
from downpour_agent.protocol import CloseCode, ErrorCode

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def call(function: Any, *args: Any) -> Any:
    return function(*args)


@database_sync_to_async
def lease_and_unit(lease_id: str) -> tuple[str, str]:
    lease = Lease.objects.select_related("unit").get(id=lease_id)
    return lease.status, lease.unit.status


@database_sync_to_async
def agent_record(name: str = "pc-1") -> tuple[int, float]:
    agent = Agent.objects.get(name=name)
    return agent.leases_abandoned, agent.unit_scale


@database_sync_to_async
def set_job_status(job: Job, status: str) -> None:
    Job.objects.filter(id=job.id).update(status=status)


async def test_a_paused_job_is_announced_as_paused_and_its_lease_handed_back_unpenalised(
    running_job: Job, registered: Socket
) -> None:
    # Prepare
    lease = await registered.lease()
    await registered.fetch(lease, 0)

    # Execute
    assert await call(control.pause_job, running_job)

    # Assert: told what it is, not job_finished
    announced, _ = await registered.recv()
    assert announced == {
        "type": "job_paused",
        "job_id": str(running_job.id),
        "message": f"job {running_job.id} was paused",
    }
    assert await lease_and_unit(lease["lease_id"]) == ("returned", "pending")
    refused = await registered.ask(
        {"type": "fetch", "lease_id": lease["lease_id"], "shard": 0, "ref": 7}
    )
    assert (refused["type"], refused["code"]) == ("error", ErrorCode.JOB_PAUSED)
    await call(reap_expired_leases)
    assert await agent_record() == (0, 1.0)


async def test_a_resumed_job_is_served_again_on_the_same_socket(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: paused as the operator did it in the admin (a bare status change), so the
    # socket learns of it only from a refused request.
    first = await registered.lease()
    await set_job_status(running_job, Job.Status.PAUSED)
    await call(control.take_back_leases, Lease.objects.filter(id=first["lease_id"]))
    consumers.JOB_STATUS_TTL_S, ttl = 0.0, consumers.JOB_STATUS_TTL_S
    try:
        refused = await registered.ask(
            {"type": "fetch", "lease_id": first["lease_id"], "shard": 0, "ref": 1}
        )
        assert refused["code"] == ErrorCode.JOB_PAUSED

        # Execute
        assert await call(control.resume_job, running_job)
        second = await registered.lease()

        # Assert: the new lease is served, from the store as it was (no re-init)
        version, _ = await registered.fetch(second, 0)
    finally:
        consumers.JOB_STATUS_TTL_S = ttl
    assert second["job_id"] == str(running_job.id)
    assert version == 0
    assert await agent_record() == (0, 1.0)


async def test_work_requests_are_bounded_per_agent_per_second(
    running_job: Job, registered: Socket, settings: Any
) -> None:
    # Prepare: a burst of 2, within the two leases one agent may hold (scheduler.sizing)
    settings.CLAIMS_PER_SECOND, settings.CLAIM_BURST = 0.01, 2

    # Execute: an agent that asks again and again, at once
    replies = [await registered.ask({"type": "request_work", "ref": i}) for i in range(10)]

    # Assert
    leased = [r for r in replies if r["type"] == "lease"]
    limited = [r for r in replies if r.get("reason") == "rate_limited"]
    assert len(leased) == 2 and len(limited) == 8
    assert await call(lambda: Lease.objects.count()) == 2


async def test_revoking_a_token_closes_its_socket_and_reissues_its_lease(
    running_job: Job, registered: Socket
) -> None:
    # Prepare
    lease = await registered.lease()
    token_row = await call(lambda: AgentToken.objects.get())

    # Execute
    assert await call(control.revoke_token, token_row)

    # Assert
    told, _ = await registered.recv()
    assert (told["type"], told["code"]) == ("error", ErrorCode.UNAUTHORIZED)
    assert await registered.closed_with() == CloseCode.UNAUTHORIZED
    assert await lease_and_unit(lease["lease_id"]) == ("returned", "pending")
    assert await agent_record() == (0, 1.0)


async def test_a_revocation_without_a_push_is_seen_at_the_next_request(
    running_job: Job, registered: Socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: revoked behind the server's back (another process, a lost push)
    lease = await registered.lease()
    monkeypatch.setattr(consumers, "AUTHORITY_TTL_S", 0.0)
    await call(lambda: AgentToken.objects.update(revoked_at="2026-01-01T00:00:00Z"))

    # Execute
    refused = await registered.ask(
        {"type": "fetch", "lease_id": lease["lease_id"], "shard": 0, "ref": 3}
    )

    # Assert
    assert refused["code"] == ErrorCode.UNAUTHORIZED
    assert await registered.closed_with() == CloseCode.UNAUTHORIZED


async def test_banning_an_agent_closes_every_socket_it_has(
    running_job: Job, registered: Socket, token: str
) -> None:
    # Prepare: a second socket under the same name
    communicator, connected, _ = await open_socket(token)
    assert connected
    second = Socket(communicator)
    assert (await second.register())["type"] == "registered"
    lease = await second.lease()
    agent = await call(lambda: Agent.objects.get(name="pc-1"))

    # Execute
    assert await call(control.ban_agent, agent, "spamming")

    # Assert
    for sock in (registered, second):
        told, _ = await sock.recv()
        assert told["code"] == ErrorCode.BANNED and "spamming" in told["message"]
        assert await sock.closed_with() == CloseCode.FORBIDDEN
    assert await lease_and_unit(lease["lease_id"]) == ("returned", "pending")
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)


async def test_a_ban_holds_against_a_new_name_under_the_same_token(
    registered: Socket, token: str
) -> None:
    # Prepare
    agent = await call(lambda: Agent.objects.get(name="pc-1"))
    assert await call(control.ban_agent, agent, "failed a spot check")
    await registered.recv()
    await registered.closed_with()
    communicator, connected, _ = await open_socket(token)
    assert connected
    fresh = Socket(communicator)

    # Execute
    reply = await fresh.register("a-brand-new-name")

    # Assert
    assert reply["code"] == ErrorCode.BANNED
    assert await fresh.closed_with() == CloseCode.FORBIDDEN
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)


async def test_deactivating_the_donors_account_cuts_its_agents_off(
    running_job: Job, registered: Socket, charlie: Any
) -> None:
    # Prepare
    lease = await registered.lease()

    # Execute: as the admin's form does it
    charlie.is_active = False
    await call(charlie.save)

    # Assert
    told, _ = await registered.recv()
    assert told["code"] == ErrorCode.UNAUTHORIZED and "deactivated" in told["message"]
    assert await registered.closed_with() == CloseCode.UNAUTHORIZED
    assert await lease_and_unit(lease["lease_id"]) == ("returned", "pending")


async def test_no_work_says_why_while_a_robust_job_waits_for_a_trusted_agent(
    alice: Any, dataset: Any, registered: Socket
) -> None:
    # Prepare
    from tests.server.helpers import job_params

    from downpour.training.actions.jobs import start_job, submit_job

    job = await call(submit_job, alice, dataset, job_params(robust_aggregation=True))
    assert await call(start_job, job)

    # Execute
    reply = await registered.ask({"type": "request_work", "ref": 1})

    # Assert
    assert (reply["type"], reply["reason"]) == ("no_work", "trusted_warmup")
    assert "trusted agent" in reply["message"]
    await database_sync_to_async(connections.close_all)()


async def test_cancelling_a_paused_job_finishes_it_and_queues_nothing(
    running_job: Job, registered: Socket
) -> None:
    await registered.lease()
    assert await call(control.pause_job, running_job)
    await registered.recv()

    assert await call(control.cancel_job, running_job)

    status, message = await call(
        lambda: Job.objects.values_list("status", "status_message").get(id=running_job.id)
    )
    assert (status, message) == ("failed", "cancelled by its owner")
    told, _ = await registered.recv()
    assert told["type"] == "job_finished"
    assert (await registered.ask({"type": "request_work", "ref": 2}))["type"] == "no_work"
    assert await call(lambda: WorkUnit.objects.filter(status="leased").count()) == 0


async def test_a_fetch_that_races_the_end_of_the_job_hears_job_finished_not_unknown_job(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: the job finishes (its store freed) between the socket's status reads
    from downpour.training.actions.jobs import free_job_store

    lease = await registered.lease()
    await registered.fetch(lease, 0)
    await set_job_status(running_job, Job.Status.DONE)
    await call(free_job_store, running_job)

    # Execute
    reply = await registered.ask(
        {"type": "fetch", "lease_id": lease["lease_id"], "shard": 1, "ref": 4}
    )

    # Assert
    assert (reply["type"], reply["code"]) == ("error", ErrorCode.JOB_FINISHED)
    assert (await lease_and_unit(lease["lease_id"]))[0] == "returned"
