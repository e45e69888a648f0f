from __future__ import annotations

import numpy as np

from downpour.paramstore import (
    AdagradConfig,
    InMemoryStorage,
    ParameterStore,
    ShardLayout,
    VariableSpec,
    adagrad_apply,
)


def store(staleness_aware: bool) -> ParameterStore:
    layout = ShardLayout.balanced([VariableSpec("w", (4,))], 1)
    s = ParameterStore(
        InMemoryStorage(), "job", layout, AdagradConfig(0.1), 10, staleness_aware=staleness_aware
    )
    s.initialize({"w": np.zeros(4, np.float32)})
    return s


def test_a_stale_push_takes_a_step_divided_by_its_staleness() -> None:
    # Prepare: two fresh pushes move the shard to version 2.
    s = store(staleness_aware=True)
    g = np.full(4, 0.5, np.float32)
    s.push(0, {"w": g}, 0, "a")
    s.push(0, {"w": g}, 1, "b")
    w, acc = s.fetch_flat(0)[1].copy(), s.snapshot()[0].accumulators.copy()

    # Execute: a push computed on version 0 (staleness 2).
    result = s.push(0, {"w": g}, 0, "c")

    # Assert: the reference applies the same gradient at half the step.
    adagrad_apply(w, acc, g, 0.1 / 2, 1e-7)
    assert result.staleness == 2
    np.testing.assert_array_equal(s.fetch_flat(0)[1], w)


def test_without_the_option_staleness_does_not_change_the_step() -> None:
    s = store(staleness_aware=False)
    g = np.full(4, 0.5, np.float32)
    s.push(0, {"w": g}, 0, "a")
    s.push(0, {"w": g}, 1, "b")
    w, acc = s.fetch_flat(0)[1].copy(), s.snapshot()[0].accumulators.copy()
    s.push(0, {"w": g}, 0, "c")
    adagrad_apply(w, acc, g, 0.1, 1e-7)
    np.testing.assert_array_equal(s.fetch_flat(0)[1], w)
