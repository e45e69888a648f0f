"""The agent's small parts: URLs, backoff, the layout check, the status line, the CLI."""

from __future__ import annotations

import logging
import random
import re
import time
from pathlib import Path

import pytest
from tests.agent.fakeserver import (
    FakeServer,
    make_agent,
    run_agent,
)

from downpour_agent.cli import main
from downpour_agent.leases import LeaseRejected, check_layout
from downpour_agent.protocol import (
    VariableSpec,
)
from downpour_agent.session import Backoff, websocket_url
from downpour_agent.stats import AgentStats, PushResult

# -- small parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://localhost:8000", "ws://localhost:8000/ws/agent/"),
        ("http://localhost:8000/", "ws://localhost:8000/ws/agent/"),
        ("https://downpour.example", "wss://downpour.example/ws/agent/"),
        ("https://example.org/downpour/", "wss://example.org/downpour/ws/agent/"),
        ("HTTP://Host:1", "ws://Host:1/ws/agent/"),
    ],
)
def test_the_websocket_url_is_derived_from_the_base_url(base: str, expected: str) -> None:
    assert websocket_url(base) == expected


@pytest.mark.parametrize("base", ["ftp://host", "localhost:8000", "http://", ""])
def test_a_base_url_that_is_not_http_is_refused(base: str) -> None:
    with pytest.raises(ValueError):
        websocket_url(base)


def test_backoff_doubles_from_half_a_second_to_thirty_with_jitter() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(0))

    delays = [backoff.next_delay() for _ in range(12)]

    steps = [min(30.0, 0.5 * 2**i) for i in range(12)]
    assert all(step / 2 <= delay <= step for delay, step in zip(delays, steps, strict=True))
    assert len(set(delays)) == len(delays)


def test_backoff_starts_again_after_a_reset() -> None:
    backoff = Backoff(0.5, 30.0, random.Random(0))
    for _ in range(8):
        backoff.next_delay()

    backoff.reset()

    assert backoff.next_delay() <= 0.5


def _layout(*entries: tuple[str, tuple[int, ...]]) -> list[list[VariableSpec]]:
    return [[(name, shape, "float32") for name, shape in entries]]


def test_a_layout_naming_exactly_the_model_variables_is_accepted_in_any_shard_order() -> None:
    specs: list[VariableSpec] = [("d/kernel", (3, 4), "float32"), ("d/bias", (4,), "float32")]

    check_layout([[specs[1]], [specs[0]]], specs)


@pytest.mark.parametrize(
    ("layout", "complaint"),
    [
        (_layout(("d/kernel", (3, 4))), "missing ['d/bias']"),
        (_layout(("d/kernel", (3, 4)), ("d/bias", (4,)), ("x", (1,))), "unknown ['x']"),
        (_layout(("d/kernel", (4, 3)), ("d/bias", (4,))), "d/kernel [4, 3] vs model [3, 4]"),
        (_layout(("d/kernel", (3, 4)), ("d/bias", (4,)), ("d/bias", (4,))), "twice"),
    ],
)
def test_a_layout_that_differs_from_the_model_is_rejected_with_the_difference(
    layout: list[list[VariableSpec]], complaint: str
) -> None:
    specs: list[VariableSpec] = [("d/kernel", (3, 4), "float32"), ("d/bias", (4,), "float32")]

    with pytest.raises(LeaseRejected) as info:
        check_layout(layout, specs)

    assert complaint in str(info.value)


def test_the_status_line_shows_job_progress_speed_and_the_last_push() -> None:
    stats = AgentStats(job_id="9c4e0f21-aaaa-bbbb", steps_done=120, steps_total=500)
    stats.last_push = PushResult(
        seq=11, shard=0, version=345, staleness=2, applied=True, duplicate=False
    )

    stats.compute_s, stats.training_since = 123.45, 1000.0

    line = stats.status_line(samples_per_s=412.4, utilisation=0.8734, now=1141.4)

    assert line.startswith("job 9c4e0f21 step 120/500 412 samples/s")
    assert "push #11 v345 staleness 2 applied" in line
    assert line.endswith("utilisation=0.873 compute_s=123.45 wall_s=141.40")


async def test_status_lines_are_logged_while_training(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.INFO, logger="downpour_agent")
    server.lease_template.update(steps=30)
    server.work = [dict(server.lease_template)]
    agent = make_agent(server, tmp_path, status_interval_s=0.1, max_steps_per_second=50)

    # Execute
    await run_agent(agent)

    # Assert: the format bench/downpour_runs.py parses
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("job ")]
    assert lines
    pattern = re.compile(
        r"^job 9c4e0f21 step \d+/30 \d+ samples/s(?: .*)? utilisation=[0-9.]+ "
        r"compute_s=[0-9.]+ wall_s=[0-9.]+$"
    )
    assert all(pattern.match(line) for line in lines), lines
    assert 0 < agent.stats.compute_s < agent.stats.wall_s(time.perf_counter())


def test_join_without_a_token_exits_with_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DOWNPOUR_TOKEN", raising=False)

    code = main(["join", "http://127.0.0.1:9", "--no-nice"])

    assert code == 2
    assert "token" in capsys.readouterr().err
