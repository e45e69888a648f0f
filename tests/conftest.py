"""Shared fixtures. Personas: Alice owns the job, Bob is another researcher, Charlie donates."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from tests import services

# Property tests check results, not speed: Hypothesis's 200 ms deadline and its too-slow
# health check failed a scheduler property test on a busy machine (268 ms on a first call,
# 0.16 ms on the retry), and timings belong in bench/.
settings.register_profile("downpour", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("downpour")

#: Every test under these directories carries the marker, so none can be forgotten by
#: ``make test-fast`` (``-m "not services and not e2e and not browser and not slow"``).
MARKED_DIRECTORIES = {"e2e": "e2e", "browser": "browser", "net": "net"}


@pytest.fixture(scope="session", autouse=True)
def _kill_leftover_children() -> Iterator[None]:
    """Like hivemind's: no server, worker or agent outlives the test session."""
    yield
    # Not imported, nothing spawned; and the agent's tests run without downpour at all.
    devprocs = sys.modules.get("downpour.devprocs")
    for proc in devprocs.SPAWNED if devprocs is not None else ():
        if proc.poll() is None:
            kill_group(proc.pid)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    for item in items:
        relative = item.path.relative_to(tests_dir)
        marker = MARKED_DIRECTORIES.get(relative.parts[0]) if len(relative.parts) > 1 else None
        if marker is not None:
            item.add_marker(marker)
    # Marks added above count for -m: pytest deselects after this hook.
    if not (services.HAVE_POSTGRES and services.HAVE_REDIS):
        skip = pytest.mark.skip(
            reason="needs PostgreSQL and Redis (see tests/services.py; DATABASE_URL/REDIS_URL)"
        )
        for item in items:
            if "services" in item.keywords:
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
