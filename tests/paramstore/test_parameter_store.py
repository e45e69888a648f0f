"""ParameterStore over InMemoryStorage: validation, staleness, duplicates and concurrency."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
from tests.paramstore.layouts import initial_weights, model_layout

from downpour.paramstore import (
    AdagradConfig,
    InMemoryStorage,
    NonFinite,
    NotInitialized,
    ParameterStore,
    ShardLayout,
    StaleGradient,
    StoreError,
    UnknownShard,
    VariableSpec,
    WrongDtype,
    WrongShape,
    adagrad_apply,
)

OPTIMIZER = AdagradConfig(learning_rate=0.1, initial_accumulator=0.1, epsilon=1e-7)
JOB = "alice-mnist"


def gradient_for(layout: ShardLayout, shard: int, scale: float = 0.5) -> dict[str, np.ndarray]:
    return {
        spec.name: np.linspace(-scale, scale, spec.size, dtype=np.float32).reshape(spec.shape)
        for spec in layout.shards[shard]
    }


def make_store(max_staleness: int = 2) -> ParameterStore:
    layout = model_layout()
    store = ParameterStore(InMemoryStorage(), JOB, layout, OPTIMIZER, max_staleness)
    store.initialize(initial_weights(layout))
    return store


def state_bytes(store: ParameterStore) -> list[tuple[int, bytes, bytes]]:
    return [(s.version, s.weights.tobytes(), s.accumulators.tobytes()) for s in store.snapshot()]


def expected_after_pushes(
    store: ParameterStore, shard: int, grad: dict[str, np.ndarray], times: int
) -> np.ndarray:
    layout = store.layout
    weights = layout.flatten_shard(shard, layout.split(initial_weights(layout))[shard])
    accumulators = np.full(weights.shape, OPTIMIZER.initial_accumulator, np.float32)
    flat_grad = layout.flatten_shard(shard, grad)
    for _ in range(times):
        adagrad_apply(weights, accumulators, flat_grad, OPTIMIZER.learning_rate, OPTIMIZER.epsilon)
    return weights


def test_initialize_stores_version_zero_and_the_initial_accumulator() -> None:
    store = make_store()

    states = store.snapshot()

    assert store.versions() == [0, 0]
    assert all(np.all(state.accumulators == np.float32(0.1)) for state in states)
    weights = store.weights()
    for name, tensor in initial_weights(store.layout).items():
        np.testing.assert_array_equal(weights[name], tensor)
    assert list(weights) == ["dense/kernel", "dense/bias", "out/kernel"]


def test_fetch_returns_tensors_the_caller_may_modify_without_touching_the_store() -> None:
    store = make_store()
    before = state_bytes(store)

    version, tensors = store.fetch(1)
    tensors["dense/bias"][:] = 42.0
    _, flat = store.fetch_flat(0)
    flat[:] = 42.0

    assert version == 0
    assert set(tensors) == {"dense/bias", "out/kernel"}
    assert state_bytes(store) == before


def test_a_push_applies_adagrad_and_bumps_the_version() -> None:
    store = make_store()
    grad = gradient_for(store.layout, 0)

    result = store.push(0, grad, base_version=0, push_id="bob-1")

    assert (result.applied, result.duplicate, result.version, result.staleness) == (
        True,
        False,
        1,
        0,
    )
    assert store.versions() == [1, 0]
    np.testing.assert_array_equal(store.fetch_flat(0)[1], expected_after_pushes(store, 0, grad, 1))


BAD_GRADIENTS: list[tuple[str, Callable[[dict[str, np.ndarray]], None], type[StoreError], str]] = [
    (
        "wrong shape",
        lambda g: g.__setitem__("dense/bias", np.zeros((4,), np.float32)),
        WrongShape,
        r"'dense/bias': expected shape \(3,\), got \(4,\)",
    ),
    (
        "float64",
        lambda g: g.__setitem__("dense/bias", g["dense/bias"].astype(np.float64)),
        WrongDtype,
        "'dense/bias': expected a float32 array",
    ),
    (
        "float16",
        lambda g: g.__setitem__("out/kernel", g["out/kernel"].astype(np.float16)),
        WrongDtype,
        "'out/kernel': expected a float32 array",
    ),
    (
        "a list",
        lambda g: g.__setitem__("dense/bias", [0.0, 0.0, 0.0]),
        WrongDtype,
        "got list",
    ),
    (
        "NaN",
        lambda g: g["out/kernel"].__setitem__((1, 1), np.nan),
        NonFinite,
        "'out/kernel' has 1 NaN and 0 infinite values",
    ),
    (
        "Inf",
        lambda g: g["dense/bias"].__setitem__(0, -np.inf),
        NonFinite,
        "'dense/bias' has 0 NaN and 1 infinite values",
    ),
    (
        "unknown name",
        lambda g: g.__setitem__("dense/kernel", np.zeros((4, 3), np.float32)),
        WrongShape,
        r"unexpected \['dense/kernel'\]",
    ),
    (
        "missing name",
        lambda g: g.pop("out/kernel"),
        WrongShape,
        r"missing \['out/kernel'\]",
    ),
]


@pytest.mark.parametrize(
    ("corrupt", "error", "message"),
    [case[1:] for case in BAD_GRADIENTS],
    ids=[case[0] for case in BAD_GRADIENTS],
)
def test_an_invalid_gradient_is_rejected_and_leaves_the_state_unchanged(
    corrupt: Callable[[dict[str, np.ndarray]], None], error: type[StoreError], message: str
) -> None:
    store = make_store()
    store.push(1, gradient_for(store.layout, 1), 0, "good")
    before = state_bytes(store)
    grad = gradient_for(store.layout, 1)
    corrupt(grad)

    with pytest.raises(error, match=message):
        store.push(1, grad, base_version=1, push_id="bad")

    assert state_bytes(store) == before
    assert not store.storage.was_applied(JOB, 1, "bad")


@pytest.mark.parametrize("shard", [2, -1, "0", True])
def test_a_push_to_an_unknown_shard_is_rejected_and_leaves_the_state_unchanged(
    shard: object,
) -> None:
    store = make_store()
    before = state_bytes(store)

    with pytest.raises(UnknownShard, match="does not exist; this job has shards 0..1"):
        store.push(shard, gradient_for(store.layout, 0), 0, "lost")  # type: ignore[arg-type]

    assert state_bytes(store) == before


def advanced_store(version: int) -> ParameterStore:
    store = make_store(max_staleness=2)
    for k in range(version):
        store.push(0, gradient_for(store.layout, 0), k, f"warmup-{k}")
    return store


@pytest.mark.parametrize(("base_version", "staleness"), [(1, 2), (2, 1), (3, 0)])
def test_a_gradient_at_most_max_staleness_versions_old_is_applied(
    base_version: int, staleness: int
) -> None:
    store = advanced_store(version=3)

    result = store.push(0, gradient_for(store.layout, 0), base_version, "late")

    assert (result.applied, result.version, result.staleness) == (True, 4, staleness)
    assert store.staleness_counts[staleness] >= 1


@pytest.mark.parametrize(
    ("base_version", "message"),
    [
        (0, "3 versions stale .* at most 2 allowed"),
        (4, "base_version 4 is ahead of shard 0's current version 3"),
        (-1, "base_version must be >= 0"),
    ],
)
def test_a_gradient_too_old_from_the_future_or_negative_is_refused_as_stale(
    base_version: int, message: str
) -> None:
    store = advanced_store(version=3)
    before = state_bytes(store)

    with pytest.raises(StaleGradient, match=message):
        store.push(0, gradient_for(store.layout, 0), base_version, "late")

    assert state_bytes(store) == before


def test_staleness_of_accepted_pushes_is_counted() -> None:
    store = make_store(max_staleness=5)

    for k in range(3):
        store.push(1, gradient_for(store.layout, 1), 0, f"same-base-{k}")

    assert store.staleness_counts == {0: 1, 1: 1, 2: 1}


def test_a_duplicate_push_id_is_acknowledged_but_not_applied() -> None:
    store = make_store()
    grad = gradient_for(store.layout, 0)
    store.push(0, grad, 0, "charlie-7")
    after_first = state_bytes(store)

    result = store.push(0, grad, 0, "charlie-7")

    assert (result.applied, result.duplicate, result.version) == (False, True, 1)
    assert state_bytes(store) == after_first
    assert sum(store.staleness_counts.values()) == 1


def test_push_ids_are_tracked_per_shard() -> None:
    store = make_store()

    first = store.push(0, gradient_for(store.layout, 0), 0, "step-1")
    second = store.push(1, gradient_for(store.layout, 1), 0, "step-1")

    assert first.applied and second.applied
    assert store.versions() == [1, 1]


def test_a_job_that_was_never_initialized_is_reported_as_unknown() -> None:
    layout = model_layout()
    store = ParameterStore(InMemoryStorage(), "nobody", layout, OPTIMIZER, 2)

    with pytest.raises(NotInitialized, match="'nobody' has no parameters for shard 0"):
        store.push(0, gradient_for(layout, 0), 0, "p")
    with pytest.raises(NotInitialized):
        store.fetch(1)
    with pytest.raises(NotInitialized):
        store.versions()


def test_a_deleted_job_is_reported_as_unknown() -> None:
    store = make_store()

    store.delete()

    with pytest.raises(NotInitialized):
        store.fetch(0)


def test_initialize_refuses_non_finite_weights_and_stores_nothing() -> None:
    layout = model_layout()
    store = ParameterStore(InMemoryStorage(), JOB, layout, OPTIMIZER, 2)
    weights = initial_weights(layout)
    weights["dense/bias"][1] = np.nan

    with pytest.raises(NonFinite, match="weights for shard 1 must be finite"):
        store.initialize(weights)

    with pytest.raises(NotInitialized):
        store.versions()


def test_restore_puts_back_a_snapshot_and_forgets_applied_push_ids() -> None:
    store = make_store()
    snapshot = store.snapshot()
    store.push(0, gradient_for(store.layout, 0), 0, "undone")

    store.restore(snapshot)
    again = store.push(0, gradient_for(store.layout, 0), 0, "undone")

    assert again.applied
    assert store.versions() == [1, 0]


def test_restore_refuses_states_that_do_not_fit_the_layout() -> None:
    store = make_store()
    states = store.snapshot()
    states.pop()

    with pytest.raises(WrongShape, match="expected 2 shard states, got 1"):
        store.restore(states)


def test_eight_threads_pushing_25_times_each_lose_no_update() -> None:
    # Prepare: a shard big enough that numpy releases the GIL mid-push, so threads really
    # interleave; every push carries the same gradient, so the order does not matter
    layout = ShardLayout.balanced([VariableSpec("big", (300, 400)), VariableSpec("b", (7,))], 1)
    store = ParameterStore(InMemoryStorage(), JOB, layout, OPTIMIZER, max_staleness=10_000)
    store.initialize(initial_weights(layout))
    grad = gradient_for(layout, 0, scale=0.25)
    threads, pushes = 8, 25
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(thread: int) -> None:
        try:
            start.wait()
            for k in range(pushes):
                version, _ = store.fetch_flat(0)
                store.push(0, grad, version, f"thread{thread}-push{k}")
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    # Execute
    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()

    # Assert
    assert errors == []
    total = threads * pushes
    assert store.versions() == [total]
    assert sum(store.staleness_counts.values()) == total
    assert all(
        store.storage.was_applied(JOB, 0, f"thread{t}-push{k}")
        for t in range(threads)
        for k in range(pushes)
    )
    np.testing.assert_array_equal(
        store.fetch_flat(0)[1], expected_after_pushes(store, 0, grad, total)
    )
