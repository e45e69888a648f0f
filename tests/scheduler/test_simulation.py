"""A short, seeded run of bench/simulate.py: the real policy under churn keeps its promises."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import downpour.scheduler as scheduler

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "simulate.py"


@pytest.fixture(scope="module")
def simulate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_simulate", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(simulate: ModuleType) -> dict[str, Any]:
    args = simulate.build_parser().parse_args(
        ["--agents", "40", "--duration", "900", "--seed", "3", "--no-docs"]
    )
    return dict(simulate.run(args))


def test_it_drives_the_real_policy_not_a_copy(simulate: ModuleType) -> None:
    for name in ("pick_job", "unit_steps", "can_resume", "should_issue_backup", "credit_for_push"):
        assert getattr(simulate, name) is getattr(scheduler, name)


def test_no_unit_is_lost(result: dict[str, Any]) -> None:
    assert result["units_lost"] == 0
    assert sum(result["units_by_status"].values()) == result["units"]


def test_every_reissued_unit_completes_unless_its_job_ended_or_time_ran_out(
    result: dict[str, Any],
) -> None:
    assert result["reissued_units"] > 0, "the run should exercise reissue"
    accounted = (
        result["reissued_units_done"]
        + result["reissued_units_dropped_job_finished"]
        + result["reissued_units_open_at_end"]
    )
    assert accounted == result["reissued_units"]
    assert result["reissued_units_done"] >= result["reissued_units"] - 3


def test_an_expired_lease_is_reissued_within_ttl_plus_reap_interval_plus_a_request(
    result: dict[str, Any],
) -> None:
    assert 0 < result["lease_reissue_p95_s"] <= result["lease_reissue_max_s"] <= 30 + 5 + 10


def test_utilisation_and_fairness_are_within_their_ranges(result: dict[str, Any]) -> None:
    assert 0.0 <= result["utilisation"] <= 1.0
    assert 1 / 3 <= result["jain_index_min_window"] <= 1.0
    assert 0.0 <= result["useful_fraction"] <= 1.0


def test_agents_that_reconnect_in_time_resume_and_replays_earn_nothing(
    result: dict[str, Any],
) -> None:
    assert result["leases_resumed"] > 0
    assert result["duplicate_pushes_suppressed"] > 0


def test_the_same_seed_gives_the_same_run(simulate: ModuleType, result: dict[str, Any]) -> None:
    args = simulate.build_parser().parse_args(
        ["--agents", "40", "--duration", "900", "--seed", "3", "--no-docs"]
    )
    again = dict(simulate.run(args))
    for key in ("units", "leases", "jain_index_min_window", "utilisation", "staleness_p95"):
        assert again[key] == result[key]
