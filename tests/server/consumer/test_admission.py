"""Issue 10: the work a push may cost is bounded before it is done, and only real rounds count.

High 1: a frame is checked (registration, rate, lease, layout) before anything is inflated,
and inflates to at most its shard's float32 size. High 2: ``seq`` names a round of the
lease, ``samples`` fit that round, ``complete`` needs the lease's pushes and its checked
round. 14: every refusal echoes the ``ref``.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
import zlib
from functools import cache
from typing import Any

import pytest
from channels.db import database_sync_to_async
from tests.server.consumer.client import (
    Socket,
    gradients,
    lease_row,
    push_every_round,
    round_samples,
)
from tests.server.helpers import job_params

from downpour.agents import push
from downpour.donors.models import Agent
from downpour.training import spotcheck_selection as selection
from downpour.training import store
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.models import Job, SpotCheck
from downpour_agent.protocol import CloseCode, frame_to_wire
from downpour_agent.protocol.tensors import MAGIC

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1 << 20
#: What one hostile frame may add to the process's traced peak memory.
PEAK_BOUND = 32 * MiB
BOMB_BYTES = 256 * MiB


@cache
def zeros_deflated(size: int) -> bytes:
    """``size`` zero bytes deflated, built a MiB at a time (about 1/1000 of ``size``)."""
    deflate = zlib.compressobj(9)
    chunk = bytes(MiB)
    return b"".join(deflate.compress(chunk) for _ in range(size // MiB)) + deflate.flush()


def bomb(msg: dict[str, Any], names: list[str]) -> bytes:
    """A frame of one zlib tensor per name, each declaring and inflating to 256 MiB."""
    payload = zeros_deflated(BOMB_BYTES)
    descriptors = [
        {
            "name": name,
            "dtype": "float32",
            "shape": [BOMB_BYTES // 4],
            "compression": "zlib",
            "nbytes": len(payload),
        }
        for name in names
    ]
    head = json.dumps({"msg": msg, "tensors": descriptors}).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + payload * len(names)


async def peak_of(socket: Socket, frame: bytes) -> tuple[dict[str, Any], int, float]:
    """Send ``frame``; return the reply, the traced peak memory it added and the seconds."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        started = time.monotonic()
        await socket.send_bytes(frame)
        reply, _ = await socket.recv()
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return reply, peak - before, elapsed


def push_msg(lease_id: str, **fields: Any) -> dict[str, Any]:
    msg = {"type": "push", "lease_id": lease_id, "seq": 0, "shard": 0, "base_version": 0}
    return {**msg, "samples": 30, **fields}


@pytest.fixture
def checked_job(alice: Any, dataset: Any) -> Job:
    """A started job whose every lease of an untrusted agent is spot-checked."""
    job = submit_job(alice, dataset, job_params(spot_check_fraction=1.0))
    assert start_job(job)
    job.refresh_from_db()
    return job


# --- High 1: nothing is inflated before the frame is checked --------------------------------


async def test_a_bomb_from_a_socket_that_never_registered_is_refused_without_inflating(
    socket: Socket,
) -> None:
    # Prepare: 4 zlib tensors of 256 MiB each in a frame of about 1 MiB.
    frame = bomb(push_msg("x", ref=9), ["a", "b", "c", "d"])
    assert len(frame) < 2 * MiB

    # Execute
    reply, peak, elapsed = await peak_of(socket, frame)

    # Assert
    assert (reply["code"], reply["ref"]) == ("not_registered", 9)
    assert peak < PEAK_BOUND, f"{peak / MiB:.0f} MiB"
    assert elapsed < 2.0
    assert (await socket.register())["type"] == "registered"


async def test_a_bomb_on_an_unknown_lease_is_refused_without_inflating(
    running_job: Job, registered: Socket
) -> None:
    # Prepare
    frame = bomb(push_msg("00000000-0000-4000-8000-000000000000"), ["a", "b", "c", "d"])

    # Execute
    reply, peak, _ = await peak_of(registered, frame)

    # Assert
    assert reply["code"] == "unknown_lease"
    assert peak < PEAK_BOUND, f"{peak / MiB:.0f} MiB"


async def test_a_bomb_naming_the_shards_variables_is_refused_by_the_layout_before_inflating(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: the shard's own names, each declared (and inflating) at 256 MiB.
    lease = await registered.lease()
    names = [v["name"] for v in lease["layout"][0]]
    frame = bomb(push_msg(lease["lease_id"], ref="b"), names)

    # Execute
    reply, peak, _ = await peak_of(registered, frame)

    # Assert
    assert (reply["code"], reply["ref"]) == ("wrong_shape", "b")
    assert peak < PEAK_BOUND, f"{peak / MiB:.0f} MiB"
    assert store.job_store(running_job).versions() == [0, 0]


async def test_a_bomb_declaring_the_layouts_shapes_inflates_no_further_than_they_hold(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: right names and shapes, but each buffer inflates to 256 MiB.
    lease = await registered.lease()
    payload = zeros_deflated(BOMB_BYTES)
    descriptors = [
        {
            "name": v["name"],
            "dtype": "float32",
            "shape": v["shape"],
            "compression": "zlib",
            "nbytes": len(payload),
        }
        for v in lease["layout"][0]
    ]
    head = json.dumps({"msg": push_msg(lease["lease_id"]), "tensors": descriptors}).encode()
    frame = MAGIC + struct.pack("<I", len(head)) + head + payload * len(descriptors)

    # Execute
    reply, peak, _ = await peak_of(registered, frame)

    # Assert
    assert reply["code"] == "bad_frame" and "inflates past its shape" in reply["message"]
    assert peak < PEAK_BOUND, f"{peak / MiB:.0f} MiB"
    assert store.job_store(running_job).versions() == [0, 0]


# --- High 2: a lease has as many rounds as its steps, and no more samples than its size ------


@pytest.mark.parametrize("seq", [20, 10**6, -1, -(2**40)], ids=["rounds", "million", "-1", "neg"])
async def test_a_push_seq_outside_the_leases_rounds_is_refused(
    running_job: Job, registered: Socket, seq: int
) -> None:
    # Prepare: 20 steps, one per round.
    lease = await registered.lease()
    assert lease["steps"] == 20 and lease["hyper"]["n_push"] == 1

    # Execute
    reply = await registered.push(lease, 0, gradients(lease, 0), seq=seq, samples=30, ref=3)

    # Assert
    assert reply == {
        "type": "error",
        "code": "bad_message",
        "message": f"push: seq {seq} is not a round of this lease (0 to 19)",
        "ref": 3,
    }
    assert store.job_store(running_job).versions() == [0, 0]


@pytest.mark.parametrize("samples", [0, 31, 10**12])
async def test_a_push_claiming_other_samples_than_its_round_covers_is_refused(
    running_job: Job, registered: Socket, samples: int
) -> None:
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0), samples=samples)
    assert reply["code"] == "bad_message"
    assert reply["message"] == f"push: round 0 covers 1 to 30 samples, not {samples}"
    assert store.job_store(running_job).versions() == [0, 0]


async def test_a_lease_counts_no_more_samples_than_its_size_however_often_it_pushes(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: every round once, then every round again (duplicates).
    lease = await registered.lease()
    size = await push_every_round(registered, lease)
    for seq in range(20):
        await registered.push(lease, 0, gradients(lease, 0, 0.0), seq=seq)

    # Execute: completing flushes the counts.
    reply = await registered.ask(
        {"type": "complete", "lease_id": lease["lease_id"], "samples": size}
    )

    # Assert
    assert reply["type"] == "complete_ack", reply
    row = await lease_row(lease["lease_id"])
    assert size == 20 * 30 and row.samples == size and row.samples_pushed == size


# --- 15: complete needs the work -------------------------------------------------------------


async def test_complete_with_no_push_is_refused(running_job: Job, registered: Socket) -> None:
    lease = await registered.lease()
    reply = await registered.ask(
        {"type": "complete", "lease_id": lease["lease_id"], "samples": 600, "ref": 4}
    )
    assert reply == {
        "type": "error",
        "code": "bad_message",
        "message": "complete: no push of this lease has arrived",
        "ref": 4,
    }
    assert (await lease_row(lease["lease_id"])).status == "active"


@pytest.mark.parametrize("claimed", [0, 30, 599, 601, 10**9])
async def test_complete_claiming_other_samples_than_were_pushed_is_refused(
    running_job: Job, registered: Socket, claimed: int
) -> None:
    lease = await registered.lease()
    pushed = await push_every_round(registered, lease)
    reply = await registered.ask(
        {"type": "complete", "lease_id": lease["lease_id"], "samples": claimed}
    )
    assert reply["code"] == "bad_message"
    assert reply["message"] == (
        f"complete: {claimed} samples claimed; this lease's pushes covered {pushed} of its 600"
    )


async def test_complete_after_one_round_of_many_is_refused(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    for shard in (0, 1):
        assert (await registered.push(lease, shard, gradients(lease, shard)))["applied"]
    reply = await registered.ask({"type": "complete", "lease_id": lease["lease_id"], "samples": 30})
    assert reply["code"] == "bad_message"


# --- High 2: the spot-checked round must arrive -----------------------------------------------


class LastRound:
    """A stand-in for the OS's random source: check every lease, and its last round."""

    def random(self) -> float:
        return 0.0

    def randrange(self, stop: int) -> int:
        return stop - 1


async def test_complete_is_refused_until_the_checked_round_has_arrived_in_full(
    checked_job: Job, registered: Socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the last round is checked; every round arrives but that one's shard 1.
    monkeypatch.setattr(selection, "_random", LastRound())
    lease = await registered.lease()
    assert (await lease_row(lease["lease_id"])).spot_check_round == 19
    for seq in range(20):
        for shard in (0, 1) if seq < 19 else (0,):
            version, _ = await registered.fetch(lease, shard)
            reply = await registered.push(
                lease, shard, gradients(lease, shard, 0.0), seq=seq, base_version=version
            )
            assert reply["type"] == "push_ack", reply
    complete = {"type": "complete", "lease_id": lease["lease_id"], "samples": 600}

    # Execute
    refused = await registered.ask(complete)
    version, _ = await registered.fetch(lease, 1)
    await registered.push(lease, 1, gradients(lease, 1, 0.0), seq=19, base_version=version)
    accepted = await registered.ask(complete)

    # Assert: the text does not say which round is missing.
    assert refused == {
        "type": "error",
        "code": "bad_message",
        "message": "complete: a round of this lease has not arrived in full",
    }
    assert accepted["type"] == "complete_ack", accepted
    row = await lease_row(lease["lease_id"])
    check = await database_sync_to_async(SpotCheck.objects.get)(lease_id=row.id)
    assert check.round == 19 and check.status == SpotCheck.Status.QUEUED


async def test_pushing_past_the_checked_round_before_it_arrived_fails_the_check(
    checked_job: Job, registered: Socket
) -> None:
    # Prepare: the checked round is never sent (the attack of issue 10: pushes that are never
    # the checked round); the round after it is.
    lease = await registered.lease()
    checked = (await lease_row(lease["lease_id"])).spot_check_round
    assert checked is not None
    seq = checked + 1 if checked + 1 < 20 else None
    if seq is None:  # the last round is checked: skip the one before it instead
        pytest.skip("the checked round is the last one")
    version, _ = await registered.fetch(lease, 0)

    # Execute
    await registered.push(lease, 0, gradients(lease, 0, 0.0), seq=seq, base_version=version)

    # Assert: a failed check, and the agent is banned.
    row = await lease_row(lease["lease_id"])
    check = await database_sync_to_async(SpotCheck.objects.get)(lease_id=row.id)
    assert check.status == SpotCheck.Status.FAILED and check.round == checked
    assert f"round {seq} arrived before round {checked}" in check.detail
    agent = await database_sync_to_async(Agent.objects.get)(id=row.agent_id)
    assert agent.banned_at is not None


async def test_an_honest_checked_lease_records_its_round_and_completes(
    checked_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    samples = await push_every_round(registered, lease)
    reply = await registered.ask(
        {"type": "complete", "lease_id": lease["lease_id"], "samples": samples}
    )
    assert reply["type"] == "complete_ack", reply
    row = await lease_row(lease["lease_id"])
    check = await database_sync_to_async(SpotCheck.objects.get)(lease_id=row.id)
    assert check.round == row.spot_check_round and check.status == SpotCheck.Status.QUEUED


# --- 14: every refusal echoes the ref ---------------------------------------------------------


@pytest.mark.parametrize(
    ("msg", "code"),
    [
        ({"type": "fetch", "lease_id": "x", "ref": "r1"}, "bad_message"),
        ({"type": "fetch", "lease_id": 7, "shard": 0, "ref": "r1"}, "bad_message"),
        ({"type": "heartbeat", "extra": 1, "ref": "r1"}, "bad_message"),
        ({"type": "pull", "ref": "r1"}, "unknown_type"),
        ({"type": 5, "ref": "r1"}, "bad_message"),
    ],
    ids=["missing-field", "wrong-type", "extra-field", "unknown-type", "type-not-a-string"],
)
async def test_a_schema_error_echoes_the_ref(
    registered: Socket, msg: dict[str, Any], code: str
) -> None:
    reply = await registered.ask(msg)
    assert (reply["type"], reply["code"], reply["ref"]) == ("error", code, "r1")


async def test_a_ref_that_is_itself_malformed_is_not_echoed(registered: Socket) -> None:
    reply = await registered.ask({"type": "heartbeat", "ref": 1.5})
    assert reply["code"] == "bad_message" and "ref" not in reply
    reply = await registered.ask({"type": "pull", "ref": "r" * 300})
    assert reply["code"] == "unknown_type" and "ref" not in reply


async def test_a_binary_schema_error_echoes_the_ref(registered: Socket) -> None:
    msg = {"type": "push", "lease_id": "x", "seq": 0, "ref": 8}  # no shard, base, samples
    head = json.dumps({"msg": msg, "tensors": []}).encode()
    await registered.send_bytes(MAGIC + struct.pack("<I", len(head)) + head)
    reply, _ = await registered.recv()
    assert (reply["code"], reply["ref"]) == ("bad_message", 8)


async def test_a_rate_limited_push_echoes_the_ref(
    running_job: Job, registered: Socket, settings: Any
) -> None:
    # Prepare: one push per ~17 minutes, a burst of one.
    settings.PUSHES_PER_SECOND = 0.001
    settings.PUSH_BURST = 1
    lease = await registered.lease()
    first = await registered.push(lease, 0, gradients(lease, 0), samples=round_samples(lease, 0))
    assert first["type"] == "push_ack", first

    # Execute
    reply = await registered.push(lease, 1, gradients(lease, 1), ref="late")

    # Assert
    assert (reply["code"], reply["ref"]) == ("rate_limited", "late")


# --- Low 11: nothing is sent on a socket the server closed -------------------------------------


async def test_frames_queued_behind_a_ban_get_no_answer_after_the_close(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: a push round is on its way when the ban arrives.
    lease = await registered.lease()
    agent = await database_sync_to_async(Agent.objects.get)(name="pc-1")
    await database_sync_to_async(push.notify_agent_banned)(str(agent.id), "a spot check failed")

    # Execute
    await registered.send_bytes(frame_to_wire(push_msg(lease["lease_id"]), gradients(lease, 0)))
    await registered.send({"type": "heartbeat", "ref": 2})

    # Assert: the ban, the close, and nothing after it (daphne would raise on each send).
    event, _ = await registered.recv()
    assert event["code"] == "banned"
    assert await registered.closed_with() == CloseCode.FORBIDDEN
    assert await registered.communicator.receive_nothing(timeout=0.5)
