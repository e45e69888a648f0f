"""Per-token connection caps and per-agent push and claim rates, shared by all server processes.

With ``REDIS_URL`` the counters live in Redis (``downpour.hotstate.limits``); the embedded
default keeps them in this process, which is all there is.

A connection's slot lasts as long as its socket: it is taken on connect and given back on
disconnect, whatever the socket sends in between (an idle socket keeps its slot, so it
counts against the cap). In Redis each slot names the server process that holds it, and
that process marks itself alive every ``SERVER_REFRESH_S`` (:func:`start_server_refresher`);
the slots of a server that stopped doing so for ``LEASE_TTL_S`` are swept.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from functools import cache
from typing import Protocol

from django.conf import settings

log = logging.getLogger(__name__)


class Limits(Protocol):
    def acquire_connection(self, token_id: str, connection: str) -> bool: ...
    def release_connection(self, token_id: str, connection: str) -> None: ...
    def refresh_server(self) -> None: ...
    def allow_push(self, agent_id: str) -> bool: ...
    def allow_claim(self, agent_id: str) -> bool: ...
    def refund_claim(self, agent_id: str) -> None: ...


class LocalLimits:
    """The limits of the one server process there is: a slot lives until it is released."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._connections: dict[str, set[str]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire_connection(self, token_id: str, connection: str) -> bool:
        with self._lock:
            live = self._connections.setdefault(token_id, set())
            if connection not in live and len(live) >= settings.MAX_CONNECTIONS_PER_TOKEN:
                return False
            live.add(connection)
            return True

    def release_connection(self, token_id: str, connection: str) -> None:
        with self._lock:
            live = self._connections.get(token_id, set())
            live.discard(connection)
            if not live:
                self._connections.pop(token_id, None)

    def refresh_server(self) -> None:
        """Nothing to do: this process's slots die with it."""

    def allow_push(self, agent_id: str) -> bool:
        return self._take(agent_id, settings.PUSHES_PER_SECOND, settings.PUSH_BURST)

    def allow_claim(self, agent_id: str) -> bool:
        """A work request's token from the agent's claim bucket (``CLAIMS_PER_SECOND``)."""
        return self._take(f"claim:{agent_id}", settings.CLAIMS_PER_SECOND, settings.CLAIM_BURST)

    def refund_claim(self, agent_id: str) -> None:
        """A completed lease gives its claim's token back (up to the burst): the bucket
        bounds claims that end in no work, and an agent finishing many small units (a
        Sandblaster pass) is never held back by it."""
        self._take(f"claim:{agent_id}", settings.CLAIMS_PER_SECOND, settings.CLAIM_BURST, -1)

    def _take(self, key: str, rate: float, burst: float, cost: float = 1) -> bool:
        now = self._clock()
        with self._lock:
            tokens, ts = self._buckets.get(key, (burst, now))
            tokens = min(burst, tokens + (now - ts) * rate)
            allowed = tokens >= cost
            self._buckets[key] = (min(burst, tokens - cost) if allowed else tokens, now)
            return allowed


def server_instance_id() -> str:
    """A fresh id for one server process (the owner of its sockets' slots)."""
    return uuid.uuid4().hex


def server_refresh_s() -> float:
    """How often a server marks itself alive: three times per ``LEASE_TTL_S``."""
    return float(settings.LEASE_TTL_S) / 3


def start_server_refresher(target: Limits, interval_s: float) -> threading.Event:
    """Call ``target.refresh_server()`` every ``interval_s`` seconds in a daemon thread.

    Returns the event that stops the thread when set.
    """
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            try:
                target.refresh_server()
            except Exception:  # Redis down for a moment: the next round retries
                log.exception("could not mark this server alive")

    threading.Thread(target=run, name="limits-refresher", daemon=True).start()
    return stop


@cache
def limits() -> Limits:
    if settings.REDIS_URL:
        import redis

        from downpour.hotstate.limits import RedisLimits

        shared = RedisLimits(
            redis.Redis.from_url(settings.REDIS_URL), settings.STORE_PREFIX, server_instance_id()
        )
        shared.refresh_server()
        start_server_refresher(shared, server_refresh_s())
        return shared
    return LocalLimits()
