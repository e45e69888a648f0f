"""Non-trainable statistics: the running average, exactly once per push id, in every backend
and in checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from downpour.hotstate.store import RedisStorage
from downpour.paramstore import (
    AdagradConfig,
    InMemoryStorage,
    NonFinite,
    NotInitialized,
    ParameterStore,
    ShardLayout,
    StatisticsState,
    VariableSpec,
    WrongShape,
    fold_report,
    read_checkpoint,
    write_checkpoint,
)
from downpour.paramstore.statistics import check_statistics

TRAINABLE = [VariableSpec("bn/gamma", (3,)), VariableSpec("dense/kernel", (3, 2))]
STATISTICS = [VariableSpec("bn/moving_mean", (3,)), VariableSpec("bn/moving_variance", (3,))]


def bn_layout() -> ShardLayout:
    return ShardLayout.balanced(TRAINABLE, 2, STATISTICS)


def start_weights() -> dict[str, np.ndarray]:
    return {
        "bn/gamma": np.ones(3, np.float32),
        "dense/kernel": np.zeros((3, 2), np.float32),
        "bn/moving_mean": np.zeros(3, np.float32),
        "bn/moving_variance": np.ones(3, np.float32),
    }


def report(mean: float, variance: float) -> dict[str, np.ndarray]:
    return {
        "bn/moving_mean": np.full(3, mean, np.float32),
        "bn/moving_variance": np.full(3, variance, np.float32),
    }


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[ParameterStore]:
    if request.param == "memory":
        storage: object = InMemoryStorage()
    else:
        request.applymarker(pytest.mark.services)
        client = request.getfixturevalue("client")
        storage = RedisStorage(client, request.getfixturevalue("prefix"))
    store = ParameterStore(
        storage,  # type: ignore[arg-type]
        "alice-bn-job",
        bn_layout(),
        AdagradConfig(0.05),
        max_staleness=16,
    )
    store.initialize(start_weights())
    yield store
    store.delete()


# --- the numeric rule ---------------------------------------------------------------------


def test_the_first_report_replaces_the_initial_values() -> None:
    state = StatisticsState(0, np.zeros(4, np.float32), 0.0)
    after = fold_report(state, np.full(4, 2.0, np.float32), 32)
    np.testing.assert_allclose(after.values, 2.0)
    assert after.version == 1 and after.samples == 32


def test_reports_average_by_samples_within_the_horizon() -> None:
    state = StatisticsState(0, np.zeros(1, np.float32), 0.0)
    state = fold_report(state, np.array([1.0], np.float32), 30)
    state = fold_report(state, np.array([4.0], np.float32), 10)
    np.testing.assert_allclose(state.values, [(30 * 1.0 + 10 * 4.0) / 40], rtol=1e-6)


def test_beyond_the_horizon_old_reports_fade() -> None:
    state = StatisticsState(0, np.zeros(1, np.float32), 0.0)
    state = fold_report(state, np.array([0.0], np.float32), 10_000, horizon=100)
    state = fold_report(state, np.array([1.0], np.float32), 100, horizon=100)
    np.testing.assert_allclose(state.values, [0.5], rtol=1e-6)  # as if 100 samples, not 10,000


def test_a_report_must_be_finite_and_fit() -> None:
    state = StatisticsState(0, np.zeros(2, np.float32), 0.0)
    with pytest.raises(NonFinite):
        fold_report(state, np.array([np.nan, 0], np.float32), 1)
    with pytest.raises(WrongShape):
        fold_report(state, np.zeros(3, np.float32), 1)
    with pytest.raises(ValueError, match="samples"):
        fold_report(state, np.zeros(2, np.float32), 0)


def test_the_state_survives_its_byte_encoding() -> None:
    state = StatisticsState(7, np.arange(5, dtype=np.float32), 123.5)
    back = StatisticsState.from_bytes(state.to_bytes(), 5)
    assert back.version == 7 and back.samples == 123.5
    np.testing.assert_array_equal(back.values, state.values)


# --- the layout ---------------------------------------------------------------------------


def test_the_layout_keeps_statistics_apart_from_the_shards_and_in_its_json() -> None:
    layout = bn_layout()
    sharded = {spec.name for shard in layout.shards for spec in shard}
    assert sharded == {spec.name for spec in TRAINABLE}
    assert layout.statistics == tuple(STATISTICS)
    assert layout.statistics_size == 6
    assert ShardLayout.from_json(layout.to_json()) == layout
    assert "statistics" not in ShardLayout.balanced(TRAINABLE, 2).to_json()


def test_check_statistics_refuses_a_missing_or_infinite_statistic() -> None:
    layout = bn_layout()
    with pytest.raises(WrongShape):
        check_statistics(layout, {"bn/moving_mean": np.zeros(3, np.float32)})
    with pytest.raises(NonFinite):
        check_statistics(layout, report(np.inf, 1.0))


# --- the store, in memory and in Redis ----------------------------------------------------


def test_fetches_return_the_initial_statistics_with_the_weights(store: ParameterStore) -> None:
    weights = store.weights()
    np.testing.assert_array_equal(weights["bn/moving_variance"], np.ones(3, np.float32))
    assert set(weights) == {spec.name for spec in TRAINABLE + STATISTICS}


def test_a_report_is_applied_exactly_once_per_push_id(store: ParameterStore) -> None:
    assert store.report_statistics(report(2.0, 4.0), 32, "lease:0:0")
    assert not store.report_statistics(report(100.0, 100.0), 32, "lease:0:0")
    statistics = store.statistics()
    np.testing.assert_allclose(statistics["bn/moving_mean"], 2.0)
    np.testing.assert_allclose(statistics["bn/moving_variance"], 4.0)
    state = store.statistics_state()
    assert state is not None and state.version == 1 and state.samples == 32


def test_two_reports_make_a_sample_weighted_mean(store: ParameterStore) -> None:
    store.report_statistics(report(1.0, 1.0), 30, "a")
    store.report_statistics(report(4.0, 1.0), 10, "b")
    np.testing.assert_allclose(store.statistics()["bn/moving_mean"], 1.75, rtol=1e-6)


def test_delete_forgets_the_statistics(store: ParameterStore) -> None:
    store.delete()
    with pytest.raises(NotInitialized):
        store.statistics_state()


def test_the_statistics_survive_a_checkpoint_and_a_restore(
    store: ParameterStore, tmp_path: Path
) -> None:
    store.report_statistics(report(3.0, 2.0), 64, "a")
    path = tmp_path / "ckpt.npz"
    write_checkpoint(path, store.layout, store.snapshot(), {}, store.statistics_state())
    store.report_statistics(report(9.0, 9.0), 64, "b")
    checkpoint = read_checkpoint(path)
    store.restore(checkpoint.states)
    store.restore_statistics(checkpoint.statistics)
    np.testing.assert_allclose(store.statistics()["bn/moving_mean"], 3.0)
    assert checkpoint.weights()["bn/moving_variance"].tolist() == [2.0, 2.0, 2.0]


def test_a_checkpoint_of_a_layout_with_statistics_needs_them(tmp_path: Path) -> None:
    store = ParameterStore(
        InMemoryStorage(), "j", bn_layout(), AdagradConfig(0.05), max_staleness=16
    )
    store.initialize(start_weights())
    with pytest.raises(ValueError, match="statistics"):
        write_checkpoint(tmp_path / "c.npz", store.layout, store.snapshot(), {})


def test_a_model_without_statistics_has_none(tmp_path: Path) -> None:
    store = ParameterStore(
        InMemoryStorage(),
        "j",
        ShardLayout.balanced(TRAINABLE, 1),
        AdagradConfig(0.05),
        max_staleness=16,
    )
    store.initialize({k: v for k, v in start_weights().items() if not k.startswith("bn/moving")})
    assert store.statistics_state() is None and store.statistics() == {}
