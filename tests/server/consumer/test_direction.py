"""The push path passes the server's root reference to the direction test (issue 10, 16).

Alice's robust job warms up on the worker's reference gradients; Charlie's ordinary agent
pushes over the socket, in process (the embedded default: the board is in process too).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis
from channels.db import database_sync_to_async
from tests.server.consumer.client import REPLY_TIMEOUT_S, Socket, gradients, open_socket
from tests.server.helpers import job_params

from downpour.agents import consumers
from downpour.donors.models import Agent
from downpour.scheduler import reputation
from downpour.training import store as store_module
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.actions.references import (
    publish_reference,
    publish_references,
    push_running_references,
)
from downpour.training.models import Job
from downpour.training.store import job_store, reference_board, take_reference_requests
from downpour_agent.protocol import CloseCode

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def robust_job(alice: Any, dataset: Any) -> Job:
    params = job_params(robust_aggregation=True, spot_check_fraction=0.0)
    job = submit_job(alice, dataset, params)
    assert start_job(job)
    job.refresh_from_db()
    return job


def flagged(job: Job, shard: int) -> int:
    store = job_store(job)
    (stats,) = store.storage.load_robust_stats(str(job.id), [shard])
    assert stats is not None
    return stats.clipped


async def test_a_push_against_the_root_reference_is_flagged_and_without_one_it_is_not(
    robust_job: Job, registered: Socket
) -> None:
    # Prepare: warm (the worker's reference pushes), then a reference known to the test.
    await database_sync_to_async(push_running_references)()
    lease = await registered.lease()
    assert lease["type"] == "lease", lease
    layout = job_store(robust_job).layout
    board = reference_board()
    ones = [np.ones(layout.shard_size(s), np.float32) for s in range(layout.n_shards)]
    board.publish(str(robust_job.id), ones, max_age_s=60, versions=[0] * layout.n_shards)
    before = [flagged(robust_job, s) for s in range(layout.n_shards)]
    # Execute: shard 0 pushed against the reference; shard 1 after it was taken away.
    version, _ = await registered.fetch(lease, 0)
    opposed = await registered.push(lease, 0, gradients(lease, 0, -0.01), base_version=version)
    board.forget(str(robust_job.id))
    version, _ = await registered.fetch(lease, 1)
    untested = await registered.push(lease, 1, gradients(lease, 1, -0.01), base_version=version)
    # Assert: both applied (flag-and-clip), only the tested one flagged.
    assert opposed["type"] == "push_ack" and opposed["applied"], opposed
    assert untested["type"] == "push_ack" and untested["applied"], untested
    assert flagged(robust_job, 0) == before[0] + 1
    assert flagged(robust_job, 1) == before[1]


def test_the_worker_publishes_a_shards_reference_only_while_the_root_halves_agree(
    robust_job: Job,
) -> None:
    # Prepare: the halves agree on shard 0's variables and point opposite ways on shard 1's.
    layout = job_store(robust_job).layout
    half_a = {spec.name: np.ones(spec.shape, np.float32) for spec in layout.specs}
    half_b = {
        name: value if layout.shard_of(name) == 0 else -value for name, value in half_a.items()
    }
    # Execute
    published = publish_references(robust_job, layout, [half_a, half_b], [0] * layout.n_shards)
    # Assert
    job_id = str(robust_job.id)
    np.testing.assert_array_equal(published[0], np.ones(layout.shard_size(0), np.float32))
    assert published[1] is None
    np.testing.assert_array_equal(
        reference_board().latest(job_id, 0, layout.shard_size(0)), published[0]
    )
    assert reference_board().latest(job_id, 1, layout.shard_size(1)) is None


async def test_the_push_that_makes_a_ban_due_is_judged_at_once_not_at_the_next_flush(
    robust_job: Job, registered: Socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: timed judgements an hour apart, so only the due ban can bring one forward;
    # a reference on both shards that every push points straight against (cosine -1).
    monkeypatch.setattr(consumers, "FLUSH_INTERVAL_S", 3600.0)
    monkeypatch.setattr(reputation, "OPPOSED_JUDGE_INTERVAL_S", 3600.0)
    await database_sync_to_async(push_running_references)()
    lease = await registered.lease()
    assert lease["type"] == "lease", lease
    layout = job_store(robust_job).layout
    ones = [np.ones(layout.shard_size(s), np.float32) for s in range(layout.n_shards)]
    reference_board().publish(
        str(robust_job.id), ones, max_age_s=60, versions=[0] * layout.n_shards
    )
    needed = reputation.DEFAULT_MIN_PUSHES
    # Execute: one push short of the evidence a ban needs, then the push that completes it.
    for index in range(needed):
        shard, seq = index % layout.n_shards, index // layout.n_shards
        version, _ = await registered.fetch(lease, shard)
        against = gradients(lease, shard, -0.01)
        reply = await registered.push(lease, shard, against, seq=seq, base_version=version)
        assert reply["type"] == "push_ack" and reply["applied"], (index, reply)
        if index < needed - 1:  # no judgement is due, so none is running
            agent = await database_sync_to_async(Agent.objects.get)(name="pc-1")
            assert agent.banned_at is None, index
    # Assert: told at that push, closed, and banned on the direction rule.
    event, _ = await registered.recv()
    assert (event["type"], event["code"]) == ("error", "banned"), event
    assert "pushed against the server's root gradient" in event["message"], event
    assert await registered.closed_with() == CloseCode.FORBIDDEN
    agent = await database_sync_to_async(Agent.objects.get)(name="pc-1")
    assert "against the server's root gradient" in agent.ban_reason, agent.ban_reason
    assert agent.rep_tested == needed


async def test_a_reconnected_agent_is_judged_on_its_whole_record_from_its_first_push(
    robust_job: Job, registered: Socket, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the agent's record holds 19 tested pushes straight against the root gradient
    # (an earlier socket's); it connects again. Timed judgements an hour apart.
    monkeypatch.setattr(consumers, "FLUSH_INTERVAL_S", 3600.0)
    monkeypatch.setattr(reputation, "OPPOSED_JUDGE_INTERVAL_S", 3600.0)
    needed = reputation.DEFAULT_MIN_PUSHES
    await database_sync_to_async(Agent.objects.filter(name="pc-1").update)(
        rep_pushes=needed - 1,
        rep_tested=needed - 1,
        rep_cosine_sum=-(needed - 1.0),
        rep_cosine_sq_sum=needed - 1.0,
    )
    communicator, connected, _ = await open_socket(token)
    assert connected
    again = Socket(communicator)
    assert (await again.register())["type"] == "registered"
    await database_sync_to_async(push_running_references)()
    # A returned lease flushes with nothing to judge, so the next push is not judged for
    # being the socket's first: only the record the socket started from can make it due.
    returned = await again.lease()
    await again.ask({"type": "return_lease", "lease_id": returned["lease_id"]})
    lease = await again.lease()
    layout = job_store(robust_job).layout
    ones = [np.ones(layout.shard_size(s), np.float32) for s in range(layout.n_shards)]
    reference_board().publish(
        str(robust_job.id), ones, max_age_s=60, versions=[0] * layout.n_shards
    )
    # Execute: the 20th push against it.
    version, _ = await again.fetch(lease, 0)
    reply = await again.push(lease, 0, gradients(lease, 0, -0.01), base_version=version)
    # Assert: judged at once on all 20, and banned.
    assert reply["type"] == "push_ack" and reply["applied"], reply
    event, _ = await again.recv()
    assert (event["type"], event["code"]) == ("error", "banned"), event
    assert await again.closed_with() == CloseCode.FORBIDDEN
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)


async def test_a_push_reaching_every_nth_version_requests_one_reference_until_it_is_published(
    robust_job: Job, registered: Socket, settings: Any
) -> None:
    # Prepare: requests every 4 versions of shard 0, published however the root halves
    # disagree (so that the board shows the versions read); warm; earlier requests taken.
    settings.REFERENCE_EVERY_VERSIONS = 4
    settings.REFERENCE_MIN_AGREEMENT = -1.0
    await database_sync_to_async(push_running_references)()
    take_reference_requests()
    lease = await registered.lease()
    rounds = -(-lease["steps"] // lease["hyper"]["n_push"])
    assert rounds >= 12, lease
    job_id = str(robust_job.id)
    seqs = iter(range(rounds))

    async def push_shard_0() -> tuple[int, list[str]]:
        version, _ = await registered.fetch(lease, 0)
        seq = next(seqs)
        reply = await registered.push(lease, 0, gradients(lease, 0), seq=seq, base_version=version)
        assert reply["type"] == "push_ack" and reply["applied"], reply
        return int(reply["version"]), take_reference_requests()

    # Execute and assert: a request exactly at the multiple of 4...
    version, requested = await push_shard_0()
    while version % 4:
        assert requested == [], version
        version, requested = await push_shard_0()
    assert requested == [job_id], version
    # ...none while it is in flight, past the next multiple...
    for _ in range(4):
        version, requested = await push_shard_0()
        assert requested == [], version
    # ...the worker publishes it at the versions it read (and no trusted push)...
    assert await database_sync_to_async(publish_reference)(job_id)
    assert reference_board().version(job_id, 0) == version
    assert job_store(robust_job).fetch(0)[0] == version
    # ...and the next multiple asks again.
    version, requested = await push_shard_0()
    while version % 4:
        assert requested == [], version
        version, requested = await push_shard_0()
    assert requested == [job_id], version


def test_an_embedded_request_never_answered_stops_blocking_after_its_ttl(
    robust_job: Job, settings: Any
) -> None:
    # Prepare: requests every 4 versions; one that lives 0.2 s unanswered.
    settings.REFERENCE_EVERY_VERSIONS = 4
    settings.REFERENCE_REQUEST_TTL_S = 0.2
    store, job_id = job_store(robust_job), str(robust_job.id)
    take_reference_requests()
    # Execute and assert: one in flight blocks the next multiple, until its TTL is out.
    assert store_module.request_reference(store, job_id, 0, 4)
    assert not store_module.request_reference(store, job_id, 0, 8)
    time.sleep(0.25)
    assert store_module.request_reference(store, job_id, 0, 12)
    assert take_reference_requests() == [job_id, job_id]


def test_a_request_that_redis_cannot_take_leaves_the_applied_push_alone(
    robust_job: Job, settings: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    # Prepare: the store's Redis unreachable (a real client, on a port nothing listens on).
    settings.REFERENCE_EVERY_VERSIONS = 4
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    monkeypatch.setattr(store_module, "storage", lambda: SimpleNamespace(client=unreachable))
    # Execute
    requested = store_module.request_reference(job_store(robust_job), str(robust_job.id), 0, 8)
    monkeypatch.undo()  # before the fixtures' teardown forgets the job's store
    # Assert: no request, no exception for the push path, and the fault logged.
    assert requested is False
    assert "root reference request not sent" in caplog.text
