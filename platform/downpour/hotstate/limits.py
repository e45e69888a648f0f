"""Per-token connection caps and per-agent push rates in Redis, shared by all processes.

The limits themselves (and the in-process version) are in ``downpour.agents.limits``.
"""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings

from downpour.hotstate import keys

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


class RedisLimits:
    """``downpour.agents.limits.Limits`` in Redis: Lua scripts keep each check atomic."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._bucket = client.register_script(_BUCKET_LUA)

    def acquire_connection(self, token_id: str, connection: str) -> bool:
        # A connection's entry lives for a lease TTL and is renewed on every heartbeat, so
        # a server that dies without releasing frees its slots by itself.
        now = time.time()
        key = keys.connections_key(self.prefix, token_id)
        args = [now, now + settings.LEASE_TTL_S, connection, settings.MAX_CONNECTIONS_PER_TOKEN]
        return bool(self._acquire(keys=[key], args=args))

    def release_connection(self, token_id: str, connection: str) -> None:
        self.client.zrem(keys.connections_key(self.prefix, token_id), connection)

    def allow_push(self, agent_id: str) -> bool:
        key = keys.push_bucket_key(self.prefix, agent_id)
        args = [time.time(), settings.PUSHES_PER_SECOND, settings.PUSH_BURST]
        return bool(self._bucket(keys=[key], args=args))

    def allow_claim(self, agent_id: str) -> bool:
        """A work request's token from the agent's claim bucket (``CLAIMS_PER_SECOND``)."""
        key = keys.claim_bucket_key(self.prefix, agent_id)
        args = [time.time(), settings.CLAIMS_PER_SECOND, settings.CLAIM_BURST]
        return bool(self._bucket(keys=[key], args=args))
