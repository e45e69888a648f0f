"""Locks across server processes, in Redis."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from downpour.hotstate import keys


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
