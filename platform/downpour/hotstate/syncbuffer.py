"""The synchronous step's buffer in Redis (``downpour.paramstore.sync.SyncStorage``).

Keys, beside a shard's own (``store.py``), for shard ``i`` of job ``j``::

    {prefix}job:{j}:shard:{i}:sync     HASH: version (the step), first (Redis TIME, µs, of
                                       its first gradient), n (gradients in it),
                                       g:{push id} -> int64 LE samples + float32 LE gradient,
                                       l:{worker (agent) id} -> its lease id
    {prefix}job:{j}:shard:{i}:dropped  SET of push ids dropped as late
    {prefix}job:{j}:sync               HASH of the job's counters: steps, timeouts, late

Each operation is one Lua script, so it is atomic across every server process; times come
from Redis's own clock (``TIME``), so processes on several hosts agree on a step's age.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from downpour.hotstate import keys
from downpour.paramstore.storage import CommitOutcome, ShardState
from downpour.paramstore.sync import SyncBatch, SyncCounts, SyncOffer, SyncOutcome

_SAMPLES = np.dtype("<i8")
_FLOAT = np.dtype("<f4")

# KEYS: version, buffer, applied ids, dropped ids, counters
# ARGV: base version, push id, lease id, payload, capacity, "1" to count a drop, worker id
# Returns {code, version, count, age µs}; codes follow _OFFER_OUTCOMES.
_OFFER_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then return {6, 0, 0, 0} end
cur = tonumber(cur)
if redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 1 then return {2, cur, 0, 0} end
if redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 1 then return {3, cur, 0, 0} end
local base = tonumber(ARGV[1])
if base > cur then return {5, cur, 0, 0} end
local step = redis.call('HGET', KEYS[2], 'version')
if step and tonumber(step) ~= cur then
    redis.call('DEL', KEYS[2])
end
local n = tonumber(redis.call('HGET', KEYS[2], 'n') or '0')
local held = redis.call('HGET', KEYS[2], 'l:' .. ARGV[7])
if base == cur then
    if redis.call('HEXISTS', KEYS[2], 'g:' .. ARGV[2]) == 1 then return {2, cur, n, 0} end
    if held == ARGV[3] then return {4, cur, n, 0} end
end
if base < cur or n >= tonumber(ARGV[5]) or held then
    redis.call('SADD', KEYS[4], ARGV[2])
    if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[5], 'late', 1) end
    return {1, cur, n, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if n == 0 then
    redis.call('HSET', KEYS[2], 'version', cur, 'first', now)
end
redis.call('HSET', KEYS[2], 'g:' .. ARGV[2], ARGV[4], 'l:' .. ARGV[7], ARGV[3])
n = redis.call('HINCRBY', KEYS[2], 'n', 1)
return {0, cur, n, now - tonumber(redis.call('HGET', KEYS[2], 'first'))}
"""

# KEYS: version, buffer. Returns {} when the shard is absent, {version} when its step is
# empty, else {version, age µs, field, value, field, value, ...} (the whole hash).
_PENDING_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur then return {} end
local step = redis.call('HGET', KEYS[2], 'version')
if (not step) or step ~= cur then return {tonumber(cur)} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local result = {tonumber(cur), now - tonumber(redis.call('HGET', KEYS[2], 'first'))}
for _, v in ipairs(redis.call('HGETALL', KEYS[2])) do result[#result + 1] = v end
return result
"""

# KEYS: version, buffer. Returns {gradients in the current step, age µs} ({0, 0} if none).
_AGE_LUA = """
local cur = redis.call('GET', KEYS[1])
local step = redis.call('HGET', KEYS[2], 'version')
if (not cur) or (not step) or step ~= cur then return {0, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
return {tonumber(redis.call('HGET', KEYS[2], 'n')),
        now - tonumber(redis.call('HGET', KEYS[2], 'first'))}
"""

# KEYS: version, weights, accumulators, applied ids, staged weights, staged accumulators,
#       buffer, counters, robust state, average (both dropped: a synchronous step keeps neither)
# ARGV: step version, new version, gradients averaged, "1" if timed out, "1" to count, ids...
# Returns 0 = applied, 1 = conflict (the shard moved on, or the buffer changed).
_COMMIT_LUA = """
local function discard()
    redis.call('DEL', KEYS[5], KEYS[6])
end
local current = redis.call('GET', KEYS[1])
if (not current) or current ~= ARGV[1]
        or redis.call('HGET', KEYS[7], 'version') ~= ARGV[1]
        or redis.call('HGET', KEYS[7], 'n') ~= ARGV[3]
        or redis.call('EXISTS', KEYS[5], KEYS[6]) ~= 2 then
    discard()
    return 1
end
for i = 6, #ARGV do
    if redis.call('HEXISTS', KEYS[7], 'g:' .. ARGV[i]) ~= 1 then
        discard()
        return 1
    end
end
redis.call('RENAME', KEYS[5], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('RENAME', KEYS[6], KEYS[3])
redis.call('PERSIST', KEYS[3])
redis.call('DEL', KEYS[9], KEYS[7], KEYS[10])
for i = 6, #ARGV do
    redis.call('SADD', KEYS[4], ARGV[i])
end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[5] == '1' then
    redis.call('HINCRBY', KEYS[8], 'steps', 1)
    if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[8], 'timeouts', 1) end
end
return 0
"""

_OFFER_OUTCOMES = {
    0: SyncOutcome.COUNTED,
    1: SyncOutcome.LATE,
    2: SyncOutcome.DUPLICATE,
    3: SyncOutcome.DUPLICATE_LATE,
    4: SyncOutcome.SAME_LEASE,
    5: SyncOutcome.AHEAD,
    6: SyncOutcome.ABSENT,
}
STAGING_TTL_SECONDS = 300


class RedisSyncBuffer:
    """Mixed into ``RedisStorage``: needs its ``client``, ``prefix`` and ``shard_key``."""

    client: Any
    prefix: str

    def _script(self, lua: str) -> Any:
        scripts = self.__dict__.setdefault("_sync_scripts", {})
        if lua not in scripts:
            scripts[lua] = self.client.register_script(lua)
        return scripts[lua]

    def shard_key(self, job: str, shard: int, suffix: str) -> str:
        return keys.shard_key(self.prefix, job, shard, suffix)

    def sync_offer(
        self,
        job: str,
        shard: int,
        base_version: int,
        push_id: str,
        lease_id: str,
        worker: str,
        samples: int,
        gradient: np.ndarray,
        capacity: int,
        counted: bool,
    ) -> SyncOffer:
        """Classify and buffer a gradient in one script; see ``SyncStorage.sync_offer``."""
        payload = np.array([samples], _SAMPLES).tobytes() + np.asarray(gradient, _FLOAT).tobytes()
        script = self._script(_OFFER_LUA)
        reply: Any = script(
            keys=[
                self.shard_key(job, shard, "v"),
                self.shard_key(job, shard, "sync"),
                self.shard_key(job, shard, "applied"),
                self.shard_key(job, shard, "dropped"),
                keys.sync_counts_key(self.prefix, job),
            ],
            args=[
                base_version,
                push_id,
                lease_id,
                payload,
                capacity,
                "1" if counted else "0",
                worker,
            ],
        )
        code, version, count, age_us = (int(x) for x in reply)
        return SyncOffer(_OFFER_OUTCOMES[code], version, count, age_us / 1e6)

    def sync_pending(self, job: str, shard: int) -> SyncBatch | None:
        """The buffer at the shard's current version, read atomically; None if empty."""
        script = self._script(_PENDING_LUA)
        reply: Any = script(
            keys=[self.shard_key(job, shard, "v"), self.shard_key(job, shard, "sync")]
        )
        if len(reply) < 2:
            return None
        version, age_us = int(reply[0]), int(reply[1])
        fields = reply[2:]
        push_ids, samples, gradients = [], [], []
        for name, value in zip(fields[::2], fields[1::2], strict=True):
            if not bytes(name).startswith(b"g:"):
                continue
            data = bytes(value)
            push_ids.append(bytes(name)[2:].decode())
            samples.append(int(np.frombuffer(data[:8], _SAMPLES)[0]))
            gradients.append(np.frombuffer(data[8:], _FLOAT).astype(np.float32))
        if not push_ids:
            return None
        return SyncBatch(version, tuple(push_ids), tuple(samples), tuple(gradients), age_us / 1e6)

    def sync_age(self, job: str, shard: int) -> tuple[int, float]:
        """Gradients in the current step and seconds since its first (two small reads)."""
        reply: Any = self._script(_AGE_LUA)(
            keys=[self.shard_key(job, shard, "v"), self.shard_key(job, shard, "sync")]
        )
        return int(reply[0]), int(reply[1]) / 1e6

    def sync_commit(
        self,
        job: str,
        shard: int,
        batch: SyncBatch,
        state: ShardState,
        timed_out: bool,
        counted: bool,
    ) -> CommitOutcome:
        """Compare-and-set through one script; see ``SyncStorage.sync_commit``."""
        if state.version != batch.version + 1:
            raise ValueError(f"state.version must be {batch.version + 1}, got {state.version}")
        token = uuid.uuid4().hex
        staged_w = self.shard_key(job, shard, f"staged:{token}:w")
        staged_a = self.shard_key(job, shard, f"staged:{token}:a")
        pipe = self.client.pipeline(transaction=False)
        pipe.set(staged_w, _wire(state.weights), ex=STAGING_TTL_SECONDS)
        pipe.set(staged_a, _wire(state.accumulators), ex=STAGING_TTL_SECONDS)
        script = self._script(_COMMIT_LUA)
        script(
            keys=[
                *(self.shard_key(job, shard, suffix) for suffix in ("v", "w", "a", "applied")),
                staged_w,
                staged_a,
                self.shard_key(job, shard, "sync"),
                keys.sync_counts_key(self.prefix, job),
                self.shard_key(job, shard, "r"),
                self.shard_key(job, shard, "p"),
            ],
            args=[
                batch.version,
                batch.version + 1,
                len(batch.push_ids),
                "1" if timed_out else "0",
                "1" if counted else "0",
                *batch.push_ids,
            ],
            client=pipe,
        )
        results: Any = pipe.execute()
        return CommitOutcome.APPLIED if int(results[-1]) == 0 else CommitOutcome.CONFLICT

    def sync_counts(self, job: str) -> SyncCounts:
        """The job's counters from its hash (zeros when absent)."""
        raw: Any = self.client.hgetall(keys.sync_counts_key(self.prefix, job))
        values = {bytes(k).decode(): int(v) for k, v in raw.items()}
        return SyncCounts(values.get("steps", 0), values.get("timeouts", 0), values.get("late", 0))


def _wire(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=_FLOAT).tobytes()
