"""The agent socket for local-steps jobs: the lease's inner loop and H, pseudo-gradient pushes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from tests.server.consumer.client import Socket, gradients, lease_row, push_every_round
from tests.server.helpers import job_params

from downpour.training import store
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.models import Job
from downpour_agent.protocol import ErrorCode
from downpour_agent.protocol.quantize import encoded_nbytes

pytestmark = pytest.mark.django_db(transaction=True)


def _local_job(alice: Any, dataset: Any, **extra: Any) -> Job:
    params = job_params(
        algorithm="local-steps",
        spot_check_fraction=0.0,
        inner_optimizer="sgd-momentum",
        inner_learning_rate=0.02,
        **extra,
    )
    job = submit_job(alice, dataset, params)
    assert start_job(job)
    job.refresh_from_db()
    return job


async def test_a_local_steps_lease_carries_its_inner_loop_and_the_jobs_h(
    alice: Any, dataset: Any, registered: Socket
) -> None:
    # Prepare: a job that fixes H at 6.
    job = await _sync(_local_job, alice, dataset, inner_steps=6)

    # Execute
    lease = await registered.lease()

    # Assert: rounds of H steps, fetched once a round; the outer settings stay server-side.
    assert lease["job_id"] == str(job.id)
    assert lease["local_steps"] == {"inner_optimizer": "sgd-momentum", "inner_learning_rate": 0.02}
    assert lease["hyper"]["n_push"] == lease["hyper"]["n_fetch"] == 6
    assert (await lease_row(lease["lease_id"])).round_steps == 6


async def test_h_is_chosen_from_the_rates_the_agent_reports(
    alice: Any, dataset: Any, registered: Socket
) -> None:
    # Prepare: H chosen per agent (0); a slow link and a fast computer.
    await _sync(_local_job, alice, dataset, inner_steps=0)
    link = {"compute_samples_per_s": 32000.0, "push_bytes_per_s": 1e3, "fetch_bytes_per_s": 1e4}

    # Execute
    lease = await registered.ask({"type": "request_work", "link": link, "ref": 1})

    # Assert: far more steps than the default, within the bound.
    assert lease["type"] == "lease", lease
    assert 16 < lease["hyper"]["n_push"] <= 500


@pytest.mark.parametrize("compression", ["none", "int8"])
async def test_h_counts_the_push_in_the_bytes_the_jobs_compression_sends(
    alice: Any, dataset: Any, registered: Socket, compression: str
) -> None:
    # Prepare: a 1 ms step, a push rate slow enough that the push sets H (50 bytes a second
    # per parameter), a fetch fast enough to add nothing.
    job = await _sync(_local_job, alice, dataset, inner_steps=0, compression=compression)
    rate = 50.0 * job.param_count
    link = {"compute_samples_per_s": 32000.0, "push_bytes_per_s": rate, "fetch_bytes_per_s": 1e11}

    # Execute
    lease = await registered.ask({"type": "request_work", "link": link, "ref": 1})

    # Assert: 1.5 x (the push's own bytes over its rate + the float32 fetch's), in 1 ms steps
    # (int8: a byte a parameter and a float32 scale per 256, about a quarter of float32's H).
    push_bytes = encoded_nbytes(job.param_count) if compression == "int8" else 4 * job.param_count
    assert lease["type"] == "lease", lease
    seconds = push_bytes / rate + 4 * job.param_count / 1e11
    assert 8 < lease["hyper"]["n_push"] == math.ceil(1.5 * seconds / 0.001) < 500


async def test_a_bad_link_report_is_refused(alice: Any, dataset: Any, registered: Socket) -> None:
    await _sync(_local_job, alice, dataset)
    reply = await registered.ask(
        {"type": "request_work", "link": {"compute_samples_per_s": -1}, "ref": 3}
    )
    assert reply["type"] == "error" and reply["code"] == ErrorCode.BAD_MESSAGE
    assert reply["ref"] == 3


async def test_pseudo_gradients_apply_with_nesterov_and_a_complete_counts_the_rounds(
    alice: Any, dataset: Any, registered: Socket
) -> None:
    # Prepare
    # DiLoCo's outer settings, not the defaults (1.0, no momentum), so that momentum shows.
    job = await _sync(
        _local_job, alice, dataset, inner_steps=4, outer_learning_rate=0.7, outer_momentum=0.9
    )
    lease = await registered.lease()
    _, before = await registered.fetch(lease, 0)

    # Execute: one round's pseudo-gradient for shard 0, flagged.
    delta = gradients(lease, 0, 0.1)
    reply = await registered.push(lease, 0, delta, pseudo_gradient=True)

    # Assert: w - (0.9 * m + lr * d) with m = -lr * d: w - 0.7 * 1.9 * 0.1.
    assert reply["type"] == "push_ack" and reply["applied"], reply
    _, after = await registered.fetch(lease, 0)
    for name, value in after.items():
        np.testing.assert_allclose(value, before[name] - 0.7 * 1.9 * 0.1, rtol=1e-5, atol=1e-6)
    assert store.job_store(job).outer is not None


async def test_a_push_of_the_wrong_kind_is_refused_and_changes_nothing(
    alice: Any, dataset: Any, registered: Socket
) -> None:
    # Prepare
    await _sync(_local_job, alice, dataset, inner_steps=4)
    lease = await registered.lease()
    _, before = await registered.fetch(lease, 0)

    # Execute: a plain gradient push on a local-steps lease.
    reply = await registered.push(lease, 0, gradients(lease, 0, 0.1))

    # Assert
    assert reply["type"] == "error" and reply["code"] == ErrorCode.BAD_MESSAGE, reply
    assert "pseudo_gradient" in reply["message"]
    version, after = await registered.fetch(lease, 0)
    assert version == 0
    for name, value in after.items():
        np.testing.assert_array_equal(value, before[name])


async def test_a_gradient_lease_refuses_a_pseudo_gradient(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0), pseudo_gradient=True)
    assert reply["type"] == "error" and reply["code"] == ErrorCode.BAD_MESSAGE, reply


async def test_a_local_steps_lease_completes_after_all_its_rounds(
    alice: Any, dataset: Any, registered: Socket
) -> None:
    await _sync(_local_job, alice, dataset, inner_steps=3)
    lease = await registered.lease()
    samples = await _push_rounds(registered, lease)
    reply = await registered.ask(
        {"type": "complete", "lease_id": lease["lease_id"], "samples": samples, "ref": 5}
    )
    assert reply["type"] == "complete_ack", reply


async def _push_rounds(socket: Socket, lease: dict[str, Any]) -> int:
    original = socket.push

    async def flagged(*args: Any, **fields: Any) -> dict[str, Any]:
        return await original(*args, pseudo_gradient=True, **fields)

    socket.push = flagged  # type: ignore[method-assign]
    try:
        return await push_every_round(socket, lease)
    finally:
        socket.push = original  # type: ignore[method-assign]


async def _sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from channels.db import database_sync_to_async

    return await database_sync_to_async(fn)(*args, **kwargs)
