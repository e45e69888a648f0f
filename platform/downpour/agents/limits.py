"""Per-token connection caps and per-agent push rates, shared by all server processes.

With ``REDIS_URL`` the counters live in Redis (Lua scripts keep each check atomic across
processes); the embedded default keeps them in this process, which is all there is.
"""

from __future__ import annotations

import threading
import time
from functools import cache
from typing import Any, Protocol

from django.conf import settings

# KEYS[1] zset of live connections; ARGV: now, expires_at, member, limit
_ACQUIRE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
    redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[2] - ARGV[1]) + 1)
    return 1
end
return 0
"""

# KEYS[1] bucket hash; ARGV: now, rate per second, burst. Returns 1 when a token was taken.
_BUCKET_LUA = """
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local burst = tonumber(ARGV[3])
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or tonumber(ARGV[1])
tokens = math.min(burst, tokens + (tonumber(ARGV[1]) - ts) * tonumber(ARGV[2]))
local allowed = 0
if tokens >= 1 then
    tokens = tokens - 1
    allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(burst / tonumber(ARGV[2])) + 1)
return allowed
"""


class Limits(Protocol):
    def acquire_connection(self, token_id: str, connection: str) -> bool: ...
    def release_connection(self, token_id: str, connection: str) -> None: ...
    def allow_push(self, agent_id: str) -> bool: ...


class RedisLimits:
    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._bucket = client.register_script(_BUCKET_LUA)

    def acquire_connection(self, token_id: str, connection: str) -> bool:
        # A connection's entry lives for a lease TTL and is renewed on every heartbeat, so
        # a server that dies without releasing frees its slots by itself.
        now = time.time()
        key = f"{self.prefix}limits:conn:{token_id}"
        args = [now, now + settings.LEASE_TTL_S, connection, settings.MAX_CONNECTIONS_PER_TOKEN]
        return bool(self._acquire(keys=[key], args=args))

    def release_connection(self, token_id: str, connection: str) -> None:
        self.client.zrem(f"{self.prefix}limits:conn:{token_id}", connection)

    def allow_push(self, agent_id: str) -> bool:
        key = f"{self.prefix}limits:push:{agent_id}"
        args = [time.time(), settings.PUSHES_PER_SECOND, settings.PUSH_BURST]
        return bool(self._bucket(keys=[key], args=args))


class LocalLimits:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[str, dict[str, float]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire_connection(self, token_id: str, connection: str) -> bool:
        now = time.time()
        with self._lock:
            live = {c: t for c, t in self._connections.get(token_id, {}).items() if t > now}
            if connection not in live and len(live) >= settings.MAX_CONNECTIONS_PER_TOKEN:
                self._connections[token_id] = live
                return False
            live[connection] = now + settings.LEASE_TTL_S
            self._connections[token_id] = live
            return True

    def release_connection(self, token_id: str, connection: str) -> None:
        with self._lock:
            self._connections.get(token_id, {}).pop(connection, None)

    def allow_push(self, agent_id: str) -> bool:
        now = time.time()
        rate, burst = settings.PUSHES_PER_SECOND, settings.PUSH_BURST
        with self._lock:
            tokens, ts = self._buckets.get(agent_id, (burst, now))
            tokens = min(burst, tokens + (now - ts) * rate)
            allowed = tokens >= 1
            self._buckets[agent_id] = (tokens - 1 if allowed else tokens, now)
            return allowed


@cache
def limits() -> Limits:
    if settings.REDIS_URL:
        import redis

        return RedisLimits(redis.Redis.from_url(settings.REDIS_URL), settings.STORE_PREFIX)
    return LocalLimits()
