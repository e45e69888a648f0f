"""The store's running average of the weights (``ParameterStore(average=b)``).

Each applied push advances its shard's average once, ``a = d * a + (1 - d) * w`` with
``d = min(b, (1 + v) / (10 + v))`` for the push that makes version ``v + 1``, from the
initial weights; refused and duplicate pushes do not. The average is committed with the
weights (memory and Redis), written to and read from checkpoints, and is what the job is
scored at (``ShardState.scored``, ``scored_weights``). The Redis tests are marked
``services``: they fail under ``DOWNPOUR_REQUIRE_SERVICES=1`` without Redis.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import redis

from downpour.hotstate.store import RedisStorage
from downpour.paramstore import (
    AdagradConfig,
    CorruptState,
    InMemoryStorage,
    OuterConfig,
    ParameterStore,
    ShardLayout,
    ShardState,
    StaleGradient,
    VariableSpec,
    read_checkpoint,
    write_checkpoint,
)
from downpour.paramstore.errors import CorruptCheckpoint, WrongShape

LAYOUT = ShardLayout.balanced([VariableSpec("w", (6,)), VariableSpec("b", (3,))], 2)
INITIAL = {
    "w": np.linspace(-1, 1, 6, dtype=np.float32),
    "b": np.array([0.5, -0.5, 0.25], np.float32),
}
BETA = 0.9


def make(
    storage: object,
    average: float = BETA,
    job: str = "job",
    max_staleness: int = 2,
    initialize: bool = True,
) -> ParameterStore:
    store = ParameterStore(
        storage,  # type: ignore[arg-type]
        job,
        LAYOUT,
        AdagradConfig(0.1),
        max_staleness,
        average=average,
    )
    if initialize:
        store.initialize(INITIAL)
    return store


def gradient(shard: int, k: int) -> dict[str, np.ndarray]:
    return {
        s.name: np.linspace(-0.4, 0.3 + 0.05 * k, s.size, dtype=np.float32).reshape(s.shape)
        for s in LAYOUT.shards[shard]
    }


def check_average_follows_every_applied_version(store: ParameterStore) -> None:
    """Pushes, a stale one and a duplicate; the average against the rule in float64."""
    expected = [store.fetch_flat(shard)[1].astype(np.float64) for shard in (0, 1)]
    for shard in (0, 1):
        assert store.snapshot()[shard].average is not None
        np.testing.assert_array_equal(store.snapshot()[shard].average, store.fetch_flat(shard)[1])
    pushes = 100  # the warm-up's (1 + v) / (10 + v) passes BETA from v = 81 on
    for k in range(pushes):
        for shard in (0, 1):
            version = store.fetch_flat(shard)[0]
            store.push(shard, gradient(shard, k), version, f"p{k}:{shard}")
            new = store.fetch_flat(shard)[1]
            decay = min(BETA, (1 + version) / (10 + version))
            expected[shard] = decay * expected[shard] + (1 - decay) * new
    # Neither a refused (too stale) nor a repeated push moves the average.
    before = [state.average.copy() for state in store.snapshot() if state.average is not None]
    with pytest.raises(StaleGradient):
        store.push(0, gradient(0, 9), 0, "late")
    assert store.push(1, gradient(1, 0), pushes - 1, "p99:1").duplicate
    for shard, state in enumerate(store.snapshot()):
        assert state.version == pushes
        assert state.average is not None
        np.testing.assert_array_equal(state.average, before[shard])
        np.testing.assert_allclose(state.average, expected[shard], rtol=1e-5, atol=1e-6)
        # The average trails the weights: the test would pass on weights alone otherwise.
        assert not np.allclose(state.average, state.weights, atol=1e-3)
        np.testing.assert_array_equal(state.scored, state.average)
    scored = store.scored_weights()
    for shard, state in enumerate(store.snapshot()):
        for name, value in LAYOUT.unflatten_shard(shard, state.average).items():
            np.testing.assert_array_equal(scored[name], value)


def test_the_first_push_keeps_a_tenth_of_the_start() -> None:
    """v = 0 before the first push, so d = 1/10 exactly (v + 1 would give 2/11)."""
    store = make(InMemoryStorage())
    start = store.fetch_flat(0)[1]
    store.push(0, gradient(0, 0), 0, "first")
    state = store.snapshot()[0]
    assert state.average is not None
    expected = np.float32(0.1) * start + np.float32(0.9) * state.weights
    np.testing.assert_allclose(state.average, expected, rtol=0, atol=1e-7)


def test_the_average_follows_every_applied_version_in_memory() -> None:
    check_average_follows_every_applied_version(make(InMemoryStorage()))


@pytest.mark.services
def test_the_average_follows_every_applied_version_in_redis(
    client: redis.Redis, prefix: str
) -> None:
    store = make(RedisStorage(client, prefix))
    check_average_follows_every_applied_version(store)
    # A second process (no cache) reads the same average, in one MGET with the weights.
    other = RedisStorage(client, prefix).load("job", 0)
    assert other is not None and other.average is not None
    np.testing.assert_array_equal(other.average, store.snapshot()[0].average)


@pytest.mark.services
def test_concurrent_pushes_advance_the_average_once_each_in_redis(
    client: redis.Redis, prefix: str
) -> None:
    """Threads, each with its own storage (no shared cache, as separate server processes),
    race pushes of one gradient. Every push then makes the same next weights whatever the
    order, so the average after all of them is that of the same pushes made one by one: a
    lost or doubled advance, or an average committed from a state that lost the race,
    would leave it elsewhere."""
    # Prepare
    make(RedisStorage(client, prefix), max_staleness=1_000)
    threads, pushes = 4, 12
    errors: list[BaseException] = []
    stalenesses: list[int] = []
    go = threading.Barrier(threads)

    def work(thread: int) -> None:
        try:
            store = make(RedisStorage(client, prefix), max_staleness=1_000, initialize=False)
            go.wait(timeout=30)
            for k in range(pushes):
                for shard in (0, 1):
                    version = store.fetch_flat(shard)[0]
                    result = store.push(
                        shard, gradient(shard, 0), version, f"t{thread}-{k}:{shard}"
                    )
                    stalenesses.append(result.staleness)
        except BaseException as exc:  # reported below, with the thread's name
            errors.append(exc)

    # Execute
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)

    # Assert
    assert not any(worker.is_alive() for worker in workers), "a pushing thread hung"
    assert not errors, errors
    # Pushes raced: some landed on a version another thread made after their fetch.
    assert max(stalenesses) > 0, stalenesses
    serial = make(InMemoryStorage(), max_staleness=1_000)
    for k in range(threads * pushes):
        for shard in (0, 1):
            serial.push(shard, gradient(shard, 0), serial.fetch_flat(shard)[0], f"s{k}:{shard}")
    raced = RedisStorage(client, prefix)
    for shard, expected in enumerate(serial.snapshot()):
        state = raced.load("job", shard)
        assert state is not None and state.average is not None and expected.average is not None
        assert state.version == threads * pushes
        np.testing.assert_allclose(state.weights, expected.weights, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(state.average, expected.average, rtol=1e-5, atol=1e-6)
        assert not np.allclose(state.average, state.weights, atol=1e-3)


@pytest.mark.services
def test_redis_drops_the_average_when_a_commit_has_none(client: redis.Redis, prefix: str) -> None:
    storage = RedisStorage(client, prefix)
    make(storage)
    key = storage.shard_key("job", 0, "p")
    assert client.exists(key)
    state = storage.load("job", 0)
    assert state is not None
    outcome = storage.commit(
        "job", 0, 0, ShardState(1, state.weights, state.accumulators, None, None), "x"
    )
    assert outcome.value == "applied"
    assert not client.exists(key)
    fresh = RedisStorage(client, prefix).load("job", 0)
    assert fresh is not None and fresh.average is None
    storage.delete("job")
    assert not list(client.scan_iter(match=prefix + "*"))


@pytest.mark.services
def test_redis_leaves_no_staged_average_behind_a_duplicate_or_a_conflict(
    client: redis.Redis, prefix: str
) -> None:
    storage = RedisStorage(client, prefix)
    store = make(storage)
    store.push(0, gradient(0, 0), 0, "a")
    before = storage.load("job", 0)
    assert before is not None and before.average is not None

    def attempt(expected_version: int, push_id: str) -> str:
        new = ShardState(
            expected_version + 1,
            before.weights + 1,
            before.accumulators,
            None,
            np.full_like(before.average, 7.0),
        )
        return storage.commit("job", 0, expected_version, new, push_id).value

    assert attempt(1, "a") == "duplicate"
    assert attempt(0, "b") == "conflict"
    assert list(client.scan_iter(match=prefix + "*staged*")) == []
    after = RedisStorage(client, prefix).load("job", 0)
    assert after is not None and after.average is not None
    np.testing.assert_array_equal(after.average, before.average)
    assert client.ttl(storage.shard_key("job", 0, "p")) == -1  # the staging TTL did not stick


@pytest.mark.services
def test_redis_refuses_an_average_of_the_wrong_length(client: redis.Redis, prefix: str) -> None:
    storage = RedisStorage(client, prefix)
    make(storage)
    client.set(storage.shard_key("job", 0, "p"), b"\0" * 8)
    with pytest.raises(CorruptState, match="average"):
        RedisStorage(client, prefix).load("job", 0)


def test_without_the_option_no_average_is_kept_and_the_weights_are_scored() -> None:
    store = make(InMemoryStorage(), average=0.0)
    store.push(0, gradient(0, 0), 0, "a")
    state = store.snapshot()[0]
    assert state.average is None
    np.testing.assert_array_equal(state.scored, state.weights)
    for name, value in store.weights().items():
        np.testing.assert_array_equal(store.scored_weights()[name], value)
    assert store.storage.memory_bytes() == sum(  # type: ignore[attr-defined]
        2 * LAYOUT.shard_size(i) * 4 for i in (0, 1)
    )


def test_a_shard_restored_without_an_average_starts_one_from_its_weights() -> None:
    store = make(InMemoryStorage())
    states = store.snapshot()
    store.restore([ShardState(s.version, s.weights, s.accumulators) for s in states])
    assert store.snapshot()[0].average is None
    store.push(0, gradient(0, 0), 0, "a")
    state = store.snapshot()[0]
    assert state.average is not None
    np.testing.assert_array_equal(state.average, state.weights)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan"), True, "0.9"])
def test_an_average_out_of_range_is_refused(beta: object) -> None:
    with pytest.raises(ValueError, match="average"):
        ParameterStore(InMemoryStorage(), "job", LAYOUT, AdagradConfig(0.1), 2, average=beta)  # type: ignore[arg-type]


def test_an_outer_optimizer_does_not_average() -> None:
    with pytest.raises(ValueError, match="average"):
        ParameterStore(
            InMemoryStorage(),
            "job",
            LAYOUT,
            AdagradConfig(0.1),
            2,
            outer=OuterConfig(),
            average=0.9,
        )


def test_restore_refuses_an_average_of_the_wrong_shape() -> None:
    store = make(InMemoryStorage())
    states = store.snapshot()
    bad = [
        ShardState(s.version, s.weights, s.accumulators, None, np.zeros(2, np.float32))
        for s in states
    ]
    with pytest.raises(WrongShape, match="average"):
        store.restore(bad)


def test_a_checkpoint_keeps_the_average_and_scores_at_it(tmp_path: Path) -> None:
    store = make(InMemoryStorage())
    for k in range(3):
        store.push(0, gradient(0, k), k, f"a{k}")
    states = store.snapshot()
    path = tmp_path / "c.npz"
    digest = write_checkpoint(path, LAYOUT, states, {"job": "job"})
    read = read_checkpoint(path, digest)
    for shard, state in enumerate(read.states):
        assert state.average is not None and states[shard].average is not None
        np.testing.assert_array_equal(state.average, states[shard].average)
    np.testing.assert_array_equal(read.weights(scored=True)["w"], store.scored_weights()["w"])
    assert not np.array_equal(read.weights()["w"], read.weights(scored=True)["w"])
    # Restored, the store goes on from the saved average, not from the weights.
    other = make(InMemoryStorage())
    other.restore(read.states)
    np.testing.assert_array_equal(other.scored_weights()["w"], store.scored_weights()["w"])


def test_a_checkpoint_without_averages_reads_as_none(tmp_path: Path) -> None:
    store = make(InMemoryStorage(), average=0.0)
    path = tmp_path / "c.npz"
    digest = write_checkpoint(path, LAYOUT, store.snapshot(), {})
    read = read_checkpoint(path, digest)
    assert all(state.average is None for state in read.states)
    np.testing.assert_array_equal(read.weights(scored=True)["w"], read.weights()["w"])


def test_a_checkpoint_with_an_average_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    store = make(InMemoryStorage())
    path = tmp_path / "c.npz"
    write_checkpoint(path, LAYOUT, store.snapshot(), {})
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["p0"] = np.zeros(2, np.float32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)  # type: ignore[arg-type]
    with pytest.raises(CorruptCheckpoint, match="average"):
        read_checkpoint(bad)
