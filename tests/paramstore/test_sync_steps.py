"""The synchronous step rule (Chen et al. 2016) on the memory backend and on Redis.

First N gradients of a version win and their sample-weighted mean is applied once; later
ones are dropped and counted; a step that waits past its timeout applies what it has;
push ids count once; concurrent pushers and appliers apply each step exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import redis
from tests.paramstore.layouts import initial_weights, model_layout

from downpour.paramstore import AdagradConfig, InMemoryStorage, ParameterStore, StaleGradient
from downpour.paramstore.adagrad import adagrad_apply
from downpour.paramstore.sync import SyncAggregator, SyncCounts, SyncRule

OPTIMIZER = AdagradConfig(learning_rate=0.05)
JOB = "alice-sync-job"

StorageFactory = Callable[[], object]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.services)])
def new_storage(request: pytest.FixtureRequest) -> StorageFactory:
    """A factory of storages that share one backend (one per simulated server process)."""
    if request.param == "memory":
        shared = InMemoryStorage()
        return lambda: shared
    from downpour.hotstate.store import RedisStorage

    client: redis.Redis = request.getfixturevalue("client")
    prefix: str = request.getfixturevalue("prefix")
    url = client.connection_pool.connection_kwargs
    return lambda: RedisStorage(redis.Redis(**url), prefix)


def make(new_storage: StorageFactory, rule: SyncRule, *, init: bool = True) -> SyncAggregator:
    layout = model_layout()
    store = ParameterStore(new_storage(), JOB, layout, OPTIMIZER, max_staleness=16)  # type: ignore[arg-type]
    if init:
        store.initialize(initial_weights(layout))
    return SyncAggregator(store, rule)


def gradient(agg: SyncAggregator, shard: int, value: float) -> dict[str, np.ndarray]:
    return {
        spec.name: np.full(spec.shape, value, np.float32) for spec in agg.store.layout.shards[shard]
    }


def expected_after(agg: SyncAggregator, shard: int, means: list[float]) -> np.ndarray:
    layout = agg.store.layout
    weights = layout.flatten_shard(shard, layout.split(initial_weights(layout))[shard])
    accumulators = np.full(weights.shape, OPTIMIZER.initial_accumulator, np.float32)
    for mean in means:
        grad = np.full(weights.shape, mean, np.float32)
        adagrad_apply(weights, accumulators, grad, OPTIMIZER.learning_rate, OPTIMIZER.epsilon)
    return weights


def test_the_first_n_gradients_of_a_version_are_averaged_and_applied_once(
    new_storage: StorageFactory,
) -> None:
    agg = make(new_storage, SyncRule(workers=2, backups=1, step_timeout_s=60))

    first = agg.push(0, gradient(agg, 0, 0.1), 0, "a:0:0", "a", 32)
    second = agg.push(0, gradient(agg, 0, 0.3), 0, "b:0:0", "b", 32)
    third = agg.push(0, gradient(agg, 0, 9.0), 0, "c:0:0", "c", 32)

    assert (first.applied, first.late, first.version) == (True, False, 0)
    assert (second.applied, second.late, second.version) == (True, False, 1)
    assert (third.applied, third.late, third.duplicate, third.staleness) == (False, True, False, 1)
    version, flat = agg.store.fetch_flat(0)
    assert version == 1
    np.testing.assert_allclose(flat, expected_after(agg, 0, [0.2]), rtol=1e-6)
    assert agg.counts() == SyncCounts(steps=1, timeouts=0, late=1)


def test_a_gradient_arriving_when_the_step_already_has_n_is_late(
    new_storage: StorageFactory,
) -> None:
    agg = make(new_storage, SyncRule(workers=1, backups=1, step_timeout_s=60))
    # Shard 1 first, so shard 0 (whose events the counters count) stays at version 0.
    agg.push(1, gradient(agg, 1, 0.1), 0, "a:0:1", "a", 32)
    late = agg.push(1, gradient(agg, 1, 0.1), 0, "b:0:1", "b", 32)

    assert late.late and not late.applied
    assert agg.store.versions() == [0, 1]
    assert agg.counts() == SyncCounts()  # shard 1's events are not counted


def test_replays_are_duplicates_and_count_once(new_storage: StorageFactory) -> None:
    agg = make(new_storage, SyncRule(workers=2, backups=1, step_timeout_s=60))
    agg.push(0, gradient(agg, 0, 0.1), 0, "a:0:0", "a", 32)
    buffered_again = agg.push(0, gradient(agg, 0, 0.1), 0, "a:0:0", "a", 32)
    agg.push(0, gradient(agg, 0, 0.3), 0, "b:0:0", "b", 32)
    applied_again = agg.push(0, gradient(agg, 0, 0.3), 0, "b:0:0", "b", 32)
    agg.push(0, gradient(agg, 0, 1.0), 0, "c:0:0", "c", 32)
    late_again = agg.push(0, gradient(agg, 0, 1.0), 0, "c:0:0", "c", 32)

    assert (buffered_again.duplicate, buffered_again.applied) == (True, False)
    assert (applied_again.duplicate, applied_again.applied, applied_again.late) == (
        True,
        False,
        False,
    )
    assert (late_again.duplicate, late_again.late) == (True, True)
    assert agg.store.versions()[0] == 1
    assert agg.counts() == SyncCounts(steps=1, timeouts=0, late=1)


def test_a_lease_has_at_most_one_gradient_per_step(new_storage: StorageFactory) -> None:
    agg = make(new_storage, SyncRule(workers=2, step_timeout_s=60))
    agg.push(0, gradient(agg, 0, 0.1), 0, "a:0:0", "a", 32)

    with pytest.raises(StaleGradient, match="already has a gradient in step 0"):
        agg.push(0, gradient(agg, 0, 0.1), 0, "a:1:0", "a", 32)


def test_a_gradient_on_a_version_not_reached_is_refused(new_storage: StorageFactory) -> None:
    agg = make(new_storage, SyncRule(workers=2, step_timeout_s=60))

    with pytest.raises(StaleGradient, match="ahead"):
        agg.push(0, gradient(agg, 0, 0.1), 3, "a:0:0", "a", 32)


def test_the_mean_is_weighted_by_samples(new_storage: StorageFactory) -> None:
    agg = make(new_storage, SyncRule(workers=2, step_timeout_s=60))
    agg.push(0, gradient(agg, 0, 0.4), 0, "a:0:0", "a", 30)
    agg.push(0, gradient(agg, 0, 0.0), 0, "b:0:0", "b", 10)

    np.testing.assert_allclose(agg.store.fetch_flat(0)[1], expected_after(agg, 0, [0.3]), rtol=1e-6)


def test_a_step_waits_no_longer_than_its_timeout_then_applies_what_arrived(
    new_storage: StorageFactory,
) -> None:
    agg = make(new_storage, SyncRule(workers=3, backups=0, step_timeout_s=0.3))
    agg.push(0, gradient(agg, 0, 0.5), 0, "a:0:0", "a", 32)

    assert not agg.tick(0)  # not yet: one of three, and the step is young
    time.sleep(0.35)
    assert agg.tick(0)
    assert not agg.tick(0)  # applied once; the next step is empty

    assert agg.store.versions()[0] == 1
    np.testing.assert_allclose(agg.store.fetch_flat(0)[1], expected_after(agg, 0, [0.5]), rtol=1e-6)
    assert agg.counts() == SyncCounts(steps=1, timeouts=1, late=0)


def test_an_empty_step_never_times_out(new_storage: StorageFactory) -> None:
    agg = make(new_storage, SyncRule(workers=2, step_timeout_s=0.01))
    time.sleep(0.02)

    assert not agg.tick(0)
    assert agg.store.versions() == [0, 0]


def test_a_push_after_the_timeout_completes_the_step(new_storage: StorageFactory) -> None:
    agg = make(new_storage, SyncRule(workers=3, step_timeout_s=0.2))
    agg.push(0, gradient(agg, 0, 0.2), 0, "a:0:0", "a", 32)
    time.sleep(0.25)

    result = agg.push(0, gradient(agg, 0, 0.4), 0, "b:0:0", "b", 32)

    assert result.applied and result.version == 1
    np.testing.assert_allclose(agg.store.fetch_flat(0)[1], expected_after(agg, 0, [0.3]), rtol=1e-6)
    assert agg.counts().timeouts == 1


def test_concurrent_pushers_in_several_processes_apply_each_step_exactly_once(
    new_storage: StorageFactory,
) -> None:
    rule = SyncRule(workers=3, backups=3, step_timeout_s=60)
    agg = make(new_storage, rule)
    steps, agents = 5, 6
    outcomes: list[tuple[int, bool, bool]] = []
    lock = threading.Lock()

    def agent(index: int) -> None:
        mine = make(new_storage, rule, init=False)  # its own storage: another "process"
        for step in range(steps):
            while mine.store.versions()[0] < step:
                time.sleep(0.001)
            result = mine.push(0, gradient(mine, 0, 0.1), step, f"{index}:{step}:0", str(index), 8)
            with lock:
                outcomes.append((step, result.applied, result.late))

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert agg.store.versions()[0] == steps
    for step in range(steps):
        mine = [o for o in outcomes if o[0] == step]
        assert len(mine) == agents
        assert sum(applied for _, applied, _ in mine) == rule.workers
        assert sum(late for _, _, late in mine) == agents - rule.workers
    assert agg.counts() == SyncCounts(steps=steps, timeouts=0, late=steps * 3)
    np.testing.assert_allclose(
        agg.store.fetch_flat(0)[1], expected_after(agg, 0, [0.1] * steps), rtol=1e-5
    )


def test_a_restore_forgets_the_buffer_of_the_replaced_versions(
    new_storage: StorageFactory,
) -> None:
    agg = make(new_storage, SyncRule(workers=2, step_timeout_s=60))
    agg.push(0, gradient(agg, 0, 5.0), 0, "a:0:0", "a", 32)

    agg.store.initialize(initial_weights(agg.store.layout))
    agg.push(0, gradient(agg, 0, 0.1), 0, "b:0:0", "b", 32)
    agg.push(0, gradient(agg, 0, 0.3), 0, "c:0:0", "c", 32)

    np.testing.assert_allclose(agg.store.fetch_flat(0)[1], expected_after(agg, 0, [0.2]), rtol=1e-6)


def test_the_rule_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="workers"):
        SyncRule(workers=0)
    with pytest.raises(ValueError, match="backups"):
        SyncRule(workers=1, backups=-1)
    with pytest.raises(ValueError, match="step_timeout_s"):
        SyncRule(workers=1, step_timeout_s=0)
    assert SyncRule(workers=2, backups=1).leases == 3


def test_an_agents_gradient_from_a_new_lease_in_the_same_step_is_late(
    new_storage: StorageFactory,
) -> None:
    # The agent finished one unit and took another before the step completed: the first N
    # *agents'* gradients win, so its second one is dropped (and credited as late).
    agg = make(new_storage, SyncRule(workers=2, step_timeout_s=60))
    agg.push(0, gradient(agg, 0, 0.1), 0, "a1:9:0", "a1", 32, worker="alice-pc")

    second = agg.push(0, gradient(agg, 0, 0.1), 0, "a2:0:0", "a2", 32, worker="alice-pc")
    other = agg.push(0, gradient(agg, 0, 0.3), 0, "b:0:0", "b", 32, worker="bob-pc")

    assert (second.applied, second.late, second.duplicate) == (False, True, False)
    assert other.applied and other.version == 1
    np.testing.assert_allclose(agg.store.fetch_flat(0)[1], expected_after(agg, 0, [0.2]), rtol=1e-6)
    assert agg.counts() == SyncCounts(steps=1, timeouts=0, late=1)


def test_the_memory_backend_times_steps_on_the_clock_it_is_given() -> None:
    # The convergence simulator runs sync jobs in virtual time: a step's age is read from
    # the storage's clock, so no real time passes and none is needed.
    now = [100.0]
    store = ParameterStore(
        InMemoryStorage(clock=lambda: now[0]), JOB, model_layout(), OPTIMIZER, max_staleness=16
    )
    store.initialize(initial_weights(store.layout))
    agg = SyncAggregator(store, SyncRule(workers=2, step_timeout_s=5.0))
    agg.push(0, gradient(agg, 0, 0.5), 0, "a:0:0", "a", 32)

    now[0] = 104.9
    assert not agg.tick(0)
    now[0] = 105.0
    assert agg.tick(0)
    assert agg.store.versions()[0] == 1 and agg.counts().timeouts == 1


def test_a_synchronous_step_keeps_no_average_of_the_weights_on_either_backend(
    new_storage: StorageFactory,
) -> None:
    """A synchronous job keeps no average (the job option is Downpour's): should a shard hold
    one, the step's commit drops it on Redis as on the memory backend, rather than leaving a
    stale average that would be scored."""
    layout = model_layout()
    storage = new_storage()
    averaging = ParameterStore(storage, JOB, layout, OPTIMIZER, max_staleness=16, average=0.9)  # type: ignore[arg-type]
    averaging.initialize(initial_weights(layout))
    assert averaging.snapshot()[0].average is not None
    agg = SyncAggregator(
        ParameterStore(storage, JOB, layout, OPTIMIZER, max_staleness=16),  # type: ignore[arg-type]
        SyncRule(workers=1, step_timeout_s=60),
    )

    agg.push(0, gradient(agg, 0, 0.1), 0, "a:0:0", "a", 32)

    state = new_storage().load(JOB, 0)  # type: ignore[attr-defined]
    assert state.version == 1 and state.average is None
