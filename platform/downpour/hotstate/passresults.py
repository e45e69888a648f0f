"""Sandblaster's unit answers in Redis (``downpour.paramstore.passes.PassResults``).

Per pass and shard, one HASH of unit -> answer (8 bytes samples, 8 bytes loss, float32
little-endian gradient) and one HASH of unit -> push id. One Lua script keeps an answer
only if its unit has none, so the first of several processes' copies wins; the ids tell a
repeat of the same push (duplicate) from another copy's answer (late). An answer to a pass
below the job's open pass (one key per job) is late and keeps nothing. The pass keys expire
after a day, in case a job is deleted while a pass is open.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from downpour.paramstore.passes import Answer, UnitAnswer

from .keys import lbfgs_state_key, open_pass_key, pass_key

PASS_TTL_S = 24 * 3600

_OFFER = """
local open = redis.call('GET', KEYS[3])
if open and tonumber(ARGV[5]) < tonumber(open) then return 'late' end
local id = redis.call('HGET', KEYS[2], ARGV[1])
if id then
  if id == ARGV[2] then return 'duplicate' end
  return 'late'
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 'first'
"""

_HEADER = struct.Struct("<qd")


def answer_to_bytes(answer: UnitAnswer) -> bytes:
    gradient = np.ascontiguousarray(answer.gradient, dtype="<f4")
    return _HEADER.pack(answer.samples, answer.loss) + gradient.tobytes()


def answer_from_bytes(data: bytes) -> UnitAnswer:
    samples, loss = _HEADER.unpack_from(data)
    gradient = np.frombuffer(data, dtype="<f4", offset=_HEADER.size).astype(np.float32)
    return UnitAnswer(int(samples), float(loss), gradient)


class RedisPassResults:
    """:class:`~downpour.paramstore.passes.PassResults` on a ``redis.Redis`` client."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._offer = client.register_script(_OFFER)

    def offer(
        self, job: str, pass_number: int, unit: int, shard: int, push_id: str, answer: UnitAnswer
    ) -> Answer:
        keys = [
            pass_key(self.prefix, job, pass_number, shard),
            pass_key(self.prefix, job, pass_number, shard, "ids"),
            open_pass_key(self.prefix, job),
        ]
        args = [int(unit), push_id, answer_to_bytes(answer), PASS_TTL_S, int(pass_number)]
        outcome = self._offer(keys=keys, args=args)
        return Answer(outcome.decode() if isinstance(outcome, bytes) else outcome)

    def open_pass(self, job: str, pass_number: int) -> None:
        self.client.set(open_pass_key(self.prefix, job), int(pass_number))

    def count(self, job: str, pass_number: int, shard: int) -> int:
        return int(self.client.hlen(pass_key(self.prefix, job, pass_number, shard)))

    def answers(self, job: str, pass_number: int, shard: int) -> dict[int, UnitAnswer]:
        raw = self.client.hgetall(pass_key(self.prefix, job, pass_number, shard))
        return {int(unit): answer_from_bytes(data) for unit, data in raw.items()}

    def answered(self, job: str, pass_number: int, shard: int) -> set[int]:
        ids = self.client.hkeys(pass_key(self.prefix, job, pass_number, shard, "ids"))
        return {int(unit) for unit in ids}

    def forget_pass(self, job: str, pass_number: int, shards: int) -> None:
        keys = [pass_key(self.prefix, job, pass_number, shard) for shard in range(shards)]
        keys += [pass_key(self.prefix, job, pass_number, shard, "ids") for shard in range(shards)]
        self.client.delete(*keys)

    def save_state(self, job: str, state: bytes) -> None:
        self.client.set(lbfgs_state_key(self.prefix, job), state)

    def load_state(self, job: str) -> bytes | None:
        data = self.client.get(lbfgs_state_key(self.prefix, job))
        return None if data is None else bytes(data)

    def delete(self, job: str) -> None:
        self.client.delete(lbfgs_state_key(self.prefix, job))
        for key in self.client.scan_iter(match=f"{self.prefix}job:{job}:pass:*", count=500):
            self.client.delete(key)
