"""The agent's connection: reconnecting, resuming, refusals that end it, bad frames."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from tests.agent.fakeserver import (
    FakeServer,
    make_agent,
    run_agent,
)
from websockets.asyncio.server import serve

from downpour_agent.connection import EXIT_FATAL, EXIT_OK
from downpour_agent.protocol import (
    CloseCode,
    error_message,
    frame_to_wire,
    message_to_wire,
)

keras = pytest.importorskip("keras")


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
    assert server.close_codes == [CloseCode.UNAUTHORIZED]


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
