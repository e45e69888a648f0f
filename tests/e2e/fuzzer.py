"""The fuzzer of ``test_fuzz.py``: seeded malformed frames, each with the codes it may earn."""

from __future__ import annotations

import json
import random
import string
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from downpour_agent.protocol import (
    AGENT_MESSAGES,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    frame_to_wire,
)
from downpour_agent.protocol.messages import MAX_TEXT_BYTES
from downpour_agent.protocol.tensors import MAGIC, MAX_HEADER_BYTES, MAX_TENSORS

MAX_FRAME_BYTES = 1 << 20
DUPLICATE = "push_ack:duplicate"
Reply = dict[str, Any]


def push_msg(lease_id: str, shard: int, seq: int, base: int, samples: int = 32) -> dict[str, Any]:
    return {
        "type": "push",
        "lease_id": lease_id,
        "seq": seq,
        "shard": shard,
        "base_version": base,
        "samples": samples,
    }


@dataclass(frozen=True)
class Case:
    """One frame and the answers it may earn.

    ``before_registration`` says whether the frame is refused before the server asks
    whether the socket has registered; if not, an unregistered socket gets
    ``not_registered`` instead of ``expected``. The server decodes no binary frame before
    registration (issue 10), so only an oversize one is refused first.
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
        hyper = target.lease["hyper"]
        # Rounds 1.. of the lease: a seq must name a round (issue 10), round 0 holds the
        # pushes that were applied (the replays), and none of these is ever applied.
        self.rounds = -(-target.lease["steps"] // hyper["n_push"])
        assert self.rounds >= 3, target.lease["steps"]
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
        cases = [
            replace(case, before_registration=False) if isinstance(case.frame, bytes) else case
            for case in cases
        ]
        for _ in range(oversize):
            cases.insert(self.rng.randrange(len(cases) + 1), self.oversize())
        return cases

    # -- building blocks ----------------------------------------------------------------

    def text(self, low: int = 0, high: int = 40) -> str:
        return "".join(self.rng.choice(_ALPHABET) for _ in range(self.rng.randint(low, high)))

    def bytes_(self, low: int = 0, high: int = 64) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def next_seq(self) -> int:
        return self.rng.randrange(1, self.rounds)

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
        return {**push_msg(self.lease_id, shard, self.next_seq(), base, samples=1), **fields}

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

    def shard0_frame(self, broken: dict[str, Any], payload: bytes) -> bytes:
        """A push of shard 0 whose first variable is ``broken`` (last in the frame, so
        ``payload`` may run past it) and whose other variables are good: the server checks
        the frame against the layout before it decodes."""
        descriptors, buffers = [], []
        for spec in self.layout[0][1:]:
            size = 4 * int(np.prod(spec["shape"]))
            descriptors.append(self.descriptor(spec["name"], "float32", spec["shape"], size))
            buffers.append(bytes(size))
        header = {"msg": self.push(0), "tensors": [*descriptors, broken]}
        return self.pack(header, b"".join(buffers) + payload)

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
            frame = self.pack({"msg": self.push(0), "tensors": tensors}, payload)
            return Case("buffer mismatch", frame, frozenset({"bad_frame"}))
        elif choice == 3:  # unknown compression
            payload = bytes(size)
            tensors = [self.descriptor(name, "float32", shape, size, "lz4")]
        elif choice == 4:  # corrupt zlib
            payload = b"\x78\x9c" + self.bytes_(4, 32)
            tensors = [self.descriptor(name, "float32", shape, len(payload), "zlib")]
        elif choice == 5:  # a zlib bomb: inflates past what the shape promises
            payload = zlib.compress(bytes(size * 64))
            tensors = [self.descriptor(name, "float32", shape, len(payload), "zlib")]
        else:  # fp16 compression of something that is not float32: the shard holds float32
            payload = bytes(2 * int(np.prod(shape)))
            tensors = [self.descriptor(name, "float64", shape, len(payload), "fp16")]
            frame = self.shard0_frame(tensors[0], payload)
            return Case("buffer mismatch", frame, frozenset({"wrong_dtype"}))
        return Case(
            "buffer mismatch", self.shard0_frame(tensors[0], payload), frozenset({"bad_frame"})
        )

    def unknown_dtype(self) -> Case:
        spec = self.layout[0][0]
        dtype = self.rng.choice(["complex64", "object", "<f4", "float128", "O", "U8", "", "bf16"])
        payload = self.bytes_(0, 64)
        tensor = self.descriptor(spec["name"], dtype, spec["shape"], len(payload))
        return Case("unknown dtype", self.shard0_frame(tensor, payload), frozenset({"wrong_dtype"}))

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
