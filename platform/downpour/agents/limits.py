"""Per-token connection caps and per-agent push and claim rates, shared by all server processes.

With ``REDIS_URL`` the counters live in Redis (``downpour.hotstate.limits``); the embedded
default keeps them in this process, which is all there is.
"""

from __future__ import annotations

import threading
import time
from functools import cache
from typing import Protocol

from django.conf import settings


class Limits(Protocol):
    def acquire_connection(self, token_id: str, connection: str) -> bool: ...
    def release_connection(self, token_id: str, connection: str) -> None: ...
    def allow_push(self, agent_id: str) -> bool: ...
    def allow_claim(self, agent_id: str) -> bool: ...


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
        return self._take(agent_id, settings.PUSHES_PER_SECOND, settings.PUSH_BURST)

    def allow_claim(self, agent_id: str) -> bool:
        """A work request's token from the agent's claim bucket (``CLAIMS_PER_SECOND``)."""
        return self._take(f"claim:{agent_id}", settings.CLAIMS_PER_SECOND, settings.CLAIM_BURST)

    def _take(self, key: str, rate: float, burst: float) -> bool:
        now = time.time()
        with self._lock:
            tokens, ts = self._buckets.get(key, (burst, now))
            tokens = min(burst, tokens + (now - ts) * rate)
            allowed = tokens >= 1
            self._buckets[key] = (tokens - 1 if allowed else tokens, now)
            return allowed


@cache
def limits() -> Limits:
    if settings.REDIS_URL:
        import redis

        from downpour.hotstate.limits import RedisLimits

        return RedisLimits(redis.Redis.from_url(settings.REDIS_URL), settings.STORE_PREFIX)
    return LocalLimits()
