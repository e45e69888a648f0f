"""Shared fixtures. Personas: Alice owns the job, Bob is another researcher, Charlie donates."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import pytest
from tests.services import HAVE_POSTGRES, HAVE_REDIS


@pytest.fixture(scope="session", autouse=True)
def _kill_leftover_children() -> Iterator[None]:
    """Like hivemind's: no server, worker or agent outlives the test session."""
    yield
    from downpour import localrun

    for proc in localrun.SPAWNED:
        if proc.poll() is None:
            kill_group(proc.pid)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs PostgreSQL and Redis (set DATABASE_URL/REDIS_URL)")
    for item in items:
        if "services" in item.keywords and not (HAVE_POSTGRES and HAVE_REDIS):
            item.add_marker(skip)


@pytest.fixture
def alice(django_user_model):  # type: ignore[no-untyped-def]
    return django_user_model.objects.create_user("alice", password="alice-pw", is_researcher=True)


@pytest.fixture
def bob(django_user_model):  # type: ignore[no-untyped-def]
    return django_user_model.objects.create_user("bob", password="bob-pw", is_researcher=True)


@pytest.fixture
def charlie(django_user_model):  # type: ignore[no-untyped-def]
    return django_user_model.objects.create_user("charlie", password="charlie-pw", is_donor=True)


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
