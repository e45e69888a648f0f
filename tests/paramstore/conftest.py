"""Redis fixtures shared by the store's Redis tests: they fail, not skip, without Redis."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is unreachable at {REDIS_URL} ({exc}); start it or set REDIS_URL")
    yield connection
    connection.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    unique = f"downpour-test:{uuid.uuid4().hex}:"
    yield unique
    keys = list(client.scan_iter(match=unique + "*", count=1000))
    if keys:
        client.delete(*keys)
