"""Login throttling: after too many failed logins, refuse even the right password for a while.

Failures are counted in the cache (Redis in production, so every server process shares
them) under two keys: the username with the client's address, and the address alone. A
guesser is stopped on one account and, more slowly, across accounts; someone else's
failures from another address do not lock a user out.
"""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.cache import cache


def _keys(username: str, address: str) -> tuple[str, str]:
    who = hashlib.sha256(f"{username.strip().lower()}|{address}".encode()).hexdigest()
    return f"login-failures:user:{who}", f"login-failures:addr:{address}"


def locked_out(username: str, address: str) -> bool:
    user_key, addr_key = _keys(username, address)
    counts = cache.get_many([user_key, addr_key])
    return (
        counts.get(user_key, 0) >= settings.LOGIN_FAILURES_PER_USER
        or counts.get(addr_key, 0) >= settings.LOGIN_FAILURES_PER_ADDRESS
    )


def record_failure(username: str, address: str) -> None:
    """Count one failure; the cool-off runs from the first failure of the window."""
    for key in _keys(username, address):
        # add() then incr() is atomic on Redis, so concurrent guesses are all counted.
        cache.add(key, 0, timeout=settings.LOGIN_COOLOFF_S)
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.add(key, 1, timeout=settings.LOGIN_COOLOFF_S)


def record_success(username: str, address: str) -> None:
    cache.delete(_keys(username, address)[0])
