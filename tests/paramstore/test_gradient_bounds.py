"""Huge finite gradients: clipped to the job's norm, refused when Adagrad would overflow.

A gradient of 3e38 is finite and float32, so it passed every check and was applied, and
Adagrad's accumulators went to infinity. These tests run the store on InMemoryStorage and
on the real Redis (``tests.services.redis_url()``).
"""

from __future__ import annotations

import numpy as np
import pytest
import redis
from tests.paramstore.layouts import initial_weights, model_layout

from downpour.hotstate.store import RedisStorage
from downpour.paramstore import (
    AdagradConfig,
    InMemoryStorage,
    NonFinite,
    ParameterStore,
    ShardLayout,
    ShardStorage,
    adagrad_apply,
)
from downpour.paramstore.bounds import MAX_SQUARABLE, clip_to_norm, gradient_norm

OPTIMIZER = AdagradConfig(learning_rate=0.1)
JOB = "alice-job"


def make_store(storage: ShardStorage, max_grad_norm: float | None) -> ParameterStore:
    layout = model_layout()
    store = ParameterStore(storage, JOB, layout, OPTIMIZER, 4, max_grad_norm=max_grad_norm)
    store.initialize(initial_weights(layout))
    return store


def filled(layout: ShardLayout, shard: int, value: float) -> dict[str, np.ndarray]:
    return {spec.name: np.full(spec.shape, value, np.float32) for spec in layout.shards[shard]}


def states(store: ParameterStore) -> list[tuple[int, bytes, bytes]]:
    return [(s.version, s.weights.tobytes(), s.accumulators.tobytes()) for s in store.snapshot()]


def test_a_3e38_gradient_is_refused_and_changes_nothing_even_with_the_clip_off() -> None:
    store = make_store(InMemoryStorage(), None)
    before = states(store)

    with pytest.raises(NonFinite, match="overflow Adagrad's float32 accumulator"):
        store.push(0, filled(store.layout, 0, 3e38), 0, "lease:0:0")

    assert states(store) == before


def test_values_whose_squares_just_fit_are_taken_and_just_beyond_are_refused() -> None:
    store = make_store(InMemoryStorage(), 1.0)
    under = np.nextafter(np.float32(MAX_SQUARABLE), np.float32(0))
    over = np.nextafter(np.float32(MAX_SQUARABLE), np.float32(np.inf))

    assert store.push(0, filled(store.layout, 0, float(under)), 0, "lease:0:0").applied
    with pytest.raises(NonFinite):
        store.push(0, filled(store.layout, 0, float(over)), 1, "lease:1:0")


def test_pushes_that_would_carry_an_accumulator_past_float32_are_refused_unclipped() -> None:
    store = make_store(InMemoryStorage(), None)
    big = float(np.float32(MAX_SQUARABLE) * np.float32(0.8))
    assert store.push(0, filled(store.layout, 0, big), 0, "lease:0:0").applied
    before = states(store)

    with pytest.raises(NonFinite, match="nothing was applied"):
        store.push(0, filled(store.layout, 0, big), 1, "lease:1:0")

    assert states(store) == before
    assert np.isfinite(store.snapshot()[0].accumulators).all()


def test_a_huge_gradient_is_scaled_to_the_jobs_norm_before_adagrad_sees_it() -> None:
    store = make_store(InMemoryStorage(), 10.0)
    layout = store.layout
    huge = filled(layout, 0, 1e18)

    result = store.push(0, huge, 0, "lease:0:0")

    assert result.applied
    accumulators = store.snapshot()[0].accumulators
    # Sum of squares grows by at most the clip's square (plus float32 rounding).
    grown = float(accumulators.astype(np.float64).sum()) - 0.1 * accumulators.size
    assert grown == pytest.approx(100.0, rel=1e-5)
    weights = layout.flatten_shard(0, layout.split(initial_weights(layout))[0])
    acc = np.full(weights.shape, OPTIMIZER.initial_accumulator, np.float32)
    clipped, was_clipped = clip_to_norm([layout.flatten_shard(0, huge)], 10.0)
    adagrad_apply(weights, acc, clipped[0], OPTIMIZER.learning_rate, OPTIMIZER.epsilon)
    assert was_clipped
    np.testing.assert_array_equal(store.snapshot()[0].weights, weights)


def test_a_gradient_within_the_norm_is_applied_exactly_as_without_a_clip() -> None:
    clipped = make_store(InMemoryStorage(), 10.0)
    plain = make_store(InMemoryStorage(), None)
    grad = filled(clipped.layout, 1, 0.25)

    clipped.push(1, grad, 0, "lease:0:1")
    plain.push(1, grad, 0, "lease:0:1")

    assert states(clipped) == states(plain)


def test_zero_turns_the_clip_off() -> None:
    store = make_store(InMemoryStorage(), 0.0)
    assert store.max_grad_norm is None


def test_the_norm_of_huge_values_is_summed_without_overflow() -> None:
    pieces = [np.full(1000, 1e19, np.float32), np.full(10, 1e19, np.float32)]
    assert gradient_norm(pieces) == pytest.approx(1e19 * np.sqrt(1010), rel=1e-6)


@pytest.mark.services
def test_the_redis_store_refuses_the_overflow_and_clips_the_huge(
    client: redis.Redis, prefix: str
) -> None:
    store = make_store(RedisStorage(client, prefix), 10.0)
    before = states(store)

    with pytest.raises(NonFinite):
        store.push(0, filled(store.layout, 0, 3e38), 0, "lease:0:0")
    assert states(store) == before

    assert store.push(0, filled(store.layout, 0, 1e18), 0, "lease:1:0").applied
    accumulators = store.snapshot()[0].accumulators
    assert float(accumulators.astype(np.float64).sum()) - 0.1 * accumulators.size == (
        pytest.approx(100.0, rel=1e-5)
    )
