"""Per-token connection caps and per-agent push rates in Redis, shared by all processes.

The limits themselves (and the in-process version) are in ``downpour.agents.limits``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from django.conf import settings

from downpour.hotstate import keys

# KEYS[1] hash of the token's slots, connection -> server; KEYS[2] zset of live servers,
# scored by the time each one is alive until. ARGV: now, server, alive_until, connection,
# limit. Slots whose server is no longer alive are swept first.
_ACQUIRE_LUA = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
local slots = redis.call('HGETALL', KEYS[1])
for i = 1, #slots, 2 do
    if not redis.call('ZSCORE', KEYS[2], slots[i + 1]) then
        redis.call('HDEL', KEYS[1], slots[i])
    end
end
if redis.call('HEXISTS', KEYS[1], ARGV[4]) == 1
        or redis.call('HLEN', KEYS[1]) < tonumber(ARGV[5]) then
    redis.call('HSET', KEYS[1], ARGV[4], ARGV[2])
    return 1
end
return 0
"""

# KEYS[1] bucket hash; ARGV: now, rate per second, burst, cost (1 takes a token, -1 gives
# one back, up to the burst). Returns 1 when the cost was paid.
_BUCKET_LUA = """
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local burst = tonumber(ARGV[3])
local cost = tonumber(ARGV[4]) or 1
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or tonumber(ARGV[1])
tokens = math.min(burst, tokens + (tonumber(ARGV[1]) - ts) * tonumber(ARGV[2]))
local allowed = 0
if tokens >= cost then
    tokens = math.min(burst, tokens - cost)
    allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(burst / tonumber(ARGV[2])) + 1)
return allowed
"""


class RedisLimits:
    """``downpour.agents.limits.Limits`` in Redis: Lua scripts keep each check atomic.

    ``server`` names this server process; its sockets' slots live while it marks itself
    alive (:meth:`refresh_server`, at least once per ``LEASE_TTL_S``).
    """

    def __init__(
        self, client: Any, prefix: str, server: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.server = server
        self._clock = clock
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._bucket = client.register_script(_BUCKET_LUA)

    def acquire_connection(self, token_id: str, connection: str) -> bool:
        now = self._clock()
        slots = keys.connections_key(self.prefix, token_id)
        servers = keys.servers_key(self.prefix)
        alive_until = now + settings.LEASE_TTL_S
        args = [now, self.server, alive_until, connection, settings.MAX_CONNECTIONS_PER_TOKEN]
        return bool(self._acquire(keys=[slots, servers], args=args))

    def release_connection(self, token_id: str, connection: str) -> None:
        self.client.hdel(keys.connections_key(self.prefix, token_id), connection)

    def refresh_server(self) -> None:
        """Mark this server alive for another ``LEASE_TTL_S``, and so all its slots."""
        self.client.zadd(
            keys.servers_key(self.prefix), {self.server: self._clock() + settings.LEASE_TTL_S}
        )

    def allow_push(self, agent_id: str) -> bool:
        key = keys.push_bucket_key(self.prefix, agent_id)
        args = [self._clock(), settings.PUSHES_PER_SECOND, settings.PUSH_BURST]
        return bool(self._bucket(keys=[key], args=args))

    def allow_claim(self, agent_id: str) -> bool:
        """A work request's token from the agent's claim bucket (``CLAIMS_PER_SECOND``)."""
        key = keys.claim_bucket_key(self.prefix, agent_id)
        args = [self._clock(), settings.CLAIMS_PER_SECOND, settings.CLAIM_BURST, 1]
        return bool(self._bucket(keys=[key], args=args))

    def refund_claim(self, agent_id: str) -> None:
        """A completed lease gives its claim's token back (``LocalLimits.refund_claim``)."""
        key = keys.claim_bucket_key(self.prefix, agent_id)
        args = [self._clock(), settings.CLAIMS_PER_SECOND, settings.CLAIM_BURST, -1]
        self._bucket(keys=[key], args=args)
