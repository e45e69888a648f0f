"""The desktop agent as a donor runs it: a real ``downpour-agent join`` with its status
page, against a real production stack, driven by a real X server's idle time and by the
``downpour-agent pause`` / ``resume`` commands."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from tests.desktop.conftest import press_key

from downpour.devprocs import BIN, process_env, stop
from downpour_agent.desktop import settings as cfg
from downpour_agent.desktop import status as st
from downpour_agent.desktop.statuspage import call

from .stack import FAST_LEASES, Stack, held, running, wait_registered

pytestmark = [pytest.mark.services, pytest.mark.desktop]

#: FAST_LEASES' timings with a TTL long enough that a short pause (two CLI calls of 1-2 s
#: each on a busy machine, around two heartbeats) fits well inside it.
LEASE_TTL_S = 8.0
IDLE_AFTER_S = 3.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = Path(tmp_path_factory.mktemp("desktop"))
    timings = {**FAST_LEASES, "LEASE_TTL_S": str(int(LEASE_TTL_S))}
    # Units of 20 s at the agents' 2 steps/s (start_desktop_agent): 40 steps.
    with running("production", workdir, **timings, UNIT_TARGET_SECONDS="20") as started:
        yield started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_desktop_agent(stack: Stack, name: str, token: str, job_id: str, *flags: str) -> None:
    """``downpour-agent join`` with its status page on a free port, registered before the job
    runs (``held``); ``flags`` go after the harness's ``--mode always``."""
    cfg.save(cfg.Settings(status_port=free_port()), stack.agent_config(name))
    with held(stack, job_id):
        # Slow enough that a lease lasts through the pauses below: the first unit (20 steps)
        # takes 10 s. At 10 steps/s it took 2 s and, on a busy machine, ended before a
        # ``pause`` command (1-3 s) landed, so the lease was "completed", not paused.
        stack.start_agent(name, token, "--max-steps-per-second", "2", *flags, status_page=True)
        wait_registered(stack, name)


def agent_cli(stack: Stack, name: str, *args: str) -> str:
    """Run ``downpour-agent ARGS`` as the donor would, against agent ``name``."""
    done = subprocess.run(
        [str(BIN / "downpour-agent"), *args],
        env=process_env(stack.agent_env(name)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def page_status(stack: Stack, name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The agent's status page answer, as ``downpour-agent status --json`` reads it, without
    a process start per poll (the timings below are under a second)."""
    monkeypatch.setenv(cfg.CONFIG_ENV, str(stack.agent_config(name)))
    return call("/api/status")


def pushing_lease(stack: Stack, name: str, job_id: str) -> tuple[str, str]:
    """The id and unit of agent ``name``'s active lease, once a push on it was accepted."""
    rows = stack.wait_for(
        f"{name} to push on a lease",
        lambda: stack.query(
            "SELECT l.id, l.unit_id FROM training_lease l JOIN donors_agent a ON l.agent_id = a.id "
            "JOIN training_workunit u ON l.unit_id = u.id WHERE a.name = %s "
            "AND l.status = 'active' AND l.pushes_accepted > 0 AND u.job_id = %s",
            [name, job_id],
        ),
        timeout=120,
    )
    return str(rows[0][0]), str(rows[0][1])


def lease_row(stack: Stack, lease_id: str) -> dict[str, Any]:
    status, pushes, heartbeat_at = stack.query(
        "SELECT status, pushes_accepted, heartbeat_at FROM training_lease WHERE id = %s",
        [lease_id],
    )[0]
    return {"status": status, "pushes_accepted": pushes, "heartbeat_at": heartbeat_at}


def stop_agent(stack: Stack, name: str) -> None:
    """SIGTERM, as Ctrl-C or the service manager stops it: the agent hands its lease back."""
    stop([stack.agents[name]], sig=signal.SIGTERM, grace=30)
    assert stack.agents[name].returncode == 0, (stack.workdir / f"{name}.log").read_text()


def db_now(stack: Stack) -> datetime:
    return stack.query("SELECT now()")[0][0]  # type: ignore[no-any-return]


def books_agree(stack: Stack, job_id: str) -> None:
    """Each accepted push is one push id in the store's applied sets: the two agree only if
    no push was applied twice, nor applied without being counted.

    Checked once the agent's lease went back (the server records a lease's push counts when
    it ends, and otherwise only as more pushes arrive) and before the job finishes (which
    frees the store).
    """
    stack.wait_for(
        "the store's applied push ids to match the accepted pushes",
        lambda: stack.store_applied_ids(job_id) == stack.job(job_id)["pushes_accepted"],
        timeout=20,
    )
    assert stack.job(job_id)["pushes_accepted"] > 0


def finishes(stack: Stack, job_id: str) -> None:
    stack.wait_for("the job to finish", lambda: stack.job(job_id)["status"] in ("done", "failed"))
    assert stack.job(job_id)["status"] == "done", stack.logs()


def test_a_lease_survives_a_pause_shorter_than_its_ttl(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    seeded = stack.seed(target_accuracy=1.0, budget_seconds=40, name="digits-short-pause")
    job_id = seeded["job_id"]
    start_desktop_agent(stack, "short", seeded["token"], job_id)
    lease_id, _ = pushing_lease(stack, "short", job_id)

    # Execute: pause through two heartbeats, then resume
    agent_cli(stack, "short", "pause")
    paused_at = db_now(stack)
    paused = stack.wait_for(
        "the page to show the pause",
        lambda: (s := page_status(stack, "short", monkeypatch))["state"] == st.PAUSED and s,
    )
    assert paused["reason"] == st.BY_DONOR
    stack.wait_for(
        "heartbeats to go on during the pause",
        lambda: (
            (lease_row(stack, lease_id)["heartbeat_at"] or paused_at)
            >= paused_at + timedelta(seconds=2)
        ),
        timeout=LEASE_TTL_S,
    )
    pushes_paused = lease_row(stack, lease_id)["pushes_accepted"]
    assert "computing" in agent_cli(stack, "short", "resume")
    resumed_at = db_now(stack)

    # Assert: the same lease, still active, goes on being pushed to
    assert resumed_at - paused_at < timedelta(seconds=LEASE_TTL_S)
    stack.wait_for(
        "pushes on the same lease after the pause",
        lambda: lease_row(stack, lease_id)["pushes_accepted"] > pushes_paused,
        timeout=60,
    )
    assert lease_row(stack, lease_id)["status"] == "active"
    assert "paused for longer than lease" not in (stack.workdir / "short.log").read_text()
    # Stopped (Ctrl-C), the agent hands the lease back: now the books can be compared.
    stop_agent(stack, "short")
    assert lease_row(stack, lease_id)["status"] == "returned"
    books_agree(stack, job_id)


def test_a_pause_longer_than_the_lease_hands_it_back_and_its_unit_is_reissued(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    seeded = stack.seed(target_accuracy=1.0, budget_seconds=80, name="digits-long-pause")
    job_id = seeded["job_id"]
    start_desktop_agent(stack, "long", seeded["token"], job_id)
    lease_id, unit_id = pushing_lease(stack, "long", job_id)

    # Execute: pause until the agent hands the lease back, then resume
    agent_cli(stack, "long", "pause")
    stack.wait_for(
        "the agent to hand its lease back",
        lambda: lease_row(stack, lease_id)["status"] != "active",
        timeout=LEASE_TTL_S + 30,
    )
    returned = lease_row(stack, lease_id)
    books_agree(stack, job_id)
    agent_cli(stack, "long", "resume")

    # Assert: returned by the agent (not expired by the reaper), the unit leased again,
    # nothing pushed on the old lease after it went back, and the job finishes
    assert returned["status"] == "returned"
    stack.wait_for(
        "the unit to be leased again",
        lambda: (
            stack.query(
                "SELECT COUNT(*) FROM training_lease WHERE unit_id = %s AND id <> %s",
                [unit_id, lease_id],
            )[0][0]
            >= 1
        ),
        timeout=60,
    )
    assert page_status(stack, "long", monkeypatch)["reason"] != st.BY_DONOR
    # Once work went on on the reissued unit, a second long pause hands that lease back too,
    # and the books are compared again.
    stack.wait_for(
        "pushes on the reissued unit",
        lambda: (
            stack.query(
                "SELECT COUNT(*) FROM training_lease WHERE unit_id = %s AND id <> %s "
                "AND pushes_accepted > 0",
                [unit_id, lease_id],
            )[0][0]
            >= 1
        ),
        timeout=60,
    )
    agent_cli(stack, "long", "pause")
    stack.wait_for(
        "the reissued unit's lease to go back",
        lambda: (
            stack.query(
                "SELECT COUNT(*) FROM training_lease WHERE unit_id = %s AND status = 'returned'",
                [unit_id],
            )[0][0]
            >= 2
        ),
        timeout=LEASE_TTL_S + 30,
    )
    books_agree(stack, job_id)
    agent_cli(stack, "long", "resume")
    finishes(stack, job_id)
    assert lease_row(stack, lease_id)["pushes_accepted"] == returned["pushes_accepted"]
    assert "paused for longer than lease" in (stack.workdir / "long.log").read_text()
    stack.kill_agent("long")


def test_an_idle_agent_pauses_within_a_second_of_a_key_press_and_resumes_after_the_idle_time(
    stack: Stack, xvfb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: an agent in mode "idle" under a private X server nobody has touched
    seeded = stack.seed(target_accuracy=1.0, budget_seconds=60, name="digits-idle")
    job_id = seeded["job_id"]
    idle_after = str(IDLE_AFTER_S)
    start_desktop_agent(
        stack, "idler", seeded["token"], job_id, "--mode", "idle", "--idle-after", idle_after
    )
    pushing_lease(stack, "idler", job_id)
    computing = stack.wait_for(
        "the idle agent to compute",
        lambda: (s := page_status(stack, "idler", monkeypatch))["state"] == st.COMPUTING and s,
    )
    assert computing["settings"]["mode"] == "idle"

    # Execute: the person presses a key; watch the page until the agent works again
    seen: list[tuple[float, dict[str, Any]]] = []
    before_press = time.monotonic()
    press_key(xvfb)
    after_press = time.monotonic()
    while time.monotonic() < after_press + IDLE_AFTER_S + 10:
        seen.append((time.monotonic(), page_status(stack, "idler", monkeypatch)))
        if seen[-1][1]["state"] == st.COMPUTING and seen[-1][0] > after_press + 1.0:
            break
        time.sleep(0.02)

    # Assert
    paused = [(t, s) for t, s in seen if s["state"] == st.PAUSED]
    assert paused, "never paused"
    assert paused[0][0] - before_press <= 1.0, f"paused {paused[0][0] - before_press:.2f} s late"
    assert {s["reason"] for _, s in paused} == {st.PERSON_ACTIVE}
    resumed_at, resumed = seen[-1]
    assert resumed["state"] == st.COMPUTING, "never resumed"
    assert before_press + IDLE_AFTER_S <= resumed_at <= after_press + IDLE_AFTER_S + 1.0
    stack.wait_for(
        "steps after the pause",
        lambda: (
            page_status(stack, "idler", monkeypatch)["steps_done"] > paused[-1][1]["steps_done"]
            or page_status(stack, "idler", monkeypatch)["lease_id"] != paused[-1][1]["lease_id"]
        ),
        timeout=30,
    )
    stack.kill_agent("idler")
