"""10,000 malformed frames against a live production deployment (issue 4).

Three sockets are fuzzed at once: two registered agents, each holding a lease (and each
using the other's lease as a foreign one), and one that never registers. Each frame comes
from a seeded generator together with the error codes it may earn. Every frame must get
exactly one reply, a structured ``error`` with one of those codes, except replayed pushes,
which get a ``push_ack`` marked duplicate. The shard versions and weights must not move
during the stream. The server must stay up, its memory bounded, and the sockets usable.

Set ``DOWNPOUR_FUZZ_SEED`` to replay another stream. The tests after the fuzz reproduce
the server faults it found: each sends the one input that triggers one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import string
import struct
import time
import uuid
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from downpour_agent.protocol import (
    AGENT_MESSAGES,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    ErrorCode,
    frame_from_wire,
    frame_to_wire,
)
from downpour_agent.protocol.messages import MAX_TEXT_BYTES
from downpour_agent.protocol.tensors import MAGIC, MAX_HEADER_BYTES, MAX_TENSORS

from .stack import Stack, running

pytestmark = [pytest.mark.e2e, pytest.mark.services]

FRAMES = 10_000
SHARE = {"agent-a": 0.4, "agent-b": 0.4, "unregistered": 0.2}
OVERSIZE_PER_SOCKET = 8  # each costs 1-1.5 MiB on the wire
MAX_FRAME_BYTES = 1 << 20
WINDOW = 64  # frames in flight per socket
REPLY_TIMEOUT_S = 30
RSS_GROWTH_LIMIT = 150 << 20
SEED = int(os.environ.get("DOWNPOUR_FUZZ_SEED", "20260401"))
DUPLICATE = "push_ack:duplicate"
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
    data = deployment.seed(
        hidden="16", target_accuracy=1.0, budget_seconds=3600, name="fuzz", tokens=4
    )
    deployment.wait_for(
        "the job to start", lambda: deployment.job(data["job_id"])["status"] == "running", 120
    )
    return data


# --- a raw agent socket ---------------------------------------------------------------------


Reply = dict[str, Any]


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


def push_msg(lease_id: str, shard: int, seq: int, base: int, samples: int = 32) -> dict[str, Any]:
    return {
        "type": "push",
        "lease_id": lease_id,
        "seq": seq,
        "shard": shard,
        "base_version": base,
        "samples": samples,
    }


def server_rss(deployment: Stack) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the daphne process, in bytes."""
    assert deployment.server is not None
    status = Path(f"/proc/{deployment.server.pid}/status").read_text()
    fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE))
    return int(fields["VmRSS"]) << 10, int(fields["VmHWM"]) << 10


def documented_codes() -> set[str]:
    table = DOCS.read_text().split("## Error codes", 1)[1]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))


# --- the generator --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One frame and the answers it may earn.

    ``before_registration`` says whether the frame is refused before the server asks
    whether the socket has registered; if not, an unregistered socket gets
    ``not_registered`` instead of ``expected``.
    """

    category: str
    frame: str | bytes
    expected: frozenset[str]
    before_registration: bool = True


@dataclass
class Target:
    """What a fuzzed socket knows: its lease (if any), another agent's, the shard versions."""

    lease: Reply
    foreign_lease_id: str
    versions: list[int]
    replays: list[bytes]


_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " \t\n" + "éß€😀\u2028"
_WRONG_VALUES: dict[str, list[Any]] = {
    "int": [True, False, 1.0, 2.5, "1", None, [], {}, [1], 1e300],
    "str": [1, 0, True, None, [], {}, ["x"], 1.5],
    "dict": [[], "x", 1, True, None],
    "ref": [1.5, True, None, [], {}, ["r"]],
}
_FIELD_KINDS = {"protocol_version": "int", "seq": "int", "shard": "int", "base_version": "int"}
_FIELD_KINDS |= {"samples": "int", "name": "str", "lease_id": "str", "device": "dict"}
_FIELD_KINDS |= {"ref": "ref", "type": "str"}
_OTHER_DTYPES = ("float16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


class Fuzzer:
    """Seeded malformed frames; each method returns one :class:`Case`."""

    def __init__(self, rng: random.Random, target: Target) -> None:
        self.rng = rng
        self.target = target
        self.lease_id: str = target.lease["lease_id"]
        self.layout: list[list[Reply]] = target.lease["layout"]
        self.seq = 1_000_000
        self.categories: list[Callable[[], Case]] = [
            self.broken_json,
            self.not_an_object,
            self.bad_type_field,
            self.unknown_type,
            self.wrong_schema,
            self.push_as_text,
            self.unknown_lease_text,
            self.foreign_lease_text,
            self.unknown_shard_fetch,
            self.unsupported_version,
            self.bad_magic,
            self.truncated,
            self.bad_header_json,
            self.bad_header_keys,
            self.binary_bad_message,
            self.bad_descriptor,
            self.buffer_mismatch,
            self.unknown_dtype,
            self.wrong_shape,
            self.wrong_dtype,
            self.non_finite,
            self.stale,
            self.unknown_shard_push,
            self.unknown_lease_push,
            self.foreign_lease_push,
            self.replay,
        ]

    def cases(self, count: int, oversize: int) -> list[Case]:
        cases = [self.rng.choice(self.categories)() for _ in range(count - oversize)]
        for _ in range(oversize):
            cases.insert(self.rng.randrange(len(cases) + 1), self.oversize())
        return cases

    # -- building blocks ----------------------------------------------------------------

    def text(self, low: int = 0, high: int = 40) -> str:
        return "".join(self.rng.choice(_ALPHABET) for _ in range(self.rng.randint(low, high)))

    def bytes_(self, low: int = 0, high: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def shard(self) -> int:
        return self.rng.randrange(len(self.layout))

    def grads(self, shard: int) -> dict[str, np.ndarray]:
        """Finite, non-zero float32 gradients of the right shapes: applying one would show."""
        return {
            v["name"]: np.asarray(self.rng.uniform(0.5, 2.0), np.float32)
            * np.ones(v["shape"], np.float32)
            for v in self.layout[shard]
        }

    def push(self, shard: int | None = None, **fields: Any) -> dict[str, Any]:
        shard = self.shard() if shard is None else shard
        base = self.target.versions[shard] if 0 <= shard < len(self.layout) else 0
        return {**push_msg(self.lease_id, shard, self.next_seq(), base), **fields}

    def messages(self) -> list[dict[str, Any]]:
        """One valid message of each agent type (never sent unmutated, except as bases)."""
        lease = self.lease_id
        return [
            {"type": "register", "protocol_version": 1, "name": "x", "device": {}},
            {"type": "heartbeat", "lease_id": lease},
            {"type": "request_work"},
            {"type": "fetch", "lease_id": lease, "shard": 0},
            {"type": "complete", "lease_id": lease, "samples": 1},
            {"type": "return_lease", "lease_id": lease},
            push_msg(lease, 0, 1, 0),
        ]

    @staticmethod
    def pack(header: Any, payload: bytes = b"", head: bytes | None = None) -> bytes:
        raw = head if head is not None else json.dumps(header).encode()
        return MAGIC + struct.pack("<I", len(raw)) + raw + payload

    @staticmethod
    def descriptor(
        name: str, dtype: str, shape: list[int], nbytes: int, compression: str = "none"
    ) -> dict[str, Any]:
        return {
            "name": name,
            "dtype": dtype,
            "shape": shape,
            "compression": compression,
            "nbytes": nbytes,
        }

    # -- text frames ----------------------------------------------------------------------

    def broken_json(self) -> Case:
        valid = json.dumps(self.rng.choice(self.messages()))
        fetch = '{"type": "fetch", "lease_id": "x", "shard": '
        frames = [
            valid[: self.rng.randrange(len(valid))],
            "{" + self.text().replace("}", ""),
            valid + self.rng.choice(["}", "]", "x", ",", '"']),
            valid.replace('"type"', "type", 1),
            fetch + self.rng.choice(["NaN", "Infinity", "-Infinity"]) + "}",
            fetch + "1" + "0" * 5000 + "}",  # past Python's 4300-digit limit
            "[" * 50_000 + "]" * 50_000,
        ]
        return Case("broken json", self.rng.choice(frames), frozenset({"bad_frame"}))

    def not_an_object(self) -> Case:
        value = self.rng.choice([0, -1.5, "type", None, True, [], [{"type": "heartbeat"}]])
        return Case("not an object", json.dumps(value), frozenset({"bad_message"}))

    def bad_type_field(self) -> Case:
        msg = dict(self.rng.choice(self.messages()))
        if self.rng.random() < 0.3:
            del msg["type"]
        else:
            msg["type"] = self.rng.choice(_WRONG_VALUES["str"])
        return Case("no string type", json.dumps(msg), frozenset({"bad_message"}))

    def unknown_type(self) -> Case:
        name = self.rng.choice(
            [*SERVER_MESSAGES, "Push", "push ", "fetch\x00", self.text(1, 20), "on_connect"]
        )
        if name in AGENT_MESSAGES:
            name += "!"
        msg = {"type": name, "lease_id": self.lease_id}
        return Case("unknown type", json.dumps(msg), frozenset({"unknown_type"}))

    def wrong_schema(self) -> Case:
        msg = dict(self.rng.choice(self.messages()))
        fields = [key for key in msg if key != "type"] + ["ref"]
        mutation = self.rng.choice(["drop", "extra", "retype"])
        if mutation == "drop" and len(msg) > 1:
            del msg[self.rng.choice([key for key in msg if key != "type"])]
        elif mutation == "extra" or len(fields) == 0:
            msg[self.rng.choice(["lease", "token", "shards", "__class__", self.text(1, 8)])] = 1
        else:
            key = self.rng.choice(fields)
            msg[key] = self.rng.choice(_WRONG_VALUES[_FIELD_KINDS[key]])
        if _schema_ok(msg):  # e.g. an optional field was dropped
            msg["unexpected"] = True
        return Case("wrong schema", json.dumps(msg), frozenset({"bad_message"}))

    def push_as_text(self) -> Case:
        return Case("push as text", json.dumps(self.push()), frozenset({"bad_message"}))

    def _lease_request(self, lease_id: str) -> str:
        kind = self.rng.choice(["heartbeat", "fetch", "complete", "return_lease"])
        msg: dict[str, Any] = {"type": kind, "lease_id": lease_id}
        if kind == "fetch":
            msg["shard"] = self.shard()
        if kind == "complete":
            msg["samples"] = self.rng.randint(0, 1000)
        return json.dumps(msg)

    def unknown_lease_text(self) -> Case:
        frame = self._lease_request(str(uuid.UUID(int=self.rng.getrandbits(128), version=4)))
        return Case("unknown lease", frame, frozenset({"unknown_lease"}), False)

    def foreign_lease_text(self) -> Case:
        frame = self._lease_request(self.target.foreign_lease_id)
        return Case("foreign lease", frame, frozenset({"lease_not_yours"}), False)

    def unknown_shard_fetch(self) -> Case:
        shard = self.rng.choice([len(self.layout), 99, -1, -(2**70), 2**63, 2**200])
        msg = {"type": "fetch", "lease_id": self.lease_id, "shard": shard}
        return Case("unknown shard", json.dumps(msg), frozenset({"unknown_shard"}), False)

    def unsupported_version(self) -> Case:
        version = self.rng.choice([0, 2, -1, 2**64, PROTOCOL_VERSION + self.rng.randint(1, 99)])
        msg = {"type": "register", "protocol_version": version, "name": "fuzz", "device": {}}
        return Case("unsupported version", json.dumps(msg), frozenset({"unsupported_version"}))

    def oversize(self) -> Case:
        size = MAX_FRAME_BYTES + self.rng.randint(1, MAX_FRAME_BYTES // 2)
        if self.rng.random() < 0.5:
            pad = "x" * (max(size, MAX_TEXT_BYTES + 1) - 30)
            frame: str | bytes = json.dumps({"type": "heartbeat", "pad": pad})
        else:
            frame = MAGIC + self.rng.randbytes(size)
        return Case("oversize", frame, frozenset({"frame_too_large"}))

    # -- binary frames: decoding ------------------------------------------------------------

    def bad_magic(self) -> Case:
        frame = self.bytes_(1, 64)
        if frame.startswith(MAGIC):
            frame = b"X" + frame
        if self.rng.random() < 0.3:
            frame = b"DPT\x02" + frame_to_wire(self.push(), self.grads(0))[4:]
        return Case("bad magic", frame, frozenset({"bad_frame"}))

    def truncated(self) -> Case:
        shard = self.shard()
        whole = frame_to_wire(self.push(shard), self.grads(shard))
        return Case("truncated", whole[: self.rng.randrange(len(whole))], frozenset({"bad_frame"}))

    def bad_header_json(self) -> Case:
        if self.rng.random() < 0.2:
            claimed = self.rng.choice([MAX_HEADER_BYTES + 1, 2**32 - 1, 10_000])
            frame = MAGIC + struct.pack("<I", claimed) + b"{}"
            return Case("bad header", frame, frozenset({"bad_frame"}))
        head = self.rng.choice(
            [
                b"{" + self.bytes_().replace(b"}", b""),
                b"\xff\xfe{}",
                b"",
                b'{"msg": NaN}',
                b"[" * 20_000,
            ]
        )
        return Case("bad header", self.pack(None, head=head), frozenset({"bad_frame"}))

    def bad_header_keys(self) -> Case:
        header: Any = self.rng.choice(
            [
                {"msg": self.push()},
                {"tensors": []},
                {"msg": self.push(), "tensors": [], "extra": 1},
                [self.push(), []],
                "push",
                None,
            ]
        )
        return Case("header keys", self.pack(header), frozenset({"bad_frame"}))

    def binary_bad_message(self) -> Case:
        choice = self.rng.randrange(4)
        if choice == 0:
            msg: Any = self.rng.choice([[], "push", 7, None])
            code = "bad_message"
        elif choice == 1:
            msg = {**self.push(), "type": self.rng.choice(["params", "pull", "Push"])}
            code = "unknown_type"
        elif choice == 2:
            msg = self.push()
            del msg[self.rng.choice(["lease_id", "seq", "shard", "base_version", "samples"])]
            code = "bad_message"
        else:  # a valid message of another type, sent as a binary frame
            msg = self.rng.choice([m for m in self.messages() if m["type"] != "push"])
            code = "bad_message"
        return Case("binary message", self.pack({"msg": msg, "tensors": []}), frozenset({code}))

    def bad_descriptor(self) -> Case:
        spec = self.layout[0][0]
        size = 4 * int(np.prod(spec["shape"]))
        good = self.descriptor(spec["name"], "float32", spec["shape"], size)
        payload = bytes(good["nbytes"])
        missing = self.rng.choice(list(good))
        broken: list[Any] = [
            {k: v for k, v in good.items() if k != missing},
            {**good, "extra": 1},
            {**good, "name": 7},
            {**good, "name": "n" * 257},
            {**good, "shape": "64,16"},
            {**good, "shape": [-1, 16]},
            {**good, "shape": [True, 16]},
            {**good, "shape": [64.0, 16]},
            {**good, "shape": [2**31, 1]},
            {**good, "shape": [1] * 9},
            {**good, "nbytes": -1},
            {**good, "nbytes": good["nbytes"] + 1},
            {**good, "nbytes": 1.5},
            {**good, "dtype": None},
            {**good, "compression": 0},
            "tensor",
        ]
        tensors: Any = [self.rng.choice(broken)]
        if self.rng.random() < 0.1:
            tensors = self.rng.choice([{"t": good}, "all", [good] * (MAX_TENSORS + 1)])
        frame = self.pack({"msg": self.push(0), "tensors": tensors}, payload)
        return Case("bad descriptor", frame, frozenset({"bad_frame"}))

    def buffer_mismatch(self) -> Case:
        spec = self.layout[0][0]
        shape, name = list(spec["shape"]), spec["name"]
        size = 4 * int(np.prod(shape))
        choice = self.rng.randrange(7)
        if choice == 0:  # the buffer does not fill the shape
            payload = bytes(size - 4 * self.rng.randint(1, 8))
            tensors = [self.descriptor(name, "float32", shape, len(payload))]
        elif choice == 1:  # bytes left over after the last tensor
            payload = bytes(size) + self.bytes_(1, 16)
            tensors = [self.descriptor(name, "float32", shape, size)]
        elif choice == 2:  # a name twice
            payload = bytes(2 * size)
            tensors = [self.descriptor(name, "float32", shape, size)] * 2
        elif choice == 3:  # unknown compression
            payload = bytes(size)
            tensors = [self.descriptor(name, "float32", shape, size, "lz4")]
        elif choice == 4:  # corrupt zlib
            payload = b"\x78\x9c" + self.bytes_(4, 32)
            tensors = [self.descriptor(name, "float32", shape, len(payload), "zlib")]
        elif choice == 5:  # a zlib bomb: inflates past what the shape promises
            payload = zlib.compress(bytes(size * 64))
            tensors = [self.descriptor(name, "float32", shape, len(payload), "zlib")]
        else:  # fp16 compression of something that is not float32
            payload = bytes(2 * int(np.prod(shape)))
            tensors = [self.descriptor(name, "float64", shape, len(payload), "fp16")]
        frame = self.pack({"msg": self.push(0), "tensors": tensors}, payload)
        return Case("buffer mismatch", frame, frozenset({"bad_frame"}))

    def unknown_dtype(self) -> Case:
        spec = self.layout[0][0]
        dtype = self.rng.choice(["complex64", "object", "<f4", "float128", "O", "U8", "", "bf16"])
        payload = self.bytes_(0, 64)
        tensors = [self.descriptor(spec["name"], dtype, spec["shape"], len(payload))]
        frame = self.pack({"msg": self.push(0), "tensors": tensors}, payload)
        return Case("unknown dtype", frame, frozenset({"wrong_dtype"}))

    # -- binary frames: well formed, refused by the handler -----------------------------------

    def wrong_shape(self) -> Case:
        shard = self.shard()
        grads = self.grads(shard)
        names = list(grads)
        victim = self.rng.choice(names)
        choice = self.rng.randrange(5)
        if choice == 0:
            grads[victim] = np.ones((3, 3), np.float32)
        elif choice == 1:
            grads[victim] = np.ones(grads[victim].size + 1, np.float32)
        elif choice == 2:
            del grads[victim]
        elif choice == 3:
            grads[f"{victim}/extra"] = np.ones(4, np.float32)
        else:
            grads = self.grads(1 - shard)
        frame = frame_to_wire(self.push(shard), grads)
        return Case("wrong shape", frame, frozenset({"wrong_shape"}), False)

    def wrong_dtype(self) -> Case:
        shard = self.shard()
        grads = self.grads(shard)
        victim = self.rng.choice(list(grads))
        grads[victim] = grads[victim].astype(self.rng.choice(_OTHER_DTYPES))
        frame = frame_to_wire(self.push(shard), grads)
        return Case("wrong dtype", frame, frozenset({"wrong_dtype"}), False)

    def non_finite(self) -> Case:
        shard = self.shard()
        grads = self.grads(shard)
        victim = grads[self.rng.choice(list(grads))]
        for _ in range(self.rng.randint(1, 3)):
            bad = self.rng.choice([np.nan, np.inf, -np.inf])
            victim.flat[self.rng.randrange(victim.size)] = bad
        compression = self.rng.choice(["none", "zlib"])
        frame = frame_to_wire(self.push(shard), grads, compression)
        return Case("non-finite", frame, frozenset({"non_finite"}), False)

    def stale(self) -> Case:
        shard = self.shard()
        current = self.target.versions[shard]
        base = self.rng.choice([current + self.rng.randint(1, 10**6), -1, -(2**70), 2**80])
        frame = frame_to_wire(self.push(shard, base_version=base), self.grads(shard))
        return Case("stale", frame, frozenset({"stale_gradient"}), False)

    def unknown_shard_push(self) -> Case:
        shard = self.rng.choice([len(self.layout), 7, -1, 2**40, -(2**70)])
        frame = frame_to_wire(self.push(shard), self.grads(0))
        return Case("unknown shard push", frame, frozenset({"unknown_shard"}), False)

    def unknown_lease_push(self) -> Case:
        lease_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        frame = frame_to_wire(self.push(0, lease_id=lease_id), self.grads(0))
        return Case("unknown lease push", frame, frozenset({"unknown_lease"}), False)

    def foreign_lease_push(self) -> Case:
        msg = self.push(0, lease_id=self.target.foreign_lease_id)
        frame = frame_to_wire(msg, self.grads(0))
        return Case("foreign lease push", frame, frozenset({"lease_not_yours"}), False)

    def replay(self) -> Case:
        return Case("replay", self.rng.choice(self.target.replays), frozenset({DUPLICATE}), False)


def _schema_ok(msg: dict[str, Any]) -> bool:
    from downpour_agent.protocol import ProtocolError, validate_message

    try:
        validate_message(msg, AGENT_MESSAGES)
    except ProtocolError:
        return False
    return True


def outcome(reply: Reply) -> str:
    if reply.get("type") == "push_ack" and reply.get("duplicate") and not reply.get("applied"):
        return DUPLICATE
    if reply.get("type") == "error":
        return str(reply.get("code"))
    return f"unexpected {reply.get('type')}"


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

    # Assert
    assert reply.get("code") == "bad_frame", reply


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
