"""Stopping the agent: the current lease goes back, the socket closes cleanly."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.agent.fakeserver import (
    TOKEN,
    FakeServer,
    make_agent,
    run_agent,
)
from tests.waiting import async_wait_for
from websockets.asyncio.server import ServerConnection

from downpour_agent.connection import EXIT_OK

keras = pytest.importorskip("keras")


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

    # The fake server records the close code as its handler ends, a moment after the agent.
    async def closed() -> list[int]:
        return list(server.close_codes)

    assert await async_wait_for(closed, 10, "the server to see the close") == [1000]


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


@pytest.mark.slow  # a real agent process, which imports TensorFlow
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
        "DOWNPOUR_CONFIG": str(tmp_path / "agent.toml"),
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
        "--mode",
        "always",
        "--no-status-page",
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
