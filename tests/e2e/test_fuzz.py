"""10,000 malformed frames against a live production deployment (issue 4).

Three sockets are fuzzed at once: two registered agents, each holding a lease (and each
using the other's lease as a foreign one), and one that never registers. Each frame comes
from a seeded generator together with the error codes it may earn. Every frame must get
exactly one reply, a structured ``error`` with one of those codes, except replayed pushes,
which get a ``push_ack`` marked duplicate. The shard versions and weights must not move
during the stream. The server must stay up, its memory bounded, and the sockets usable.

The generator is in ``fuzzer.py``. Set ``DOWNPOUR_FUZZ_SEED`` to replay another stream. The
tests after the fuzz reproduce the server faults it found: each sends the one input that
triggers one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from downpour_agent.protocol import (
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    ErrorCode,
    frame_from_wire,
    frame_to_wire,
)
from downpour_agent.protocol.tensors import MAGIC

from .fuzzer import (
    DUPLICATE,
    MAX_FRAME_BYTES,
    Case,
    Fuzzer,
    Reply,
    Target,
    outcome,
    push_msg,
)
from .stack import Stack, running

pytestmark = [pytest.mark.e2e, pytest.mark.services]

FRAMES = 10_000
SHARE = {"agent-a": 0.4, "agent-b": 0.4, "unregistered": 0.2}
OVERSIZE_PER_SOCKET = 8  # each costs 1-1.5 MiB on the wire
WINDOW = 64  # frames in flight per socket
REPLY_TIMEOUT_S = 30
RSS_GROWTH_LIMIT = 150 << 20
SEED = int(os.environ.get("DOWNPOUR_FUZZ_SEED", "20260401"))
DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Small frame limit (oversize frames are cheap), no push rate limit, long leases."""
    with running(
        "production",
        Path(tmp_path_factory.mktemp("fuzz")),
        MAX_FRAME_BYTES=str(MAX_FRAME_BYTES),
        PUSHES_PER_SECOND="1e9",
        PUSH_BURST="1e9",
        LEASE_TTL_S="600",
        HEARTBEAT_INTERVAL_S="60",
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def seeded(deployment: Stack) -> dict[str, Any]:
    # No spot checks: the fuzz pushes rounds out of order, which fails a checked lease (that
    # rule has its own tests in tests/server/consumer/test_admission.py).
    data = deployment.seed(
        hidden="16",
        target_accuracy=1.0,
        budget_seconds=3600,
        name="fuzz",
        tokens=4,
        spot_check_fraction=0,
    )
    deployment.wait_for(
        "the job to start", lambda: deployment.job(data["job_id"])["status"] == "running", 120
    )
    return data


# --- a raw agent socket ---------------------------------------------------------------------


class Peer:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def recv(self) -> tuple[Reply, dict[str, np.ndarray]]:
        data = await asyncio.wait_for(self.ws.recv(), REPLY_TIMEOUT_S)
        if isinstance(data, bytes):
            return frame_from_wire(data, SERVER_MESSAGES)
        return json.loads(data), {}

    async def ask(self, frame: str | bytes | dict[str, Any]) -> Reply:
        await self.ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)
        return (await self.recv())[0]

    async def register(self, name: str, device: dict[str, Any] | None = None) -> Reply:
        return await self.ask(
            {
                "type": "register",
                "protocol_version": PROTOCOL_VERSION,
                "name": name,
                "device": device if device is not None else {"cpu_cores": 1},
            }
        )

    async def lease(self) -> Reply:
        reply = await self.ask({"type": "request_work"})
        assert reply["type"] == "lease", reply
        return reply

    async def fetch(self, lease_id: str, shard: int) -> tuple[int, dict[str, np.ndarray]]:
        await self.ws.send(json.dumps({"type": "fetch", "lease_id": lease_id, "shard": shard}))
        msg, tensors = await self.recv()
        assert msg["type"] == "params", msg
        return int(msg["version"]), tensors

    async def replies_until(self, sentinel: str) -> list[Reply]:
        """Every reply up to, not including, the heartbeat_ack carrying ``ref=sentinel``."""
        await self.ws.send(json.dumps({"type": "heartbeat", "ref": sentinel}))
        replies: list[Reply] = []
        while True:
            reply = (await self.recv())[0]
            if reply.get("ref") == sentinel:
                assert reply["type"] == "heartbeat_ack", reply
                return replies
            replies.append(reply)


OpenPeer = Callable[[str], Awaitable[Peer]]


@pytest.fixture
async def open_peer(deployment: Stack) -> AsyncIterator[OpenPeer]:
    """Opens raw sockets with a token; closes them after the test."""
    sockets: list[ClientConnection] = []

    async def opener(token: str) -> Peer:
        ws = await connect(
            deployment.ws_url,
            additional_headers={"Authorization": f"Bearer {token}"},
            max_size=None,
            compression=None,
        )
        sockets.append(ws)
        return Peer(ws)

    yield opener
    for ws in sockets:
        await ws.close()


def zero_grads(lease: Reply, shard: int) -> dict[str, np.ndarray]:
    return {v["name"]: np.zeros(v["shape"], np.float32) for v in lease["layout"][shard]}


def server_rss(deployment: Stack) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the daphne process, in bytes."""
    assert deployment.server is not None
    status = Path(f"/proc/{deployment.server.pid}/status").read_text()
    fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
    return int(fields["VmRSS"]) << 10, int(fields["VmHWM"]) << 10


def documented_codes() -> set[str]:
    table = DOCS.read_text().split("## Error codes", 1)[1]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))


# --- the fuzz -------------------------------------------------------------------------------


async def stream(peer: Peer, cases: list[Case]) -> list[Reply]:
    """Send every case, at most WINDOW ahead of the replies; return the replies in order."""
    window = asyncio.Semaphore(WINDOW)
    replies: list[Reply] = []
    sentinel = f"end-{uuid.uuid4().hex}"

    async def read() -> None:
        while True:
            reply = (await peer.recv())[0]
            if reply.get("ref") == sentinel:
                return
            replies.append(reply)
            window.release()

    reader = asyncio.create_task(read())
    for case in cases:
        await window.acquire()
        await peer.ws.send(case.frame)
    await peer.ws.send(json.dumps({"type": "heartbeat", "ref": sentinel}))
    await asyncio.wait_for(reader, 120)
    return replies


async def setup_agent(peer: Peer, name: str) -> tuple[Reply, list[bytes]]:
    """Register, take a lease and apply one zero push per shard (these get replayed)."""
    assert (await peer.register(name))["type"] == "registered"
    lease = await peer.lease()
    frames = []
    for shard in range(len(lease["layout"])):
        version, _ = await peer.fetch(lease["lease_id"], shard)
        frame = frame_to_wire(
            push_msg(lease["lease_id"], shard, 0, version), zero_grads(lease, shard)
        )
        ack = await peer.ask(frame)
        assert ack["type"] == "push_ack" and ack["applied"], ack
        frames.append(frame)
    return lease, frames


async def snapshot(peer: Peer, lease: Reply) -> tuple[list[int], dict[str, np.ndarray]]:
    versions, weights = [], {}
    for shard in range(len(lease["layout"])):
        version, tensors = await peer.fetch(lease["lease_id"], shard)
        versions.append(version)
        weights.update(tensors)
    return versions, weights


async def sample_rss(deployment: Stack, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak.append(server_rss(deployment)[0])
        await asyncio.sleep(0.25)


async def test_ten_thousand_malformed_frames_are_each_refused_once_and_nothing_is_applied(
    deployment: Stack, seeded: dict[str, Any], open_peer: OpenPeer
) -> None:
    # Prepare
    a, b, unregistered = [await open_peer(token) for token in seeded["tokens"][:3]]
    lease_a, replays_a = await setup_agent(a, "fuzz-a")
    lease_b, replays_b = await setup_agent(b, "fuzz-b")
    versions, weights = await snapshot(a, lease_a)
    rng = random.Random(SEED)
    targets = {
        "agent-a": (a, Target(lease_a, lease_b["lease_id"], versions, replays_a)),
        "agent-b": (b, Target(lease_b, lease_a["lease_id"], versions, replays_b)),
        "unregistered": (unregistered, Target(lease_a, lease_b["lease_id"], versions, replays_a)),
    }
    plans = {
        name: Fuzzer(random.Random(rng.getrandbits(64)), target).cases(
            round(FRAMES * SHARE[name]), OVERSIZE_PER_SOCKET
        )
        for name, (_, target) in targets.items()
    }
    log = deployment.workdir / "server.log"
    log_offset = log.stat().st_size
    rss_before, _ = server_rss(deployment)
    peak: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(deployment, peak, stop))

    # Execute
    started = time.monotonic()
    results = await asyncio.gather(
        *(stream(targets[name][0], cases) for name, cases in plans.items())
    )
    duration = time.monotonic() - started
    stop.set()
    await sampler
    rss_after, hwm = server_rss(deployment)
    versions_after, weights_after = await snapshot(a, lease_a)

    # Assert: one reply per frame, each a documented code this frame may earn.
    histogram: Counter[str] = Counter()
    wrong = []
    for name, replies in zip(plans, results, strict=True):
        cases = plans[name]
        assert len(replies) == len(cases), f"{name}: {len(cases)} frames, {len(replies)} replies"
        for case, reply in zip(cases, replies, strict=True):
            expected = case.expected
            if name == "unregistered" and not case.before_registration:
                expected = frozenset({"not_registered"})
            got = outcome(reply)
            histogram[got] += 1
            if got not in expected:
                wrong.append((name, case.category, sorted(expected), reply, case.frame[:160]))
    total = sum(len(cases) for cases in plans.values())
    print(
        f"\nfuzz seed {SEED}: {total} frames in {duration:.1f} s; "
        f"server RSS {rss_before >> 20} -> {rss_after >> 20} MiB "
        f"(peak {max(peak, default=rss_after) >> 20} MiB, high-water {hwm >> 20} MiB)\n"
        f"replies: {dict(histogram.most_common())}\n"
        f"frames: {dict(Counter(c.category for cases in plans.values() for c in cases))}"
    )
    assert not wrong, f"{len(wrong)} frames got an answer they should not:\n" + "\n".join(
        map(repr, wrong[:20])
    )
    assert total == FRAMES
    codes = {code for code in histogram if code != DUPLICATE}
    assert codes <= documented_codes() & {code.value for code in ErrorCode}
    # Nothing moved: not one version, not one weight.
    assert versions_after == versions
    for key, value in weights.items():
        np.testing.assert_array_equal(value, weights_after[key])
    # The server is up, its memory bounded, its log free of tracebacks.
    assert deployment.server is not None and deployment.server.poll() is None
    assert max(peak, default=rss_after) - rss_before < RSS_GROWTH_LIMIT
    assert "Traceback" not in log.read_text(errors="replace")[log_offset:]
    # Every socket is still usable, and a good push still applies exactly once.
    for peer, lease in ((a, lease_a), (b, lease_b)):
        version, _ = await peer.fetch(lease["lease_id"], 0)
        frame = frame_to_wire(push_msg(lease["lease_id"], 0, 1, version), zero_grads(lease, 0))
        ack = await peer.ask(frame)
        assert ack["type"] == "push_ack" and ack["applied"] and ack["version"] == version + 1
    assert (await unregistered.register("late"))["type"] == "registered"
    assert deployment.store_versions(seeded["job_id"]) == [versions[0] + 2, *versions[1:]]


async def test_a_frame_over_the_transport_limit_closes_only_that_socket(
    deployment: Stack, seeded: dict[str, Any], open_peer: OpenPeer
) -> None:
    # Prepare
    victim, bystander = [await open_peer(seeded["tokens"][3]) for _ in range(2)]
    assert (await bystander.register("bystander"))["type"] == "registered"

    # Execute: over daphne's limit (twice MAX_FRAME_BYTES) the frame never reaches the app.
    # The server may drop the connection while the frame is still being written, so the send
    # itself can fail: that is the refusal too.
    with contextlib.suppress(ConnectionClosed):
        await victim.ws.send(MAGIC + bytes(2 * MAX_FRAME_BYTES + 1))
    await asyncio.wait_for(victim.ws.wait_closed(), 20)

    # Assert: docs/protocol.md promises 1009; autobahn drops the TCP connection instead, so
    # the client sees 1006. Either way only this socket goes.
    assert victim.ws.close_code in (1006, 1009)
    assert (await bystander.ask({"type": "heartbeat"}))["type"] == "heartbeat_ack"
    assert deployment.server is not None and deployment.server.poll() is None


# --- server faults the fuzz found (these fail until the server is fixed) --------------------


async def test_a_lease_id_that_is_not_a_uuid_is_an_unknown_lease_not_a_server_fault(
    seeded: dict[str, Any], open_peer: OpenPeer
) -> None:
    # Prepare
    peer = await open_peer(seeded["tokens"][3])
    lease = await (await _registered(peer, "not-a-uuid")).lease()
    frames: dict[str, str | bytes] = {
        kind: json.dumps({"type": kind, "lease_id": "not-a-uuid", **extra})
        for kind, extra in (
            ("heartbeat", {}),
            ("fetch", {"shard": 0}),
            ("complete", {"samples": 1}),
            ("return_lease", {}),
        )
    }
    frames["push"] = frame_to_wire(push_msg("not-a-uuid", 0, 1, 0), zero_grads(lease, 0))

    # Execute
    codes = {kind: (await peer.ask(frame)).get("code") for kind, frame in frames.items()}

    # Assert
    assert codes == dict.fromkeys(frames, "unknown_lease")


@pytest.mark.parametrize(
    ("name", "device"),
    [
        ("nul\x00byte", {}),
        ("lone-\ud800-surrogate", {}),
        ("ok", {"os": "Linux\x00"}),
        ("ok", {"tf_version": "2." * 50}),
        ("ok", {"cpu_cores": 2**40}),
        ("ok", {"ram_bytes": 2**70}),
    ],
    ids=["nul-in-name", "surrogate-in-name", "nul-in-os", "long-tf-version", "cores", "ram"],
)
async def test_a_register_the_database_cannot_store_is_a_client_error_not_a_server_fault(
    name: str, device: dict[str, Any], seeded: dict[str, Any], open_peer: OpenPeer
) -> None:
    # Prepare
    peer = await open_peer(seeded["tokens"][3])
    frame = json.dumps(
        {"type": "register", "protocol_version": PROTOCOL_VERSION, "name": name, "device": device}
    )

    # Execute
    reply = await peer.ask(frame)

    # Assert: stored (cleaned up) or refused as the client's mistake, never "internal".
    assert reply["type"] == "registered" or reply.get("code") == "bad_message", reply


async def test_a_zlib_tensor_with_an_impossible_shape_is_a_bad_frame(
    seeded: dict[str, Any], open_peer: OpenPeer
) -> None:
    # Prepare
    peer = await open_peer(seeded["tokens"][3])
    lease = await (await _registered(peer, "zlib")).lease()
    payload = zlib.compress(b"\x00" * 16)
    descriptor = {
        "name": lease["layout"][0][0]["name"],
        "dtype": "float32",
        "shape": [2**31 - 1] * 8,
        "compression": "zlib",
        "nbytes": len(payload),
    }
    header = {"msg": push_msg(lease["lease_id"], 0, 1, 0), "tensors": [descriptor]}

    # Execute
    reply = await peer.ask(Fuzzer.pack(header, payload))

    # Assert: a client error before anything is inflated (the layout refuses the shape now).
    assert reply.get("code") in ("bad_frame", "wrong_shape"), reply


async def test_a_device_claiming_an_absurd_speed_still_gets_a_lease_or_a_client_error(
    seeded: dict[str, Any], open_peer: OpenPeer
) -> None:
    # Prepare
    peer = await open_peer(seeded["tokens"][3])
    registered = await peer.register("fast", {"samples_per_s": 1e308})

    # Execute
    reply = await peer.ask({"type": "request_work"}) if registered["type"] == "registered" else {}

    # Assert
    assert reply.get("type") in ("lease", "no_work") or registered.get("code") == "bad_message", (
        registered,
        reply,
    )


async def test_a_push_cannot_claim_more_samples_than_its_lease_computes(
    deployment: Stack, seeded: dict[str, Any], open_peer: OpenPeer
) -> None:
    # Prepare
    peer = await open_peer(seeded["tokens"][3])
    lease = await (await _registered(peer, "braggart")).lease()
    version, _ = await peer.fetch(lease["lease_id"], 0)
    msg = push_msg(lease["lease_id"], 0, 1, version, samples=10**12)
    honest = lease["hyper"]["batch_size"] * lease["hyper"]["n_push"]

    # Execute
    reply = await peer.ask(frame_to_wire(msg, zero_grads(lease, 0)))
    await peer.ws.close()  # disconnecting flushes the tallies

    # Assert: refused, or credited at most what one push round can have computed.
    def credit() -> list[tuple[Any, ...]]:
        return deployment.query(
            "SELECT credit FROM donors_agent WHERE name = %s AND NOT connected", ["braggart"]
        )

    (credited,) = deployment.wait_for("the tallies to be flushed", credit, 20)[0]
    assert reply.get("code") == "bad_message" or credited <= honest, (reply, credited)


async def test_a_push_with_a_sample_count_the_database_cannot_hold_gets_one_reply(
    seeded: dict[str, Any], open_peer: OpenPeer
) -> None:
    # Prepare
    peer = await open_peer(seeded["tokens"][3])
    lease = await (await _registered(peer, "overflow")).lease()
    version, _ = await peer.fetch(lease["lease_id"], 0)
    msg = push_msg(lease["lease_id"], 0, 1, version, samples=10**30)

    # Execute
    await peer.ws.send(frame_to_wire(msg, zero_grads(lease, 0)))
    replies = await peer.replies_until("after")

    # Assert
    assert len(replies) == 1 and replies[0].get("code") != "internal", replies


async def _registered(peer: Peer, name: str) -> Peer:
    assert (await peer.register(name))["type"] == "registered"
    return peer
