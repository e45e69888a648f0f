"""An operator bans Charlie's agent while Charlie revokes its token, at the same moment.

Both actions take the agent's leases back; together they must neither deadlock nor end a
lease or requeue a unit twice, and the agent's pushes count once. The database is the real
one (PostgreSQL; the test needs the services); the socket is in process.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connections
from tests.server.consumer.client import REPLY_TIMEOUT_S, Socket, gradients, open_socket

from downpour.donors.models import Agent, AgentToken
from downpour.training.actions import control
from downpour.training.actions.claims import claim_work
from downpour.training.models import Job, Lease, WorkUnit
from downpour.training.store import job_store
from downpour_agent.protocol import CloseCode, ErrorCode

# Two writers at one instant need a database that takes concurrent writers: the in-memory
# SQLite of the quick tests answers "database table is locked" at once instead of waiting.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]


@database_sync_to_async
def call(function: Any, *args: Any) -> Any:
    return function(*args)


def at_once(*actions: Any) -> tuple[list[Any], list[BaseException]]:
    """Run ``actions`` in threads released together; their results and errors."""
    start = threading.Barrier(len(actions))
    results: list[Any] = [None] * len(actions)
    errors: list[BaseException] = []

    def run(i: int, action: Any) -> None:
        try:
            start.wait(10)
            results[i] = action()
        except BaseException as exc:  # reported to the test
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(actions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a deadlock: still waiting"
    return results, errors


async def test_a_ban_and_a_revocation_at_once_end_the_lease_once_and_stop_the_agent(
    running_job: Job, registered: Socket, token: str, dave_agent: Agent
) -> None:
    # Prepare: Charlie's agent holds a lease and has had one push applied.
    lease = await registered.lease()
    version, _ = await registered.fetch(lease, 0)
    ack = await registered.push(lease, 0, gradients(lease, 0), base_version=version)
    assert ack["applied"], ack
    agent = await call(lambda: Agent.objects.get(name="pc-1"))
    charlie_token = await call(lambda: AgentToken.objects.get(id=agent.token_id))
    versions = job_store(running_job).versions()
    # Execute
    (banned, revoked), errors = await call(
        at_once,
        lambda: control.ban_agent(agent, "operator test"),
        lambda: control.revoke_token(charlie_token),
    )
    # Assert: both took effect, neither failed
    assert errors == [] and banned and revoked
    told, _ = await registered.recv()
    assert told["code"] in (ErrorCode.BANNED, ErrorCode.UNAUTHORIZED)
    assert await registered.closed_with() in (CloseCode.FORBIDDEN, CloseCode.UNAUTHORIZED)
    # ...the lease ended once, its unit queued once, and nothing more was applied.
    assert await call(lambda: Lease.objects.get(id=lease["lease_id"]).status) == "returned"
    unit_id = await call(lambda: Lease.objects.get(id=lease["lease_id"]).unit_id)
    assert await call(lambda: WorkUnit.objects.get(id=unit_id).status) == "pending"
    assert await call(lambda: Lease.objects.filter(status=Lease.Status.ACTIVE).count()) == 0
    assert job_store(running_job).versions() == versions
    agent_after = await call(lambda: Agent.objects.get(id=agent.id))
    assert agent_after.leases_abandoned == 0
    # ...another donor's agent is given the unit again; Charlie's token gets nothing.
    reissued = await call(claim_work, dave_agent)
    assert reissued is not None and reissued.unit_id == unit_id
    communicator, connected, _ = await open_socket(token)
    if connected:  # the handshake may pass; registering is refused and the socket closed
        again = Socket(communicator)
        reply = await again.register("pc-2")
        assert reply["code"] in (ErrorCode.UNAUTHORIZED, ErrorCode.BANNED), reply
        assert await again.closed_with() in (CloseCode.FORBIDDEN, CloseCode.UNAUTHORIZED)
        await communicator.disconnect(timeout=REPLY_TIMEOUT_S)


@pytest.fixture
def dave_agent(django_user_model: Any) -> Agent:
    dave = django_user_model.objects.create_user("dave", password="dave-pw")
    dave_token, _ = AgentToken.issue(dave, "pc")
    return Agent.objects.create(token=dave_token, name="dave-pc", samples_per_s=1000.0)
