"""The per-token connection cap holds for idle sockets, in-process and in Redis.

A slot lasts as long as its socket. The clock is the limits' own (``clock=``), so time
longer than ``LEASE_TTL_S`` passes without sleeping. The Redis tests run against the real
Redis (``tests.services.redis_url()``) under their own key prefix.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from tests import services
from tests.waiting import wait_for

from downpour.agents.limits import LocalLimits, start_server_refresher
from downpour.hotstate.limits import RedisLimits

CAP = 16
TOKEN = "charlie-token"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def cap(settings: Any) -> None:
    settings.MAX_CONNECTIONS_PER_TOKEN = CAP
    settings.LEASE_TTL_S = 30


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


def open_idle(limits: Any, count: int, clock: Clock, *, refresh: bool) -> list[bool]:
    """Open ``count`` sockets that never send anything, ``LEASE_TTL_S`` / 2 apart.

    ``refresh`` marks the server alive between them, as its refresher thread does.
    """
    answers = []
    for i in range(count):
        answers.append(limits.acquire_connection(TOKEN, f"socket-{i}"))
        clock.now += 15.0
        if refresh:
            limits.refresh_server()
    return answers


def test_seventeen_idle_sockets_over_several_ttls_leave_the_seventeenth_refused_in_process() -> (
    None
):
    clock = Clock()
    limits = LocalLimits(clock=clock)
    answers = open_idle(limits, CAP + 1, clock, refresh=True)
    assert answers == [True] * CAP + [False]


def test_a_released_slot_is_free_again_in_process() -> None:
    limits = LocalLimits()
    assert all(limits.acquire_connection(TOKEN, f"socket-{i}") for i in range(CAP))
    limits.release_connection(TOKEN, "socket-3")
    assert limits.acquire_connection(TOKEN, "socket-new")
    assert not limits.acquire_connection(TOKEN, "socket-newer")


@pytest.mark.services
def test_seventeen_idle_sockets_over_several_ttls_leave_the_seventeenth_refused_in_redis(
    client: redis.Redis, prefix: str
) -> None:
    clock = Clock()
    limits = RedisLimits(client, prefix, "server-a", clock=clock)
    answers = open_idle(limits, CAP + 1, clock, refresh=True)
    assert answers == [True] * CAP + [False]


@pytest.mark.services
def test_the_cap_is_shared_by_the_servers_in_redis(client: redis.Redis, prefix: str) -> None:
    clock = Clock()
    first = RedisLimits(client, prefix, "server-a", clock=clock)
    second = RedisLimits(client, prefix, "server-b", clock=clock)
    assert all(first.acquire_connection(TOKEN, f"a-{i}") for i in range(CAP // 2))
    assert all(second.acquire_connection(TOKEN, f"b-{i}") for i in range(CAP // 2))
    assert not second.acquire_connection(TOKEN, "b-over")
    first.release_connection(TOKEN, "a-0")
    assert second.acquire_connection(TOKEN, "b-over")


@pytest.mark.services
def test_a_dead_servers_slots_are_swept_in_redis(client: redis.Redis, prefix: str) -> None:
    clock = Clock()
    dead = RedisLimits(client, prefix, "server-dead", clock=clock)
    alive = RedisLimits(client, prefix, "server-alive", clock=clock)
    assert all(dead.acquire_connection(TOKEN, f"dead-{i}") for i in range(CAP - 1))
    assert alive.acquire_connection(TOKEN, "alive-0")
    assert not alive.acquire_connection(TOKEN, "alive-1")
    # The dead server stops marking itself alive; the live one keeps on.
    for _ in range(3):
        clock.now += 15.0
        alive.refresh_server()
    assert all(alive.acquire_connection(TOKEN, f"alive-{i}") for i in range(1, CAP))
    assert not alive.acquire_connection(TOKEN, "alive-over")


@pytest.mark.services
def test_the_refresher_thread_keeps_a_server_alive(client: redis.Redis, prefix: str) -> None:
    limits = RedisLimits(client, prefix, "server-a")
    stop = start_server_refresher(limits, 0.01)
    try:
        wait_for(
            lambda: client.zscore(f"{prefix}limits:servers", "server-a") is not None,
            5.0,
            "the server marked alive",
            interval=0.01,
        )
    finally:
        stop.set()


# -- the claim bucket: completed work gives its claim back --------------------------------------


def claims_answered(limits: Any, clock: Clock, *, complete: bool) -> list[bool]:
    """Twenty claims 0.05 s apart (a Sandblaster agent's small units), each completed or not."""
    answers = []
    for _ in range(20):
        allowed = limits.allow_claim("agent-1")
        answers.append(allowed)
        if allowed and complete:
            limits.refund_claim("agent-1")
        clock.now += 0.05
    return answers


@pytest.fixture
def claim_rate(settings: Any) -> None:
    settings.CLAIMS_PER_SECOND, settings.CLAIM_BURST = 2.0, 5.0


@pytest.mark.usefixtures("claim_rate")
def test_claims_that_end_in_completed_work_are_never_held_back_in_process() -> None:
    clock = Clock()
    limits = LocalLimits(clock=clock)
    assert all(claims_answered(limits, clock, complete=True))
    # ...while claims that end in no work are bounded by the burst and the rate.
    refused = LocalLimits(clock=clock)
    # The burst of 5, and 1 more refilled in the 0.95 s the claims span at 2 a second.
    assert claims_answered(refused, clock, complete=False).count(True) == 6


@pytest.mark.usefixtures("claim_rate")
def test_a_refund_never_raises_the_bucket_above_its_burst_in_process() -> None:
    clock = Clock()
    limits = LocalLimits(clock=clock)
    for _ in range(10):
        limits.refund_claim("agent-1")
    assert [limits.allow_claim("agent-1") for _ in range(6)] == [True] * 5 + [False]


@pytest.mark.services
@pytest.mark.usefixtures("claim_rate")
def test_claims_that_end_in_completed_work_are_never_held_back_in_redis(
    client: redis.Redis, prefix: str
) -> None:
    clock = Clock()
    limits = RedisLimits(client, prefix, "server-a", clock=clock)
    assert all(claims_answered(limits, clock, complete=True))
    for _ in range(10):
        limits.refund_claim("agent-1")
    assert [limits.allow_claim("agent-1") for _ in range(6)] == [True] * 5 + [False]
    refused = RedisLimits(client, prefix + "other:", "server-a", clock=clock)
    assert claims_answered(refused, clock, complete=False).count(True) == 6
