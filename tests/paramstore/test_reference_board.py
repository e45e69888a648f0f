"""Root reference gradients published per job and shard, read by the push path.

The worker publishes each parameter shard's root reference (``hotstate.references``); every
process that applies pushes reads the freshest, for at most ``max_age_s``. In process for the
embedded default, in Redis (marked ``services``) for production.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis

from downpour.hotstate import references as board_module
from downpour.hotstate.locks import lower_flag, raise_flag
from downpour.hotstate.references import LocalReferences, RedisReferences
from downpour.hotstate.store import RedisStorage

JOB = "alice-job"
#: The shard versions the references of ``refs()`` were computed at.
VERSIONS = [7, 8, 9]


def refs(size: int = 5) -> list[np.ndarray | None]:
    return [np.arange(size, dtype=np.float32), None, -np.ones(size, np.float32)]


def test_a_published_reference_is_served_per_shard_and_none_means_none() -> None:
    board = LocalReferences()
    board.publish(JOB, refs(), max_age_s=10, versions=VERSIONS)
    np.testing.assert_array_equal(board.latest(JOB, 0, 5), np.arange(5, dtype=np.float32))
    assert board.latest(JOB, 1, 5) is None
    assert board.latest("bob-job", 0, 5) is None
    # A newer round where shard 0's halves disagree takes its reference away.
    board.publish(JOB, [None, None, np.ones(5, np.float32)], max_age_s=10, versions=VERSIONS)
    assert board.latest(JOB, 0, 5) is None
    np.testing.assert_array_equal(board.latest(JOB, 2, 5), np.ones(5, np.float32))


def test_a_reference_older_than_its_max_age_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(board_module.time, "monotonic", lambda: clock[0])
    board = LocalReferences()
    board.publish(JOB, refs(), max_age_s=10, versions=VERSIONS)
    clock[0] = 109.9
    assert board.latest(JOB, 0, 5) is not None
    clock[0] = 110.1
    assert board.latest(JOB, 0, 5) is None


def test_a_reference_of_another_size_is_not_used_and_forget_drops_the_job() -> None:
    board = LocalReferences()
    board.publish(JOB, refs(), max_age_s=10, versions=VERSIONS)
    assert board.latest(JOB, 0, 6) is None
    assert board.version(JOB, 2) == 9
    board.forget(JOB)
    assert board.latest(JOB, 2, 5) is None
    assert board.version(JOB, 2) is None


@pytest.mark.services
def test_in_redis_a_push_far_past_the_cached_reference_reads_the_fresher_one(
    client: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a server process that reads again once a push's base is 8 versions past the
    # reference it holds; it has read shard 0's, computed at version 7.
    clock = [100.0]
    monkeypatch.setattr(board_module.time, "monotonic", lambda: clock[0])
    worker, server = RedisReferences(client, prefix), RedisReferences(client, prefix, 8)
    worker.publish(JOB, refs(), max_age_s=60, versions=VERSIONS)
    assert server.version(JOB, 0) == 7
    # Execute: the worker publishes a reference at version 30.
    fresh = [np.full(5, 2.0, np.float32), None, None]
    worker.publish(JOB, fresh, max_age_s=60, versions=[30, 30, 30])
    # Assert: a push 7 versions on keeps the cached one; 8 on reads again, though not
    # within READ_AGAIN_MIN_S of the last read; a push with no base waits out READ_CACHE_S.
    clock[0] += board_module.READ_AGAIN_MIN_S + 1e-6
    np.testing.assert_array_equal(server.latest(JOB, 0, 5, 14), np.arange(5, dtype=np.float32))
    np.testing.assert_array_equal(server.latest(JOB, 0, 5), np.arange(5, dtype=np.float32))
    np.testing.assert_array_equal(server.latest(JOB, 0, 5, 15), fresh[0])
    assert server.version(JOB, 0) == 30
    worker.publish(JOB, refs(), max_age_s=60, versions=VERSIONS)
    clock[0] += board_module.READ_AGAIN_MIN_S / 2
    np.testing.assert_array_equal(server.latest(JOB, 0, 5, 100), fresh[0])
    clock[0] += board_module.READ_CACHE_S
    np.testing.assert_array_equal(server.latest(JOB, 0, 5), np.arange(5, dtype=np.float32))


@pytest.mark.services
def test_a_flag_is_raised_once_until_its_owner_lowers_it_or_it_expires(
    client: redis.Redis, prefix: str
) -> None:
    key = f"{prefix}refrequest:{JOB}"
    token = raise_flag(client, key, ttl_s=5.0)
    assert token
    assert raise_flag(client, key, ttl_s=5.0) is None
    assert 0 < client.pttl(key) <= 5000
    assert lower_flag(client, key, token)
    # A flag that expired and was raised again is not lowered by the first request's token.
    stale = raise_flag(client, key, ttl_s=0.001)
    assert stale
    deadline = time.monotonic() + 5
    while client.exists(key) and time.monotonic() < deadline:
        time.sleep(0.01)
    fresh = raise_flag(client, key, ttl_s=5.0)
    assert fresh and fresh != stale
    assert not lower_flag(client, key, stale)
    assert client.exists(key)
    assert lower_flag(client, key, fresh) and not client.exists(key)


@pytest.mark.services
def test_in_redis_it_lives_under_the_documented_key_with_its_age_as_ttl(
    client: redis.Redis, prefix: str
) -> None:
    # Prepare: the worker's board and a server process's board
    worker, server = RedisReferences(client, prefix), RedisReferences(client, prefix)
    # Execute
    worker.publish(JOB, refs(), max_age_s=2.0, versions=VERSIONS)
    # Assert
    key = f"{prefix}job:{JOB}:shard:0:refv"
    version = (7).to_bytes(8, "little", signed=True)
    assert client.get(key) == version + np.arange(5, dtype="<f4").tobytes()
    assert 0 < client.pttl(key) <= 2000
    assert client.exists(f"{prefix}job:{JOB}:shard:1:refv") == 0
    np.testing.assert_array_equal(server.latest(JOB, 2, 5), -np.ones(5, np.float32))
    assert server.latest(JOB, 1, 5) is None
    assert server.latest(JOB, 0, 4) is None
    assert (server.version(JOB, 0), server.version(JOB, 1)) == (7, None)


@pytest.mark.services
def test_in_redis_deleting_the_jobs_store_or_forgetting_it_removes_the_references(
    client: redis.Redis, prefix: str
) -> None:
    board = RedisReferences(client, prefix)
    board.publish(JOB, refs(), max_age_s=60, versions=VERSIONS)
    client.sadd(f"{prefix}job:{JOB}:shards", 0, 1, 2)
    RedisStorage(client, prefix).delete(JOB)
    assert list(client.scan_iter(match=prefix + "*")) == []
    board.publish(JOB, refs(), max_age_s=60, versions=VERSIONS)
    board.forget(JOB)
    assert list(client.scan_iter(match=prefix + "*")) == []
