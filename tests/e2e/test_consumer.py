"""The agent websocket against a real daphne + Celery + PostgreSQL + Redis deployment.

Every bad input gets a structured error, nothing is applied, and the socket stays usable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.waiting import async_wait_for
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from downpour_agent.protocol import (
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    CloseCode,
    frame_from_wire,
    frame_to_wire,
)

from .stack import FAST_LEASES, Stack, running

pytestmark = [pytest.mark.e2e, pytest.mark.services]


# Above the agents the other tests register on token 0 (one per test), below the default.
AGENTS_PER_TOKEN = 20


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Short lease timings, and small connection, push-rate and agent limits to test them."""
    with running(
        "production",
        Path(tmp_path_factory.mktemp("consumer")),
        **FAST_LEASES,
        MAX_CONNECTIONS_PER_TOKEN="3",
        PUSHES_PER_SECOND="20",
        PUSH_BURST="40",
        MAX_AGENTS_PER_TOKEN=str(AGENTS_PER_TOKEN),
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def seeded(production: Stack) -> dict[str, Any]:
    data = production.seed(target_accuracy=1.0, budget_seconds=3600, name="consumer", tokens=3)
    production.wait_for(
        "the job to start", lambda: production.job(data["job_id"])["status"] == "running", 120
    )
    return data


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(msg))

    async def recv(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        data = await asyncio.wait_for(self.ws.recv(), 20)
        if isinstance(data, bytes):
            return frame_from_wire(data, SERVER_MESSAGES)
        return json.loads(data), {}

    async def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        await self.send(msg)
        return (await self.recv())[0]

    async def register(self, name: str) -> dict[str, Any]:
        return await self.ask(
            {
                "type": "register",
                "protocol_version": PROTOCOL_VERSION,
                "name": name,
                "device": {"cpu_cores": 1},
            }
        )

    async def lease(self) -> dict[str, Any]:
        reply = await self.ask({"type": "request_work"})
        assert reply["type"] == "lease", reply
        return reply

    async def fetch(self, lease: dict[str, Any], shard: int) -> tuple[int, dict[str, np.ndarray]]:
        await self.send({"type": "fetch", "lease_id": lease["lease_id"], "shard": shard})
        msg, tensors = await self.recv()
        assert msg["type"] == "params", msg
        return msg["version"], tensors

    async def push(
        self,
        lease: dict[str, Any],
        shard: int,
        tensors: dict[str, np.ndarray],
        seq: int = 0,
        base_version: int = 0,
    ) -> dict[str, Any]:
        msg = {
            "type": "push",
            "lease_id": lease["lease_id"],
            "seq": seq,
            "shard": shard,
            "base_version": base_version,
            "samples": 1,  # within what any round covers (issue 10)
        }
        await self.ws.send(frame_to_wire(msg, tensors))
        return (await self.recv())[0]

    async def still_usable(self) -> None:
        reply = await self.ask({"type": "heartbeat"})
        assert reply["type"] == "heartbeat_ack"


@pytest.fixture
async def client(production: Stack, seeded: dict[str, Any]) -> AsyncIterator[Client]:
    async with connect(
        production.ws_url,
        additional_headers={"Authorization": f"Bearer {seeded['token']}"},
        max_size=None,
    ) as ws:
        c = Client(ws)
        assert (await c.register(f"raw-{uuid.uuid4().hex[:6]}"))["type"] == "registered"
        yield c


def lease_status(stack: Stack, lease_id: str, status: str) -> bool:
    return bool(
        stack.query(
            "SELECT 1 FROM training_lease WHERE id = %s AND status = %s", [lease_id, status]
        )
    )


def zero_grads(lease: dict[str, Any], shard: int) -> dict[str, np.ndarray]:
    return {v["name"]: np.zeros(v["shape"], dtype=np.float32) for v in lease["layout"][shard]}


async def test_it_refuses_a_socket_without_a_token(production: Stack) -> None:
    async with connect(production.ws_url) as ws:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["code"] == "unauthorized"
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == CloseCode.UNAUTHORIZED


async def test_it_refuses_an_unknown_token(production: Stack) -> None:
    async with connect(
        production.ws_url, additional_headers={"Authorization": "Bearer dp_not-a-token"}
    ) as ws:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["code"] == "unauthorized"


async def test_it_ignores_a_token_in_the_query_string(
    production: Stack, seeded: dict[str, Any]
) -> None:
    async with connect(f"{production.ws_url}?token={seeded['token']}") as ws:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["code"] == "unauthorized"


async def test_it_refuses_an_old_protocol_version(
    production: Stack, seeded: dict[str, Any]
) -> None:
    async with connect(
        production.ws_url, additional_headers={"Authorization": f"Bearer {seeded['token']}"}
    ) as ws:
        c = Client(ws)
        reply = await c.ask({"type": "register", "protocol_version": 0, "name": "x", "device": {}})
        assert reply["code"] == "unsupported_version"


async def test_it_answers_malformed_frames_with_structured_errors_and_stays_usable(
    client: Client,
) -> None:
    await client.ws.send("{not json")
    assert (await client.recv())[0]["code"] == "bad_frame"
    await client.ws.send(b"\x00\x01garbage")
    assert (await client.recv())[0]["code"] == "bad_frame"
    assert (await client.ask({"type": "teleport"}))["code"] == "unknown_type"
    assert (await client.ask({"type": "fetch", "lease_id": 7, "shard": 0}))["code"] == "bad_message"
    await client.still_usable()


async def test_a_wrong_shape_is_rejected_and_nothing_is_applied(client: Client) -> None:
    lease = await client.lease()
    version, before = await client.fetch(lease, 0)
    grads = zero_grads(lease, 0)
    name = next(iter(grads))
    grads[name] = np.zeros((3, 3), dtype=np.float32)
    reply = await client.push(lease, 0, grads)
    assert reply["code"] == "wrong_shape"
    after_version, after = await client.fetch(lease, 0)
    assert after_version == version
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    await client.still_usable()


async def test_a_wrong_dtype_is_rejected(client: Client) -> None:
    lease = await client.lease()
    grads = {k: v.astype(np.float64) for k, v in zero_grads(lease, 0).items()}
    assert (await client.push(lease, 0, grads))["code"] == "wrong_dtype"
    await client.still_usable()


async def test_a_nan_gradient_is_rejected_and_nothing_is_applied(client: Client) -> None:
    lease = await client.lease()
    version, before = await client.fetch(lease, 1)
    grads = zero_grads(lease, 1)
    name = next(iter(grads))
    grads[name].flat[0] = np.nan
    assert (await client.push(lease, 1, grads))["code"] == "non_finite"
    after_version, after = await client.fetch(lease, 1)
    assert after_version == version
    np.testing.assert_array_equal(before[name], after[name])
    await client.still_usable()


async def test_a_good_push_is_applied_once_and_its_replay_is_acknowledged_but_not_applied(
    client: Client,
) -> None:
    lease = await client.lease()
    version, _ = await client.fetch(lease, 0)
    grads = {k: np.full(v.shape, 0.01, np.float32) for k, v in zero_grads(lease, 0).items()}
    first = await client.push(lease, 0, grads, seq=5, base_version=version)
    assert first["type"] == "push_ack" and first["applied"] and first["version"] == version + 1
    replay = await client.push(lease, 0, grads, seq=5, base_version=version)
    assert replay["type"] == "push_ack" and replay["duplicate"] and not replay["applied"]
    assert (await client.fetch(lease, 0))[0] == version + 1


async def test_an_unknown_lease_is_rejected(client: Client) -> None:
    fake = {"lease_id": str(uuid.uuid4()), "layout": [[]]}
    assert (await client.push(fake, 0, {}))["code"] == "unknown_lease"
    await client.still_usable()


async def test_a_foreign_lease_is_rejected(
    client: Client, production: Stack, seeded: dict[str, Any]
) -> None:
    lease = await client.lease()
    async with connect(
        production.ws_url, additional_headers={"Authorization": f"Bearer {seeded['tokens'][1]}"}
    ) as ws:
        other = Client(ws)
        await other.register("other-donor")
        reply = await other.push(lease, 0, zero_grads(lease, 0))
        assert reply["code"] == "lease_not_yours"
        await other.still_usable()


async def test_a_push_on_an_expired_lease_is_rejected(client: Client, production: Stack) -> None:
    lease = await client.lease()
    # No heartbeats: the 4 s lease expires and the reaper (every 1 s) takes it back.
    await async_wait_for(
        lambda: asyncio.to_thread(lease_status, production, lease["lease_id"], "expired"),
        60,
        "the reaper to take the lease back",
    )
    reply = await client.push(lease, 0, zero_grads(lease, 0))
    assert reply["code"] == "lease_expired"
    await client.still_usable()


async def test_an_oversized_frame_is_rejected(client: Client) -> None:
    lease = await client.lease()
    huge = {"x": np.zeros(80 << 20, dtype=np.uint8)}  # over the 64 MiB frame limit
    msg = {
        "type": "push",
        "lease_id": lease["lease_id"],
        "seq": 1,
        "shard": 0,
        "base_version": 0,
        "samples": 1,
    }
    await client.ws.send(frame_to_wire(msg, huge))
    reply = (await client.recv())[0]
    assert reply["code"] == "frame_too_large"
    await client.still_usable()


async def test_a_browser_page_from_another_site_cannot_open_an_agent_socket(
    production: Stack, seeded: dict[str, Any]
) -> None:
    with pytest.raises(InvalidStatus):
        async with connect(
            production.ws_url,
            origin="https://evil.example",  # type: ignore[arg-type]
            additional_headers={"Authorization": f"Bearer {seeded['token']}"},
        ) as ws:
            await ws.recv()


async def test_a_page_served_by_downpour_itself_may_open_one(
    production: Stack, seeded: dict[str, Any]
) -> None:
    async with connect(
        production.ws_url,
        origin=f"http://127.0.0.1:{production.port}",  # type: ignore[arg-type]
        additional_headers={"Authorization": f"Bearer {seeded['token']}"},
    ) as ws:
        assert (await Client(ws).register("same-origin"))["type"] == "registered"


async def test_a_token_gets_a_limited_number_of_connections(
    production: Stack, seeded: dict[str, Any]
) -> None:
    headers = {"Authorization": f"Bearer {seeded['tokens'][1]}"}
    async with (
        connect(production.ws_url, additional_headers=headers) as a,
        connect(production.ws_url, additional_headers=headers) as b,
        connect(production.ws_url, additional_headers=headers) as c,
    ):
        for i, ws in enumerate((a, b, c)):
            assert (await Client(ws).register(f"capped-{i}"))["type"] == "registered"
        async with connect(production.ws_url, additional_headers=headers) as d:
            reply = json.loads(await asyncio.wait_for(d.recv(), 10))
            assert reply["code"] == "rate_limited"
            await asyncio.wait_for(d.wait_closed(), 10)
            assert d.close_code == CloseCode.RATE_LIMITED
    async with connect(production.ws_url, additional_headers=headers) as e:
        assert (await Client(e).register("after-release"))["type"] == "registered"


async def test_a_token_registers_a_limited_number_of_agents_and_each_may_register_again(
    production: Stack, seeded: dict[str, Any]
) -> None:
    # Prepare: one socket may register many names; token 2 is this test's alone.
    token = seeded["tokens"][2]
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(production.ws_url, additional_headers=headers) as ws:
        c = Client(ws)
        for i in range(AGENTS_PER_TOKEN):
            assert (await c.register(f"machine-{i}"))["type"] == "registered"

        # Execute
        reply = await c.ask(
            {
                "type": "register",
                "protocol_version": PROTOCOL_VERSION,
                "name": "one-too-many",
                "device": {},
                "ref": 7,
            }
        )

        # Assert: a structured refusal, then the socket is closed.
        assert reply["type"] == "error" and reply["code"] == "too_many_agents", reply
        assert reply["ref"] == 7 and f"already has {AGENTS_PER_TOKEN} agents" in reply["message"]
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code == CloseCode.FORBIDDEN
    async with connect(production.ws_url, additional_headers=headers) as ws:
        assert (await Client(ws).register("machine-0"))["type"] == "registered"
        await Client(ws).still_usable()
    ((agents,),) = production.query(
        "SELECT count(*) FROM donors_agent a JOIN donors_agenttoken t ON t.id = a.token_id "
        "WHERE t.token_hash = %s",
        [hashlib.sha256(token.encode()).hexdigest()],
    )
    assert agents == AGENTS_PER_TOKEN


async def test_a_push_flood_is_rate_limited_and_nothing_is_applied(client: Client) -> None:
    lease = await client.lease()
    version, _ = await client.fetch(lease, 0)
    grads = {k: np.full(v.shape, 0.01, np.float32) for k, v in zero_grads(lease, 0).items()}
    codes, applied = [], 0
    # One round of the lease, sent 60 times: what is not rate limited is applied once, then
    # acknowledged as a duplicate (a seq must name a round of the lease: issue 10).
    msg = {
        "type": "push",
        "lease_id": lease["lease_id"],
        "seq": 0,
        "shard": 0,
        "base_version": version,
        "samples": 1,
    }
    for _ in range(60):
        await client.ws.send(frame_to_wire(msg, grads))
    for _ in range(60):
        reply = (await client.recv())[0]
        codes.append(reply.get("code", reply["type"]))
        applied += bool(reply.get("applied"))
    limited = codes.count("rate_limited")
    # The bucket holds 40; what gets through is applied or, past max_staleness, refused.
    assert limited >= 10
    assert set(codes) <= {"push_ack", "rate_limited", "stale_gradient"}
    assert (await client.fetch(lease, 0))[0] == version + applied
    await client.still_usable()

    # The bucket refills (20 a second), and pushes go through again.
    async def accepted() -> bool:
        current, _ = await client.fetch(lease, 0)
        reply = await client.push(lease, 0, grads, seq=1, base_version=current)
        assert reply["type"] == "push_ack" or reply["code"] == "rate_limited", reply
        return reply["type"] == "push_ack"

    await async_wait_for(accepted, 30, "a push after the flood to be accepted", interval=0.1)
