"""Reputation, bans and spot checks: the pure policy of ``downpour.scheduler.reputation``."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from downpour.scheduler.reputation import (
    DEFAULT_MIN_PUSHES,
    DEFAULT_SPOT_CHECK_FRACTION,
    Reputation,
    clipped_fraction,
    gradients_match,
    lift_ban,
    min_pushes_for_shards,
    min_spot_check_fraction,
    recent_clipped_fraction,
    record_push,
    record_spot_check,
    should_ban,
    should_spot_check,
    spot_check_probability_of_catch,
)

PLATFORM_DIR = Path(__file__).resolve().parents[2] / "platform"


def after(pushes: list[bool], start: Reputation | None = None) -> Reputation:
    reputation = start or Reputation()
    for clipped in pushes:
        reputation = record_push(reputation, clipped)
    return reputation


def pushes_until_banned(pushes: list[bool], start: Reputation | None = None) -> int | None:
    reputation = start or Reputation()
    for count, clipped in enumerate(pushes, start=1):
        reputation = record_push(reputation, clipped)
        if should_ban(reputation):
            return count
    return None


# -- clipping and bans -------------------------------------------------------------------------


def test_a_new_agent_is_not_banned() -> None:
    assert not should_ban(Reputation())
    assert clipped_fraction(Reputation()) == recent_clipped_fraction(Reputation()) == 0.0


def test_an_agent_clipped_on_every_push_is_banned_as_soon_as_there_is_enough_evidence() -> None:
    assert pushes_until_banned([True] * 100) == DEFAULT_MIN_PUSHES


def test_an_honest_agent_clipped_now_and_then_is_never_banned() -> None:
    # Charlie's pushes are clipped at about twice the worst honest rate in bench/attacks.py
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert pushes_until_banned(list(rng.random(5_000) < 0.15)) is None


def test_a_sleeper_that_turns_after_a_long_honest_history_is_banned_by_its_recent_rate() -> None:
    honest_history = after([False] * 2_000)

    banned_at = pushes_until_banned([True] * 200, start=honest_history)

    assert banned_at is not None and banned_at <= 80  # the lifetime rate would need 2,000
    assert clipped_fraction(after([True] * 80, honest_history)) < 0.05


def test_counts_are_kept_exactly() -> None:
    reputation = after([True, False, False, True, False])

    assert (reputation.pushes, reputation.clipped) == (5, 2)
    assert clipped_fraction(reputation) == 0.4
    assert 0.39 < recent_clipped_fraction(reputation) < 0.4  # the oldest, clipped, weighs less


def test_one_failed_spot_check_bans_and_passed_ones_do_not() -> None:
    passed = record_spot_check(record_spot_check(Reputation(), True), True)
    failed = record_spot_check(passed, False)

    assert not should_ban(passed)
    assert should_ban(failed)
    assert not should_ban(failed, max_failed_spot_checks=1)


def test_lifting_a_ban_starts_the_agent_afresh() -> None:
    banned = record_spot_check(after([True] * 30), False)
    assert should_ban(banned)

    lifted = lift_ban(record_spot_check(banned, True))

    assert lifted == Reputation(spot_checks_passed=1)
    assert pushes_until_banned([True] * 19, start=lifted) is None


def test_a_model_with_many_shards_needs_as_many_rounds_of_evidence() -> None:
    assert min_pushes_for_shards(2) == DEFAULT_MIN_PUSHES
    assert min_pushes_for_shards(8) == 80
    # one unlucky round of an 8-shard model is not enough
    assert not should_ban(after([True] * 8 + [False] * 72), min_pushes=min_pushes_for_shards(8))


def test_the_ban_rule_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        should_ban(Reputation(), max_clipped_fraction=1.0)
    with pytest.raises(ValueError):
        should_ban(Reputation(), min_pushes=0)
    with pytest.raises(ValueError):
        record_push(Reputation(), True, window=0)


# -- spot checks -------------------------------------------------------------------------------


def test_the_default_spot_check_rate_catches_an_always_faking_agent_within_100_tasks() -> None:
    assert spot_check_probability_of_catch(DEFAULT_SPOT_CHECK_FRACTION, 100) >= 0.99
    assert spot_check_probability_of_catch(0.05, 100) == pytest.approx(1 - 0.95**100)
    assert spot_check_probability_of_catch(0.0, 100) == 0.0
    assert spot_check_probability_of_catch(1.0, 1) == 1.0
    assert spot_check_probability_of_catch(0.5, 0) == 0.0


def test_the_smallest_sufficient_fraction_is_the_inverse() -> None:
    fraction = min_spot_check_fraction(100, 0.99)

    assert fraction == pytest.approx(0.045, abs=5e-4)
    assert spot_check_probability_of_catch(fraction, 100) == pytest.approx(0.99)
    assert fraction <= DEFAULT_SPOT_CHECK_FRACTION


def test_spot_checks_catch_simulated_fakers_as_often_as_promised() -> None:
    # Prepare: 4,000 agents that fake every one of their 100 tasks
    rng = np.random.default_rng(1)

    # Execute
    caught = sum(
        any(should_spot_check(rng, DEFAULT_SPOT_CHECK_FRACTION) for _ in range(100))
        for _ in range(4_000)
    )

    # Assert: 0.9941 expected; the standard error is 0.0012
    assert caught / 4_000 >= 0.99 - 0.004


def test_should_spot_check_fires_at_its_rate_with_any_uniform_source() -> None:
    for source in (random.Random(2), np.random.default_rng(2)):
        draws = [should_spot_check(source, 0.05) for _ in range(20_000)]
        assert 0.045 < np.mean(draws) < 0.055
    assert not any(should_spot_check(random.SystemRandom(), 0.0) for _ in range(1_000))
    assert all(should_spot_check(random.SystemRandom(), 1.0) for _ in range(1_000))
    with pytest.raises(ValueError):
        should_spot_check(random.Random(), 1.5)


def recomputation() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "dense/kernel": rng.standard_normal((64, 128)).astype(np.float32),
        "dense/bias": rng.standard_normal(128).astype(np.float32),
    }


def test_gradients_that_differ_by_rounding_match() -> None:
    trusted = recomputation()
    # what another machine's float32 arithmetic may produce: relative noise of 1e-4
    rng = np.random.default_rng(4)
    agent = {
        n: t * (1 + 1e-4 * rng.standard_normal(t.shape)).astype(np.float32)
        for n, t in trusted.items()
    }

    assert gradients_match(agent, trusted)
    assert gradients_match(trusted["dense/bias"], trusted["dense/bias"].astype(np.float64))


@pytest.mark.parametrize(
    "fake",
    [
        lambda t: -t,
        lambda t: 1.05 * t,
        lambda t: np.zeros_like(t),
        lambda t: t + 0.05 * np.std(t) * np.random.default_rng(5).standard_normal(t.shape),
        lambda t: np.random.default_rng(6).permutation(t.ravel()).reshape(t.shape),
    ],
    ids=["signflip", "scaled-5pct", "zeros", "noise-5pct", "shuffled"],
)
def test_faked_gradients_do_not_match(fake: object) -> None:
    trusted = recomputation()
    agent = dict(trusted)
    agent["dense/kernel"] = fake(trusted["dense/kernel"]).astype(np.float32)  # type: ignore[operator]

    assert not gradients_match(agent, trusted)


def test_gradients_with_other_names_shapes_or_non_finite_values_do_not_match() -> None:
    trusted = recomputation()
    nan = {**trusted, "dense/bias": np.full(128, np.nan, np.float32)}

    assert not gradients_match({"dense/kernel": trusted["dense/kernel"]}, trusted)
    assert not gradients_match({**trusted, "dense/bias": np.zeros(127, np.float32)}, trusted)
    assert not gradients_match(nan, trusted)
    assert not gradients_match(trusted, nan)


def test_the_policy_imports_no_framework_or_redis() -> None:
    code = (
        "import sys, downpour.scheduler.reputation; "
        "print(sorted(m for m in ('django', 'channels', 'celery', 'redis') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(PLATFORM_DIR)}

    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
