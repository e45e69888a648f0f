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
    DEFAULT_MAX_MEAN_COSINE,
    DEFAULT_MIN_PUSHES,
    DEFAULT_SPOT_CHECK_FRACTION,
    OPPOSED_JUDGE_INTERVAL_S,
    PushFlags,
    Reputation,
    clipped_fraction,
    cosine_t,
    gradients_match,
    judge_interval,
    lift_ban,
    mean_cosine,
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


# -- direction against the server's root gradient (sign flips, IPM) -----------------------------

UNTESTED = PushFlags(clipped=False)


def direction(cosine: float) -> PushFlags:
    return PushFlags(clipped=cosine < -0.5, cosine=cosine, opposed=cosine < -0.5)


def flags_until_banned(pushes: list[PushFlags]) -> int | None:
    reputation = Reputation()
    for count, flags in enumerate(pushes, start=1):
        reputation = record_push(reputation, flags)
        if should_ban(reputation):
            return count
    return None


def sign_flips(count: int, seed: int = 0) -> list[PushFlags]:
    """A sign flipper's tested pushes: honest cosines (mean +0.45, sd 0.3), negated."""
    rng = np.random.default_rng(seed)
    return [direction(float(-np.clip(rng.normal(0.45, 0.3), -1, 1))) for _ in range(count)]


def test_a_sign_flipper_is_banned_at_its_twentieth_tested_push() -> None:
    # Prepare: no root gradient for its first 100 pushes (training had not made the gradient
    # coherent), then tested pushes whose cosines are honest ones negated: only about a third
    # fail the per-push test (below -0.5), so clipping flags alone ban late or never.
    pushes = [UNTESTED] * 100 + sign_flips(200)
    # Execute
    banned_at = flags_until_banned(pushes)
    # Assert: 20 tested pushes are the evidence.
    assert banned_at == 100 + DEFAULT_MIN_PUSHES
    clipping_alone = pushes_until_banned([flags.opposed for flags in pushes])
    assert clipping_alone is None or clipping_alone > 100 + 2 * DEFAULT_MIN_PUSHES


def test_an_ipm_attacker_whose_cosines_are_only_slightly_negative_but_steady_is_banned() -> None:
    # IPM pushes -epsilon times the honest mean: a mean cosine of -0.08, above the ban line
    # (-0.10), but with little spread its t statistic is far below -5 by 20 tested pushes.
    rng = np.random.default_rng(2)
    pushes = [direction(float(rng.normal(-0.08, 0.04))) for _ in range(100)]
    assert flags_until_banned(pushes) == DEFAULT_MIN_PUSHES
    reputation = Reputation()
    for flags in pushes[:DEFAULT_MIN_PUSHES]:
        reputation = record_push(reputation, flags)
    assert mean_cosine(reputation) > DEFAULT_MAX_MEAN_COSINE and cosine_t(reputation) < -5


def test_an_honest_agent_whose_mean_cosine_is_zero_is_not_banned_by_noise() -> None:
    # Late in training an honest push is about orthogonal to the root gradient: mean 0,
    # wide spread. 5,000 tested pushes never give a t statistic below -5.
    rng = np.random.default_rng(3)
    pushes = [direction(float(np.clip(rng.normal(0.0, 0.35), -1, 1))) for _ in range(5000)]
    assert flags_until_banned(pushes) is None


def test_the_t_statistic_needs_two_pushes_and_floors_the_spread() -> None:
    one = record_push(Reputation(), direction(-0.4))
    assert cosine_t(one) == 0.0
    same = record_push(one, direction(-0.4))  # no spread: the floor, 0.05, stands in
    assert cosine_t(same) == pytest.approx(-0.4 / (0.05 / 2**0.5))


def test_untested_pushes_say_nothing_about_direction() -> None:
    reputation = Reputation()
    for flags in [UNTESTED] * 500 + [direction(-0.9)] * (DEFAULT_MIN_PUSHES - 1):
        reputation = record_push(reputation, flags)
    assert reputation.tested == DEFAULT_MIN_PUSHES - 1
    assert mean_cosine(reputation) == pytest.approx(-0.9)
    assert not should_ban(reputation)  # 19 tested pushes are not yet evidence
    assert should_ban(record_push(reputation, direction(-0.9)))


def test_an_honest_agent_whose_pushes_sometimes_point_away_is_never_banned() -> None:
    # Honest cosines: mean +0.45 and a wide spread, a fifth of them negative, in runs of two.
    rng = np.random.default_rng(1)
    pushes = []
    for _ in range(2000):
        cosine = float(np.clip(rng.normal(0.45, 0.5), -1, 1))
        pushes += [direction(cosine), direction(cosine), UNTESTED]
    assert flags_until_banned(pushes) is None


def test_a_sleeper_that_turns_late_is_left_to_its_recent_clipping_rate() -> None:
    # The direction rule reads the lifetime mean, which a long honest history holds up; a
    # sleeper whose flips fail the per-push test is still flagged, and banned on those.
    pushes = [direction(0.6)] * 5000 + [direction(-0.6)] * 300
    reputation = Reputation()
    for flags in pushes[:5100]:
        reputation = record_push(reputation, flags)
    assert mean_cosine(reputation) > 0
    banned_at = flags_until_banned(pushes)
    assert banned_at is not None and 5000 < banned_at < 5000 + 100


def test_an_opposed_push_must_have_been_tested_and_a_cosine_must_be_one() -> None:
    with pytest.raises(ValueError, match="direction test"):
        record_push(Reputation(), PushFlags(clipped=True, opposed=True))
    with pytest.raises(ValueError, match="cosine"):
        record_push(Reputation(), PushFlags(clipped=False, cosine=1.5))


def test_an_opposed_push_pending_shortens_the_wait_before_judging() -> None:
    assert judge_interval([], 2.0) == 2.0
    assert judge_interval([direction(0.3), UNTESTED, PushFlags(clipped=True)], 2.0) == 2.0
    assert judge_interval([direction(0.3), direction(-0.8)], 2.0) == OPPOSED_JUDGE_INTERVAL_S < 2.0
    assert judge_interval([direction(-0.8)], 0.1) == 0.1


def test_a_projected_reputation_due_a_ban_is_judged_at_once() -> None:
    # Prepare: 19 pushes straight against the root gradient, then the 20th.
    projected = Reputation()
    for flags in [direction(-0.9)] * 19:
        projected = record_push(projected, flags)
    pending = [direction(-0.9)]
    # Execute and Assert: one short of the evidence waits; the push that completes it not.
    assert judge_interval(pending, 2.0, projected) == OPPOSED_JUDGE_INTERVAL_S
    assert judge_interval(pending, 2.0, record_push(projected, pending[0])) == 0.0
    # An honest record with the same pending push keeps the rhythm of opposed pushes.
    honest = Reputation()
    for flags in [direction(0.2)] * 40:
        honest = record_push(honest, flags)
    assert judge_interval(pending, 2.0, record_push(honest, pending[0])) == OPPOSED_JUDGE_INTERVAL_S


def test_lifting_a_ban_forgets_the_direction_record_too() -> None:
    reputation = Reputation()
    for flags in [direction(-0.7)] * 40:
        reputation = record_push(reputation, flags)
    assert should_ban(reputation)
    lifted = lift_ban(reputation)
    assert lifted.tested == 0 and lifted.cosine_sum == 0.0 and not should_ban(lifted)


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
