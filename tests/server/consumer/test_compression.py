"""int8 jobs over the socket: who gets int8, delta fetches, and int8 pushes (issue 11 §2)."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from channels.db import database_sync_to_async
from tests.server.consumer.client import (
    REPLY_TIMEOUT_S,
    Socket,
    gradients,
    open_socket,
    push_every_round,
    round_samples,
)
from tests.server.helpers import job_params

from downpour.training import store
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.models import Job
from downpour_agent.protocol import (
    COMPRESSIONS,
    SERVER_MESSAGES,
    frame_from_wire,
    frame_header_from_wire,
    frame_to_wire,
)
from downpour_agent.protocol.feedback import add_delta
from downpour_agent.protocol.quantize import encoded_nbytes, error_bound, int8_encode

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def int8_job(alice: Any, dataset: Any) -> Job:
    job = submit_job(alice, dataset, job_params(spot_check_fraction=0.0, compression="int8"))
    assert start_job(job)
    job.refresh_from_db()
    return job


@pytest.fixture
async def int8_agent(socket: Socket) -> Socket:
    """Charlie's agent, registered as one that decodes every compression."""
    assert (await socket.register(compressions=list(COMPRESSIONS)))["type"] == "registered"
    return socket


async def fetch(
    socket: Socket, lease: dict[str, Any], shard: int, have: int | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], int]:
    """A fetch's answer: its message, its tensors as sent, and their bytes on the wire."""
    msg: dict[str, Any] = {"type": "fetch", "lease_id": lease["lease_id"], "shard": shard}
    if have is not None:
        msg["have"] = have
    await socket.send(msg)
    data = await socket.communicator.receive_from(REPLY_TIMEOUT_S)
    assert isinstance(data, bytes), data
    reply, tensors = frame_from_wire(data, SERVER_MESSAGES)
    assert reply["type"] == "params", reply
    header = frame_header_from_wire(data, SERVER_MESSAGES)
    return reply, tensors, sum(len(t.buffer) for t in header.tensors)


def others_push(job: Job, rounds: int, seed: int) -> None:
    """Other agents' pushes move every shard on by ``rounds`` versions."""
    shards = store.job_store(job)
    rng = np.random.default_rng(seed)
    for k in range(rounds):
        for shard, specs in enumerate(shards.layout.shards):
            grads = {v.name: rng.normal(0, 0.05, v.shape).astype(np.float32) for v in specs}
            shards.push(shard, grads, shards.versions()[shard], f"other:{seed}:{k}:{shard}")


def current(job: Job, shard: int) -> tuple[int, dict[str, np.ndarray]]:
    version, tensors = store.job_store(job).fetch(shard)
    return version, {name: value.copy() for name, value in tensors.items()}


async def test_an_agent_that_decodes_int8_gets_int8_and_an_older_one_gets_none(
    int8_job: Job, int8_agent: Socket, token: str
) -> None:
    # Execute
    lease = await int8_agent.lease()
    communicator, _, _ = await open_socket(token)
    old = Socket(communicator)
    assert (await old.register("old-pc"))["type"] == "registered"
    old_lease = await old.lease()

    # Assert: the old agent pushes and fetches float32, and its fetches are never deltas
    assert lease["hyper"]["compression"] == "int8"
    assert old_lease["hyper"]["compression"] == "none"
    reply, tensors, _ = await fetch(old, old_lease, 0, have=0)
    assert "base" not in reply
    _, exact = await database_sync_to_async(current)(int8_job, 0)
    assert all(np.array_equal(tensors[k], exact[k]) for k in exact)
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)


async def test_delta_fetches_stay_within_one_quantisation_of_the_full_fetch(
    int8_job: Job, int8_agent: Socket
) -> None:
    # Prepare: a first fetch is the whole shard, exactly
    lease = await int8_agent.lease()
    reply, held, full_bytes = await fetch(int8_agent, lease, 1)
    version, exact = await database_sync_to_async(current)(int8_job, 1)
    assert "base" not in reply and reply["version"] == version
    assert all(np.array_equal(held[k], exact[k]) for k in exact)

    for round_ in range(6):
        # Execute: others push, the agent fetches naming what it holds
        await database_sync_to_async(others_push)(int8_job, 3, round_)
        reply, change, delta_bytes = await fetch(int8_agent, lease, 1, have=version)
        held = add_delta(held, change)

        # Assert: a delta from the version held, about a quarter of the bytes, and the
        # agent's copy off the store's by at most this one change's quantisation: errors
        # of earlier deltas were sent on, not accumulated
        version, exact = await database_sync_to_async(current)(int8_job, 1)
        assert reply["base"] == version - 3 and reply["version"] == version
        assert delta_bytes == sum(encoded_nbytes(v.size) for v in exact.values())
        assert full_bytes == sum(4 * v.size for v in exact.values())
        for name, value in exact.items():
            error = float(np.linalg.norm(held[name].astype(np.float64) - value))
            assert error <= error_bound(change[name]) * (1 + 1e-4) + 1e-7


async def test_a_forged_or_outdated_have_gets_the_whole_shard(
    int8_job: Job, int8_agent: Socket
) -> None:
    lease = await int8_agent.lease()
    first, _, _ = await fetch(int8_agent, lease, 0)
    await database_sync_to_async(others_push)(int8_job, 1, 7)
    second, _, _ = await fetch(int8_agent, lease, 0, have=first["version"])
    assert second["base"] == first["version"]

    for have in (second["version"] + 5, first["version"], -1):
        reply, tensors, _ = await fetch(int8_agent, lease, 0, have=have)

        assert "base" not in reply
        _, exact = await database_sync_to_async(current)(int8_job, 0)
        assert all(np.array_equal(tensors[k], exact[k]) for k in exact)


async def test_the_jobs_next_lease_on_the_connection_goes_on_with_deltas(
    int8_job: Job, int8_agent: Socket
) -> None:
    # Prepare: a whole lease, ending with a fetch of shard 0 (the mirror's version)
    first = await int8_agent.lease()
    samples = await push_every_round(int8_agent, first)
    last, _, _ = await fetch(int8_agent, first, 0)
    done = await int8_agent.ask(
        {"type": "complete", "lease_id": first["lease_id"], "samples": samples}
    )
    assert done["type"] == "complete_ack", done

    # Execute
    second = await int8_agent.lease()
    reply, _, _ = await fetch(int8_agent, second, 0, have=last["version"])

    # Assert
    assert second["lease_id"] != first["lease_id"]
    assert reply["base"] == last["version"]


async def test_after_a_reconnect_the_first_fetch_is_the_whole_shard(
    int8_job: Job, int8_agent: Socket, token: str
) -> None:
    # Prepare
    lease = await int8_agent.lease()
    first, _, _ = await fetch(int8_agent, lease, 0)
    await int8_agent.communicator.disconnect(timeout=REPLY_TIMEOUT_S)
    communicator, _, _ = await open_socket(token)
    again = Socket(communicator)
    assert (await again.register(compressions=["int8"]))["type"] == "registered"
    resumed = await again.ask({"type": "resume", "lease_id": lease["lease_id"]})
    assert resumed["type"] == "lease" and resumed["hyper"]["compression"] == "int8"

    # Execute
    reply, _, _ = await fetch(again, lease, 0, have=first["version"])

    # Assert
    assert "base" not in reply
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)


async def test_a_job_without_compression_ignores_have(running_job: Job, int8_agent: Socket) -> None:
    lease = await int8_agent.lease()
    assert lease["hyper"]["compression"] == "none"

    reply, _, _ = await fetch(int8_agent, lease, 0, have=0)

    assert "base" not in reply


async def test_an_int8_push_is_applied_as_what_it_decodes_to(
    int8_job: Job, int8_agent: Socket
) -> None:
    # Prepare
    lease = await int8_agent.lease()
    version, before = await database_sync_to_async(current)(int8_job, 0)
    grads = gradients(lease, 0, 0.02)
    msg = {"type": "push", "lease_id": lease["lease_id"], "seq": 0, "shard": 0}
    msg |= {"base_version": version, "samples": round_samples(lease, 0)}

    # Execute
    await int8_agent.send_bytes(frame_to_wire(msg, grads, "int8"))
    ack, _ = await int8_agent.recv()

    # Assert
    assert ack["type"] == "push_ack" and ack["applied"], ack
    after_version, after = await database_sync_to_async(current)(int8_job, 0)
    assert after_version == version + 1
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def _frame(msg: dict[str, Any], tensors: list[tuple[str, list[int], bytes]]) -> bytes:
    header = {
        "msg": msg,
        "tensors": [
            {"name": n, "dtype": "float32", "shape": s, "compression": "int8", "nbytes": len(b)}
            for n, s, b in tensors
        ],
    }
    head = json.dumps(header).encode()
    return b"DPT\x01" + struct.pack("<I", len(head)) + head + b"".join(b for _, _, b in tensors)


@pytest.mark.parametrize("damage", ["short", "long", "minus-128"])
async def test_a_damaged_int8_push_is_a_bad_frame_and_nothing_is_applied(
    int8_job: Job, int8_agent: Socket, damage: str
) -> None:
    # Prepare
    lease = await int8_agent.lease()
    version, _ = await database_sync_to_async(current)(int8_job, 0)
    parts = []
    for entry in lease["layout"][0]:
        buffer = int8_encode(np.full(entry["shape"], 0.5, np.float32))
        parts.append((entry["name"], entry["shape"], buffer))
    name, shape, buffer = parts[0]
    parts[0] = (
        name,
        shape,
        {"short": buffer[:-1], "long": buffer + b"\0", "minus-128": buffer[:-1] + b"\x80"}[damage],
    )
    msg = {"type": "push", "lease_id": lease["lease_id"], "seq": 0, "shard": 0}
    msg |= {"base_version": version, "samples": round_samples(lease, 0), "ref": 5}

    # Execute
    await int8_agent.send_bytes(_frame(msg, parts))
    reply, _ = await int8_agent.recv()

    # Assert
    assert reply["type"] == "error" and reply["code"] == "bad_frame" and reply["ref"] == 5
    assert (await database_sync_to_async(current)(int8_job, 0))[0] == version
    await int8_agent.still_usable()


async def test_a_register_with_malformed_compressions_is_refused(socket: Socket) -> None:
    reply = await socket.register(compressions="int8")

    assert reply["type"] == "error" and reply["code"] == "bad_message"
