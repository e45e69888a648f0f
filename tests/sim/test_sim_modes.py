"""The simulator's other modes (sync, local steps, Sandblaster) against the code they model.

Each mode runs the real server-side rule (``SyncAggregator``, the outer optimizer,
``LbfgsState``) in virtual time; what is the simulator's own (the numpy inner AdamW, the
full-batch loss and gradient) is checked here against the agent's TensorFlow code.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import pytest
from tests.sim.test_convergence_sim import _load

from downpour.paramstore.lbfgs import LbfgsConfig, LbfgsState
from downpour.paramstore.sync import SyncRule
from downpour.teacher import teacher_data


@pytest.fixture(scope="module")
def world() -> ModuleType:
    return _load("simworld")


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    return _load("convergence_sim")


@pytest.fixture(scope="module")
def modes() -> ModuleType:
    return _load("sim_modes")


@pytest.fixture(scope="module")
def student(sim: ModuleType) -> Any:
    return sim.Student(sim.JobSettings(n_data_shards=4), teacher_data(4_000, 1_000))


def _settings(sim: ModuleType, **changes: Any) -> Any:
    return sim.JobSettings(n_data_shards=4, **changes)


def _arrays(student: Any, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.array(weights[name], np.float32) for name in student.names]


# -- what the simulator computes itself --------------------------------------------------------


def test_the_inner_adamw_round_is_the_agents_round(modes: ModuleType, student: Any) -> None:
    from downpour_agent.local_steps import replay_local_round
    from downpour_agent.protocol import LocalSteps
    from downpour_agent.trainer import BatchSampler

    x, y = student.data.x_train, student.data.y_train
    start = _arrays(student, student.initial)
    student.computer.set_weights(student.initial)
    theirs, samples = replay_local_round(
        student.computer,
        LocalSteps("adamw", 0.001),
        x,
        y,
        batch_size=32,
        seed=7,
        first_step=0,
        steps=12,
    )

    w = [a.copy() for a in start]
    adamw = modes.AdamW(0.001)
    adamw.reset(w)
    sampler = BatchSampler(len(x), 32, 7)
    for _ in range(12):
        idx = sampler.next_indices()
        adamw.step(w, modes.mlp_gradients(w, x[idx], y[idx]))
    ours = {name: s - e for name, s, e in zip(student.names, start, w, strict=True)}

    assert samples == 12 * 32
    for name in student.names:
        assert np.abs(ours[name]).max() > 1e-3  # the round moved the weights
        np.testing.assert_allclose(ours[name], theirs[name], atol=2e-6, rtol=1e-3)


def test_the_full_batch_loss_and_gradient_are_keras(modes: ModuleType, student: Any) -> None:
    x, y = student.data.x_train[:2_000], student.data.y_train[:2_000]
    weights = {k: v + np.float32(0.01) for k, v in student.initial.items()}
    student.computer.set_weights(weights)
    keras_grads, keras_loss = student.computer.compute(x, y)

    loss, grads = modes.mlp_loss_and_gradients(_arrays(student, weights), x, y, chunk=700)

    assert loss == pytest.approx(keras_loss, rel=1e-5)
    for name, grad in zip(student.names, grads, strict=True):
        np.testing.assert_allclose(grad, keras_grads[name], atol=2e-6, rtol=1e-4)


# -- sync -------------------------------------------------------------------------------------


def test_each_sync_step_averages_the_first_n_and_drops_the_backups_gradient(
    sim: ModuleType, modes: ModuleType, world: ModuleType, student: Any
) -> None:
    donors = world.uniform_population(3, "cable", 4000.0, 5.0)
    run = modes.SyncSimulation(
        student,
        donors,
        _settings(sim, n_fetch=1, n_push=1, target_accuracy=1.0),
        sim.Calibration(speed=4000.0, build_s=0.0),
        modes=modes.ModeSettings(),
        rule=SyncRule(2, 1, 10.0),
        horizon_s=5.0,
    )
    result = run.run()

    steps = result["sync"]["steps"]
    assert steps > 20 and result["sync"]["timeouts"] == 0
    assert run.store.versions() == [steps, steps]  # each step applied once, on every shard
    counted = result["pushes_applied"] // 2  # two parameter shards
    assert 2 * steps <= counted <= 2 * steps + 2  # N a step (the last may be filling)
    assert result["sync"]["late"] >= steps - 1  # the third donor's arrives when N are in


def test_a_sync_step_short_of_n_applies_at_its_timeout_in_virtual_time(
    sim: ModuleType, modes: ModuleType, world: ModuleType, student: Any
) -> None:
    donors = world.uniform_population(1, "cable", 4000.0, 10.0)
    run = modes.SyncSimulation(
        student,
        donors,
        _settings(sim, n_fetch=1, n_push=1, target_accuracy=1.0),
        sim.Calibration(speed=4000.0, build_s=0.0),
        modes=modes.ModeSettings(),
        rule=SyncRule(2, 0, 1.0),
        horizon_s=10.0,
    )
    result = run.run()

    # One donor of the two a step waits for: every step waits out its 1 s timeout.
    assert result["sync"]["timeouts"] == result["sync"]["steps"]
    assert 8 <= result["sync"]["steps"] <= 10
    assert result["steps"] == result["sync"]["steps"] + 1  # its gradient of the open step


def test_the_sync_rule_of_a_comparison_keeps_a_tenth_of_the_donors_as_backups(
    modes: ModuleType,
) -> None:
    settings = modes.ModeSettings()
    assert modes.sync_rule(1, settings) == SyncRule(1, 0, 10.0)
    assert modes.sync_rule(16, settings) == SyncRule(14, 2, 10.0)
    assert modes.sync_rule(64, settings) == SyncRule(58, 6, 10.0)


# -- local steps ------------------------------------------------------------------------------


def test_local_steps_push_pseudo_gradients_through_the_outer_optimizer(
    sim: ModuleType, modes: ModuleType, world: ModuleType, student: Any
) -> None:
    donors = world.Population(speed=4000.0).draw(3, 20.0, seed=1)

    def run() -> dict[str, Any]:
        result = modes.LocalStepsSimulation(
            student,
            donors,
            _settings(sim, target_accuracy=0.6),
            sim.Calibration(speed=4000.0),
            modes=modes.ModeSettings(),
            horizon_s=20.0,
            max_steps=3_000,
        ).run()
        result.pop("wall_s")
        return dict(result)

    first = run()
    assert first == run()  # the same for the same seed
    assert first["pushes_applied"] > 0 and first["time_to_target_s"] is not None
    assert first["inner_steps"]["min"] >= 8  # the scheduler's floor of H


# -- Sandblaster ------------------------------------------------------------------------------


def test_sandblaster_with_one_donor_follows_single_process_lbfgs(
    sim: ModuleType, modes: ModuleType, world: ModuleType, student: Any
) -> None:
    donors = world.uniform_population(1, "lan", 20_000.0, 10.0)
    run = modes.SandblasterSimulation(
        student,
        donors,
        _settings(sim, target_accuracy=1.0),
        sim.Calibration(speed=20_000.0, build_s=0.0),
        modes=modes.ModeSettings(),
        horizon_s=10.0,
    )
    result = run.run()
    passes = result["sandblaster"]["passes"]
    assert passes >= 5

    x, y = student.data.x_train, student.data.y_train
    x0 = np.concatenate(
        [
            student.layout.flatten_shard(k, {s.name: student.initial[s.name] for s in specs})
            for k, specs in enumerate(student.layout.shards)
        ]
    )
    state = LbfgsState.start(x0, LbfgsConfig(history=10))
    for _ in range(passes):
        weights: dict[str, np.ndarray] = {}
        offset = 0
        for k in range(len(student.layout.shards)):
            size = student.layout.shard_size(k)
            weights |= student.layout.unflatten_shard(
                k, state.trial[offset : offset + size].astype(np.float32)
            )
            offset += size
        loss, grads = modes.mlp_loss_and_gradients(_arrays(student, weights), x, y)
        named = dict(zip(student.names, grads, strict=True))
        state.tell(
            loss,
            np.concatenate(
                [
                    student.layout.flatten_shard(k, {s.name: named[s.name] for s in specs})
                    for k, specs in enumerate(student.layout.shards)
                ]
            ),
        )
    stored = np.concatenate([run.store.fetch_flat(k)[1] for k in range(2)])
    np.testing.assert_array_equal(stored, state.trial.astype(np.float32))
    assert run.store.versions() == [passes, passes]


def test_sandblaster_backups_finish_passes_beside_a_ten_times_slower_donor(
    sim: ModuleType, modes: ModuleType, world: ModuleType, student: Any
) -> None:
    lan = world.PROFILES["lan"]
    donors = [
        world.DonorSpec(0, lan, 20_000.0, [(0.0, 4.0)], False),
        world.DonorSpec(1, lan, 2_000.0, [(0.0, 4.0)], False),
    ]

    def run(backups: bool) -> dict[str, Any]:
        result = modes.SandblasterSimulation(
            student,
            donors,
            _settings(sim, target_accuracy=1.0),
            # A cheap claim, so the slow donor's units take 10 times as long end to end.
            sim.Calibration(speed=20_000.0, build_s=0.0, lease_overhead_s=0.001),
            # Few units, so a unit the slow donor holds is a tenth of a pass's compute.
            modes=modes.ModeSettings(units_min=4, units_per_donor=2, sandblaster_backups=backups),
            horizon_s=4.0,
        ).run()
        return dict(result["sandblaster"])

    with_backups, without = run(True), run(False)
    assert without["backups"] == 0 and without["late_answers"] == 0
    assert with_backups["backups"] >= 2
    assert with_backups["late_answers"] >= 1  # the slow copy's answer, when it came, not summed
    # Every pass without backups waits for the slow donor's last unit.
    assert with_backups["passes"] >= 1.4 * without["passes"]  # 8 against 5


def test_local_steps_simulate_the_forms_outer_step_unless_told_otherwise(modes: ModuleType) -> None:
    defaults = modes.ModeSettings()
    assert (defaults.outer_learning_rate, defaults.outer_momentum) == (1.0, 0.0)
    parser = modes.build_parser()
    assert parser.parse_args(["--outer", "0.7:0.9"]).outer == (0.7, 0.9)
    for bad in ("0:0", "1.0:1", "11:0", "1.0", "a:b"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--outer", bad])
