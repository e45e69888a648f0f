"""``donors.actions.register_agent``: a token registers at most ``MAX_AGENTS_PER_TOKEN`` agents.

Charlie donates; his token's agents are what the cap counts. The websocket side (the
``too_many_agents`` error and the close) is in ``tests/e2e/test_consumer.py``.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connections

from downpour.donors.actions import TooManyAgents, register_agent, register_reported_agent
from downpour.donors.models import Agent, AgentToken

pytestmark = pytest.mark.django_db


@pytest.fixture
def token(charlie: Any) -> AgentToken:
    return AgentToken.issue(charlie, "charlie's PCs")[0]


def test_a_token_registers_agents_up_to_the_cap_and_no_further(
    token: AgentToken, settings: Any
) -> None:
    # Prepare
    settings.MAX_AGENTS_PER_TOKEN = 3
    for i in range(3):
        register_agent(token, f"pc-{i}", {"cpu_cores": 4})

    # Execute / Assert
    with pytest.raises(TooManyAgents, match=r"already has 3 agents.*--name"):
        register_agent(token, "pc-3", {"cpu_cores": 4})
    assert sorted(Agent.objects.filter(token=token).values_list("name", flat=True)) == [
        "pc-0",
        "pc-1",
        "pc-2",
    ]


def test_an_agent_registered_before_registers_again_at_the_cap_and_is_updated(
    token: AgentToken, settings: Any
) -> None:
    # Prepare
    settings.MAX_AGENTS_PER_TOKEN = 2
    first = register_agent(token, "pc-0", {"cpu_cores": 4, "connected": False})
    register_agent(token, "pc-1", {})

    # Execute
    again = register_agent(token, "pc-0", {"cpu_cores": 8, "connected": True})

    # Assert: the same row, updated, and still two agents.
    assert again.id == first.id
    assert (again.cpu_cores, again.connected) == (8, True)
    assert Agent.objects.filter(token=token).count() == 2


def test_each_token_has_its_own_cap(token: AgentToken, charlie: Any, settings: Any) -> None:
    # Prepare
    settings.MAX_AGENTS_PER_TOKEN = 1
    other, _ = AgentToken.issue(charlie, "charlie's laptop")
    register_agent(token, "pc", {})

    # Execute
    laptop = register_agent(other, "pc", {})

    # Assert
    assert laptop.token_id == other.id
    with pytest.raises(TooManyAgents):
        register_agent(token, "another-pc", {})


@pytest.mark.services  # row locks: SQLite has none to test
@pytest.mark.django_db(transaction=True)
def test_concurrent_registrations_of_new_names_never_pass_the_cap(
    token: AgentToken, settings: Any
) -> None:
    # Prepare: two places left, eight servers registering new names at the same moment.
    settings.MAX_AGENTS_PER_TOKEN = 5
    for i in range(3):
        register_agent(token, f"old-{i}", {})
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def register(i: int) -> None:
        try:
            start.wait()
            register_agent(token, f"new-{i}", {})
            outcomes.append("registered")
        except TooManyAgents:
            outcomes.append("refused")
        finally:
            connections.close_all()

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    # Assert
    assert sorted(outcomes) == ["refused"] * 6 + ["registered"] * 2
    assert Agent.objects.filter(token=token).count() == 5


def test_the_gpu_settings_an_agent_reports_are_stored(token: AgentToken) -> None:
    # What a desktop agent computing on its second GPU, capped at 4 GiB, sends.
    device = {
        "gpu_name": "NVIDIA GeForce RTX 3060",
        "gpu_memory_bytes": 12 << 30,
        "gpu_device": "/physical_device:GPU:1",
        "gpu_count": 2,
        "gpu_memory_limit_mb": 4096,
        "gpu_memory_growth": False,
    }

    agent = register_reported_agent(token, "gamer", device)

    agent.refresh_from_db()
    assert agent.gpu_name == "NVIDIA GeForce RTX 3060" and agent.gpu_memory_bytes == 12 << 30
    assert agent.gpu_device == "/physical_device:GPU:1"
    assert (agent.gpu_count, agent.gpu_memory_limit_mb, agent.gpu_memory_growth) == (
        2,
        4096,
        False,
    )


def test_gpu_settings_that_do_not_fit_are_dropped(token: AgentToken) -> None:
    device = {
        "gpu_device": "GPU:\x00" + "x" * 300,
        "gpu_count": 2.5,
        "gpu_memory_limit_mb": 1 << 40,
        "gpu_memory_growth": "yes",
    }

    agent = register_reported_agent(token, "odd", device)

    agent.refresh_from_db()
    assert agent.gpu_device == "GPU:" + "x" * 196
    assert agent.gpu_count is None and agent.gpu_memory_limit_mb is None
    assert agent.gpu_memory_growth is None


def test_an_agent_without_a_gpu_registers_null_gpu_settings(token: AgentToken) -> None:
    device = {
        "gpu_device": None,
        "gpu_count": 0,
        "gpu_memory_limit_mb": None,
        "gpu_memory_growth": None,
    }

    agent = register_reported_agent(token, "laptop", device)

    agent.refresh_from_db()
    assert (agent.gpu_device, agent.gpu_count, agent.gpu_memory_growth) == ("", 0, None)
