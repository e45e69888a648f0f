"""Locks across server processes, in Redis."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis.exceptions import LockError

from downpour.hotstate import keys

log = logging.getLogger(__name__)


@contextmanager
def restore_lock(client: Any, prefix: str, job_id: str, ttl_s: float) -> Iterator[None]:
    """Held while one process restores job ``job_id``'s store; others wait for it.

    A holder that crashes frees the lock after ``ttl_s`` seconds; a waiter gives up (with
    ``TimeoutError``) after as long.
    """
    lock = client.lock(keys.restore_lock_key(prefix, job_id), timeout=ttl_s, blocking_timeout=ttl_s)
    if not lock.acquire():
        raise TimeoutError(f"job {job_id}: another process held the restore lock too long")
    try:
        yield
    finally:
        lock.release()


#: Delete KEYS[1] only while it holds ARGV[1]: a request that outlived its flag's TTL must not
#: lower the flag of the request sent after it.
_LOWER_IF_OWNED = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


def raise_flag(client: Any, key: str, ttl_s: float) -> str | None:
    """Set ``key`` unless it is set (``SET NX PX``); the flag's token when this call set it.

    For work that must have one request in flight across processes: whoever raises the flag
    sends the request with its token, and the one doing the work lowers it
    (:func:`lower_flag`). A crashed or slow worker's flag falls after ``ttl_s``.
    """
    token = secrets.token_hex(8)
    raised = client.set(key, token.encode(), nx=True, px=max(1, round(ttl_s * 1000)))
    return token if raised else None


def lower_flag(client: Any, key: str, token: str) -> bool:
    """Lower ``key`` if it is still the flag ``token`` raised; whether it was."""
    return bool(client.eval(_LOWER_IF_OWNED, 1, key, token))


class Turn:
    """A coordinator's hold on a job: :meth:`renew` before a write that must be its alone."""

    def __init__(self, lock: Any = None) -> None:
        self._lock = lock

    def renew(self) -> bool:
        """Start the lock's TTL again; False when it expired and another worker took over
        (the turn must then write nothing more)."""
        if self._lock is None:
            return True
        try:
            self._lock.reacquire()
        except LockError:
            return False
        return True


@contextmanager
def coordinator_lock(client: Any, key: str, ttl_s: float) -> Iterator[Turn | None]:
    """Held by the one process coordinating a job; yields None (skip the turn) when another
    holds it. A crashed holder frees it after ``ttl_s``; a holder whose turn outlived that
    finds, on release, that another took over, and logs it rather than failing."""
    lock = client.lock(key, timeout=ttl_s)
    if not lock.acquire(blocking=False):
        yield None
        return
    try:
        yield Turn(lock)
    finally:
        try:
            lock.release()
        except LockError:
            log.warning("%s expired during a turn: another worker took over", key)
