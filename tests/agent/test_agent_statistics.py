"""Non-trainable statistics on the agent: measured per batch, carried in shard 0's frames."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from downpour_agent.protocol import (
    AGENT_MESSAGES,
    STATISTICS_PREFIX,
    DatasetSpec,
    Hyper,
    LeaseSpec,
    ProtocolError,
    frame_from_wire,
    lease_from_wire,
    lease_to_wire,
    split_statistics,
    statistics_to_frame,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")


def bn_model() -> Any:
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )


def computer() -> Any:
    from downpour_agent.trainer import GradientComputer

    return GradientComputer.from_model(bn_model(), keras.losses.SparseCategoricalCrossentropy())


def lease(statistics: list[Any]) -> LeaseSpec:
    return LeaseSpec(
        lease_id="l",
        job_id="j",
        work_unit_id="u",
        steps=2,
        seed=0,
        model={},
        loss="sparse_categorical_crossentropy",
        hyper=Hyper(2, 1, 2, 0.1),
        dataset=DatasetSpec("/api/agent/shards/x/", "0" * 64, 4),
        layout=[[("w", (2,), "float32")]],
        expires_in_s=30.0,
        statistics=statistics,
    )


def test_the_computer_reports_the_sample_weighted_mean_of_its_batch_statistics() -> None:
    # Prepare
    gc = computer()
    names = [name for name, _, _ in gc.statistic_specs()]
    assert [name.rsplit("/", 1)[-1] for name in names] == ["moving_mean", "moving_variance"]
    kernel = gc.variable_specs()[0][0]
    gc.set_weights({kernel: np.eye(4, 3, dtype=np.float32)})
    first = np.zeros((2, 4), np.float32)  # projections: all 0
    second = np.ones((6, 4), np.float32)  # projections: all 1
    y2, y6 = np.zeros(2, np.int64), np.zeros(6, np.int64)
    # Execute
    gc.compute(first, y2)
    gc.compute(second, y6)
    mean, samples = gc.take_statistics()
    # Assert: batch means 0 and 1, weighted 2:6; each batch's variance is 0.
    assert samples == 8
    np.testing.assert_allclose(mean[names[0]], 0.75, rtol=1e-6)
    np.testing.assert_allclose(mean[names[1]], 0.0, atol=1e-6)
    assert gc.take_statistics()[1] == 0  # started again


def test_a_model_without_statistics_reports_none() -> None:
    from downpour_agent.trainer import GradientComputer

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    gc = GradientComputer.from_model(model, keras.losses.MeanSquaredError())
    assert gc.statistic_specs() == [] and gc.take_statistics() == ({}, 0)


def test_the_server_statistics_load_into_the_model() -> None:
    gc = computer()
    name = gc.statistic_specs()[0][0]
    gc.set_weights({name: np.full(3, 5.0, np.float32)})
    np.testing.assert_array_equal(gc.get_statistics()[name], np.full(3, 5.0, np.float32))


def test_statistics_travel_in_shard_0s_push_frame_only() -> None:
    from downpour_agent.trainer import GradientAccumulator
    from downpour_agent.transfer import push_frames

    spec = lease([("bn/moving_mean", (3,), "float32")])
    spec = LeaseSpec(
        **{**spec.__dict__, "layout": [[("a", (2,), "float32")], [("b", (1,), "float32")]]}
    )
    accumulator = GradientAccumulator()
    accumulator.add({"a": np.ones(2, np.float32), "b": np.ones(1, np.float32)}, 4)
    frames = push_frames(
        accumulator, spec, 0, {0: 0, 1: 0}, [], [1, 2], statistics={"bn/moving_mean": np.ones(3)}
    )
    decoded = [frame_from_wire(frame, AGENT_MESSAGES, 1 << 20)[1] for frame in frames]
    assert set(decoded[0]) == {"a", STATISTICS_PREFIX + "bn/moving_mean"}
    assert set(decoded[1]) == {"b"}


def test_a_lease_names_its_statistics_on_the_wire_only_when_it_has_some() -> None:
    with_stats = lease([("bn/moving_mean", (3,), "float32")])
    assert lease_from_wire(lease_to_wire(with_stats)) == with_stats
    assert "statistics" not in lease_to_wire(lease([]))
    assert lease_from_wire(lease_to_wire(lease([]))).statistics == []


def test_split_statistics_separates_and_strips_the_prefix() -> None:
    tensors = {"w": 1, **statistics_to_frame({"bn/moving_mean": 2})}
    assert split_statistics(tensors) == ({"w": 1}, {"bn/moving_mean": 2})
    with pytest.raises(ProtocolError):
        split_statistics({STATISTICS_PREFIX: 3})
