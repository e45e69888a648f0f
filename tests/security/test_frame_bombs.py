"""A small frame cannot make the server inflate gigabytes (issue 10, High 1).

A real daphne process (the embedded default) takes agent sockets; each test sends a frame of
about 1 MiB holding 4 zlib tensors of 256 MiB each, and reads the server's peak resident
memory from ``/proc`` (reset before each attack), as ``test_request_bodies.py`` does.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import zlib
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest
from tests.security.test_request_bodies import Server, server_env
from websockets.asyncio.client import connect

from downpour import devprocs
from downpour_agent.protocol import PROTOCOL_VERSION
from downpour_agent.protocol.tensors import MAGIC

MiB = 1 << 20
#: What one hostile frame may add to the server's peak memory (before: 1.3 GiB).
PEAK_BOUND = 64 * MiB
BOMB_BYTES = 256 * MiB
# A real daphne process: outside `make test-fast`.
pytestmark = pytest.mark.e2e


@cache
def zeros_deflated(size: int) -> bytes:
    deflate = zlib.compressobj(9)
    chunk = bytes(MiB)
    return b"".join(deflate.compress(chunk) for _ in range(size // MiB)) + deflate.flush()


def bomb(msg: dict[str, Any]) -> bytes:
    """4 zlib tensors, each declaring and inflating to 256 MiB, in about 1 MiB."""
    payload = zeros_deflated(BOMB_BYTES)
    descriptors = [
        {
            "name": name,
            "dtype": "float32",
            "shape": [BOMB_BYTES // 4],
            "compression": "zlib",
            "nbytes": len(payload),
        }
        for name in "abcd"
    ]
    head = json.dumps({"msg": msg, "tensors": descriptors}).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + payload * 4


@pytest.fixture(scope="module")
def agent_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """daphne on the embedded default, and a donor's agent token."""
    var_dir = tmp_path_factory.mktemp("frames")
    env = server_env(var_dir)
    devprocs.manage(["migrate", "-v0"], env)
    issue = (
        "from downpour.accounts.models import User; "
        "from downpour.donors.models import AgentToken; "
        "u = User.objects.create_user('charlie', password='a long password for agents'); "
        "print(AgentToken.issue(u, 'pc')[1])"
    )
    token = devprocs.manage(["shell", "-c", issue], env, timeout=120).strip().splitlines()[-1]
    proc, port = devprocs.start_server(env, var_dir / "daphne.log")
    try:
        yield Server(port, proc.pid), token
    finally:
        devprocs.stop([proc])


async def send_bomb(server: Server, token: str, register: bool) -> tuple[dict[str, Any], float]:
    url = f"ws://127.0.0.1:{server.port}/ws/agent/"
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        if register:
            hello = {"type": "register", "protocol_version": PROTOCOL_VERSION, "name": "pc"}
            await ws.send(json.dumps({**hello, "device": {}}))
            assert json.loads(await ws.recv())["type"] == "registered"
        msg = {"type": "push", "lease_id": "00000000-0000-4000-8000-000000000000", "seq": 0}
        frame = bomb({**msg, "shard": 0, "base_version": 0, "samples": 1, "ref": 3})
        assert len(frame) < 2 * MiB
        started = time.monotonic()
        await ws.send(frame)
        reply = json.loads(await asyncio.wait_for(ws.recv(), 60))
        return reply, time.monotonic() - started


@pytest.mark.parametrize(
    ("register", "code"),
    [(False, "not_registered"), (True, "unknown_lease")],
    ids=["never-registered", "unknown-lease"],
)
def test_a_small_frame_of_zlib_bombs_is_refused_before_anything_is_inflated(
    agent_server: tuple[Server, str], register: bool, code: str
) -> None:
    # Prepare
    server, token = agent_server
    zeros_deflated(BOMB_BYTES)  # built before the peak is reset
    before = server.reset_peak()

    # Execute
    reply, elapsed = asyncio.run(send_bomb(server, token, register))

    # Assert
    growth = server.settled_peak() - before
    assert (reply["code"], reply["ref"]) == (code, 3)
    assert elapsed < 2.0, elapsed
    assert growth < PEAK_BOUND, f"{growth / MiB:.0f} MiB"
