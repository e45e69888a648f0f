"""A local websocket server that speaks the server side of the protocol minimally.

``FakeServer`` serves the websocket endpoint and the dataset shard on one port (as the
real server does), records every message it receives and answers like the parameter
server: fetch -> params, push -> push_ack (after applying the gradient), and so on.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from downpour_agent.connection import Agent, AgentConfig
from downpour_agent.desktop.governor import DutyCycle, Governor, Policy
from downpour_agent.desktop.settings import Settings
from downpour_agent.protocol import (
    AGENT_MESSAGES,
    CloseCode,
    error_message,
    frame_from_wire,
    frame_to_wire,
    message_from_wire,
    message_to_wire,
)

TOKEN = "alice-agent-token"

SHARD_PATH = "/api/agent/shards/5b1c/"
N_SAMPLES = 40


class FakeServer:
    """The server side of the protocol, just enough to drive an agent through leases."""

    def __init__(
        self,
        model_config: dict[str, Any],
        layout: list[list[dict[str, Any]]],
        shard_body: bytes,
        *,
        leases: int = 1,
        steps: int = 7,
        hyper: dict[str, Any] | None = None,
    ) -> None:
        self.layout = layout
        self.shard_body = shard_body
        self.lease_template: dict[str, Any] = {
            "type": "lease",
            "job_id": "9c4e0f21-job",
            "work_unit_id": "wu-1",
            "steps": steps,
            "seed": 42,
            "model": model_config,
            "loss": "sparse_categorical_crossentropy",
            "hyper": {
                "batch_size": 8,
                "n_fetch": 3,
                "n_push": 2,
                "learning_rate": 0.1,
                "compression": "none",
                **(hyper or {}),
            },
            "dataset": {
                "url": SHARD_PATH,
                "sha256": hashlib.sha256(shard_body).hexdigest(),
                "n_samples": N_SAMPLES,
            },
            "layout": layout,
            "expires_in_s": 60,
        }
        rng = np.random.default_rng(1)
        self.params = {
            entry["name"]: (rng.standard_normal(entry["shape"]) * 0.3).astype(np.float32)
            for shard in layout
            for entry in shard
        }
        self.versions = [0] * len(layout)
        # (shard, version) -> the weights a fetch answered with, for replaying rounds.
        self.served: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.work = [dict(self.lease_template) for _ in range(leases)]
        self.outstanding: dict[str, dict[str, Any]] = {}
        self.orphaned: dict[str, dict[str, Any]] = {}
        self.resumable = True
        self.applied: set[tuple[str, int, int]] = set()
        self.lease_ids = (f"lease-{i}" for i in itertools.count(1))
        self.received: list[dict[str, Any]] = []
        self.pushes: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.shard_requests: list[str | None] = []
        self.connections = 0
        self.close_codes: list[int | None] = []
        self.garbage: list[str | bytes] = []
        #: Extra fields of ``no_work`` (``reason``, ``message``).
        self.no_work_extra: dict[str, Any] = {}
        self.push_reply: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
        #: Sent as they are (no ``ref`` added) when the next push arrives, before its answer.
        self.events_on_push: list[dict[str, Any]] = []
        #: Seconds before a ``complete`` is answered (and its lease let go), without holding
        #: up the connection's other messages.
        self.complete_delay_s = 0.0
        self._later: set[asyncio.Task[None]] = set()
        #: (lease_id, seq, "job_paused" or "job_finished"): when that push arrives, the job
        #: ends as the server ends it: its leases are taken back, the agent hears the event,
        #: and every later request naming one of them is refused with that code.
        self.end_job_on_push: tuple[str, int, str] | None = None
        #: lease_id -> the code its requests are refused with; index in ``received`` of the
        #: push that ended the job.
        self.ended: dict[str, str] = {}
        self.ended_at: int | None = None
        #: (lease_id, event, trigger): that lease's fetches go unanswered until ``trigger``
        #: is set; then the job ends as above, and they are refused with the event's code
        #: (the real server's order).
        self.end_job_on_fetch: tuple[str, str, asyncio.Event] | None = None
        #: (lease_id, event): the job ends as above right after that lease is issued, its
        #: answer and the event sent back to back.
        self.end_job_after_lease: tuple[str, str] | None = None
        self._held_fetches: list[int] = []
        self.drop_after_pushes: int | None = None
        self.drop_how = "close"
        self.drop_code = 1012  # server restart; CloseCode.FORBIDDEN after a ban
        self.register_error: str | None = None
        self.handshake_status: HTTPStatus | None = None
        self.first_push = asyncio.Event()
        self.asked_for_work = asyncio.Event()
        self.refused_three_times = asyncio.Event()
        self.base_url = ""
        self._server: Server | None = None

    async def __aenter__(self) -> FakeServer:
        self._server = await serve(
            self.handler, "127.0.0.1", 0, process_request=self.process_request
        ).__aenter__()
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._later:
            task.cancel()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def of_type(self, mtype: str) -> list[dict[str, Any]]:
        return [msg for msg in self.received if msg["type"] == mtype]

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == SHARD_PATH:
            auth = request.headers.get("Authorization")
            self.shard_requests.append(auth)
            if auth != f"Bearer {TOKEN}":
                return connection.respond(HTTPStatus.UNAUTHORIZED, "token required\n")
            headers = Headers([("Content-Length", str(len(self.shard_body)))])
            return Response(200, "OK", headers, self.shard_body)
        if request.path != "/ws/agent/":
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if self.handshake_status is not None:
            self.connections += 1
            if self.connections >= 3:
                self.refused_three_times.set()
            return connection.respond(self.handshake_status, "no\n")
        return None

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        connection_number = self.connections
        authorized = ws.request is not None and (
            ws.request.headers.get("Authorization") == f"Bearer {TOKEN}"
        )
        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    msg, tensors = frame_from_wire(raw, AGENT_MESSAGES)
                    self.pushes.append((msg, tensors))
                else:
                    msg = message_from_wire(raw, AGENT_MESSAGES)
                    tensors = {}
                self.received.append(msg)
                if not authorized:
                    await ws.send(
                        message_to_wire(error_message("unauthorized", "bad token", msg.get("ref")))
                    )
                    await ws.close(CloseCode.UNAUTHORIZED, "unauthorized")
                    return
                await self.answer(ws, msg, tensors)
                if (
                    self.drop_after_pushes is not None
                    and connection_number == 1
                    and len(self.pushes) >= self.drop_after_pushes
                ):
                    if self.drop_how == "abort":
                        ws.transport.abort()
                    else:
                        await ws.close(self.drop_code, "server restart")
                    return
        finally:
            self.close_codes.append(ws.close_code)
            # A lease whose agent went away can be resumed, or its work is reissued.
            for lease in self.outstanding.values():
                if self.resumable:
                    self.orphaned[lease["lease_id"]] = lease
                else:
                    self.work.insert(0, {k: v for k, v in lease.items() if k != "lease_id"})
            self.outstanding.clear()

    async def answer(
        self, ws: ServerConnection, msg: dict[str, Any], tensors: dict[str, Any]
    ) -> None:
        ref, mtype = msg.get("ref"), msg["type"]

        async def reply(answer: dict[str, Any]) -> None:
            if ref is not None:
                answer["ref"] = ref
            await ws.send(message_to_wire(answer))

        if msg.get("lease_id") in self.ended and mtype != "heartbeat":
            await reply(error_message(self.ended[msg["lease_id"]], "the job ended"))
            return
        ending = self.end_job_on_push
        if mtype == "push" and ending is not None and ending[:2] == (msg["lease_id"], msg["seq"]):
            await self._end_job(ws, self.outstanding[msg["lease_id"]]["job_id"], ending[2])
            await reply(error_message(ending[2], "the job ended"))
            return
        on_fetch = self.end_job_on_fetch
        if mtype == "fetch" and on_fetch is not None and msg["lease_id"] == on_fetch[0]:
            self._held_fetches.append(ref)
            if len(self._held_fetches) == 1:
                self._later_task(self._end_job_later(ws, msg["lease_id"], *on_fetch[1:]))
            return
        if mtype == "register" and self.register_error is not None:
            await reply(error_message(self.register_error, "go away"))
        elif mtype == "register":
            await reply(
                {
                    "type": "registered",
                    "agent_id": f"agent-{self.connections}",
                    "heartbeat_interval_s": 0.1,
                    "lease_ttl_s": 30,
                }
            )
        elif mtype == "heartbeat":
            await reply({"type": "heartbeat_ack", **{k: msg[k] for k in ("lease_id",) if k in msg}})
        elif mtype == "request_work":
            self.asked_for_work.set()
            for junk in self.garbage:
                await ws.send(junk)
            self.garbage = []
            # As the server: at most two leases at once (max_active_leases), counting those
            # whose connection went and that wait to be resumed.
            if not self.work or len(self.outstanding) + len(self.orphaned) >= 2:
                await reply({"type": "no_work", "retry_after_s": 0.05, **self.no_work_extra})
                return
            lease = {**self.work.pop(0), "lease_id": next(self.lease_ids)}
            self.outstanding[lease["lease_id"]] = lease
            await reply(lease)
            after = self.end_job_after_lease
            if after is not None and after[0] == lease["lease_id"]:
                self.end_job_after_lease = None
                await self._end_job(ws, lease["job_id"], after[1])
        elif mtype == "resume":
            lease = self.orphaned.pop(msg["lease_id"], None)
            if lease is None:
                await reply(error_message("lease_expired", "its work was reissued"))
                return
            self.outstanding[lease["lease_id"]] = lease
            await reply(dict(lease))
        elif mtype == "fetch":
            shard = msg["shard"]
            names = [entry["name"] for entry in self.layout[shard]]
            header = {
                "type": "params",
                "lease_id": msg["lease_id"],
                "shard": shard,
                "version": self.versions[shard],
                "ref": ref,
            }
            self.served[(shard, self.versions[shard])] = {n: self.params[n].copy() for n in names}
            await ws.send(frame_to_wire(header, {n: self.params[n] for n in names}))
        elif mtype == "push":
            self.first_push.set()
            events, self.events_on_push = self.events_on_push, []
            for event in events:
                await ws.send(message_to_wire(event))
            custom = self.push_reply(msg) if self.push_reply else None
            if custom is not None:
                await reply(custom)
                return
            shard = msg["shard"]
            key = (msg["lease_id"], msg["seq"], shard)
            duplicate = key in self.applied
            staleness = self.versions[shard] - msg["base_version"]
            if not duplicate:
                self.applied.add(key)
                for name, grad in tensors.items():
                    self.params[name] -= 0.1 * grad
                self.versions[shard] += 1
            await reply(
                {
                    "type": "push_ack",
                    "lease_id": msg["lease_id"],
                    "seq": msg["seq"],
                    "shard": shard,
                    "version": self.versions[shard],
                    "staleness": staleness,
                    "applied": not duplicate,
                    "duplicate": duplicate,
                }
            )
        elif mtype == "complete" and self.complete_delay_s:
            # Answered later, while the connection's other messages are read (a busy server).
            async def later() -> None:
                await asyncio.sleep(self.complete_delay_s)
                self.outstanding.pop(msg["lease_id"], None)
                await reply({"type": "complete_ack", "lease_id": msg["lease_id"]})

            self._later_task(later())
        elif mtype == "complete":
            self.outstanding.pop(msg["lease_id"], None)
            await reply({"type": "complete_ack", "lease_id": msg["lease_id"]})
        elif mtype == "return_lease":
            self.outstanding.pop(msg["lease_id"], None)
            await reply({"type": "lease_returned", "lease_id": msg["lease_id"]})

    def _later_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _end_job_later(
        self, ws: ServerConnection, lease_id: str, event: str, trigger: asyncio.Event
    ) -> None:
        await trigger.wait()
        self.end_job_on_fetch = None
        await self._end_job(ws, self.outstanding[lease_id]["job_id"], event)
        refs, self._held_fetches = self._held_fetches, []
        for ref in refs:
            await ws.send(message_to_wire(error_message(event, "the job ended", ref)))

    async def _end_job(self, ws: ServerConnection, job_id: str, event: str) -> None:
        """As the server pauses or finishes a job: its leases are taken back, not counted
        against the agent, and the agent is told."""
        self.end_job_on_push, self.ended_at = None, len(self.received) - 1
        for lease_id, lease in list(self.outstanding.items()):
            if lease["job_id"] == job_id:
                self.ended[lease_id] = event
                del self.outstanding[lease_id]
        self.work = [lease for lease in self.work if lease["job_id"] != job_id]
        await ws.send(message_to_wire({"type": event, "job_id": job_id, "message": "it ended"}))


def make_agent(server: FakeServer, cache_dir: Path, **overrides: Any) -> Agent:
    settings: dict[str, Any] = {
        "base_url": server.base_url,
        "token": TOKEN,
        "name": "alice-laptop",
        "cache_dir": cache_dir,
        "device": {"cpu_cores": 2, "samples_per_s": None},
        "exit_when_idle_s": 0.3,
        "status_interval_s": None,
        "backoff_initial_s": 0.05,
        "request_timeout_s": 20.0,
        **overrides,
    }
    return Agent(AgentConfig(**settings))


async def run_agent(agent: Agent, timeout_s: float = 60.0) -> int:
    return await asyncio.wait_for(agent.run(), timeout_s)


def governor() -> Governor:
    """A donor's governor that always allows work, until the test pauses it."""
    policy = Policy(
        Settings(mode="always"),
        input_idle=None,
        other_load=lambda: 0.0,
        on_battery=lambda: False,
    )
    return Governor(policy, DutyCycle(1.0, 1), poll_s=0.05)


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll observable state (a message seen, a state shown) until it holds."""
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


def heartbeats_for(server: FakeServer, lease_id: str) -> int:
    return sum(1 for m in server.of_type("heartbeat") if m.get("lease_id") == lease_id)
