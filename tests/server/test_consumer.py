"""The agent websocket in process: Channels' ``WebsocketCommunicator`` on the embedded default.

The in-memory channel layer and store stand in for Redis, so these drive the protocol's
server side in a fraction of the time of ``tests/e2e/test_consumer.py``, which runs the
same consumer in a real daphne. Each reply is awaited with a timeout; nothing sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.utils import timezone

from downpour.agents import limits, push
from downpour.agents.consumers import STORE_NOT_READY
from downpour.agents.routing import websocket_urlpatterns
from downpour.donors.models import Agent, AgentToken
from downpour.training import store
from downpour.training.actions.jobs import finish_job, start_job, submit_job
from downpour.training.actions.leases import reap_expired_leases
from downpour.training.actions.recovery import checkpoint_job, checkpoint_running_jobs
from downpour.training.models import Job, Lease, WorkUnit
from downpour_agent.protocol import (
    ERROR_TEXTS,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    CloseCode,
    ErrorCode,
    frame_from_wire,
    frame_to_wire,
)

from .helpers import job_params

pytestmark = pytest.mark.django_db(transaction=True)

#: Longest any one reply may take; a reply normally comes in milliseconds.
REPLY_TIMEOUT_S = 10.0

application = URLRouter(websocket_urlpatterns)


@pytest.fixture(autouse=True)
def embedded(settings: Any) -> Iterator[None]:
    """The embedded default: in-memory channel layer, store and connection limits."""
    settings.REDIS_URL = ""
    settings.EMBEDDED = True
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    _forget_backends()
    yield
    _forget_backends()


def _forget_backends() -> None:
    store.storage.cache_clear()
    limits.limits.cache_clear()
    for job_id in list(store._stores):
        store.forget_job_store(job_id)


@pytest.fixture
def token(charlie: Any) -> str:
    _, secret = AgentToken.issue(charlie, "pc")
    return str(secret)


@pytest.fixture
def running_job(alice: Any, dataset: Any) -> Job:
    """A started job of two parameter shards, never spot-checked (the check is random)."""
    job = submit_job(alice, dataset, job_params(spot_check_fraction=0.0))
    assert start_job(job)
    job.refresh_from_db()
    return job


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
            "samples": 32,
            **fields,
        }
        await self.send_bytes(frame_to_wire(msg, tensors))
        return (await self.recv())[0]

    async def still_usable(self) -> None:
        assert (await self.ask({"type": "heartbeat", "ref": "still"})) == {
            "type": "heartbeat_ack",
            "ref": "still",
        }


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


@pytest.fixture
async def socket(token: str) -> AsyncIterator[Socket]:
    """Charlie's agent, connected and not yet registered."""
    communicator, connected, _ = await open_socket(token)
    assert connected
    yield Socket(communicator)
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)
    # The consumer's thread keeps its connection (CONN_MAX_AGE); the flush needs it gone.
    await database_sync_to_async(connections.close_all)()


@pytest.fixture
async def registered(socket: Socket) -> Socket:
    assert (await socket.register())["type"] == "registered"
    return socket


def gradients(lease: dict[str, Any], shard: int, value: float = 0.01) -> dict[str, np.ndarray]:
    return {v["name"]: np.full(v["shape"], value, dtype=np.float32) for v in lease["layout"][shard]}


@database_sync_to_async
def lease_row(lease_id: str) -> Lease:
    return Lease.objects.select_related("unit").get(id=lease_id)


# --- the handshake ----------------------------------------------------------------------


async def test_a_socket_without_a_token_gets_unauthorized_and_closes_as_unauthorized() -> None:
    communicator, connected, _ = await open_socket()
    assert connected
    socket = Socket(communicator)
    reply, _ = await socket.recv()
    assert reply == {
        "type": "error",
        "code": "unauthorized",
        "message": ERROR_TEXTS[ErrorCode.UNAUTHORIZED],
    }
    assert await socket.closed_with() == CloseCode.UNAUTHORIZED


async def test_an_unknown_token_gets_unauthorized_and_closes_as_unauthorized() -> None:
    communicator, connected, _ = await open_socket("dp_not-a-token")
    assert connected
    socket = Socket(communicator)
    assert (await socket.recv())[0]["code"] == "unauthorized"
    assert await socket.closed_with() == CloseCode.UNAUTHORIZED


async def test_a_revoked_token_gets_unauthorized(token: str) -> None:
    await database_sync_to_async(lambda: AgentToken.objects.update(revoked_at=timezone.now()))()
    communicator, _, _ = await open_socket(token)
    socket = Socket(communicator)
    assert (await socket.recv())[0]["code"] == "unauthorized"
    assert await socket.closed_with() == CloseCode.UNAUTHORIZED


async def test_a_page_of_another_site_is_refused_before_the_socket_opens(token: str) -> None:
    _, connected, code = await open_socket(token, origin="https://evil.example")
    assert (connected, code) == (False, CloseCode.FORBIDDEN)
    assert type(code) is int


async def test_a_page_of_this_site_may_open_one(token: str) -> None:
    communicator, connected, _ = await open_socket(token, origin="http://localhost:8000")
    assert connected
    assert (await Socket(communicator).register())["type"] == "registered"
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)
    await database_sync_to_async(connections.close_all)()


async def test_a_token_over_its_connection_cap_is_closed_as_rate_limited(
    token: str, settings: Any
) -> None:
    settings.MAX_CONNECTIONS_PER_TOKEN = 1
    first, connected, _ = await open_socket(token)
    assert connected
    second, connected, _ = await open_socket(token)
    assert connected
    over = Socket(second)
    reply, _ = await over.recv()
    assert reply["code"] == "rate_limited" and "already has 1 connections" in reply["message"]
    assert await over.closed_with() == CloseCode.RATE_LIMITED
    await first.disconnect(timeout=REPLY_TIMEOUT_S)
    await database_sync_to_async(connections.close_all)()


# --- register ---------------------------------------------------------------------------


async def test_register_answers_registered_with_the_servers_timings(
    socket: Socket, settings: Any
) -> None:
    reply = await socket.register(ref=7)
    agent = await database_sync_to_async(Agent.objects.get)(name="pc-1")
    assert reply == {
        "type": "registered",
        "agent_id": str(agent.id),
        "heartbeat_interval_s": settings.HEARTBEAT_INTERVAL_S,
        "lease_ttl_s": settings.LEASE_TTL_S,
        "ref": 7,
    }
    assert agent.connected and agent.cpu_cores == 4


async def test_an_old_protocol_version_is_refused_with_its_ref(socket: Socket) -> None:
    reply = await socket.register(protocol_version=PROTOCOL_VERSION - 1, ref="hello")
    assert reply == {
        "type": "error",
        "code": "unsupported_version",
        "message": f"server speaks protocol {PROTOCOL_VERSION}, agent {PROTOCOL_VERSION - 1}",
        "ref": "hello",
    }
    assert (await socket.register())["type"] == "registered"


async def test_device_fields_that_do_not_fit_are_dropped_and_the_name_is_cleaned(
    socket: Socket,
) -> None:
    device = {
        "os": "Linux\x00\ud800" + "x" * 300,
        "cpu_cores": -3,
        "ram_bytes": True,
        "gpu_name": 17,
        "gpu_memory_bytes": 1e300,
        "tf_version": "2.16",
        "samples_per_s": 1234.5,
        "unknown": "ignored",
    }
    reply = await socket.register(name="\x07", device=device)
    assert reply["type"] == "registered"
    agent = await database_sync_to_async(Agent.objects.get)(id=reply["agent_id"])
    assert agent.name == "agent"
    assert agent.os == "Linux" + "x" * 195
    assert agent.cpu_cores is None and agent.ram_bytes is None
    assert agent.gpu_name == "" and agent.gpu_memory_bytes is None
    assert agent.tf_version == "2.16" and agent.samples_per_s == 1234.5


async def test_a_banned_agent_is_told_why_and_closed_as_forbidden(socket: Socket) -> None:
    assert (await socket.register())["type"] == "registered"
    await database_sync_to_async(
        lambda: Agent.objects.update(banned_at=timezone.now(), ban_reason="a spot check failed")
    )()
    reply = await socket.register()
    assert reply == {
        "type": "error",
        "code": "banned",
        "message": "this agent is banned: a spot check failed",
    }
    assert await socket.closed_with() == CloseCode.FORBIDDEN


async def test_a_request_before_register_gets_not_registered_with_its_ref(socket: Socket) -> None:
    reply = await socket.ask({"type": "request_work", "ref": 3})
    assert reply == {
        "type": "error",
        "code": "not_registered",
        "message": ERROR_TEXTS[ErrorCode.NOT_REGISTERED],
        "ref": 3,
    }


async def test_a_binary_frame_before_register_gets_not_registered(socket: Socket) -> None:
    msg = {
        "type": "push",
        "lease_id": "x",
        "seq": 0,
        "shard": 0,
        "base_version": 0,
        "samples": 1,
        "ref": 4,
    }
    await socket.send_bytes(frame_to_wire(msg, {"w": np.zeros(2, np.float32)}))
    reply, _ = await socket.recv()
    assert (reply["code"], reply["ref"]) == ("not_registered", 4)
    assert (await socket.register())["type"] == "registered"


# --- malformed input --------------------------------------------------------------------


async def test_malformed_json_gets_bad_frame_and_the_socket_stays_usable(
    registered: Socket,
) -> None:
    await registered.communicator.send_to(text_data="{not json")
    reply, _ = await registered.recv()
    assert reply["type"] == "error" and reply["code"] == "bad_frame"
    await registered.still_usable()


async def test_garbage_bytes_get_bad_frame(registered: Socket) -> None:
    await registered.send_bytes(b"\x00\x01garbage")
    assert (await registered.recv())[0]["code"] == "bad_frame"
    await registered.still_usable()


async def test_an_unknown_type_gets_unknown_type(registered: Socket) -> None:
    reply = await registered.ask({"type": "teleport", "ref": 9})
    assert reply["type"] == "error" and reply["code"] == "unknown_type"
    assert "teleport" in reply["message"]
    await registered.still_usable()


async def test_a_field_of_the_wrong_type_gets_bad_message(registered: Socket) -> None:
    reply = await registered.ask({"type": "fetch", "lease_id": 7, "shard": 0})
    assert reply["code"] == "bad_message" and "lease_id" in reply["message"]
    await registered.still_usable()


async def test_a_push_sent_as_text_gets_bad_message_with_its_ref(registered: Socket) -> None:
    msg = {
        "type": "push",
        "lease_id": "x",
        "seq": 0,
        "shard": 0,
        "base_version": 0,
        "samples": 1,
        "ref": 5,
    }
    reply = await registered.ask(msg)
    assert reply == {
        "type": "error",
        "code": "bad_message",
        "message": "push must be a binary tensor frame",
        "ref": 5,
    }


async def test_a_text_message_sent_as_a_binary_frame_gets_bad_message(registered: Socket) -> None:
    await registered.send_bytes(frame_to_wire({"type": "heartbeat", "ref": 6}, {}))
    reply, _ = await registered.recv()
    assert (reply["code"], reply["ref"]) == ("bad_message", 6)
    assert reply["message"] == "heartbeat is not a binary message"


# --- work -------------------------------------------------------------------------------


async def test_no_running_job_means_no_work(registered: Socket) -> None:
    reply = await registered.ask({"type": "request_work", "ref": 2})
    assert reply == {
        "type": "no_work",
        "retry_after_s": 2.0,
        "reason": "no_jobs",
        "message": "no job is running",
        "ref": 2,
    }


async def test_request_work_leases_a_unit_described_by_the_lease_message(
    running_job: Job, registered: Socket, settings: Any
) -> None:
    lease = await registered.lease()
    row = await lease_row(lease["lease_id"])
    assert lease["ref"] == 1
    assert lease["job_id"] == str(running_job.id) and lease["work_unit_id"] == str(row.unit_id)
    assert lease["steps"] == row.unit.steps and lease["seed"] == row.unit.seed
    assert lease["model"] == running_job.model_config and lease["loss"] == running_job.loss
    assert lease["hyper"] == {
        "batch_size": 32,
        "n_fetch": 1,
        "n_push": 1,
        "learning_rate": 0.05,
        "compression": "none",
    }
    assert lease["dataset"]["url"] == f"/api/agent/shards/{row.unit.shard_id}/"
    assert len(lease["layout"]) == 2 and all(lease["layout"])
    assert lease["expires_in_s"] == settings.LEASE_TTL_S
    assert row.status == Lease.Status.ACTIVE


async def test_fetch_answers_a_params_frame_with_the_shards_weights(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    await registered.send({"type": "fetch", "lease_id": lease["lease_id"], "shard": 1, "ref": 8})
    msg, tensors = await registered.recv()
    assert msg == {
        "type": "params",
        "lease_id": lease["lease_id"],
        "shard": 1,
        "version": 0,
        "ref": 8,
    }
    version, weights = store.job_store(running_job).fetch(1)
    assert version == 0 and weights.keys() == tensors.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(tensors[name], value)
    assert [v["name"] for v in lease["layout"][1]] == list(tensors)


async def test_fetch_of_a_shard_outside_the_layout_gets_unknown_shard(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    reply = await registered.ask(
        {"type": "fetch", "lease_id": lease["lease_id"], "shard": 2, "ref": 1}
    )
    assert (reply["code"], reply["ref"]) == ("unknown_shard", 1)


async def test_fetch_of_an_unknown_lease_gets_unknown_lease(
    running_job: Job, registered: Socket
) -> None:
    reply = await registered.ask(
        {"type": "fetch", "lease_id": "00000000-0000-4000-8000-000000000000", "shard": 0}
    )
    assert reply["code"] == "unknown_lease"
    reply = await registered.ask({"type": "fetch", "lease_id": "not-a-uuid", "shard": 0})
    assert reply["code"] == "unknown_lease"


async def test_a_good_push_is_applied_once_and_its_replay_is_a_duplicate(
    running_job: Job, registered: Socket
) -> None:
    # Prepare
    lease = await registered.lease()
    version, before = await registered.fetch(lease, 0)
    grads = gradients(lease, 0)
    # Execute
    first = await registered.push(lease, 0, grads, seq=5, base_version=version, ref=11)
    replay = await registered.push(lease, 0, grads, seq=5, base_version=version, ref=12)
    # Assert
    assert first == {
        "type": "push_ack",
        "lease_id": lease["lease_id"],
        "seq": 5,
        "shard": 0,
        "version": version + 1,
        "staleness": 0,
        "applied": True,
        "duplicate": False,
        "ref": 11,
    }
    # The replay is measured against the version its own first copy made.
    assert replay == {**first, "staleness": 1, "applied": False, "duplicate": True, "ref": 12}
    after_version, after = await registered.fetch(lease, 0)
    assert after_version == version + 1
    assert any(not np.array_equal(before[k], after[k]) for k in before)


async def test_a_wrong_shape_is_refused_and_nothing_is_applied(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    grads = gradients(lease, 0)
    grads[next(iter(grads))] = np.zeros((3, 3), np.float32)
    reply = await registered.push(lease, 0, grads, ref=1)
    assert (reply["type"], reply["code"], reply["ref"]) == ("error", "wrong_shape", 1)
    assert (await registered.fetch(lease, 0))[0] == 0


async def test_a_missing_tensor_is_refused_as_wrong_shape(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    grads = gradients(lease, 0)
    del grads[next(iter(grads))]
    assert (await registered.push(lease, 0, grads))["code"] == "wrong_shape"


async def test_a_wrong_dtype_is_refused(running_job: Job, registered: Socket) -> None:
    lease = await registered.lease()
    grads = {k: v.astype(np.float64) for k, v in gradients(lease, 1).items()}
    assert (await registered.push(lease, 1, grads))["code"] == "wrong_dtype"


async def test_a_non_finite_gradient_is_refused_and_nothing_is_applied(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    _, before = await registered.fetch(lease, 1)
    grads = gradients(lease, 1)
    grads[next(iter(grads))].flat[0] = np.inf
    reply = await registered.push(lease, 1, grads)
    assert reply["code"] == "non_finite"
    version, after = await registered.fetch(lease, 1)
    assert version == 0
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    await registered.still_usable()


async def test_a_base_version_ahead_of_the_shard_is_refused_as_stale(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0), base_version=5)
    assert reply["code"] == "stale_gradient"
    assert (await registered.fetch(lease, 0))[0] == 0


async def test_a_push_older_than_max_staleness_is_refused_as_stale(
    alice: Any, dataset: Any, registered: Socket
) -> None:
    # Prepare: a job that accepts no staleness at all, and one push that moves shard 0 on.
    job = await database_sync_to_async(submit_job)(
        alice, dataset, job_params(max_staleness=0, spot_check_fraction=0.0)
    )
    assert await database_sync_to_async(start_job)(job)
    lease = await registered.lease()
    assert (await registered.push(lease, 0, gradients(lease, 0), seq=0))["applied"]
    # Execute
    reply = await registered.push(lease, 0, gradients(lease, 0), seq=1, base_version=0)
    # Assert
    assert reply["code"] == "stale_gradient"
    assert (await registered.fetch(lease, 0))[0] == 1


@pytest.mark.parametrize(
    "loads",
    [
        pytest.param([[0, [0, 0]]], id="more-than-n-push-minus-one"),
    ],
)
async def test_bad_loads_are_refused_as_bad_message(
    running_job: Job, registered: Socket, loads: Any
) -> None:
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0), loads=loads, ref=3)
    assert reply == {
        "type": "error",
        "code": "bad_message",
        "message": (
            "push: loads must be at most n_push - 1 pairs [step offset, [a version per shard]]"
        ),
        "ref": 3,
    }
    assert (await registered.fetch(lease, 0))[0] == 0


async def test_loads_that_are_not_a_list_are_refused(running_job: Job, registered: Socket) -> None:
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0), loads="0,0")
    assert reply["code"] == "bad_message" and "loads" in reply["message"]


@pytest.mark.parametrize(
    "loads",
    [
        pytest.param([[1, [0]]], id="a-version-too-few"),
        pytest.param([[1, [0, -1]]], id="a-negative-version"),
        pytest.param([[True, [0, 0]]], id="a-bool-offset"),
        pytest.param([[1, [0, 0], 2]], id="not-a-pair"),
    ],
)
async def test_loads_of_the_wrong_form_are_refused(
    alice: Any, dataset: Any, registered: Socket, loads: Any
) -> None:
    job = await database_sync_to_async(submit_job)(
        alice, dataset, job_params(n_push=3, spot_check_fraction=0.0)
    )
    assert await database_sync_to_async(start_job)(job)
    lease = await registered.lease()
    reply = await registered.push(lease, 0, gradients(lease, 0), loads=loads)
    assert reply["code"] == "bad_message" and reply["message"].startswith("push: loads")
    good = await registered.push(lease, 0, gradients(lease, 0), loads=[[1, [0, 0]]])
    assert good["type"] == "push_ack" and good["applied"]


async def test_a_push_on_a_lease_of_another_agent_is_refused(
    running_job: Job, registered: Socket, token: str
) -> None:
    lease = await registered.lease()
    communicator, _, _ = await open_socket(token)
    other = Socket(communicator)
    assert (await other.register("pc-2"))["type"] == "registered"
    assert (await other.push(lease, 0, gradients(lease, 0)))["code"] == "lease_not_yours"
    await other.still_usable()
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)


async def test_a_push_on_an_expired_lease_is_refused(
    running_job: Job, registered: Socket, token: str
) -> None:
    # Prepare: the lease expires and the reaper takes it back.
    lease = await registered.lease()
    await database_sync_to_async(
        lambda: Lease.objects.filter(id=lease["lease_id"]).update(expires_at=timezone.now())
    )()
    assert await database_sync_to_async(reap_expired_leases)() == 1
    heartbeat = await registered.ask({"type": "heartbeat", "lease_id": lease["lease_id"]})
    assert heartbeat["code"] == "lease_expired"
    # Execute: the same agent on a new socket, whose consumer reads the lease afresh (the
    # old one trusts its copy until the lease's own deadline).
    communicator, _, _ = await open_socket(token)
    again = Socket(communicator)
    assert (await again.register())["type"] == "registered"
    reply = await again.push(lease, 0, gradients(lease, 0))
    # Assert
    assert reply == {
        "type": "error",
        "code": "lease_expired",
        "message": ERROR_TEXTS[ErrorCode.LEASE_EXPIRED],
    }
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)


# --- heartbeat, complete, return --------------------------------------------------------


async def test_a_heartbeat_extends_the_lease_it_names(
    running_job: Job, registered: Socket, settings: Any
) -> None:
    lease = await registered.lease()
    before = (await lease_row(lease["lease_id"])).expires_at
    reply = await registered.ask({"type": "heartbeat", "lease_id": lease["lease_id"], "ref": 4})
    assert reply == {
        "type": "heartbeat_ack",
        "lease_id": lease["lease_id"],
        "expires_in_s": settings.LEASE_TTL_S,
        "ref": 4,
    }
    assert (await lease_row(lease["lease_id"])).expires_at > before


async def test_complete_finishes_the_unit_and_records_the_agents_contribution(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    for shard in (0, 1):
        assert (await registered.push(lease, shard, gradients(lease, shard)))["applied"]
    reply = await registered.ask(
        {"type": "complete", "lease_id": lease["lease_id"], "samples": 32, "ref": 6}
    )
    assert reply == {"type": "complete_ack", "lease_id": lease["lease_id"], "ref": 6}
    row = await lease_row(lease["lease_id"])
    assert row.status == Lease.Status.COMPLETED and row.unit.status == WorkUnit.Status.DONE
    assert row.pushes_accepted == 2
    job = await database_sync_to_async(Job.objects.get)(id=running_job.id)
    assert job.pushes_accepted == 2 and job.samples_done == 32


async def test_return_lease_puts_the_unit_back_in_the_queue(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    reply = await registered.ask({"type": "return_lease", "lease_id": lease["lease_id"]})
    assert reply == {"type": "lease_returned", "lease_id": lease["lease_id"]}
    row = await lease_row(lease["lease_id"])
    assert row.status == Lease.Status.RETURNED and row.unit.status == WorkUnit.Status.PENDING
    reply = await registered.ask({"type": "fetch", "lease_id": lease["lease_id"], "shard": 0})
    assert reply["code"] == "lease_expired"


# --- server-initiated -------------------------------------------------------------------


async def test_a_finished_job_is_announced_and_its_lease_refused(
    running_job: Job, registered: Socket
) -> None:
    lease = await registered.lease()
    assert await database_sync_to_async(finish_job)(running_job, Job.Status.DONE, "by alice")
    event, _ = await registered.recv()
    assert event == {
        "type": "job_finished",
        "job_id": str(running_job.id),
        "message": f"job {running_job.id} has finished",
    }
    reply = await registered.push(lease, 0, gradients(lease, 0))
    assert (reply["code"], reply["message"]) == (
        "job_finished",
        ERROR_TEXTS[ErrorCode.JOB_FINISHED],
    )


async def test_a_ban_is_announced_and_the_socket_closed_as_forbidden(registered: Socket) -> None:
    agent = await database_sync_to_async(Agent.objects.get)(name="pc-1")
    await database_sync_to_async(push.notify_agent_banned)(str(agent.id), "a spot check failed")
    event, _ = await registered.recv()
    assert event == {
        "type": "error",
        "code": "banned",
        "message": "this agent is banned: a spot check failed",
    }
    assert await registered.closed_with() == CloseCode.FORBIDDEN


# --- a store emptied by a restart -------------------------------------------------------


def restart_the_store() -> None:
    """What a restart of the embedded server does to its in-memory store: empties it."""
    _forget_backends()


async def test_a_job_with_a_checkpoint_is_restored_by_the_socket_itself(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: a checkpoint at version 1 of shard 0, then one more push it lacks.
    lease = await registered.lease()
    assert (await registered.push(lease, 0, gradients(lease, 0), seq=0))["applied"]
    await database_sync_to_async(checkpoint_job)(running_job)
    assert (await registered.push(lease, 0, gradients(lease, 0), seq=1, base_version=1))["applied"]
    restart_the_store()
    # Execute
    version, _ = await registered.fetch(lease, 0)
    # Assert
    assert version == 1
    assert store.job_store(running_job).versions() == [1, 0]


async def test_a_job_with_no_checkpoint_waits_for_a_worker_to_restart_it(
    running_job: Job, registered: Socket
) -> None:
    # Prepare: one unit done, then the store is lost with no checkpoint to restore.
    done = await registered.lease()
    reply = await registered.ask({"type": "complete", "lease_id": done["lease_id"], "samples": 0})
    assert reply["type"] == "complete_ack"
    lease = await registered.lease()
    restart_the_store()
    # Execute
    reply = await registered.ask(
        {"type": "fetch", "lease_id": lease["lease_id"], "shard": 0, "ref": 2}
    )
    # Assert: a retryable refusal, and the socket restarted nothing (that builds the model).
    assert reply == {"type": "error", "code": "unknown_job", "message": STORE_NOT_READY, "ref": 2}
    assert (await lease_row(done["lease_id"])).unit.status == WorkUnit.Status.DONE
    # The worker's periodic pass restarts the job from its initial weights.
    assert await database_sync_to_async(checkpoint_running_jobs)() == 1
    assert (await lease_row(done["lease_id"])).unit.status == WorkUnit.Status.PENDING
    assert (await registered.fetch(lease, 0))[0] == 0
