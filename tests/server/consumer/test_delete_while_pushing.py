"""Alice deletes her job while Charlie's agent is pushing to it (issue 9, users' paths).

The push in flight and the ones after it get a clear ``job_finished``, never a crash or a
resurrected store; the job's store state is freed and no lease is left behind.
"""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async
from tests.server.consumer.client import Socket, gradients, round_samples

from downpour.training import store
from downpour.training.actions.control import delete_job
from downpour.training.models import Job, Lease, WorkUnit
from downpour_agent.protocol import ErrorCode, frame_to_wire

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def call(function: Any, *args: Any) -> Any:
    return function(*args)


def push_frame(lease: dict[str, Any], shard: int, version: int, seq: int = 0) -> bytes:
    msg = {
        "type": "push",
        "lease_id": lease["lease_id"],
        "seq": seq,
        "shard": shard,
        "base_version": version,
        "samples": round_samples(lease, seq),
        "ref": f"push-{shard}-{seq}",
    }
    return frame_to_wire(msg, gradients(lease, shard))


async def reply_to(socket: Socket, ref: str) -> dict[str, Any]:
    """The answer with ``ref``, past the announcements sent meanwhile (``job_finished``)."""
    for _ in range(5):
        msg, _ = await socket.recv()
        if msg.get("ref") == ref:
            return msg
    raise AssertionError(f"no answer to {ref}")


async def test_a_job_deleted_mid_push_answers_job_finished_and_leaves_nothing_behind(
    alice: Any, running_job: Job, registered: Socket
) -> None:
    # Prepare: a lease, and a push on its way
    job_id = str(running_job.id)
    lease = await registered.lease()
    version, _ = await registered.fetch(lease, 0)
    await registered.send_bytes(push_frame(lease, 0, version))
    # Execute: Alice deletes the job while the push is in flight, and the agent pushes on.
    await call(delete_job, running_job, alice)
    in_flight = await reply_to(registered, "push-0-0")
    await registered.send_bytes(push_frame(lease, 1, version))
    after = await reply_to(registered, "push-1-0")
    complete = await registered.ask(
        {"type": "complete", "lease_id": lease["lease_id"], "samples": 1, "ref": "done"}
    )
    # Assert: clear answers; the one in flight either landed before the delete or was refused.
    assert in_flight["type"] == "push_ack" or in_flight["code"] == ErrorCode.JOB_FINISHED
    assert (after["type"], after["code"]) == ("error", ErrorCode.JOB_FINISHED), after
    assert "finished" in after["message"]
    assert (complete["type"], complete["code"]) == ("error", ErrorCode.JOB_FINISHED), complete
    await registered.still_usable()  # no server error closed the socket
    # ...the store is freed and stays freed (no restore from a checkpoint) ...
    backend = store.storage()
    assert [backend.load_version(job_id, s) for s in range(2)] == [None, None]
    assert store.reference_board().latest(job_id, 0, 1) is None
    # ...and nothing of the job is left in the database.
    assert not await call(lambda: Job.objects.filter(id=job_id).exists())
    assert not await call(lambda: WorkUnit.objects.filter(job_id=job_id).exists())
    assert not await call(lambda: Lease.objects.filter(id=lease["lease_id"]).exists())
    assert await call(lambda: Lease.objects.filter(status=Lease.Status.ACTIVE).count()) == 0
    # The agent asks for other work and is told there is none, politely.
    assert (await registered.ask({"type": "request_work", "ref": "more"}))["type"] == "no_work"
