"""The in-process socket tests' client: a ``Socket`` over Channels' ``WebsocketCommunicator``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator

from downpour.agents import limits
from downpour.agents.routing import websocket_urlpatterns
from downpour.training import store
from downpour.training.models import Lease
from downpour_agent.protocol import (
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    frame_from_wire,
    frame_to_wire,
)

REPLY_TIMEOUT_S = 10.0


application = URLRouter(websocket_urlpatterns)


def forget_backends() -> None:
    store.storage.cache_clear()
    limits.limits.cache_clear()
    for job_id in list(store._stores):
        store.forget_job_store(job_id)
    store.reference_board.cache_clear()


class Socket:
    """One agent's socket, speaking the protocol as JSON text and binary tensor frames."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator

    async def send(self, msg: dict[str, Any]) -> None:
        await self.communicator.send_to(text_data=json.dumps(msg))

    async def send_bytes(self, data: bytes) -> None:
        await self.communicator.send_to(bytes_data=data)

    async def recv(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        data = await self.communicator.receive_from(REPLY_TIMEOUT_S)
        if isinstance(data, bytes):
            return frame_from_wire(data, SERVER_MESSAGES)
        return json.loads(data), {}

    async def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        await self.send(msg)
        return (await self.recv())[0]

    async def closed_with(self) -> int:
        """The code of the close that the server sends next."""
        output = await self.communicator.receive_output(REPLY_TIMEOUT_S)
        assert output["type"] == "websocket.close", output
        # A plain int, as daphne needs: it turns an int subclass into a 1011 close.
        assert type(output["code"]) is int, output
        return int(output["code"])

    async def register(self, name: str = "pc-1", **extra: Any) -> dict[str, Any]:
        msg = {"type": "register", "protocol_version": PROTOCOL_VERSION, "name": name}
        return await self.ask({"device": {"cpu_cores": 4}, **msg, **extra})

    async def lease(self) -> dict[str, Any]:
        reply = await self.ask({"type": "request_work", "ref": 1})
        assert reply["type"] == "lease", reply
        return reply

    async def fetch(self, lease: dict[str, Any], shard: int) -> tuple[int, dict[str, np.ndarray]]:
        await self.send({"type": "fetch", "lease_id": lease["lease_id"], "shard": shard})
        msg, tensors = await self.recv()
        assert msg["type"] == "params", msg
        return int(msg["version"]), tensors

    async def push(
        self, lease: dict[str, Any], shard: int, tensors: dict[str, np.ndarray], **fields: Any
    ) -> dict[str, Any]:
        msg = {
            "type": "push",
            "lease_id": lease["lease_id"],
            "seq": 0,
            "shard": shard,
            "base_version": 0,
            **fields,
        }
        msg.setdefault("samples", round_samples(lease, msg["seq"]))
        await self.send_bytes(frame_to_wire(msg, tensors))
        return (await self.recv())[0]

    async def still_usable(self) -> None:
        assert (await self.ask({"type": "heartbeat", "ref": "still"})) == {
            "type": "heartbeat_ack",
            "ref": "still",
        }


#: ``await agents(n)``: n registered sockets of Charlie's token (the ``agents`` fixture).
Agents = Callable[[int], Any]


def headers(token: str | None = None, origin: str | None = None) -> list[tuple[bytes, bytes]]:
    found = []
    if token is not None:
        found.append((b"authorization", f"Bearer {token}".encode()))
    if origin is not None:
        found.append((b"origin", origin.encode()))
    return found


async def open_socket(
    token: str | None = None, origin: str | None = None
) -> tuple[WebsocketCommunicator, bool, Any]:
    communicator = WebsocketCommunicator(application, "/ws/agent/", headers(token, origin))
    connected, detail = await communicator.connect(REPLY_TIMEOUT_S)
    return communicator, connected, detail


def round_samples(lease: dict[str, Any], seq: int) -> int:
    """What round ``seq`` of ``lease`` covers, as an honest agent claims it."""
    hyper = lease["hyper"]
    steps = max(0, min(hyper["n_push"], lease["steps"] - seq * hyper["n_push"]))
    return steps * min(hyper["batch_size"], lease["dataset"]["n_samples"])


async def push_every_round(socket: Socket, lease: dict[str, Any]) -> int:
    """Push every round of ``lease`` (zero gradients, each on freshly fetched versions);
    returns the samples an honest ``complete`` claims."""
    hyper = lease["hyper"]
    rounds = -(-lease["steps"] // hyper["n_push"])
    for seq in range(rounds):
        for shard in range(len(lease["layout"])):
            version, _ = await socket.fetch(lease, shard)
            grads = gradients(lease, shard, 0.0)
            reply = await socket.push(lease, shard, grads, seq=seq, base_version=version)
            assert reply["type"] == "push_ack", reply
    return sum(round_samples(lease, seq) for seq in range(rounds))


def gradients(lease: dict[str, Any], shard: int, value: float = 0.01) -> dict[str, np.ndarray]:
    return {v["name"]: np.full(v["shape"], value, dtype=np.float32) for v in lease["layout"][shard]}


@database_sync_to_async
def lease_row(lease_id: str) -> Lease:
    return Lease.objects.select_related("unit").get(id=lease_id)
