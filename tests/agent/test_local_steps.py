"""Local-steps rounds on the agent: inner optimizers, rebasing, replay and the payloads."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.agent.fakeserver import FakeServer, make_agent, run_agent

from downpour_agent.connection import EXIT_OK
from downpour_agent.desktop.governor import DutyCycle, Governor, Policy
from downpour_agent.desktop.settings import Settings
from downpour_agent.local_steps import (
    InnerOptimizer,
    LocalRound,
    inner_optimizer,
    replay_local_round,
)
from downpour_agent.local_training import run_steps, steps_per_hop
from downpour_agent.protocol import (
    LinkRates,
    LocalSteps,
    ProtocolError,
    link_rates_from_wire,
    link_rates_to_wire,
    local_steps_from_wire,
    local_steps_to_wire,
)
from downpour_agent.trainer import BatchSampler, GradientComputer

keras = pytest.importorskip("keras")


def _model() -> Any:
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(4, activation="softmax", name="out"),
        ],
        name="mlp",
    )


def _computer() -> GradientComputer:
    return GradientComputer(
        json.loads(_model().to_json()), "sparse_categorical_crossentropy", seed=3
    )


def _data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0).astype(np.int64)


@pytest.mark.parametrize(
    ("kind", "reference"),
    [
        ("adamw", lambda lr: keras.optimizers.AdamW(learning_rate=lr)),
        ("sgd-momentum", lambda lr: keras.optimizers.SGD(learning_rate=lr, momentum=0.9)),
    ],
)
def test_the_inner_optimizer_matches_keras(kind: str, reference: Any) -> None:
    # Prepare: the same start in our computer and in a Keras model, the same batches.
    computer = _computer()
    model = _model()
    start = computer.get_weights()
    for var, (_name, value) in zip(model.trainable_variables, start.items(), strict=True):
        var.assign(value)
    optimizer = InnerOptimizer(computer, LocalSteps(kind, 0.01))
    keras_optimizer = reference(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    x, y = _data()
    import tensorflow as tf

    # Execute: four steps each.
    for i in range(4):
        xb, yb = x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]
        grads, _ = computer.compute_tensors(xb, yb)
        optimizer.apply(grads)
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        keras_grads = tape.gradient(loss, model.trainable_variables)
        keras_optimizer.apply_gradients(zip(keras_grads, model.trainable_variables, strict=True))

    # Assert
    for ours, theirs in zip(
        computer.get_weights().values(), model.trainable_variables, strict=True
    ):
        np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-5, atol=1e-6)


def test_a_round_pushes_start_minus_end_and_resets_its_optimizer_between_rounds() -> None:
    # Prepare
    computer = _computer()
    round_ = LocalRound(computer, inner_optimizer(computer, LocalSteps("adamw", 0.01)))
    x, y = _data()
    start = computer.get_weights()

    def run() -> dict[str, np.ndarray]:
        round_.begin(start)
        sampler = BatchSampler(len(x), 16, seed=5)
        for _ in range(3):
            idx = sampler.next_indices()
            round_.step(x[idx], y[idx])
        return round_.pseudo_gradient()

    # Execute: the same round twice.
    first = run()
    end = computer.get_weights()
    second = run()

    # Assert: delta = start - end, and the second round saw no state of the first.
    for name in start:
        np.testing.assert_array_equal(first[name], start[name] - end[name])
        np.testing.assert_array_equal(first[name], second[name])
    assert round_.samples == 48 and round_.steps == 3


def test_a_rebase_keeps_the_rounds_progress_on_top_of_the_new_global_weights() -> None:
    # Prepare: two steps on S.
    computer = _computer()
    round_ = LocalRound(computer, inner_optimizer(computer, LocalSteps("sgd-momentum", 0.05)))
    x, y = _data()
    round_.begin()
    s = computer.get_weights()
    round_.step(x[:16], y[:16])
    round_.step(x[16:32], y[16:32])
    w = computer.get_weights()
    g = {name: (value + np.float32(0.25)).astype(np.float32) for name, value in s.items()}

    # Execute
    round_.rebase(g)

    # Assert: w' = G + (w - S), and the pseudo-gradient is still the round's progress.
    for name in s:
        np.testing.assert_array_equal(computer.get_weights()[name], g[name] + (w[name] - s[name]))
        np.testing.assert_allclose(round_.pseudo_gradient()[name], s[name] - w[name], atol=1e-6)


def test_the_replay_reproduces_the_agents_round_with_a_mid_round_load() -> None:
    # Prepare: the agent's round: 2 steps, new weights arrive, 2 more steps.
    x, y = _data()
    local = LocalSteps("adamw", 0.01)
    agent = _computer()
    base = agent.get_weights()
    arrived = {k: (v * np.float32(0.9)).astype(np.float32) for k, v in base.items()}
    sampler = BatchSampler(len(x), 16, seed=8)
    for _ in range(4):  # the round is the lease's second: steps 4 to 7
        sampler.next_indices()
    round_ = LocalRound(agent, inner_optimizer(agent, local))
    round_.begin(base)
    for offset in range(4):
        if offset == 2:
            round_.rebase(arrived)
        idx = sampler.next_indices()
        round_.step(x[idx], y[idx])
    pushed = round_.pseudo_gradient()

    # Execute: a worker's replay on another computer, from what the server served.
    worker = _computer()
    worker.set_weights(base)
    expected, samples = replay_local_round(
        worker, local, x, y, batch_size=16, seed=8, first_step=4, steps=4, loads=[(2, arrived)]
    )

    # Assert
    assert samples == 64
    for name, value in expected.items():
        np.testing.assert_allclose(pushed[name], value, rtol=1e-5, atol=1e-7)


def test_local_steps_and_link_rates_round_trip_and_bad_ones_are_refused() -> None:
    local = LocalSteps("sgd-momentum", 0.02)
    assert local_steps_from_wire(local_steps_to_wire(local)) == local
    rates = LinkRates(3200.0, 2.5e6, 1.25e7)
    assert link_rates_from_wire(link_rates_to_wire(rates)) == rates
    for bad in (
        {"inner_optimizer": "lbfgs", "inner_learning_rate": 0.1},
        {"inner_optimizer": "adamw", "inner_learning_rate": 0},
        {"inner_optimizer": "adamw", "inner_learning_rate": float("nan")},
        {"inner_optimizer": "adamw"},
        {"inner_optimizer": "adamw", "inner_learning_rate": 0.1, "outer": 0.7},
    ):
        with pytest.raises(ProtocolError):
            local_steps_from_wire(bad)
    for bad_rates in (
        {"compute_samples_per_s": 1.0, "push_bytes_per_s": 1.0},
        {"compute_samples_per_s": -1.0, "push_bytes_per_s": 1.0, "fetch_bytes_per_s": 1.0},
        {"compute_samples_per_s": 1e12, "push_bytes_per_s": 1.0, "fetch_bytes_per_s": 1.0},
        {"compute_samples_per_s": True, "push_bytes_per_s": 1.0, "fetch_bytes_per_s": 1.0},
    ):
        with pytest.raises(ProtocolError):
            link_rates_from_wire(bad_rates)


def _documented(kind: str) -> dict[str, Any]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    (block,) = re.findall(rf"<!-- test-vector: {kind} -->\s*```json\n(.*?)```", text, re.S)
    return dict(json.loads(block))


@pytest.mark.parametrize("kind", ["adamw", "sgd-momentum"])
def test_the_inner_optimizers_reproduce_the_documented_vector(kind: str) -> None:
    import tensorflow as tf

    # Prepare: an optimizer over one variable (all it reads of a computer).
    vector = _documented("inner-optimizer")

    class OneVariable:
        variable = tf.Variable(np.array(vector["w"], np.float32))

        def trainable(self) -> list[Any]:
            return [self.variable]

    holder = OneVariable()
    optimizer = InnerOptimizer(holder, LocalSteps(kind, vector["lr"]))  # type: ignore[arg-type]

    # Execute
    for grad in vector["grads"]:
        optimizer.apply([tf.constant(np.array(grad, np.float32))])

    # Assert
    np.testing.assert_allclose(holder.variable.numpy(), vector[kind], rtol=1e-6)


def test_steps_run_in_hops_of_about_50_ms_one_at_a_time_when_throttled_or_unknown() -> None:
    assert steps_per_hop(100, 0.01, throttled=False) == 5
    assert steps_per_hop(3, 0.001, throttled=False) == 3  # never past the round's end
    assert steps_per_hop(100, 0.2, throttled=False) == 1
    assert steps_per_hop(100, 0.0, throttled=False) == 1  # no step timed yet
    assert steps_per_hop(100, 0.001, throttled=True) == 1  # --max-steps-per-second paces


def test_a_hop_of_steps_stops_after_the_step_that_saw_the_fetch_arrive() -> None:
    # Prepare: a round, and the event the agent sets when its fetch's answers are in.
    computer = _computer()
    round_ = LocalRound(computer, inner_optimizer(computer, LocalSteps("adamw", 0.01)))
    x, y = _data()
    round_.begin()
    sampler = BatchSampler(len(x), 16, seed=5)
    arrived = threading.Event()
    # Execute: a hop with nothing arrived, then one with the fetch in.
    ran = run_steps(round_, sampler, x, y, 4, arrived)
    arrived.set()
    stopped = run_steps(round_, sampler, x, y, 4, arrived)
    # Assert: all four steps, then one (so that the rebase is not delayed).
    assert [batch for _, batch, _ in ran] == [16] * 4
    assert len(stopped) == 1 and round_.steps == 5


async def test_a_throttled_agent_reports_the_rate_its_steps_really_ran_at(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: a local-steps lease of two rounds of 4 steps (batch 8), then a second lease;
    # the donor caps the agent at 20 steps a second, far below what this small model computes.
    lease = dict(server.lease_template)
    lease["hyper"] = {**lease["hyper"], "n_fetch": 4, "n_push": 4}
    lease["steps"] = 8
    lease["algorithm"] = "local-steps"
    lease["local_steps"] = {"inner_optimizer": "sgd-momentum", "inner_learning_rate": 0.05}
    server.work = [dict(lease), dict(lease)]
    agent = make_agent(server, tmp_path, max_steps_per_second=20.0)

    # Execute
    code = await run_agent(agent)

    # Assert: the second request for work carries the first lease's last round, at about 20
    # steps of 8 samples a second (160, within a factor of two), not the unthrottled
    # compute's thousands: H is chosen for the wall time a round takes.
    assert code == EXIT_OK
    asks = server.of_type("request_work")
    assert len(asks) >= 2 and "link" not in asks[0]
    rate = asks[1]["link"]["compute_samples_per_s"]
    assert 80.0 <= rate <= 320.0, asks[1]
    assert asks[1]["link"]["push_bytes_per_s"] > 0 and asks[1]["link"]["fetch_bytes_per_s"] > 0


async def test_a_donors_pause_mid_round_does_not_count_as_a_slow_round(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: a lease of two rounds of 8 steps (batch 8) at 20 steps a second, then another;
    # the donor pauses the agent for about a second in the first lease's last round, the
    # one whose rate the second request for work reports.
    lease = dict(server.lease_template)
    lease["hyper"] = {**lease["hyper"], "n_fetch": 8, "n_push": 8}
    lease.update(steps=16, algorithm="local-steps")
    lease["local_steps"] = {"inner_optimizer": "sgd-momentum", "inner_learning_rate": 0.05}
    server.work = [dict(lease), dict(lease)]
    policy = Policy(
        Settings(mode="always"), input_idle=None, other_load=lambda: 0.0, on_battery=lambda: False
    )
    gov = Governor(policy, DutyCycle(1.0, 1), poll_s=0.05)
    agent = make_agent(server, tmp_path, governor=gov, max_steps_per_second=20.0)
    run = asyncio.create_task(agent.run())

    # Execute: pause two steps into the second round, for 1 s.
    async with asyncio.timeout(30):
        while True:  # polls the agent's own counter: no event is set at a step
            if agent.stats.steps_done >= 10:
                break
            await asyncio.sleep(0.01)
    gov.pause()
    paused_at, completes_then = agent.stats.steps_done, len(server.of_type("complete"))
    await asyncio.sleep(1.0)
    gov.resume()
    code = await asyncio.wait_for(run, 60)

    # Assert: the pause fell in the first lease's last round; the paused second left out, the
    # round still ran at about 160 samples a second (counted in, 64 samples over 1.4 s would
    # read 46; the step after a pause is not held back by the throttle, so a little faster).
    assert code == EXIT_OK and gov.pauses == 1
    assert 10 <= paused_at < 16 and completes_then == 0
    rate = server.of_type("request_work")[1]["link"]["compute_samples_per_s"]
    assert 80.0 <= rate <= 320.0, rate
