"""Non-trainable statistics over the agent socket, in process (see test_consumer.py).

Alice's job is a small MLP with BatchNormalization; Charlie's agent fetches the statistics
with shard 0's weights and reports its own with shard 0's push.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from tests.server.consumer.client import Socket, gradients
from tests.server.helpers import job_params

from downpour.training import store
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.models import Job
from downpour_agent.protocol import STATISTICS_PREFIX, statistics_to_frame

# The socket fixtures of test_consumer.py, shared by name.

pytestmark = pytest.mark.django_db(transaction=True)


def bn_mlp_json() -> dict[str, Any]:
    import keras

    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(4, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    return dict(json.loads(model.to_json()))


@pytest.fixture
def bn_job(alice: Any, dataset: Any) -> Job:
    job = submit_job(alice, dataset, job_params(model_json=bn_mlp_json(), spot_check_fraction=0.0))
    assert start_job(job)
    job.refresh_from_db()
    return job


def measured(lease: dict[str, Any], value: float) -> dict[str, np.ndarray]:
    return {v["name"]: np.full(v["shape"], value, dtype=np.float32) for v in lease["statistics"]}


async def test_the_lease_names_the_statistics_and_shard_0_serves_them(
    bn_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    names = [v["name"] for v in lease["statistics"]]
    assert [n.rsplit("/", 1)[-1] for n in names] == ["moving_mean", "moving_variance"]
    _, shard0 = await registered.fetch(lease, 0)
    _, shard1 = await registered.fetch(lease, 1)
    assert {STATISTICS_PREFIX + n for n in names} <= set(shard0)
    assert not any(n.startswith(STATISTICS_PREFIX) for n in shard1)
    np.testing.assert_array_equal(shard0[STATISTICS_PREFIX + names[1]], np.ones(4, np.float32))


async def test_a_push_with_statistics_moves_the_average_once(
    bn_job: Job, registered: Socket
) -> None:
    # Prepare
    lease = await registered.lease()
    version, _ = await registered.fetch(lease, 0)
    frame = gradients(lease, 0) | statistics_to_frame(measured(lease, 3.0))
    # Execute
    first = await registered.push(lease, 0, frame, base_version=version)
    replay = await registered.push(lease, 0, frame, base_version=version)
    # Assert
    assert first["applied"] and replay["duplicate"]
    state = store.job_store(bn_job).statistics_state()
    hyper, data = lease["hyper"], lease["dataset"]
    samples = min(hyper["batch_size"], data["n_samples"]) * min(hyper["n_push"], lease["steps"])
    assert state is not None and state.version == 1 and state.samples == samples
    for value in store.job_store(bn_job).statistics().values():
        np.testing.assert_allclose(value, 3.0)


async def test_statistics_on_another_shard_are_refused_and_nothing_is_applied(
    bn_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    frame = gradients(lease, 1) | statistics_to_frame(measured(lease, 3.0))
    reply = await registered.push(lease, 1, frame)
    assert reply["code"] == "bad_message"
    assert store.job_store(bn_job).versions()[1] == 0
    await registered.still_usable()


async def test_non_finite_statistics_are_refused_before_the_gradient_is_applied(
    bn_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    frame = gradients(lease, 0) | statistics_to_frame(measured(lease, float("nan")))
    reply = await registered.push(lease, 0, frame)
    assert reply["code"] == "non_finite"
    assert store.job_store(bn_job).versions()[0] == 0
