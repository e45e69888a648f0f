"""The convergence simulator's building blocks, and a tiny run that is the same every time."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from downpour.teacher import teacher_data

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world() -> ModuleType:
    return _load("simworld")


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    return _load("convergence_sim")


# -- virtual time ------------------------------------------------------------------------------


def test_events_run_in_time_order_and_ties_in_the_order_they_were_scheduled(
    world: ModuleType,
) -> None:
    queue, ran = world.EventQueue(), []
    for t, name in [(2.0, "c"), (1.0, "a"), (2.0, "d"), (1.0, "b"), (0.5, "first")]:
        queue.at(t, lambda name=name: ran.append((queue.now, name)))
    queue.run(until=10.0)
    assert ran == [(0.5, "first"), (1.0, "a"), (1.0, "b"), (2.0, "c"), (2.0, "d")]


def test_an_event_can_schedule_another_and_the_run_stops_at_the_horizon(world: ModuleType) -> None:
    queue, ran = world.EventQueue(), []

    def tick() -> None:
        ran.append(queue.now)
        queue.at(queue.now + 1.0, tick)

    queue.at(0.0, tick)
    queue.run(until=3.5)
    assert ran == [0.0, 1.0, 2.0, 3.0] and len(queue) == 1


def test_nothing_can_be_scheduled_in_the_past(world: ModuleType) -> None:
    queue = world.EventQueue()
    queue.at(1.0, lambda: queue.at(0.5, lambda: None))
    with pytest.raises(ValueError, match="before now"):
        queue.run(until=2.0)


# -- links ------------------------------------------------------------------------------------


def test_a_message_takes_its_bytes_over_the_bandwidth_plus_half_the_round_trip(
    world: ModuleType,
) -> None:
    cable = world.PROFILES["cable"]
    assert (cable.down_mbit, cable.up_mbit, cable.rtt_s) == (100.0, 20.0, 0.025)
    up = world.Channel(cable, up=True)
    serialise = 25_000 * (1514 / 1448) * 8 / 20e6  # 10.46 ms for 25 kB at 20 Mbit/s
    assert up.send(1.0, 25_000) == pytest.approx(1.0 + serialise + 0.0125)


def test_messages_queue_behind_each_other_on_one_direction_only(world: ModuleType) -> None:
    dsl = world.PROFILES["dsl"]
    up, down = world.Channel(dsl, up=True), world.Channel(dsl, up=False)
    one = dsl.transfer_s(50_000, up=True)
    first, second = up.send(0.0, 50_000), up.send(0.0, 50_000)
    assert second - first == pytest.approx(one)
    assert down.send(0.0, 50_000) == pytest.approx(dsl.transfer_s(50_000, up=False) + 0.02)
    assert up.bytes_sent == 100_000


def test_the_push_size_is_the_real_frame_of_the_shard_s_float32_gradient(
    world: ModuleType,
) -> None:
    specs = [("dense/kernel", (32, 64)), ("dense/bias", (64,))]
    size = world.push_frame_bytes(specs, 2)
    assert 4 * (32 * 64 + 64) < size < 4 * (32 * 64 + 64) + 600


# -- donors and churn ---------------------------------------------------------------------------


def test_thirty_percent_of_donors_churn_and_each_leaves_and_comes_back(world: ModuleType) -> None:
    donors = world.Population(speed=1000.0).draw(64, 3600.0, seed=0)
    churners = [d for d in donors if d.churner]
    assert len(churners) == round(0.3 * 63)
    for donor in churners:
        assert len(donor.sessions) >= 2
        for (_, end), (start, _) in zip(donor.sessions, donor.sessions[1:], strict=False):
            assert start > end  # away between sessions
    assert all(d.sessions == [(d.sessions[0][0], 3600.0)] for d in donors if not d.churner)


def test_more_donors_only_add_to_the_same_population(world: ModuleType) -> None:
    population = world.Population(speed=1000.0)
    small, big = population.draw(16, 600.0, seed=3), population.draw(64, 600.0, seed=3)
    assert [(d.link, d.speed, d.sessions) for d in small] == [
        (d.link, d.speed, d.sessions) for d in big[:16]
    ]
    reference = big[0]
    assert reference.link.name == "cable" and reference.speed == 1000.0
    assert not reference.churner
    assert {d.link.name for d in big} == {"lan", "fibre", "cable", "dsl"}
    assert all(500.0 <= d.speed <= 2000.0 for d in big)


# -- gradients and runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student(sim: ModuleType) -> Any:
    return sim.Student(sim.JobSettings(n_data_shards=4), teacher_data(4_000, 1_000))


def test_the_numpy_gradient_is_the_agent_s_keras_gradient(student: Any) -> None:
    x, y = student.data.x_train[:32], student.data.y_train[:32]
    weights = {k: v + np.float32(0.01) for k, v in student.initial.items()}
    student.load(weights, (0, 0))
    student.computer.set_weights(weights)
    ours = student.gradients(x, y)
    keras, _loss = student.computer.compute(x, y)
    for name, grad in keras.items():
        np.testing.assert_allclose(ours[name], grad, atol=2e-6, rtol=1e-4)


def _tiny_run(sim: ModuleType, student: Any, world: ModuleType, **changes: Any) -> dict[str, Any]:
    settings = sim.JobSettings(n_data_shards=4, target_accuracy=0.6, **changes)
    donors = world.Population(speed=4000.0).draw(3, 30.0, seed=1)
    run = sim.Simulation(
        student, donors, settings, sim.Calibration(speed=4000.0), horizon_s=30.0, max_steps=600
    ).run()
    run.pop("wall_s")
    return dict(run)


def test_a_tiny_run_is_the_same_for_the_same_seed(
    sim: ModuleType, student: Any, world: ModuleType
) -> None:
    first, again = _tiny_run(sim, student, world), _tiny_run(sim, student, world)
    assert first == again
    assert first["pushes_applied"] > 0 and first["steps"] > 0
    assert first["time_to_target_s"] is not None  # 0.6 is reached within 600 steps
    other = _tiny_run(sim, student, world, seed=5)
    assert other["curve"] != first["curve"]


def test_a_tight_staleness_bound_rejects_pushes_through_the_real_store(
    sim: ModuleType, student: Any, world: ModuleType
) -> None:
    loose = _tiny_run(sim, student, world)
    tight = _tiny_run(sim, student, world, max_staleness=0, n_fetch=8)
    assert loose["pushes_stale"] == 0
    assert tight["pushes_stale"] > 0


def test_a_donor_that_leaves_stops_computing_and_loses_what_was_in_flight(
    sim: ModuleType, student: Any, world: ModuleType
) -> None:
    cal = sim.Calibration(speed=4000.0, build_s=0.0)
    leaver = world.DonorSpec(0, world.PROFILES["dsl"], 4000.0, [(0.0, 0.5)], True)
    settings = sim.JobSettings(n_data_shards=4, target_accuracy=1.0)
    run = sim.Simulation(student, [leaver], settings, cal, horizon_s=5.0).run()
    step_s = 32 / 4000.0 + cal.step_overhead_s
    assert 0 < run["steps"] < 0.5 / step_s
    assert run["pushes_lost"] >= 1


def test_the_report_merges_its_keys_and_targets_and_keeps_everything_else(
    tmp_path: Path,
) -> None:
    report = _load("sim_report")
    path = tmp_path / "latest.json"
    path.write_text('{"other_key": 1.5, "targets": {"other_key": {"target": "<= 2"}}}')
    report.merge_results({"sim_speedup_16_donors": 3.83, "sim_speedup_64_donors": None}, path)
    data = json.loads(path.read_text())
    assert data["other_key"] == 1.5 and data["targets"]["other_key"] == {"target": "<= 2"}
    assert data["sim_speedup_16_donors"] == 3.83
    assert data["targets"]["sim_speedup_16_donors"]["met"] is False
    assert data["targets"]["sim_speedup_64_donors"]["met"] is None


def test_a_unit_capped_at_epochs_covers_that_many_passes_over_its_shard(sim: ModuleType) -> None:
    uncapped = sim.JobSettings()
    capped = sim.JobSettings(max_unit_epochs=4)
    # 30 s at 12,000 samples/s is 11,250 steps of 32: 46 passes over a 7,813-sample shard.
    assert sim.sim_unit_steps(uncapped, 12_000.0, 7_813) == 11_250
    assert sim.sim_unit_steps(capped, 12_000.0, 7_813) == 977  # ceil(4 * 7,813 / 32)
    # A shard a unit cannot pass over four times leaves the unit as the scheduler sized it.
    assert sim.sim_unit_steps(capped, 12_000.0, 1_000_000) == 11_250


def test_the_report_takes_the_median_over_the_first_sweeps_seeds_counting_misses() -> None:
    report = _load("sim_report")

    def sweep(seed: int, shards: int, t16: float | None, t1: float | None = 50.0) -> Any:
        settings = {"seed": seed, "n_data_shards": shards, "target_accuracy": 0.9}
        settings["argv"] = ["--seed", str(seed), "--json-out", f"s{seed}.json"]
        runs = [
            {"donors": 1, "time_to_target_s": t1, "speedup": 1.0 if t1 else None},
            {"donors": 16, "time_to_target_s": t16, "speedup": t1 / t16 if t1 and t16 else None},
        ]
        return {"settings": settings, "runs": runs}

    seeds = [sweep(0, 8, 5.0), sweep(1, 8, 10.0), sweep(2, 8, 4.0)]
    other = sweep(0, 64, 0.5)  # another configuration: not one of the seeds
    assert report.median_speedup([*seeds, other], 16) == 10.0
    # A seed whose 16 donors missed counts as the worst, not as absent: (0, 5, 10, 12.5).
    assert report.median_speedup([*seeds, sweep(3, 8, None)], 16) == 7.5
    # Without a one-donor baseline a seed says nothing.
    assert report.median_speedup([*seeds, sweep(4, 8, 1.0, t1=None)], 16) == 10.0
    assert report.median_speedup([sweep(0, 8, None, t1=None)], 16) is None
    assert report.same_configuration(seeds[0]["settings"], seeds[1]["settings"])
    assert not report.same_configuration(seeds[0]["settings"], other["settings"])
    quick = {**seeds[1]["settings"], "argv": ["--seed", "1", "--quick"]}
    assert not report.same_configuration(seeds[0]["settings"], quick)  # argv differs
    assert report.keys_description(seeds) == " to 90%, 8 data shards, median of seeds 0, 1, 2"
    calibrated = sweep(0, 8, 5.0)
    calibrated["settings"]["argv"] += ["--calibration", "c.json"]
    assert "8 data shards, measured calibration, median of seeds 0" in report.keys_description(
        [calibrated]
    )
    assert report._calibrated({"argv": ["--calibration=c.json"]})
    # The plot draws one line a configuration: the seeds' median, their least and greatest.
    assert report.groups([seeds[0], other, seeds[1], seeds[2]]) == [seeds, [other]]
    missed = sweep(3, 8, None)
    assert report.time_band([*seeds, missed]) == [(1, 50.0, 50.0, 50.0), (16, 5.0, 4.0, 10.0)]
    assert report.time_band([missed]) == [(1, 50.0, 50.0, 50.0)]  # no N=16 point at all


def test_the_model_builds_while_the_shard_downloads(
    sim: ModuleType, student: Any, world: ModuleType
) -> None:
    """As ``startup.prepare_lease``: a build shorter than the shard's download costs nothing."""
    settings = sim.JobSettings(n_data_shards=4, target_accuracy=1.0)
    donor = world.DonorSpec(0, world.PROFILES["dsl"], 4000.0, [(0.0, 3.0)], False)

    def run(build_s: float) -> Any:
        cal = sim.Calibration(speed=4000.0, build_s=build_s)
        return sim.Simulation(student, [donor], settings, cal, horizon_s=3.0)

    download_s = donor.link.transfer_s(run(0.0).shard_bytes[0], False)
    assert download_s > 0.02  # several steps long
    steps = {b: run(b).run()["steps"] for b in (0.0, 0.9 * download_s, download_s + 0.5)}
    assert steps[0.0] == steps[0.9 * download_s]
    assert steps[0.0] > steps[download_s + 0.5]  # a longer build is what the donor waits for


def test_the_aggregate_experiment_refuses_a_staleness_scaled_step(sim: ModuleType) -> None:
    with pytest.raises(SystemExit):  # the parser's error, before any run
        sim.main(["--aggregate", "2", "--staleness-aware", "--donors", "1"])


def test_the_aggregate_experiment_makes_one_version_of_k_pushes(
    sim: ModuleType, student: Any, world: ModuleType
) -> None:
    settings = sim.JobSettings(n_data_shards=4, target_accuracy=1.0, aggregate=2)
    donor = world.DonorSpec(0, world.PROFILES["lan"], 4000.0, [(0.0, 2.0)], False)
    cal = sim.Calibration(speed=4000.0)
    simulation = sim.Simulation(student, [donor], settings, cal, horizon_s=2.0)
    run = simulation.run()
    per_shard = run["pushes_applied"] // 2  # two parameter shards
    assert per_shard > 10 and run["pushes_stale"] == 0
    store = simulation.store
    for shard in (0, 1):
        assert store.storage.load_version(store.job_id, shard) == per_shard // 2


def test_the_simulator_scores_the_stores_average_when_the_job_keeps_one(
    sim: ModuleType, student: Any, world: ModuleType
) -> None:
    """With ``average`` the store keeps its running average (tests/paramstore) and every
    point of the curve scores it, as evaluate_job does; without, the weights."""
    donor = world.DonorSpec(0, world.PROFILES["lan"], 4000.0, [(0.0, 2.0)], False)
    curves = {}
    for beta in (0.0, 0.99):
        settings = sim.JobSettings(n_data_shards=4, target_accuracy=1.0, average=beta)
        simulation = sim.Simulation(
            student, [donor], settings, sim.Calibration(speed=4000.0), horizon_s=2.0
        )
        scored: list[dict[str, np.ndarray]] = []

        def accuracy(weights: dict[str, np.ndarray], seen: list[Any] = scored) -> float:
            seen.append(weights)
            return float(type(student).accuracy(student, weights))

        student.accuracy = accuracy
        try:
            run = simulation.run()
        finally:
            del student.accuracy
        store = simulation.store
        assert store.average == beta and run["pushes_applied"] > 20
        last = store.scored_weights() if beta else store.weights()
        for name, value in last.items():
            np.testing.assert_array_equal(scored[-1][name], value)
        curves[beta] = [point[2] for point in run["curve"]]
    assert curves[0.0] != curves[0.99]


def test_the_simulator_refuses_an_average_out_of_range(sim: ModuleType) -> None:
    for beta in ("1.0", "-0.1"):
        with pytest.raises(SystemExit):
            sim.main(["--average", beta, "--donors", "1"])


def test_speed_up_by_target_reads_each_target_off_the_curves() -> None:
    targets = _load("sim_targets")
    one = [[1.0, 100, 0.5], [10.0, 1_000, 0.86], [40.0, 4_000, 0.9]]
    sixteen = [[0.5, 400, 0.6], [2.0, 3_200, 0.87], [4.0, 6_400, 0.9]]
    missed = [[0.5, 400, 0.6], [2.0, 3_200, 0.87]]
    assert targets.first_reached(one, 0.86) == (10.0, 1_000)
    assert targets.first_reached(one, 0.95) is None

    def sweep(curves: dict[int, Any]) -> dict[str, Any]:
        runs = [{"donors": n, "curve": c} for n, c in curves.items()]
        return {"settings": {"target_accuracy": 0.9}, "runs": runs}

    rows = targets.per_target(
        [sweep({1: one, 16: sixteen}), sweep({1: one, 16: missed}), sweep({1: [], 16: sixteen})],
        [0.86, 0.9],
    )
    # 16 donors: 5x at 86% on 3.2x the samples, 10x at 90% on 1.6x; the second seed's 16
    # donors missed 90% (speed-up 0, the worst); the third has no one-donor curve.
    assert rows[0.86][16] == {"speedup": [5.0, 5.0], "samples_ratio": [3.2, 3.2]}
    assert rows[0.9][16] == {"speedup": [10.0, 0.0], "samples_ratio": [1.6]}
    assert "| 90% | 5.0 (0.0-10.0); 1.60 (of 1) [2 seeds] |" in targets.table(rows)
