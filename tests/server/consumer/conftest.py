"""Fixtures of the in-process socket tests (the embedded default, a donor's token, a socket)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import connections
from tests.server.consumer.client import (
    REPLY_TIMEOUT_S,
    Agents,
    Socket,
    forget_backends,
    open_socket,
)
from tests.server.helpers import job_params

from downpour.donors.models import AgentToken
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.models import Job


@pytest.fixture(autouse=True)
def embedded(settings: Any) -> Iterator[None]:
    """The embedded default: in-memory channel layer, store and connection limits."""
    settings.REDIS_URL = ""
    settings.EMBEDDED = True
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    forget_backends()
    yield
    forget_backends()


@pytest.fixture
def token(charlie: Any) -> str:
    _, secret = AgentToken.issue(charlie, "pc")
    return str(secret)


@pytest.fixture
def running_job(alice: Any, dataset: Any) -> Job:
    """A started job of two parameter shards, never spot-checked (the check is random)."""
    job = submit_job(alice, dataset, job_params(spot_check_fraction=0.0))
    assert start_job(job)
    job.refresh_from_db()
    return job


@pytest.fixture
async def socket(token: str) -> AsyncIterator[Socket]:
    """Charlie's agent, connected and not yet registered."""
    communicator, connected, _ = await open_socket(token)
    assert connected
    yield Socket(communicator)
    await communicator.disconnect(timeout=REPLY_TIMEOUT_S)
    # The consumer's thread keeps its connection (CONN_MAX_AGE); the flush needs it gone.
    await database_sync_to_async(connections.close_all)()


@pytest.fixture
async def registered(socket: Socket) -> Socket:
    assert (await socket.register())["type"] == "registered"
    return socket


@pytest.fixture
async def agents(token: str) -> AsyncIterator[Agents]:
    """``await agents(n)``: n registered agents of Charlie's token, pc-0 ... pc-(n-1)."""
    opened: list[Any] = []

    async def open_agents(n: int) -> list[Socket]:
        sockets = []
        for i in range(n):
            communicator, connected, _ = await open_socket(token)
            assert connected
            opened.append(communicator)
            socket = Socket(communicator)
            assert (await socket.register(name=f"pc-{i}"))["type"] == "registered"
            sockets.append(socket)
        return sockets

    yield open_agents
    for communicator in opened:
        await communicator.disconnect(timeout=REPLY_TIMEOUT_S)
    await database_sync_to_async(connections.close_all)()
