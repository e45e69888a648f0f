"""A ban that closes the socket in the middle of a push round (issue 10, Low 11).

The server sends ``banned`` and closes with 4403 while the agent is still writing the
round's frames: the agent stops with one clear line, and no traceback.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tests.agent.fakeserver import FakeServer, make_agent, run_agent

from downpour_agent.connection import EXIT_FATAL
from downpour_agent.protocol import CloseCode, banned_message

keras = pytest.importorskip("keras")


async def test_a_ban_that_closes_the_socket_mid_push_ends_the_agent_with_one_clear_line(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: at the first push frame the server bans the agent and closes the socket,
    # before the round's other frame is read.
    server.events_on_push = [banned_message("failed a spot check")]
    server.drop_after_pushes = 1
    server.drop_code = CloseCode.FORBIDDEN
    agent = make_agent(server, tmp_path)
    caplog.set_level(logging.INFO, logger="downpour_agent")

    # Execute
    code = await run_agent(agent)

    # Assert
    assert code == EXIT_FATAL
    records = [r for r in caplog.records if r.name.startswith("downpour_agent")]
    assert not [r for r in records if r.exc_info], "no traceback"
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "banned" in errors[0], errors
