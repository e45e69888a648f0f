"""Centred-clipping state in Redis: one key per shard, committed with the weights, shared by all.

Needs Redis (``tests.services.redis_url()``): marked ``services``, these tests skip without
it and fail the run under ``DOWNPOUR_REQUIRE_SERVICES=1``. Every test uses its own key
prefix and deletes its keys.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import redis
from tests import services
from tests.paramstore.layouts import initial_weights
from tests.paramstore.layouts import mlp_layout as model_layout

from downpour.hotstate.store import RedisStorage
from downpour.paramstore import (
    AdagradConfig,
    CentredClipping,
    CommitOutcome,
    CorruptState,
    InMemoryStorage,
    ParameterStore,
    RobustState,
    RobustStats,
    ShardLayout,
    ShardState,
    adagrad_apply,
    read_checkpoint,
    robust_step,
    write_checkpoint,
)

OPTIMIZER = AdagradConfig(learning_rate=0.05)
ROBUST = CentredClipping(warmup_trusted_pushes=3, tau_multiplier=2.0)
JOB = "alice-job"

pytestmark = pytest.mark.services


def trusted_gradient(layout: ShardLayout, shard: int, k: int) -> dict[str, np.ndarray]:
    return {
        s.name: np.linspace(-0.3, 0.7 + 0.1 * k, s.size, dtype=np.float32).reshape(s.shape)
        for s in layout.shards[shard]
    }


def bob_gradient(layout: ShardLayout, shard: int) -> dict[str, np.ndarray]:
    """Bob's gradient: far enough from the centre to be clipped on some pushes."""
    return {
        s.name: np.linspace(2.0, -1.0, s.size, dtype=np.float32).reshape(s.shape)
        for s in layout.shards[shard]
    }


def make_store(client: redis.Redis, prefix: str) -> ParameterStore:
    store = ParameterStore(
        RedisStorage(client, prefix), JOB, model_layout(), OPTIMIZER, 1_000_000, robust=ROBUST
    )
    return store


def warm_up(store: ParameterStore) -> None:
    for k in range(ROBUST.warmup_trusted_pushes):
        for shard in range(store.layout.n_shards):
            version = store.versions()[shard]
            store.push(
                shard, trusted_gradient(store.layout, shard, k), version, f"t{k}", trusted=True
            )


def test_the_robust_state_lives_under_the_documented_key(client: redis.Redis, prefix: str) -> None:
    storage = RedisStorage(client, prefix)
    robust = RobustState(np.arange(5, dtype=np.float32), 3, 0.25, 3, 0)
    storage.initialize(
        JOB, 3, ShardState(2, np.zeros(5, np.float32), np.zeros(5, np.float32), robust)
    )
    newer = RobustState(np.full(5, 2, np.float32), 3, 0.25, 4, 1, (1.5,))

    outcome = storage.commit(
        JOB, 3, 2, ShardState(3, np.ones(5, np.float32), np.ones(5, np.float32), newer), "p1"
    )

    base = f"{prefix}job:{JOB}:shard:3:"
    stored = client.get(base + "r")
    assert outcome is CommitOutcome.APPLIED
    assert stored == newer.to_bytes()
    assert isinstance(stored, bytes)
    assert stored[:32] == np.array([3, 0.25, 4, 1], "<f8").tobytes()
    assert stored[32:52] == np.full(5, 2, "<f4").tobytes()
    assert stored[52:] == np.array([1.5], "<f8").tobytes()  # the untrusted distances
    assert set(client.scan_iter(match=prefix + "*")) == {
        (base + suffix).encode() for suffix in ("v", "e", "w", "a", "r", "applied")
    } | {f"{prefix}job:{JOB}:shards".encode()}
    assert list(client.scan_iter(match=prefix + "*staged*")) == []


def test_a_commit_without_robust_state_removes_it_and_delete_removes_it_too(
    client: redis.Redis, prefix: str
) -> None:
    storage = RedisStorage(client, prefix)
    robust = RobustState(np.zeros(4, np.float32))
    storage.initialize(
        JOB, 0, ShardState(0, np.zeros(4, np.float32), np.zeros(4, np.float32), robust)
    )

    storage.commit(JOB, 0, 0, ShardState(1, np.ones(4, np.float32), np.ones(4, np.float32)), "p")

    loaded = RedisStorage(client, prefix).load(JOB, 0)
    assert loaded is not None and loaded.robust is None
    assert client.exists(f"{prefix}job:{JOB}:shard:0:r") == 0
    storage.initialize(
        JOB, 0, ShardState(0, np.zeros(4, np.float32), np.zeros(4, np.float32), robust)
    )
    storage.delete(JOB)
    assert list(client.scan_iter(match=prefix + "*")) == []


def test_the_warm_up_status_is_read_from_the_statistics_alone_as_in_memory(
    client: redis.Redis, prefix: str
) -> None:
    # Prepare: the same pushes to a Redis store and an in-memory one
    stores = [
        make_store(client, prefix),
        ParameterStore(InMemoryStorage(), JOB, model_layout(), OPTIMIZER, 1_000_000, robust=ROBUST),
    ]
    for store in stores:
        store.initialize(initial_weights(store.layout))
        store.push(1, trusted_gradient(store.layout, 1, 0), 0, "t0", trusted=True)
    during = [store.warmup_status() for store in stores]
    for store in stores:
        warm_up(store)
        store.push(0, bob_gradient(store.layout, 0), store.versions()[0], "bob-1")

    # Execute: a second server process, with nothing cached
    fresh = RedisStorage(redis.Redis.from_url(services.redis_url()), prefix)
    stats = fresh.load_robust_stats(JOB, [0, 1, 2])
    after = [store.warmup_status() for store in stores]

    # Assert
    assert during[0] == during[1] and during[0] is not None and during[0].trusted_pushes == (0, 1)
    assert after[0] == after[1] and after[0] is not None and after[0].warm
    assert stats[:2] == [s.robust.stats for s in stores[0].snapshot() if s.robust is not None]
    assert stats[2] is None  # no such shard
    fresh.client.close()


def test_a_shard_without_robust_state_has_fresh_statistics_and_bad_ones_are_corrupt(
    client: redis.Redis, prefix: str
) -> None:
    storage = RedisStorage(client, prefix)
    storage.initialize(JOB, 0, ShardState(0, np.zeros(4, np.float32), np.zeros(4, np.float32)))
    assert storage.load_robust_stats(JOB, [0]) == [RobustStats()]

    client.set(f"{prefix}job:{JOB}:shard:0:r", np.array([-1, 0, 0, 0], "<f8").tobytes())
    with pytest.raises(CorruptState, match="bad robust statistics"):
        storage.load_robust_stats(JOB, [0])


def test_two_server_processes_see_the_same_centre(client: redis.Redis, prefix: str) -> None:
    # Prepare: server A initializes and warms up; server B has its own client and cache
    server_a = make_store(client, prefix)
    server_a.initialize(initial_weights(server_a.layout))
    warm_up(server_a)
    other_client = redis.Redis.from_url(services.redis_url())
    server_b = make_store(other_client, prefix)

    # Execute: B accepts Bob's push (no warm-up of its own), then A sees B's update
    result_b = server_b.push(0, bob_gradient(server_b.layout, 0), server_b.versions()[0], "bob-1")
    state_a = server_a.snapshot()[0]
    result_a = server_a.push(0, bob_gradient(server_a.layout, 0), state_a.version, "bob-2")
    other_client.close()

    # Assert
    assert result_b.applied and not result_b.held
    assert result_a.applied and not result_a.held
    assert state_a.robust is not None and state_a.robust.pushes == 3 + 1
    final = server_b.snapshot()[0].robust
    assert final is not None and final.pushes == 3 + 2
    assert final.untrusted_deviations == pytest.approx(
        (result_b.deviation_norm, result_a.deviation_norm)
    )


def test_a_robust_state_stored_before_the_untrusted_distances_existed_still_loads(
    client: redis.Redis, prefix: str
) -> None:
    # Prepare: a shard that saw trusted pushes only has no untrusted distances, so its r key
    # is byte for byte the old encoding (statistics, then momentum)
    store = make_store(client, prefix)
    store.initialize(initial_weights(store.layout))
    warm_up(store)
    old = client.get(f"{prefix}job:{JOB}:shard:0:r")
    assert isinstance(old, bytes) and len(old) == 32 + 4 * store.layout.shard_size(0)

    # Execute: another server process loads it and accepts Bob's push
    other_client = redis.Redis.from_url(services.redis_url())
    other = make_store(other_client, prefix)
    loaded = other.snapshot()[0].robust
    result = other.push(0, bob_gradient(other.layout, 0), other.versions()[0], "bob-1")
    after = other.snapshot()[0].robust
    other_client.close()

    # Assert
    assert loaded is not None and loaded.untrusted_deviations == ()
    assert loaded.trusted_pushes == ROBUST.warmup_trusted_pushes
    assert result.applied and not result.held
    assert after is not None and after.untrusted_deviations == pytest.approx(
        (result.deviation_norm,)
    )
    assert store.warmup_status() == other.warmup_status()


def test_concurrent_pushes_from_two_clients_lose_no_update_of_the_robust_state(
    client: redis.Redis, prefix: str
) -> None:
    # Prepare: 2 clients x 3 threads push Bob's gradient, so the order does not matter
    store_a = make_store(client, prefix)
    store_a.initialize(initial_weights(store_a.layout))
    warm_up(store_a)
    other_client = redis.Redis.from_url(services.redis_url())
    store_b = make_store(other_client, prefix)
    layout = store_a.layout
    threads_per_client, pushes = 3, 6
    errors: list[BaseException] = []
    expected_states = [store_a.snapshot()[shard] for shard in range(layout.n_shards)]

    def work(store: ParameterStore, name: str) -> None:
        try:
            for k in range(pushes):
                for shard in range(layout.n_shards):
                    version = store.versions()[shard]
                    store.push(shard, bob_gradient(layout, shard), version, f"{name}-{k}")
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    # Execute
    threads = [
        threading.Thread(target=work, args=(store, f"{label}{t}"))
        for label, store in (("a", store_a), ("b", store_b))
        for t in range(threads_per_client)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other_client.close()

    # Assert: identical to applying the pushes one after another
    assert errors == []
    total = 2 * threads_per_client * pushes
    for shard, before in enumerate(expected_states):
        assert before.robust is not None
        weights, accumulators, robust = before.weights, before.accumulators, before.robust
        clipped = 0
        for _ in range(total):
            step = robust_step(
                ROBUST, robust, layout.flatten_shard(shard, bob_gradient(layout, shard)), False
            )
            adagrad_apply(
                weights, accumulators, step.gradient, OPTIMIZER.learning_rate, OPTIMIZER.epsilon
            )
            robust, clipped = step.state, clipped + step.clipped
        final = store_a.snapshot()[shard]
        assert final.version == before.version + total
        np.testing.assert_array_equal(final.weights, weights)
        np.testing.assert_array_equal(final.accumulators, accumulators)
        assert final.robust is not None
        assert final.robust.to_bytes() == robust.to_bytes()
        assert final.robust.pushes == before.robust.pushes + total
        assert 0 < clipped == final.robust.clipped


def test_a_checkpoint_of_a_redis_store_restores_the_same_centre_elsewhere(
    client: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    store = make_store(client, prefix)
    store.initialize(initial_weights(store.layout))
    warm_up(store)
    store.push(1, bob_gradient(store.layout, 1), store.versions()[1], "bob-1")
    path = tmp_path / "job.npz"
    write_checkpoint(path, store.layout, store.snapshot(), {"job": JOB})

    elsewhere = make_store(client, prefix + "restored:")
    elsewhere.restore(read_checkpoint(path).states)

    for mine, theirs in zip(store.snapshot(), elsewhere.snapshot(), strict=True):
        assert mine.robust is not None and theirs.robust is not None
        assert mine.robust.to_bytes() == theirs.robust.to_bytes()
        assert mine.weights.tobytes() == theirs.weights.tobytes()
