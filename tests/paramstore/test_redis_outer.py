"""The outer optimizer's momentum in Redis: kept with the weights, shared across stores."""

from __future__ import annotations

import numpy as np
import pytest
import redis
from tests.paramstore.layouts import initial_weights, mlp_layout

from downpour.hotstate.store import RedisStorage
from downpour.paramstore import (
    AdagradConfig,
    InMemoryStorage,
    OuterConfig,
    ParameterStore,
)

pytestmark = pytest.mark.services


def test_two_processes_stores_share_the_momentum_and_apply_a_push_once(
    client: redis.Redis, prefix: str
) -> None:
    # Prepare: two stores on the same Redis (as two daphne processes), one in memory as
    # the reference.
    layout = mlp_layout()
    config = OuterConfig(0.7, 0.9)

    def store(storage: RedisStorage | InMemoryStorage) -> ParameterStore:
        return ParameterStore(storage, "job", layout, AdagradConfig(0.05), 8, outer=config)

    a, b = store(RedisStorage(client, prefix)), store(RedisStorage(client, prefix))
    reference = store(InMemoryStorage())
    a.initialize(initial_weights(layout))
    reference.initialize(initial_weights(layout))
    rng = np.random.default_rng(9)

    # Execute: pushes alternate between the stores; each is also replayed on the other.
    for step in range(4):
        delta = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in layout.specs}
        for shard, part in enumerate(layout.split(delta)):
            first, again = (a, b) if step % 2 == 0 else (b, a)
            assert first.push(shard, part, step, f"l:{step}:{shard}").applied
            assert again.push(shard, part, step, f"l:{step}:{shard}").duplicate
            reference.push(shard, part, step, f"l:{step}:{shard}")

    # Assert: weights and momentum equal the in-memory store's.
    for ours, theirs in zip(a.snapshot(), reference.snapshot(), strict=True):
        assert ours.version == theirs.version == 4
        np.testing.assert_array_equal(ours.weights, theirs.weights)
        np.testing.assert_array_equal(ours.accumulators, theirs.accumulators)
        assert ours.accumulators.any()
