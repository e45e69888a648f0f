"""The benchmark scripts' headline keys (issue 11) from their runs' records."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
from tests.sim.test_convergence_sim import _load


def _run(agents: int, algorithm: str, compression: str, time_to_95: float | None) -> dict[str, Any]:
    return {
        "config": {
            "model": "large",
            "agents": agents,
            "algorithm": algorithm,
            "compression": compression,
        },
        "time_to_95_s": time_to_95,
        "agent_logs": {f"a{i}": {"utilisation": 0.5 + 0.1 * i} for i in range(agents)},
    }


def test_downpour_runs_headline_keys_name_the_new_defaults_without_a_suffix() -> None:
    runs = _load("downpour_runs")
    result = {
        "settings": {"link": "cable"},
        "runs": [
            _run(1, "downpour", "none", 200.0),
            _run(2, "downpour", "none", 220.0),
            _run(1, "local-steps", "int8", 50.0),
            _run(2, "local-steps", "int8", 35.0),
            {"config": {"model": "large", "agents": 1}, "error": "RuntimeError: boom"},
        ],
    }

    keys = runs.headline_keys(result)

    assert keys == {
        "agent_utilisation_large_cable_downpour_none": 0.5,
        "ratio_time_to_95_2_agents_vs_1_agent_large_cable_downpour_none": 1.1,
        "agent_utilisation_large_cable": 0.5,
        "ratio_time_to_95_2_agents_vs_1_agent_large_cable": 0.7,
    }


def test_agents_capped_in_steps_per_second_get_keys_of_their_own() -> None:
    runs = _load("downpour_runs")
    result = {
        "settings": {"link": "cable", "agent_steps_per_second": 60.0},
        "runs": [_run(1, "local-steps", "int8", 10.0), _run(2, "local-steps", "int8", 7.0)],
    }
    assert runs.headline_keys(result) == {
        "agent_utilisation_large_cable_capped60": 0.5,
        "ratio_time_to_95_2_agents_vs_1_agent_large_cable_capped60": 0.7,
    }


def test_a_run_that_missed_95_percent_gives_no_ratio() -> None:
    runs = _load("downpour_runs")
    result = {
        "settings": {"link": "cable"},
        "runs": [_run(1, "downpour", "none", None), _run(2, "downpour", "none", 10.0)],
    }
    assert (
        runs.headline_keys(result)["ratio_time_to_95_2_agents_vs_1_agent_large_cable_downpour_none"]
        is None
    )


def test_wire_bytes_divides_each_variant_by_todays_defaults() -> None:
    wire = _load("wire_bytes")

    def run(variant: str, per_sample: float, accuracy: float) -> dict[str, Any]:
        return {"variant": variant, "bytes_per_sample": per_sample, "final_accuracy": accuracy}

    summary = wire.summarise(
        [
            run("downpour:none", 40_000.0, 0.95),
            run("downpour:int8", 10_000.0, 0.96),
            run("local-steps:int8", 1_000.0, 0.948),
            run("local-steps:int8", 3_000.0, 0.950),
        ],
        "large",
    )

    assert summary["wire_bytes_per_sample_reduction_large_int8_delta"] == 4.0
    assert summary["wire_bytes_per_sample_reduction_large"] == 20.0  # 40,000 / mean 2,000
    assert summary["accuracy_gap_new_vs_fp32_large"] == 0.001
    assert summary["accuracy_gap_int8_delta_vs_fp32_large"] == -0.01
    assert wire.summarise([run("local-steps:int8", 1.0, 0.9)], "large") == {}


def test_a_variant_outside_the_benchmarked_algorithms_and_compressions_is_refused() -> None:
    wire = _load("wire_bytes")
    assert wire.parse_variant("local-steps:int8") == "local-steps:int8"
    for bad in ("foo:bar", "downpour", "downpour:int4", "sync:none", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            wire.parse_variant(bad)


def test_small_vs_fit_headline_is_the_fastest_modes_median_over_rounds_that_reached_95() -> None:
    small = _load("small_vs_fit")
    rounds = [
        {"ratios": {"local_steps_none": 1.6, "downpour_none": 1.9}},
        {"ratios": {"local_steps_none": 1.0, "downpour_none": 2.9}},
        {"ratios": {"local_steps_none": 0.7, "downpour_none": None}},
        {"ratios": {"local_steps_none": None, "downpour_none": 3.3}},
    ]

    summary = small.summarise(rounds, ["small:1:4:4:local-steps", "small:1:4:4"])

    assert summary["by_mode"]["local_steps_none"] == {
        "ratios": [1.6, 1.0, 0.7],
        "median": 1.0,
        "missed_95": 1,
    }
    assert summary["by_mode"]["downpour_none"]["median"] == 2.9
    assert summary["best_mode"] == "local_steps_none"
    assert summary["ratio_time_to_95_1_agent_vs_keras_fit_small"] == 1.0


def test_small_vs_fit_has_no_headline_when_no_round_reached_95() -> None:
    small = _load("small_vs_fit")
    summary = small.summarise([{"ratios": {"downpour_none": None}}], ["small:1:4:4"])
    assert summary["best_mode"] is None
    assert summary["ratio_time_to_95_1_agent_vs_keras_fit_small"] is None


def test_small_vs_fit_merges_its_headline_and_target_beside_other_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    small = _load("small_vs_fit")
    latest = tmp_path / "latest.json"
    latest.write_text('{"sim_speedup_16_donors": 3.83, "targets": {"sim_speedup_16_donors": {}}}')
    result = {
        "finished_at": "2026-12-03T23:19:22+00:00",
        "settings": {"eval_interval_s": 0.1},
        "rounds": [{"ratios": {"local_steps_none": 1.2}}],
        **small.summarise(
            [{"ratios": {"local_steps_none": 1.2, "downpour_none": 3.0}}],
            ["small:1:4:4:local-steps", "small:1:4:4"],
        ),
    }

    small.merge_latest(result, latest)

    data = json.loads(latest.read_text())
    assert data["sim_speedup_16_donors"] == 3.83 and "sim_speedup_16_donors" in data["targets"]
    assert data["ratio_time_to_95_1_agent_vs_keras_fit_small"] == 1.2
    assert data["ratio_time_to_95_1_agent_vs_keras_fit_small_downpour_none"] == 3.0
    target = data["targets"]["ratio_time_to_95_1_agent_vs_keras_fit_small"]
    assert target["value"] == 1.2 and target["met"] is True and target["target"] == "<= 1.5"


def test_a_target_entry_compares_either_way_and_refuses_other_comparisons() -> None:
    bench = _load("benchlib")
    assert bench.target_entry(1.2, "<=", 1.5, "w") == {
        "target": "<= 1.5",
        "value": 1.2,
        "met": True,
        "what": "w",
    }
    assert bench.target_entry(3.83, ">=", 6, "w")["met"] is False
    assert bench.target_entry(None, ">=", 6, "w")["met"] is None
    with pytest.raises(ValueError, match=">= or <="):
        bench.target_entry(1.0, "<", 2.0, "w")
