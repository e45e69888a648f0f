"""A small frame cannot make the server inflate gigabytes (issue 10, High 1).

A real daphne process (the embedded default) takes agent sockets; each test sends a frame of
about 1 MiB holding 4 zlib tensors of 256 MiB each, and reads the server's peak resident
memory from ``/proc`` (reset before each attack), as ``test_request_bodies.py`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from functools import cache
from typing import Any

import pytest
from tests.security.test_request_bodies import BIN, ROOT, Server, free_port, server_env
from websockets.asyncio.client import connect

from downpour_agent.protocol import PROTOCOL_VERSION
from downpour_agent.protocol.tensors import MAGIC

MiB = 1 << 20
#: What one hostile frame may add to the server's peak memory (before: 1.3 GiB).
PEAK_BOUND = 64 * MiB
BOMB_BYTES = 256 * MiB


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
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "-v0"], env=env, check=True, timeout=300)
    issue = (
        "from downpour.accounts.models import User; "
        "from downpour.donors.models import AgentToken; "
        "u = User.objects.create_user('charlie', password='a long password for agents'); "
        "print(AgentToken.issue(u, 'pc')[1])"
    )
    made = subprocess.run(
        [*manage, "shell", "-c", issue], env=env, check=True, timeout=120, capture_output=True
    )
    token = made.stdout.decode().strip().splitlines()[-1]
    port = free_port()
    log = open(var_dir / "daphne.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "downpour.asgi:application"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (var_dir / "daphne.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "daphne did not answer"
                time.sleep(0.3)
        yield Server(port, proc.pid), token
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


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
    time.sleep(0.5)  # let the server finish with the frame

    # Assert
    growth = server.rss()[1] - before
    assert (reply["code"], reply["ref"]) == (code, 3)
    assert elapsed < 2.0, elapsed
    assert growth < PEAK_BOUND, f"{growth / MiB:.0f} MiB"
