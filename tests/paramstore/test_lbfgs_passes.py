"""Sandblaster's numeric core: L-BFGS as a state machine (``paramstore.lbfgs``) fed by passes
of unit answers (``paramstore.passes``), against single-process L-BFGS and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import fmin_l_bfgs_b

from downpour.paramstore import ShardLayout, VariableSpec
from downpour.paramstore.lbfgs import (
    CONVERGED,
    SEARCHING,
    LbfgsConfig,
    LbfgsState,
    state_from_bytes,
    state_to_bytes,
    two_loop,
)
from downpour.paramstore.passes import (
    MemoryPassResults,
    PassUnit,
    assemble,
    offer_answer,
    pass_complete,
)
from downpour.scheduler import split_pass

FEATURES, CLASSES, SAMPLES = 6, 3, 240


def softmax_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLASSES, FEATURES)) * 2
    labels = rng.integers(0, CLASSES, SAMPLES)
    return centres[labels] + rng.standard_normal((SAMPLES, FEATURES)), labels


def layout() -> ShardLayout:
    specs = [VariableSpec("dense/kernel", (FEATURES, CLASSES)), VariableSpec("dense/bias", (3,))]
    return ShardLayout.balanced(specs, 2)


def summed_loss_and_gradient(
    w: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[float, np.ndarray]:
    """Softmax regression: the SUM over samples of the cross-entropy and of its gradient;
    ``w`` is the kernel (row-major) then the bias, float64."""
    kernel, bias = w[: FEATURES * CLASSES].reshape(FEATURES, CLASSES), w[FEATURES * CLASSES :]
    logits = x @ kernel + bias
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(y)), y]).sum()
    p[np.arange(len(y)), y] -= 1
    return float(loss), np.concatenate([(x.T @ p).reshape(-1), p.sum(axis=0)])


def full_batch(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    loss, gradient = summed_loss_and_gradient(w, x, y)
    return loss / len(y), gradient / len(y)


def reference_lbfgs(x0: np.ndarray, f, iterations: int, m: int = 10) -> list[np.ndarray]:
    """Textbook L-BFGS (Nocedal and Wright, algorithm 7.4 with backtracking), written apart
    from the coordinator's state machine: the accepted iterates."""
    x = x0.astype(np.float32).astype(np.float64)
    loss, g = f(x)
    s_list: list[np.ndarray] = []
    y_list: list[np.ndarray] = []
    iterates = [x]
    for _ in range(iterations):
        q = g.copy()
        a = []
        for s, yv in zip(reversed(s_list), reversed(y_list), strict=True):
            alpha = (s @ q) / (yv @ s)
            a.append(alpha)
            q = q - alpha * yv
        if s_list:
            q = q * (s_list[-1] @ y_list[-1]) / (y_list[-1] @ y_list[-1])
        for s, yv, alpha in zip(s_list, y_list, reversed(a), strict=True):
            q = q + s * (alpha - (yv @ q) / (yv @ s))
        d = -q
        t = 1.0 if s_list else 1.0 / max(1.0, np.linalg.norm(g))
        while True:
            trial = (x + t * d).astype(np.float32).astype(np.float64)
            new_loss, new_g = f(trial)
            if new_loss <= loss + 1e-4 * t * (g @ d):
                break
            t *= 0.5
        s, yv = trial - x, new_g - g
        if s @ yv > 1e-10 * (yv @ yv):
            s_list, y_list = (s_list + [s])[-m:], (y_list + [yv])[-m:]
        x, loss, g = trial, new_loss, new_g
        iterates.append(x)
    return iterates


def accepted_iterates(state: LbfgsState, f, iterations: int) -> list[np.ndarray]:
    """Drive the state machine with ``f``, recording each accepted point."""
    iterates = []
    while state.iterations < iterations and state.phase != CONVERGED:
        before = state.iterations
        state.tell(*f(state.trial))
        if state.iterations > before or len(iterates) == 0:
            iterates.append(state.x)
    return iterates


def sandblaster_one_agent(
    x0: np.ndarray, x: np.ndarray, y: np.ndarray, iterations: int, units: int
):
    """The coordinator's loop with one agent answering every unit of every pass: split the
    data, keep each unit's summed gradient per shard, assemble, tell L-BFGS."""
    shards, results, job = layout(), MemoryPassResults(), "job"
    slices = split_pass([SAMPLES], units)
    state = LbfgsState.start(x0)
    iterates: list[np.ndarray] = []
    pass_number = 0
    while state.iterations < iterations:
        weights = state.trial
        for index, piece in enumerate(slices):
            loss, gradient = summed_loss_and_gradient(
                weights, x[piece.start : piece.stop], y[piece.start : piece.stop]
            )
            tensors = shards.split(
                {
                    "dense/kernel": gradient[: FEATURES * CLASSES]
                    .reshape(FEATURES, CLASSES)
                    .astype(np.float32),
                    "dense/bias": gradient[FEATURES * CLASSES :].astype(np.float32),
                }
            )
            unit = PassUnit(pass_number, index, pass_number, piece.samples)
            for shard, grads in enumerate(tensors):
                mean_loss = loss / piece.samples
                offer_answer(
                    results,
                    shards,
                    job,
                    unit,
                    shard,
                    grads,
                    pass_number,
                    f"lease{index}:0:{shard}",
                    piece.samples,
                    mean_loss,
                )
        assert pass_complete(results, job, pass_number, len(slices), 2)
        answers = [results.answers(job, pass_number, shard) for shard in range(2)]
        loss, gradient, _ = assemble(answers, len(slices))
        before = state.iterations
        state.tell(loss, gradient)
        if state.iterations > before or not iterates:
            iterates.append(state.x)
        results.forget_pass(job, pass_number, 2)
        pass_number += 1
    return iterates


def test_the_state_machine_follows_textbook_lbfgs_iterate_for_iterate() -> None:
    # Prepare
    x, y = softmax_problem()
    x0 = np.zeros(FEATURES * CLASSES + CLASSES)
    f = lambda w: full_batch(w, x, y)  # noqa: E731

    # Execute
    ours = accepted_iterates(LbfgsState.start(x0), f, 12)
    theirs = reference_lbfgs(x0, f, 12)

    # Assert
    for mine, reference in zip(ours, theirs, strict=False):
        np.testing.assert_allclose(mine, reference, rtol=1e-9, atol=1e-9)
    assert len(ours) >= 12


def test_sandblaster_with_one_agent_follows_single_process_lbfgs() -> None:
    # Prepare: the same data, 17 uneven units of it per pass
    x, y = softmax_problem()
    x0 = np.zeros(FEATURES * CLASSES + CLASSES)

    # Execute
    blasted = sandblaster_one_agent(x0, x, y, iterations=10, units=17)
    single = reference_lbfgs(x0, lambda w: full_batch(w, x, y), 10)

    # Assert: float32 answers summed in float64 stay within float32 rounding of the path
    assert len(blasted) == 11
    for mine, reference in zip(blasted, single, strict=True):
        np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-5)


def test_it_reaches_the_minimum_scipy_finds() -> None:
    # Prepare: a little L2 keeps the minimum finite and unique
    x, y = softmax_problem(1)
    x0 = np.zeros(FEATURES * CLASSES + CLASSES)

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        loss, gradient = full_batch(w, x, y)
        return loss + 0.005 * float(w @ w), gradient + 0.01 * w

    # Execute
    state = LbfgsState.start(x0, LbfgsConfig(gradient_tolerance=1e-5))
    while state.phase != CONVERGED and state.evaluations < 500:
        state.tell(*f(state.trial))
    w_scipy, f_scipy, _ = fmin_l_bfgs_b(f, x0, m=10, pgtol=1e-8, factr=10)

    # Assert
    assert state.phase == CONVERGED
    assert state.loss == pytest.approx(f_scipy, rel=1e-6)
    np.testing.assert_allclose(state.x, w_scipy, atol=2e-3)


def test_a_non_finite_trial_backtracks_instead_of_being_accepted() -> None:
    # Prepare
    state = LbfgsState.start(np.ones(3))
    state.tell(3.0, np.ones(3))
    first_trial = state.trial.copy()

    # Execute
    state.tell(float("nan"), np.ones(3))

    # Assert
    assert state.phase == SEARCHING and state.backtracks == 1
    np.testing.assert_allclose(state.trial - 1, (first_trial - 1) / 2, rtol=1e-6)
    assert "backtracking (1)" in state.describe()


def test_two_loop_without_history_is_steepest_descent() -> None:
    g = np.array([1.0, -2.0, 0.5])
    np.testing.assert_array_equal(two_loop(g, []), -g)


def test_two_loop_solves_a_quadratic_from_its_exact_pairs() -> None:
    # Prepare: with n independent pairs of a quadratic, H is the inverse Hessian on them
    a = np.diag([1.0, 4.0, 9.0])
    pairs = [(s, a @ s) for s in np.eye(3)]
    g = np.array([1.0, 1.0, 1.0])

    # Execute
    d = two_loop(g, pairs)

    # Assert
    np.testing.assert_allclose(d, -np.linalg.solve(a, g), rtol=1e-9)


def test_the_state_survives_a_round_trip_through_bytes() -> None:
    # Prepare
    x, y = softmax_problem()
    state = LbfgsState.start(np.zeros(FEATURES * CLASSES + CLASSES))
    for _ in range(6):
        state.tell(*full_batch(state.trial, x, y))

    # Execute
    again = state_from_bytes(state_to_bytes(state))
    state.tell(*full_batch(state.trial, x, y))
    again.tell(*full_batch(again.trial, x, y))

    # Assert
    np.testing.assert_array_equal(again.trial, state.trial)
    assert (again.iterations, again.evaluations, len(again.pairs)) == (
        state.iterations,
        state.evaluations,
        len(state.pairs),
    )


def test_the_first_answer_of_a_unit_wins_and_the_others_are_late_or_duplicates() -> None:
    # Prepare
    shards, results = layout(), MemoryPassResults()
    unit = PassUnit(pass_number=4, unit=2, version=9, samples=10)
    grads = {"dense/kernel": np.ones((FEATURES, CLASSES), np.float32)}
    shard = next(i for i, s in enumerate(shards.shards) if s[0].name == "dense/kernel")

    def offer(push_id: str, version: int = 9):
        return offer_answer(results, shards, "job", unit, shard, grads, version, push_id, 10, 0.5)

    # Execute
    first, again, backup, stale = offer("a:0:0"), offer("a:0:0"), offer("b:0:0"), offer("c:0:0", 8)

    # Assert
    assert first.applied and not first.late
    assert again.duplicate and not again.applied
    assert backup.late and not backup.applied and not backup.duplicate
    assert stale.late and not stale.applied
    assert results.count("job", 4, shard) == 1


def test_a_non_finite_answer_is_kept_and_makes_the_pass_backtrack() -> None:
    # Prepare: L-BFGS searching from a point; one unit's answer at the trial overflowed
    shards, results = layout(), MemoryPassResults()
    sizes = [shards.shard_size(s) for s in range(len(shards.shards))]
    state = LbfgsState.start(np.zeros(sum(sizes)))
    state.tell(1.0, np.ones(sum(sizes)))
    step = state.step

    def grads(shard: int, value: float) -> dict[str, np.ndarray]:
        return {v.name: np.full(v.shape, value, np.float32) for v in shards.shards[shard]}

    # Execute
    acks = []
    for unit, value in ((0, 0.1), (1, np.inf)):
        pass_unit = PassUnit(pass_number=1, unit=unit, version=1, samples=10)
        for shard in range(len(sizes)):
            ack = offer_answer(
                results, shards, "job", pass_unit, shard, grads(shard, value), 1, f"{unit}", 10, 0.5
            )
            acks.append(ack)
    answers = [results.answers("job", 1, shard) for shard in range(len(sizes))]
    loss, gradient, _ = assemble(answers, 2)
    state.tell(loss, gradient)

    # Assert: every answer kept, the pass complete, its loss infinite, the step halved
    assert all(ack.applied for ack in acks)
    assert pass_complete(results, "job", 1, 2, len(sizes))
    assert loss == np.inf
    assert state.backtracks == 1 and state.step == step / 2
