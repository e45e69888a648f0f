"""A fetch cut while its requests go out: nothing is left waiting, nothing stale is kept."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from tests.agent.fakeserver import FakeServer

from downpour_agent.protocol import lease_from_wire
from downpour_agent.session import Session
from downpour_agent.transfer import request_params


class CutAfter:
    """The socket's sending side: the connection drops after ``frames`` frames."""

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.sent: list[str | bytes] = []

    async def send(self, data: str | bytes) -> None:
        if len(self.sent) >= self.frames:
            raise ConnectionResetError("the connection dropped")
        self.sent.append(data)


async def test_a_fetch_cut_between_its_shards_forgets_them_and_the_held_copy(
    model_config: dict[str, Any], layout: list[list[dict[str, Any]]], shard_body: bytes
) -> None:
    # Prepare: an int8 lease of two shards on a connection that holds shard 0 of its job
    # (so the fetch names it: the server may answer with a delta and move its mirror), and
    # whose link drops after the first fetch frame.
    template = FakeServer(model_config, layout, shard_body).lease_template
    hyper = {**template["hyper"], "compression": "int8"}
    lease = lease_from_wire({**template, "hyper": hyper, "lease_id": "lease-1"})
    socket = CutAfter(frames=1)
    session = Session(socket, listener=None)  # type: ignore[arg-type]
    session.held.put(lease.job_id, 0, 3, {"w": np.zeros(2, np.float32)})

    # Execute
    with pytest.raises(ConnectionResetError):
        await request_params(session, lease)

    # Assert: shard 0's fetch went out naming the version held; it waits for no answer, and
    # the held copy is gone, so the next fetch of the job asks for whole shards.
    assert len(socket.sent) == 1 and '"have":3' in str(socket.sent[0])
    assert session._pending == {}
    assert session.held.get(lease.job_id, 0) is None


async def test_a_waiting_fetch_cut_between_its_shards_forgets_them_too(
    model_config: dict[str, Any], layout: list[list[dict[str, Any]]], shard_body: bytes
) -> None:
    # Prepare: a synchronous step's fetch (it waits for the next version of each shard and
    # names none held), on a link that drops after the first frame.
    template = FakeServer(model_config, layout, shard_body).lease_template
    lease = lease_from_wire({**template, "lease_id": "lease-1"})
    socket = CutAfter(frames=1)
    session = Session(socket, listener=None)  # type: ignore[arg-type]

    # Execute
    with pytest.raises(ConnectionResetError):
        await request_params(session, lease, {0: 5, 1: 5})

    # Assert
    assert len(socket.sent) == 1 and '"min_version":5' in str(socket.sent[0])
    assert '"have"' not in str(socket.sent[0])
    assert session._pending == {}
