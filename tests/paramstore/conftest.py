"""Redis fixtures shared by the store's Redis tests (marked ``services``).

The URL is ``tests.services.redis_url()``; without Redis the tests skip, and under
``DOWNPOUR_REQUIRE_SERVICES=1`` the run fails (see ``tests/services.py``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from tests import services


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(services.redis_url())
    yield connection
    connection.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    unique = f"downpour-test:{uuid.uuid4().hex}:"
    yield unique
    keys = list(client.scan_iter(match=unique + "*", count=1000))
    if keys:
        client.delete(*keys)
