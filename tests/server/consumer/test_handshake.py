"""The agent socket in process: the handshake, register and malformed input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from channels.db import database_sync_to_async
from django.db import connections
from django.utils import timezone
from tests.server.consumer.client import (
    REPLY_TIMEOUT_S,
    Socket,
    open_socket,
)

from downpour.donors.models import Agent, AgentToken
from downpour_agent.protocol import (
    ERROR_TEXTS,
    PROTOCOL_VERSION,
    CloseCode,
    ErrorCode,
    frame_to_wire,
)

pytestmark = pytest.mark.django_db(transaction=True)

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
