"""The agent against a real local websocket server that speaks the server side minimally.

``FakeServer`` serves the websocket endpoint and the dataset shard on one port (as the
real server does), records every message it receives and answers like the parameter
server: fetch -> params, push -> push_ack (after applying the gradient), and so on.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import logging
import os
import random
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from downpour_agent.cli import main
from downpour_agent.connection import (
    EXIT_FATAL,
    EXIT_OK,
    Agent,
    AgentConfig,
    AgentStats,
    Backoff,
    LeaseRejected,
    PushResult,
    check_layout,
    websocket_url,
)
from downpour_agent.protocol import (
    AGENT_MESSAGES,
    PROTOCOL_VERSION,
    error_message,
    frame_from_wire,
    frame_to_wire,
    message_from_wire,
    message_to_wire,
)
from downpour_agent.trainer import GradientComputer, VariableSpec

keras = pytest.importorskip("keras")

TOKEN = "alice-agent-token"

SHARD_PATH = "/api/agent/shards/5b1c/"
N_SAMPLES = 40


@pytest.fixture(scope="module")
def model_config() -> dict[str, Any]:
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="relu"),
            keras.layers.Dense(2, activation="softmax"),
        ],
        name="tiny",
    )
    config: dict[str, Any] = json.loads(model.to_json())
    return config


@pytest.fixture(scope="module")
def layout(model_config: dict[str, Any]) -> list[list[dict[str, Any]]]:
    specs = GradientComputer(model_config, "sparse_categorical_crossentropy").variable_specs()
    entries = [{"name": n, "shape": list(s), "dtype": d} for n, s, d in specs]
    return [entries[:2], entries[2:]]


@pytest.fixture(scope="module")
def shard_body() -> bytes:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_SAMPLES, 3)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=(x[:, 0] > 0).astype(np.int64))
    return buffer.getvalue()


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
        self.push_reply: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
        self.drop_after_pushes: int | None = None
        self.drop_how = "close"
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
                    await ws.close(4401, "unauthorized")
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
                        await ws.close(1012, "server restart")
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
            if not self.work:
                await reply({"type": "no_work", "retry_after_s": 0.05})
                return
            lease = {**self.work.pop(0), "lease_id": next(self.lease_ids)}
            self.outstanding[lease["lease_id"]] = lease
            await reply(lease)
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
        elif mtype == "complete":
            self.outstanding.pop(msg["lease_id"], None)
            await reply({"type": "complete_ack", "lease_id": msg["lease_id"]})
        elif mtype == "return_lease":
            self.outstanding.pop(msg["lease_id"], None)
            await reply({"type": "lease_returned", "lease_id": msg["lease_id"]})


@pytest.fixture
async def server(
    model_config: dict[str, Any], layout: list[list[dict[str, Any]]], shard_body: bytes
) -> AsyncIterator[FakeServer]:
    async with FakeServer(model_config, layout, shard_body) as fake:
        yield fake


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


# -- a whole lease ------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zlib", "fp16"])
async def test_the_agent_registers_fetches_pushes_and_completes_a_lease(
    server: FakeServer, tmp_path: Path, compression: str
) -> None:
    # Prepare
    server.lease_template["hyper"]["compression"] = compression
    server.work = [dict(server.lease_template)]
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert: the conversation
    assert code == EXIT_OK
    register = server.received[0]
    assert register["type"] == "register"
    assert register["protocol_version"] == PROTOCOL_VERSION
    assert register["name"] == "alice-laptop" and register["device"]["cpu_cores"] == 2
    assert server.shard_requests == [f"Bearer {TOKEN}"]
    fetches = server.of_type("fetch")
    assert [(f["lease_id"], f["shard"]) for f in fetches] == [("lease-1", s) for s in (0, 1)] * 3
    [complete] = server.of_type("complete")
    assert complete == {**complete, "lease_id": "lease-1", "samples": 7 * 8}
    assert server.of_type("return_lease") == []

    # Assert: 7 steps pushed every 2 steps -> rounds after steps 1, 3, 5 and the last (6)
    assert [(m["seq"], m["shard"], m["samples"]) for m, _ in server.pushes] == [
        (seq, shard, samples) for seq, samples in enumerate([16, 16, 16, 8]) for shard in (0, 1)
    ]
    # Fetches go out before steps 0, 3 and 6 but overlap training: an answer is applied when
    # it arrives, and a push names the oldest version its steps computed on. So per shard
    # the base versions start at 0, never decrease, and never pass the pushes made before.
    for shard in (0, 1):
        bases = [m["base_version"] for m, _ in server.pushes if m["shard"] == shard]
        assert bases[0] == 0
        assert bases == sorted(bases)
        assert all(base <= round_ for round_, base in enumerate(bases))
    for msg, tensors in server.pushes:
        shard_layout = server.layout[msg["shard"]]
        assert list(tensors) == [entry["name"] for entry in shard_layout]
        for entry in shard_layout:
            grad = tensors[entry["name"]]
            assert grad.dtype == np.float32 and list(grad.shape) == entry["shape"]
            assert np.isfinite(grad).all()
        assert any(np.abs(g).sum() > 0 for g in tensors.values())

    # Assert: what the agent knows
    assert agent.stats.leases_completed == 1
    assert agent.stats.pushes_sent == agent.stats.pushes_acked == 8
    last = agent.stats.last_push
    assert last is not None
    assert (last.seq, last.shard, last.version, last.applied) == (3, 1, 4, True)
    assert 0 <= last.staleness <= 3  # overlapped fetches may leave the last push stale


async def test_the_pushed_gradient_is_the_mean_gradient_of_the_batches_it_covers(
    server: FakeServer, tmp_path: Path, model_config: dict[str, Any], shard_body: bytes
) -> None:
    # Prepare: one push covering two steps, so both batches see the fetched weights.
    server.lease_template.update(steps=2)
    server.lease_template["hyper"].update(n_fetch=2, n_push=2)
    server.work = [dict(server.lease_template)]
    weights = {name: value.copy() for name, value in server.params.items()}

    # Execute
    await run_agent(make_agent(server, tmp_path))

    # Assert
    from downpour_agent.trainer import BatchSampler

    with np.load(io.BytesIO(shard_body)) as archive:
        x, y = archive["x"], archive["y"]
    sampler = BatchSampler(N_SAMPLES, 8, seed=42)
    idx = np.concatenate([sampler.next_indices(), sampler.next_indices()])
    reference = GradientComputer(model_config, "sparse_categorical_crossentropy")
    reference.set_weights(weights)
    expected, _ = reference.compute(x[idx], y[idx])
    pushed = {name: grad for _, tensors in server.pushes for name, grad in tensors.items()}
    assert pushed.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(pushed[name], expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("n_fetch", "n_push"), [(2, 5), (3, 3), (1, 2), (1, 4), (4, 2)])
async def test_every_round_names_the_weights_it_ran_on_so_a_spot_check_can_replay_it(
    server: FakeServer,
    tmp_path: Path,
    model_config: dict[str, Any],
    shard_body: bytes,
    n_fetch: int,
    n_push: int,
) -> None:
    # Prepare: fetches overlap training, and the server's weights change with every push.
    server.lease_template.update(steps=9)
    server.lease_template["hyper"].update(n_fetch=n_fetch, n_push=n_push)
    server.work = [dict(server.lease_template)]

    # Execute
    await run_agent(make_agent(server, tmp_path))

    # Assert: rounds end at multiples of n_push (and at the last step)...
    rounds = [(m["seq"], m["samples"]) for m, _ in server.pushes if m["shard"] == 0]
    sizes = [min(n_push, 9 - start) for start in range(0, 9, n_push)]
    assert rounds == [(seq, size * 8) for seq, size in enumerate(sizes)]
    # ...and each one replays exactly from the weights served at the versions it names: its
    # base versions, then each load within the round.
    from downpour_agent.trainer import round_gradients

    def served(versions: dict[int, int]) -> dict[str, np.ndarray]:
        return {
            k: v for shard, ver in versions.items() for k, v in server.served[(shard, ver)].items()
        }

    with np.load(io.BytesIO(shard_body)) as archive:
        x, y = archive["x"].astype(np.float32), archive["y"]
    verifier = GradientComputer(model_config, "sparse_categorical_crossentropy", seed=7)
    loaded_mid_round = 0
    for seq, size in enumerate(sizes):
        frames = [(m, t) for m, t in server.pushes if m["seq"] == seq]
        loads = frames[0][0].get("loads", [])
        assert all(m.get("loads", []) == loads for m, _ in frames)
        loaded_mid_round += len(loads)
        verifier.set_weights(served({m["shard"]: m["base_version"] for m, _ in frames}))
        expected, samples = round_gradients(
            verifier,
            x,
            y,
            batch_size=8,
            seed=42,
            first_step=seq * n_push,
            steps=size,
            loads=[(offset, served(dict(enumerate(vs)))) for offset, vs in loads],
        )
        pushed = {name: grad for _, tensors in frames for name, grad in tensors.items()}
        assert samples == size * 8 and pushed.keys() == expected.keys()
        for name in expected:
            np.testing.assert_allclose(pushed[name], expected[name], rtol=1e-4, atol=1e-6)
    if n_fetch < n_push:
        assert loaded_mid_round > 0, "fetches within a round are loaded when they arrive"


async def test_heartbeats_carry_the_lease_while_it_is_worked_on(
    server: FakeServer, tmp_path: Path
) -> None:
    agent = make_agent(server, tmp_path, max_steps_per_second=20)

    await run_agent(agent)

    heartbeats = server.of_type("heartbeat")
    assert len(heartbeats) >= 2
    assert any(hb.get("lease_id") == "lease-1" for hb in heartbeats)


async def test_an_idle_agent_keeps_asking_for_work_then_exits_when_told_to(
    server: FakeServer, tmp_path: Path
) -> None:
    server.work = []

    code = await run_agent(make_agent(server, tmp_path, exit_when_idle_s=0.3))

    assert code == EXIT_OK
    assert len(server.of_type("request_work")) >= 3
    assert server.close_codes == [1000]


async def test_two_leases_of_one_job_download_the_shard_once(
    server: FakeServer, tmp_path: Path
) -> None:
    server.work = [dict(server.lease_template), dict(server.lease_template)]
    agent = make_agent(server, tmp_path)

    await run_agent(agent)

    assert [c["lease_id"] for c in server.of_type("complete")] == ["lease-1", "lease-2"]
    assert len(server.shard_requests) == 1


# -- leases the agent cannot or may no longer work on -------------------------------


async def test_a_shard_with_the_wrong_sha256_is_refused_and_the_lease_handed_back(
    server: FakeServer, tmp_path: Path
) -> None:
    server.lease_template["dataset"] = {
        **server.lease_template["dataset"],
        "sha256": hashlib.sha256(b"another shard").hexdigest(),
    }
    server.work = [dict(server.lease_template)]
    agent = make_agent(server, tmp_path)

    code = await run_agent(agent)

    assert code == EXIT_OK
    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]
    assert server.pushes == [] and server.of_type("complete") == []
    assert await asyncio.to_thread(lambda: list(tmp_path.glob("*.npz"))) == []


async def test_a_layout_that_does_not_match_the_model_is_handed_back(
    server: FakeServer, tmp_path: Path
) -> None:
    wrong = json.loads(json.dumps(server.layout))
    wrong[0][0]["shape"] = [3, 5]
    server.lease_template["layout"] = wrong
    server.work = [dict(server.lease_template)]

    await run_agent(make_agent(server, tmp_path))

    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]
    assert server.of_type("fetch") == [] and server.pushes == []


async def test_a_model_the_validator_refuses_is_handed_back(
    server: FakeServer, tmp_path: Path
) -> None:
    server.lease_template["model"] = {"class_name": "Lambda", "config": {"function": "os.system"}}
    server.work = [dict(server.lease_template)]
    agent = make_agent(server, tmp_path)

    code = await run_agent(agent)

    assert code == EXIT_OK
    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]


async def test_a_lease_with_malformed_hyper_parameters_is_handed_back(
    server: FakeServer, tmp_path: Path
) -> None:
    server.lease_template["hyper"] = {**server.lease_template["hyper"], "batch_size": "lots"}
    server.work = [dict(server.lease_template)]

    await run_agent(make_agent(server, tmp_path))

    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]


async def test_an_expired_lease_is_abandoned_at_once_and_new_work_requested(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare
    server.lease_template.update(steps=200)
    server.lease_template["hyper"].update(n_push=1)
    server.work = [dict(server.lease_template)]
    server.push_reply = lambda msg: error_message("lease_expired", "too late", msg.get("ref"))
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert
    assert code == EXIT_OK
    assert agent.stats.leases_abandoned == 1
    assert server.of_type("complete") == [] and server.of_type("return_lease") == []
    assert len(server.pushes) < 20
    last_push = max(i for i, m in enumerate(server.received) if m["type"] == "push")
    assert any(m["type"] == "request_work" for m in server.received[last_push:])


async def test_stale_gradient_errors_are_counted_and_the_work_goes_on(
    server: FakeServer, tmp_path: Path
) -> None:
    server.push_reply = lambda msg: error_message("stale_gradient", "too stale", msg.get("ref"))
    agent = make_agent(server, tmp_path)

    await run_agent(agent)

    assert agent.stats.pushes_stale == 8
    assert [c["lease_id"] for c in server.of_type("complete")] == ["lease-1"]


# -- connections ----------------------------------------------------------------------


@pytest.mark.parametrize("drop_how", ["close", "abort"])
async def test_a_dropped_connection_mid_lease_reconnects_and_resumes_the_lease(
    server: FakeServer, tmp_path: Path, drop_how: str
) -> None:
    # Prepare: drop after the first full push round
    server.drop_after_pushes = 2
    server.drop_how = drop_how
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert
    assert code == EXIT_OK
    assert server.connections == 2
    assert len(server.of_type("register")) == 2 and agent.stats.registrations == 2
    assert [m["lease_id"] for m in server.of_type("resume")] == ["lease-1"]
    assert agent.stats.leases_resumed == 1
    assert [(c["lease_id"], c["samples"]) for c in server.of_type("complete")] == [("lease-1", 56)]
    pushed = {(m["seq"], m["shard"]) for m, _ in server.pushes}
    assert pushed == {(seq, shard) for seq in range(4) for shard in (0, 1)}
    assert len(server.applied) == 8


async def test_a_drop_in_the_middle_of_a_push_round_resumes_without_double_counting(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: the server reads one shard of round 0, then the network goes.
    server.drop_after_pushes = 1
    server.drop_how = "abort"
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert
    assert code == EXIT_OK
    assert [(c["lease_id"], c["samples"]) for c in server.of_type("complete")] == [("lease-1", 56)]
    pushed = {(m["seq"], m["shard"]) for m, _ in server.pushes}
    assert {(seq, shard) for seq in range(1, 4) for shard in (0, 1)} <= pushed
    assert len(server.applied) == len(pushed)


@pytest.mark.parametrize("drop_how", ["close", "abort"])
async def test_a_lease_that_cannot_be_resumed_is_dropped_for_new_work(
    server: FakeServer, tmp_path: Path, drop_how: str
) -> None:
    # Prepare: this server reissues the work at once instead of keeping the lease.
    server.drop_after_pushes = 2
    server.drop_how = drop_how
    server.resumable = False
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert
    assert code == EXIT_OK
    assert [m["lease_id"] for m in server.of_type("resume")] == ["lease-1"]
    assert agent.stats.leases_resumed == 0
    assert [c["lease_id"] for c in server.of_type("complete")] == ["lease-2"]
    seqs = [m["seq"] for m, _ in server.pushes if m["lease_id"] == "lease-2"]
    assert seqs == [0, 0, 1, 1, 2, 2, 3, 3]


async def test_an_agent_keeps_retrying_while_the_server_is_down(
    tmp_path: Path, model_config: dict[str, Any], layout: Any, shard_body: bytes
) -> None:
    # Prepare: find a free port, then start the server there only after a while.
    fake = FakeServer(model_config, layout, shard_body)
    async with fake:
        port = int(fake.base_url.rsplit(":", 1)[1])
    agent = make_agent(fake, tmp_path, backoff_initial_s=0.05, backoff_max_s=0.2)
    task = asyncio.create_task(run_agent(agent))
    await asyncio.sleep(0.8)
    assert not task.done()

    # Execute
    async with serve(fake.handler, "127.0.0.1", port, process_request=fake.process_request):
        code = await task

    # Assert
    assert code == EXIT_OK
    assert [c["lease_id"] for c in fake.of_type("complete")] == ["lease-1"]


async def test_a_refused_token_ends_the_agent_without_retrying(
    server: FakeServer, tmp_path: Path
) -> None:
    agent = make_agent(server, tmp_path, token="stolen-token")

    code = await run_agent(agent, timeout_s=10)

    assert code == EXIT_FATAL
    assert server.connections == 1
    assert server.close_codes == [4401]


async def test_an_unsupported_protocol_version_ends_the_agent_with_a_clear_message(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server.register_error = "unsupported_version"

    code = await run_agent(make_agent(server, tmp_path), timeout_s=10)

    assert code == EXIT_FATAL
    assert server.connections == 1
    assert "upgrade the agent" in caplog.text


async def test_a_token_at_its_agent_cap_ends_the_agent_without_retrying(
    server: FakeServer, tmp_path: Path
) -> None:
    # The cap on a token's agents does not lift by waiting: retrying would only hammer it.
    server.register_error = "too_many_agents"

    code = await run_agent(make_agent(server, tmp_path), timeout_s=10)

    assert code == EXIT_FATAL
    assert server.connections == 1


@pytest.mark.parametrize("status", [HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN])
async def test_a_token_refused_at_the_handshake_ends_the_agent(
    server: FakeServer, tmp_path: Path, status: HTTPStatus
) -> None:
    server.handshake_status = status

    code = await run_agent(make_agent(server, tmp_path), timeout_s=10)

    assert code == EXIT_FATAL
    assert server.connections == 1


async def test_a_server_error_at_the_handshake_is_retried(
    server: FakeServer, tmp_path: Path
) -> None:
    server.handshake_status = HTTPStatus.SERVICE_UNAVAILABLE
    agent = make_agent(server, tmp_path, backoff_initial_s=0.02, backoff_max_s=0.05)
    task = asyncio.create_task(run_agent(agent))
    await asyncio.wait_for(server.refused_three_times.wait(), 30)

    server.handshake_status = None
    code = await task

    assert code == EXIT_OK
    assert agent.stats.registrations == 1


async def test_malformed_and_unexpected_server_frames_do_not_crash_the_agent(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare
    valid_params = frame_to_wire({"type": "params", "lease_id": "x", "shard": 0, "version": 1}, {})
    server.garbage = [
        "not json at all",
        "{",
        '{"type": "launch_missiles"}',
        '{"type": "push_ack", "lease_id": 5}',
        '{"type": "no_work", "retry_after_s": NaN}',
        message_to_wire({"type": "params", "lease_id": "x", "shard": 0, "version": 1}),
        message_to_wire({"type": "complete_ack", "lease_id": "nobody-asked"}),
        message_to_wire(
            {"type": "registered", "agent_id": "a", "heartbeat_interval_s": 1, "lease_ttl_s": 1}
        ),
        message_to_wire(error_message("internal", "something broke")),
        b"\x00\x01\x02",
        b"DPT\x01" + b"\xff" * 12,
        valid_params[:-1] + b"}" + b"\x00",
        valid_params,
        frame_to_wire({"type": "no_work", "retry_after_s": 1}, {}),
    ]
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert
    assert code == EXIT_OK
    assert server.connections == 1
    assert agent.stats.leases_completed == 1


# -- stopping -----------------------------------------------------------------------


async def test_shutdown_mid_lease_returns_the_lease_and_closes_cleanly(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare
    server.lease_template.update(steps=100_000)
    server.work = [dict(server.lease_template)]
    agent = make_agent(server, tmp_path, exit_when_idle_s=None)
    task = asyncio.create_task(run_agent(agent))
    await asyncio.wait_for(server.first_push.wait(), 30)

    # Execute
    await asyncio.wait_for(agent.shutdown(), 10)

    # Assert
    assert task.done() and task.result() == EXIT_OK
    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]
    assert agent.stats.leases_returned == 1
    assert server.of_type("complete") == []
    await asyncio.sleep(0.1)
    assert server.close_codes == [1000]


async def test_shutdown_at_any_moment_of_a_lease_returns_it(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: fetch and push every step, so a stop often lands while an answer arrives.
    server.lease_template.update(steps=100_000)
    server.lease_template["hyper"].update(n_fetch=1, n_push=1)
    rng = random.Random(3)
    for attempt in range(10):
        server.work = [dict(server.lease_template)]
        server.first_push.clear()
        agent = make_agent(server, tmp_path, exit_when_idle_s=None)
        task = asyncio.create_task(run_agent(agent))
        await asyncio.wait_for(server.first_push.wait(), 30)
        await asyncio.sleep(rng.uniform(0, 0.05))

        # Execute
        await asyncio.wait_for(agent.shutdown(), 10)

        # Assert
        assert task.result() == EXIT_OK
        assert len(server.of_type("return_lease")) == attempt + 1
        assert agent.stats.leases_returned == 1


async def test_shutdown_while_idle_just_closes(server: FakeServer, tmp_path: Path) -> None:
    server.work = []
    agent = make_agent(server, tmp_path, exit_when_idle_s=None)
    task = asyncio.create_task(run_agent(agent))
    await asyncio.wait_for(server.asked_for_work.wait(), 30)

    await asyncio.wait_for(agent.shutdown(), 10)

    assert task.result() == EXIT_OK
    assert server.of_type("return_lease") == []


async def test_shutdown_does_not_wait_forever_for_lease_returned(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: a server that never confirms the return.
    server.lease_template.update(steps=100_000)
    server.work = [dict(server.lease_template)]
    original = server.answer

    async def silent_on_return(ws: ServerConnection, msg: dict[str, Any], tensors: Any) -> None:
        if msg["type"] != "return_lease":
            await original(ws, msg, tensors)

    server.answer = silent_on_return  # type: ignore[method-assign]
    agent = make_agent(server, tmp_path, exit_when_idle_s=None, return_timeout_s=0.3)
    task = asyncio.create_task(run_agent(agent))
    await asyncio.wait_for(server.first_push.wait(), 30)

    # Execute
    await asyncio.wait_for(agent.shutdown(), 5)

    # Assert
    assert task.result() == EXIT_OK
    assert len(server.of_type("return_lease")) == 1
    assert agent.stats.leases_returned == 0


async def test_sigint_makes_the_agent_process_return_its_lease_and_exit_0(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare
    server.lease_template.update(steps=100_000)
    server.work = [dict(server.lease_template)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "DOWNPOUR_TOKEN": TOKEN,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "downpour_agent",
        "join",
        server.base_url,
        "--cache-dir",
        str(tmp_path),
        "--benchmark-seconds",
        "0",
        "--threads",
        "1",
        "--no-nice",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.wait_for(server.first_push.wait(), 120)

        # Execute
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    # Assert
    assert process.returncode == 0, stderr.decode()
    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]
    assert b"Traceback" not in stderr


# -- small parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://localhost:8000", "ws://localhost:8000/ws/agent/"),
        ("http://localhost:8000/", "ws://localhost:8000/ws/agent/"),
        ("https://downpour.example", "wss://downpour.example/ws/agent/"),
        ("https://example.org/downpour/", "wss://example.org/downpour/ws/agent/"),
        ("HTTP://Host:1", "ws://Host:1/ws/agent/"),
    ],
)
def test_the_websocket_url_is_derived_from_the_base_url(base: str, expected: str) -> None:
    assert websocket_url(base) == expected


@pytest.mark.parametrize("base", ["ftp://host", "localhost:8000", "http://", ""])
def test_a_base_url_that_is_not_http_is_refused(base: str) -> None:
    with pytest.raises(ValueError):
        websocket_url(base)


def test_backoff_doubles_from_half_a_second_to_thirty_with_jitter() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(0))

    delays = [backoff.next_delay() for _ in range(12)]

    steps = [min(30.0, 0.5 * 2**i) for i in range(12)]
    assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True))
    assert len(set(delays)) == len(delays)


def test_backoff_starts_again_after_a_reset() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(0))
    for _ in range(8):
        backoff.next_delay()

    backoff.reset()

    assert backoff.next_delay() <= 0.5


def _layout(*entries: tuple[str, tuple[int, ...]]) -> list[list[VariableSpec]]:
    return [[(name, shape, "float32") for name, shape in entries]]


def test_a_layout_naming_exactly_the_model_variables_is_accepted_in_any_shard_order() -> None:
    specs: list[VariableSpec] = [("d/kernel", (3, 4), "float32"), ("d/bias", (4,), "float32")]

    check_layout([[specs[1]], [specs[0]]], specs)


@pytest.mark.parametrize(
    ("layout", "complaint"),
    [
        (_layout(("d/kernel", (3, 4))), "missing ['d/bias']"),
        (_layout(("d/kernel", (3, 4)), ("d/bias", (4,)), ("x", (1,))), "unknown ['x']"),
        (_layout(("d/kernel", (4, 3)), ("d/bias", (4,))), "d/kernel [4, 3] vs model [3, 4]"),
        (_layout(("d/kernel", (3, 4)), ("d/bias", (4,)), ("d/bias", (4,))), "twice"),
    ],
)
def test_a_layout_that_differs_from_the_model_is_rejected_with_the_difference(
    layout: list[list[VariableSpec]], complaint: str
) -> None:
    specs: list[VariableSpec] = [("d/kernel", (3, 4), "float32"), ("d/bias", (4,), "float32")]

    with pytest.raises(LeaseRejected) as info:
        check_layout(layout, specs)

    assert complaint in str(info.value)


def test_the_status_line_shows_job_progress_speed_and_the_last_push() -> None:
    stats = AgentStats(job_id="9c4e0f21-aaaa-bbbb", steps_done=120, steps_total=500)
    stats.last_push = PushResult(
        seq=11, shard=0, version=345, staleness=2, applied=True, duplicate=False
    )

    stats.compute_s, stats.training_since = 123.45, 1000.0

    line = stats.status_line(samples_per_s=412.4, utilisation=0.8734, now=1141.4)

    assert line.startswith("job 9c4e0f21 step 120/500 412 samples/s")
    assert "push #11 v345 staleness 2 applied" in line
    assert line.endswith("utilisation=0.873 compute_s=123.45 wall_s=141.40")


async def test_status_lines_are_logged_while_training(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.INFO, logger="downpour_agent")
    server.lease_template.update(steps=30)
    server.work = [dict(server.lease_template)]
    agent = make_agent(server, tmp_path, status_interval_s=0.1, max_steps_per_second=50)

    # Execute
    await run_agent(agent)

    # Assert: the format bench/downpour_runs.py parses
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job ")]
    assert lines
    pattern = re.compile(
        r"^job 9c4e0f21 step \d+/30 \d+ samples/s(?: .*)? utilisation=[0-9.]+ "
        r"compute_s=[0-9.]+ wall_s=[0-9.]+$"
    )
    assert all(pattern.match(line) for line in lines), lines
    assert 0 < agent.stats.compute_s < agent.stats.wall_s(time.perf_counter())


def test_join_without_a_token_exits_with_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DOWNPOUR_TOKEN", raising=False)

    code = main(["join", "http://127.0.0.1:9", "--no-nice"])

    assert code == 2
    assert "token" in capsys.readouterr().err
