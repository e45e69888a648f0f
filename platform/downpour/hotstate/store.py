"""Redis implementation of the parameter store's ``ShardStorage``.

Keys (built by :mod:`downpour.hotstate.keys`) for shard ``i`` of job ``j`` (``prefix``
defaults to ``"downpour:"``)::

    {prefix}job:{j}:shard:{i}:v        version, decimal string
    {prefix}job:{j}:shard:{i}:w        weights, raw float32 little-endian bytes
    {prefix}job:{j}:shard:{i}:a        Adagrad accumulators, same encoding
    {prefix}job:{j}:shard:{i}:r        centred-clipping state, only when the store clips:
                                       4 float64 LE statistics, float32 LE momentum, then
                                       the recent untrusted distances as float64 LE
                                       (``RobustState.to_bytes``; a value written before
                                       the distances existed has none and still loads)
    {prefix}job:{j}:shard:{i}:applied  SET of applied push ids
    {prefix}job:{j}:shards             SET of shard indices, so delete() needs no SCAN
    {prefix}job:{j}:statistics         non-trainable statistics, only for a model with any:
                                       int64 LE version, float64 LE samples, float32 LE
                                       values (``StatisticsState.to_bytes``)
    {prefix}job:{j}:statistics:applied SET of applied statistics report ids

A statistics report commits with ``WATCH``/``MULTI`` on those two keys (a compare-and-set on
the version and a duplicate check on the id), separately from the shards.

A commit is one Lua script (duplicate check, version check, install of the new values,
version bump, push id), so it is atomic across every server process that shares the Redis
database. The new values travel to Redis in the same round trip, under short-lived
``...:shard:{i}:staged:{token}:w|a|r|p`` keys that the script renames into place. A load is one
``MGET``, which Redis executes atomically, so version, weights, accumulators, robust state
and the average always belong together; a commit without robust state deletes the ``r``
key, and one without an average the ``p`` key.

    {prefix}job:{j}:shard:{i}:e        epoch: a random token set by every initialize

The applied-id sets grow by one id per push for the life of the job; ``delete`` (or
re-initializing a shard) removes them.

Each process keeps the last state it loaded or committed per shard. A state is identified
by (epoch, version): versions only grow between initializations, and every initialization
draws a new epoch, so a cached state whose pair matches Redis's is exactly the stored one.
A load then costs one small ``MGET`` and a memory copy instead of moving megabytes out of
Redis — the common case when one server process handles most pushes to a shard.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from downpour.hotstate import keys
from downpour.hotstate import keys as keys_module
from downpour.hotstate.syncbuffer import RedisSyncBuffer
from downpour.paramstore.errors import CorruptState
from downpour.paramstore.robust import STATS_BYTES, RobustState, RobustStats
from downpour.paramstore.statistics import StatisticsState
from downpour.paramstore.storage import CommitOutcome, ShardState

WIRE_DTYPE = np.dtype("<f4")

# KEYS: version, weights, accumulators, applied ids, staged weights, staged accumulators, epoch,
#       robust state, staged robust state, average, staged average
# ARGV: expected version, new version, push id, expected epoch ("" = any),
#       "1" if a robust state was staged else "0" (then the robust key is deleted),
#       "1" if an average was staged else "0" (then the average key is deleted)
# Returns 0 = applied, 1 = conflict (other version, shard absent or staging lost), 2 = duplicate.
_COMMIT_LUA = """
local function discard()
    redis.call('DEL', KEYS[5], KEYS[6], KEYS[9], KEYS[11])
end
-- An optional array (robust state, average): the staged copy into place, or none at all.
local function install(flag, staged, key)
    if flag == '1' then
        redis.call('RENAME', staged, key)
        redis.call('PERSIST', key)
    else
        redis.call('DEL', key)
    end
end
if redis.call('SISMEMBER', KEYS[4], ARGV[3]) == 1 then
    discard()
    return 2
end
local current = redis.call('GET', KEYS[1])
local epoch = redis.call('GET', KEYS[7]) or ''
local staged = 2
if ARGV[5] == '1' then
    staged = staged + 1
end
if ARGV[6] == '1' then
    staged = staged + 1
end
if (not current) or current ~= ARGV[1] or (ARGV[4] ~= '' and epoch ~= ARGV[4])
        or redis.call('EXISTS', KEYS[5], KEYS[6], KEYS[9], KEYS[11]) ~= staged then
    discard()
    return 1
end
redis.call('RENAME', KEYS[5], KEYS[2])
redis.call('PERSIST', KEYS[2])
redis.call('RENAME', KEYS[6], KEYS[3])
redis.call('PERSIST', KEYS[3])
install(ARGV[5], KEYS[9], KEYS[8])
install(ARGV[6], KEYS[11], KEYS[10])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
return 0
"""

# Staged values that never reach the commit script (a dropped connection) expire by then.
STAGING_TTL_SECONDS = 300

_OUTCOMES = {0: CommitOutcome.APPLIED, 1: CommitOutcome.CONFLICT, 2: CommitOutcome.DUPLICATE}


@dataclass
class _Cached:
    epoch: bytes
    version: int
    weights: np.ndarray
    accumulators: np.ndarray
    robust: RobustState | None
    average: np.ndarray | None

    def state(self) -> ShardState:
        """A copy the caller may modify."""
        return ShardState(
            self.version,
            self.weights.copy(),
            self.accumulators.copy(),
            None if self.robust is None else self.robust.copy(),
            None if self.average is None else self.average.copy(),
        )


class RedisStorage(RedisSyncBuffer):
    """:class:`~downpour.paramstore.store.ShardStorage` backed by Redis.

    Parameters
    ----------
    client : redis.Redis
        A client created with ``decode_responses=False`` (the default); values are binary.
    prefix : str
        Prepended to every key, so several deployments or tests can share one database.
    """

    def __init__(self, client: redis.Redis, prefix: str = "downpour:") -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisStorage needs a client with decode_responses=False")
        self.client = client
        self.prefix = prefix
        self._commit_script = client.register_script(_COMMIT_LUA)
        self._cache: dict[tuple[str, int], _Cached] = {}
        self._cache_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, prefix: str = "downpour:") -> RedisStorage:
        """Connect to ``url`` (e.g. ``redis://127.0.0.1:6379/0``)."""
        return cls(redis.Redis.from_url(url), prefix)

    # -- keys --------------------------------------------------------------------------------

    def shard_key(self, job: str, shard: int, suffix: str) -> str:
        """Key ``{prefix}job:{job}:shard:{shard}:{suffix}`` (suffix v, e, w, a, r, p or applied)."""
        return keys.shard_key(self.prefix, job, shard, suffix)

    def _shards_key(self, job: str) -> str:
        return keys.job_shards_key(self.prefix, job)

    def memory_bytes(self, max_keys: int = 10_000) -> int:
        """Redis's ``MEMORY USAGE`` summed over this store's keys (the first ``max_keys``)."""
        names = list(self.client.scan_iter(match=f"{self.prefix}*", count=1000))[:max_keys]
        if not names:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.memory_usage(name)
        return sum(int(n or 0) for n in pipe.execute())

    # -- ShardStorage ------------------------------------------------------------------------

    def load(self, job: str, shard: int) -> ShardState | None:
        """Version, weights, accumulators, robust state and average as one consistent state.

        A small ``MGET`` of version and epoch decides whether this process's cached copy is
        current; otherwise one atomic ``MGET`` reads everything.
        """
        key = (job, int(shard))
        head: Any = self.client.mget(
            [self.shard_key(job, shard, "v"), self.shard_key(job, shard, "e")]
        )
        version, epoch = head
        if version is None:
            return None
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None and cached.epoch == epoch and cached.version == int(version):
                return cached.state()
        values: Any = self.client.mget(
            [self.shard_key(job, shard, suffix) for suffix in ("v", "e", "w", "a", "r", "p")]
        )
        version, epoch, weights, accumulators, robust, average = values
        if version is None:
            return None
        if (
            not isinstance(weights, bytes)
            or not isinstance(accumulators, bytes)
            or len(weights) != len(accumulators)
            or len(weights) % WIRE_DTYPE.itemsize
        ):
            raise CorruptState(
                f"Redis shard {shard} of job {job!r} is incomplete: version is set but weights "
                "or accumulators are missing or of different byte lengths"
            )
        state = ShardState(
            int(version),
            np.frombuffer(weights, dtype=WIRE_DTYPE).astype(np.float32, copy=True),
            np.frombuffer(accumulators, dtype=WIRE_DTYPE).astype(np.float32, copy=True),
            _decode_robust(robust, len(weights) // WIRE_DTYPE.itemsize, job, shard),
            _decode_average(average, len(weights), job, shard),
        )
        cached = _Cached(
            epoch or b"",
            state.version,
            state.weights,
            state.accumulators,
            state.robust,
            state.average,
        )
        with self._cache_lock:
            self._cache[key] = cached
        return cached.state()

    def load_version(self, job: str, shard: int) -> int | None:
        """The shard's version, or None."""
        version: Any = self.client.get(self.shard_key(job, shard, "v"))
        return None if version is None else int(version)

    def initialize(self, job: str, shard: int, state: ShardState) -> None:
        """Overwrite the shard in one MULTI/EXEC transaction and clear its applied ids."""
        with self._cache_lock:
            self._cache.pop((job, int(shard)), None)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.shard_key(job, shard, "applied"))
        # A synchronous step's buffer and drops belong to the versions being replaced.
        pipe.delete(self.shard_key(job, shard, "sync"), self.shard_key(job, shard, "dropped"))
        pipe.set(self.shard_key(job, shard, "e"), uuid.uuid4().hex)
        pipe.set(self.shard_key(job, shard, "w"), _wire_view(state.weights))
        pipe.set(self.shard_key(job, shard, "a"), _wire_view(state.accumulators))
        if state.robust is None:
            pipe.delete(self.shard_key(job, shard, "r"))
        else:
            pipe.set(self.shard_key(job, shard, "r"), state.robust.to_bytes())
        if state.average is None:
            pipe.delete(self.shard_key(job, shard, "p"))
        else:
            pipe.set(self.shard_key(job, shard, "p"), _wire_view(state.average))
        pipe.set(self.shard_key(job, shard, "v"), str(int(state.version)))
        pipe.sadd(self._shards_key(job), str(int(shard)))
        pipe.execute()

    def commit(
        self, job: str, shard: int, expected_version: int, state: ShardState, push_id: str
    ) -> CommitOutcome:
        """Compare-and-set through one Lua script; see ``ShardStorage.commit``.

        The new weights, accumulators, robust state and average are first written to unique
        staging keys, in the same pipeline (one round trip) as the script. The script then
        decides atomically: on success it RENAMEs the staged values into place (O(1)), bumps
        the version and records the push id; otherwise it deletes them. Passing megabytes
        through the script's ARGV instead is several times slower, because Lua copies every
        argument.
        """
        if state.version != expected_version + 1:
            raise ValueError(
                f"state.version must be expected_version + 1 = {expected_version + 1}, "
                f"got {state.version}"
            )
        key = (job, int(shard))
        with self._cache_lock:
            cached = self._cache.get(key)
        # A restore may reset the version to one we have seen: the epoch tells them apart.
        expected_epoch = cached.epoch if cached is not None else b""
        token = uuid.uuid4().hex
        staged_w = self.shard_key(job, shard, f"staged:{token}:w")
        staged_a = self.shard_key(job, shard, f"staged:{token}:a")
        staged_r = self.shard_key(job, shard, f"staged:{token}:r")
        staged_p = self.shard_key(job, shard, f"staged:{token}:p")
        pipe = self.client.pipeline(transaction=False)
        pipe.set(staged_w, _wire_view(state.weights), ex=STAGING_TTL_SECONDS)
        pipe.set(staged_a, _wire_view(state.accumulators), ex=STAGING_TTL_SECONDS)
        if state.robust is not None:
            pipe.set(staged_r, state.robust.to_bytes(), ex=STAGING_TTL_SECONDS)
        if state.average is not None:
            pipe.set(staged_p, _wire_view(state.average), ex=STAGING_TTL_SECONDS)
        self._commit_script(
            keys=[
                *(self.shard_key(job, shard, suffix) for suffix in ("v", "w", "a", "applied")),
                staged_w,
                staged_a,
                self.shard_key(job, shard, "e"),
                self.shard_key(job, shard, "r"),
                staged_r,
                self.shard_key(job, shard, "p"),
                staged_p,
            ],
            args=[
                str(int(expected_version)),
                str(int(expected_version) + 1),
                push_id,
                expected_epoch,
                "0" if state.robust is None else "1",
                "0" if state.average is None else "1",
            ],
            client=pipe,
        )
        results: Any = pipe.execute()
        outcome = _OUTCOMES[int(results[-1])]
        with self._cache_lock:
            if outcome is CommitOutcome.APPLIED and cached is not None:
                # The caller hands the state over (ParameterStore never reuses it); the
                # script checked the epoch, so it is still the one we cached.
                self._cache[key] = _Cached(
                    cached.epoch,
                    state.version,
                    state.weights,
                    state.accumulators,
                    state.robust,
                    state.average,
                )
            elif outcome is not CommitOutcome.APPLIED:
                self._cache.pop(key, None)
        return outcome

    def was_applied(self, job: str, shard: int, push_id: str) -> bool:
        """Whether ``push_id`` is in the shard's applied set."""
        return bool(self.client.sismember(self.shard_key(job, shard, "applied"), push_id))

    def load_robust_stats(self, job: str, shards: Sequence[int]) -> list[RobustStats | None]:
        """Each shard's robust statistics in one MULTI/EXEC round trip.

        Reads the version's existence and the first :data:`STATS_BYTES` of the ``r`` key
        (``GETRANGE``), never the weights or the momentum.
        """
        pipe = self.client.pipeline(transaction=True)
        for shard in shards:
            pipe.exists(self.shard_key(job, shard, "v"))
            pipe.getrange(self.shard_key(job, shard, "r"), 0, STATS_BYTES - 1)
        replies: Any = pipe.execute()
        found: list[RobustStats | None] = []
        for shard, exists, header in zip(shards, replies[::2], replies[1::2], strict=True):
            if not exists:
                found.append(None)
            elif not header:  # GETRANGE of a missing key: a shard without robust state
                found.append(RobustStats())
            else:
                try:
                    found.append(RobustStats.from_bytes(header))
                except ValueError as exc:
                    raise CorruptState(
                        f"Redis shard {shard} of job {job!r} has bad robust statistics: {exc}"
                    ) from exc
        return found

    # -- non-trainable statistics (``downpour.paramstore.statistics.StatisticsStorage``) ----

    def load_statistics(self, job: str) -> StatisticsState | None:
        """The job's statistics, or None."""
        data: Any = self.client.get(keys.statistics_key(self.prefix, job))
        return None if data is None else self._decode_statistics(job, bytes(data))

    def initialize_statistics(self, job: str, state: StatisticsState) -> None:
        """Store ``state`` and forget the applied report ids, in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(keys.statistics_key(self.prefix, job), state.to_bytes())
        pipe.delete(keys.statistics_key(self.prefix, job, "applied"))
        pipe.execute()

    def commit_statistics(
        self, job: str, expected_version: int, state: StatisticsState, push_id: str
    ) -> CommitOutcome:
        """Compare-and-set on the statistics' version, exactly once per ``push_id``."""
        key = keys.statistics_key(self.prefix, job)
        applied = keys.statistics_key(self.prefix, job, "applied")
        with self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key, applied)
                if pipe.sismember(applied, push_id):
                    return CommitOutcome.DUPLICATE
                data: Any = pipe.get(key)
                if data is None or self._decode_statistics(job, bytes(data)).version != (
                    expected_version
                ):
                    return CommitOutcome.CONFLICT
                pipe.multi()
                pipe.set(key, state.to_bytes())
                pipe.sadd(applied, push_id)
                pipe.execute()
            except redis.WatchError:
                return CommitOutcome.CONFLICT
        return CommitOutcome.APPLIED

    def _decode_statistics(self, job: str, data: bytes) -> StatisticsState:
        size = (len(data) - 16) // 4
        try:
            return StatisticsState.from_bytes(data, size)
        except ValueError as exc:
            raise CorruptState(f"Redis statistics of job {job!r}: {exc}") from exc

    def delete(self, job: str) -> None:
        """Remove every key of ``job``."""
        shards_key = self._shards_key(job)
        members: Any = self.client.smembers(shards_key)
        keys = [
            shards_key,
            keys_module.statistics_key(self.prefix, job),
            keys_module.statistics_key(self.prefix, job, "applied"),
            keys_module.sync_counts_key(self.prefix, job),
        ]
        for member in members:
            suffixes = ("v", "e", "w", "a", "r", "p", "applied", "sync", "dropped", "ref", "refv")
            for suffix in suffixes:
                keys.append(self.shard_key(job, int(member), suffix))
        self.client.delete(*keys)
        with self._cache_lock:
            for key in [k for k in self._cache if k[0] == job]:
                del self._cache[key]


def _decode_robust(data: object, size: int, job: str, shard: int) -> RobustState | None:
    """The robust state stored as ``data`` (None if absent) for a shard of ``size`` elements."""
    if data is None:
        return None
    try:
        if not isinstance(data, bytes):
            raise ValueError(f"expected bytes, got {type(data).__name__}")
        robust = RobustState.from_bytes(data, size)
    except ValueError as exc:
        raise CorruptState(
            f"Redis shard {shard} of job {job!r} has a bad robust state: {exc}"
        ) from exc
    if robust.momentum.shape != (size,):
        raise CorruptState(
            f"Redis shard {shard} of job {job!r} has {size} weights but a momentum of "
            f"{robust.momentum.shape[0]}"
        )
    return robust


def _decode_average(data: object, n_bytes: int, job: str, shard: int) -> np.ndarray | None:
    """The average stored as ``data`` (None if absent), as long as the weights' ``n_bytes``."""
    if data is None:
        return None
    if not isinstance(data, bytes) or len(data) != n_bytes:
        raise CorruptState(
            f"Redis shard {shard} of job {job!r} has an average of "
            f"{len(data) if isinstance(data, bytes) else type(data).__name__} bytes, "
            f"not the weights' {n_bytes}"
        )
    return np.frombuffer(data, dtype=WIRE_DTYPE).astype(np.float32, copy=True)


def _wire_view(array: np.ndarray) -> memoryview:
    """Little-endian float32 bytes of a flat vector, without copying when already so."""
    if array.ndim != 1:
        raise ValueError(f"expected a flat vector, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=WIRE_DTYPE).data.cast("B")
