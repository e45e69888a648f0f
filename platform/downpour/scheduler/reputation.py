"""Whether an agent is faulty or malicious: how often it is clipped, and spot checks.

Pure policy over plain values (no Django, Channels, Celery or Redis). The server keeps a
:class:`Reputation` per agent, folds in every push acknowledgement with :func:`record_push`
and every spot check with :func:`record_spot_check`, and bans the agent when
:func:`should_ban` says so. Staff review a ban; lifting it starts the agent afresh with
:func:`lift_ban`.

* **Clipping.** The parameter store clips a push that lies farther than ``tau`` from the
  shard's recent updates (:mod:`downpour.paramstore.robust`). Honest agents are clipped now
  and then (1 to 4 % of their pushes in ``bench/attacks.py``, at most 8.7 % for any one
  agent; see ``docs/robustness.md``); an agent that scales its gradients up is clipped on
  every push. Only *flagged* pushes count (``PushResult.clipped``): clipped from far outside
  the radius, or opposed to the server's root gradient when there is one (sign flips, IPM).
  "A Little Is Enough" gradients stay inside the radius: they are not banned, only bounded,
  and spot checks are what catch them. An agent is banned once
  it has ``min_pushes`` pushes and more than ``max_clipped_fraction`` of them, over its life
  or over its recent pushes, were clipped. The recent rate is an exponentially weighted count
  over about ``DEFAULT_RECENT_WINDOW`` pushes, so an agent cannot bank a long honest history
  and then attack until its lifetime rate catches up.
* **Direction.** A push that met the server's root gradient was *tested*, and its cosine
  with that gradient is kept. The server passes a root gradient only while it is
  informative, so untested pushes say nothing about direction and are left out: an agent is
  banned once it has ``min_pushes`` tested pushes and their mean cosine is below
  ``max_mean_cosine``, or that mean's t statistic below ``max_cosine_t``. Honest gradients
  point with the root gradient on average (early in training clearly, later barely): in
  ``bench/attacks.py``, with references every 32 versions as the server requests them,
  their mean never went below -0.020 after any push, t never below -0.28 (-0.055 and -1.51
  with references on a 1 s clock alone, when the line was -0.15); sign flips and IPM point
  against it (means near -0.15 to -0.52). Every push is judged (:func:`judge_interval`). A
  single cosine is noisy (a sign flip fails the per-push test, ``min_cosine = -0.5``, on
  only about a third of its tested pushes), so the mean decides. It is the lifetime mean:
  an exponentially weighted recent mean dipped to -0.08 for honest agents, too near the
  line, so an agent that turns late is left to clipping and spot checks
  (docs/robustness.md, Limits).
* **Spot checks.** One push round of a fraction of leases is recomputed by the platform's
  own worker (Celery, or the embedded thread) with the same seed, weights and mini-batches;
  :func:`gradients_match` compares the two (``downpour.training.spotchecks``). An agent
  that fakes every unit survives ``n`` units with probability ``(1 - fraction) ** n``
  (:func:`spot_check_probability_of_catch`). One failed check bans the agent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

#: Ban when more than this fraction of an agent's pushes were clipped.
DEFAULT_MAX_CLIPPED_FRACTION = 0.5
#: ...but only once the agent has made this many pushes (each shard push counts).
DEFAULT_MIN_PUSHES = 20
#: Pushes the recent clipping rate averages over (decay ``1 - 1 / window`` per push).
DEFAULT_RECENT_WINDOW = 100
#: Ban when an agent's tested pushes have a mean cosine with the root gradient below this...
DEFAULT_MAX_MEAN_COSINE = -0.10
#: ...or when that mean's t statistic is below this (:func:`cosine_t`).
DEFAULT_MAX_COSINE_T = -5.0
#: The floor of the cosines' standard deviation in :func:`cosine_t`.
MIN_COSINE_SD = 0.05
#: Seconds between judgements once an agent has an opposed push pending (:func:`judge_interval`).
OPPOSED_JUDGE_INTERVAL_S = 0.25
#: Failed spot checks an agent may have before it is banned.
DEFAULT_MAX_FAILED_SPOT_CHECKS = 0
#: Fraction of leases with one push round recomputed by the platform's worker.
DEFAULT_SPOT_CHECK_FRACTION = 0.05
#: :func:`gradients_match` tolerances: relative to the reference's L2 norm, and absolute
#: (gradient units, L2 norm per tensor).
DEFAULT_RTOL = 1e-2
DEFAULT_ATOL = 1e-5


@dataclass(frozen=True)
class Reputation:
    """What the server knows about one agent's pushes and spot checks.

    Attributes
    ----------
    pushes : int
        Pushes applied with centred clipping (one per shard push; held pushes and
        duplicates do not count).
    clipped : int
        Of those, how many were clipped.
    spot_checks_failed : int
        Work units whose recomputation by the worker did not match.
    spot_checks_passed : int
        Work units whose recomputation matched.
    recent_pushes : float
        Exponentially weighted count of pushes (weight ``1 - 1 / window`` per newer push).
    recent_clipped : float
        The same weighting over clipped pushes.
    tested : int
        Pushes that met the server's root gradient (the direction test ran).
    cosine_sum, cosine_sq_sum : float
        The sum of their cosines with it, and of the cosines' squares.
    """

    pushes: int = 0
    clipped: int = 0
    spot_checks_failed: int = 0
    spot_checks_passed: int = 0
    recent_pushes: float = 0.0
    recent_clipped: float = 0.0
    tested: int = 0
    cosine_sum: float = 0.0
    cosine_sq_sum: float = 0.0


@dataclass(frozen=True)
class PushFlags:
    """What the store said about one applied push, for :func:`record_push`.

    ``clipped``, ``cosine`` and ``opposed`` are ``PushResult``'s: flagged, the cosine with
    the root gradient when the direction test ran (None otherwise), and failed that test.
    """

    clipped: bool
    cosine: float | None = None
    opposed: bool = False


def record_push(
    reputation: Reputation, flags: PushFlags | bool, *, window: int = DEFAULT_RECENT_WINDOW
) -> Reputation:
    """The reputation after one more applied push.

    Parameters
    ----------
    reputation : Reputation
    flags : PushFlags or bool
        ``PushResult.clipped``, ``cosine`` and ``opposed`` of the push; a bool is
        ``clipped`` alone (a push no reference met).
    window : int
        Pushes the recent rates average over, ``>= 1``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not isinstance(flags, PushFlags):
        flags = PushFlags(bool(flags))
    if flags.opposed and flags.cosine is None:
        raise ValueError("a push cannot be opposed without a direction test")
    if flags.cosine is not None and not -1.0 <= flags.cosine <= 1.0:
        raise ValueError(f"cosine must be in [-1, 1], got {flags.cosine}")
    decay = 1.0 - 1.0 / window
    clipped = flags.clipped or flags.opposed
    updated = replace(
        reputation,
        pushes=reputation.pushes + 1,
        clipped=reputation.clipped + int(clipped),
        recent_pushes=reputation.recent_pushes * decay + 1.0,
        recent_clipped=reputation.recent_clipped * decay + float(clipped),
    )
    if flags.cosine is None:
        return updated
    return replace(
        updated,
        tested=updated.tested + 1,
        cosine_sum=updated.cosine_sum + flags.cosine,
        cosine_sq_sum=updated.cosine_sq_sum + flags.cosine * flags.cosine,
    )


def record_spot_check(reputation: Reputation, passed: bool) -> Reputation:
    """The reputation after one more spot check, passed or failed."""
    if passed:
        return replace(reputation, spot_checks_passed=reputation.spot_checks_passed + 1)
    return replace(reputation, spot_checks_failed=reputation.spot_checks_failed + 1)


def clipped_fraction(reputation: Reputation) -> float:
    """Fraction of the agent's pushes that were clipped, over its life; 0.0 with no push."""
    return reputation.clipped / reputation.pushes if reputation.pushes else 0.0


def recent_clipped_fraction(reputation: Reputation) -> float:
    """Exponentially weighted fraction of recent pushes that were clipped; 0.0 with no push."""
    if reputation.recent_pushes <= 0:
        return 0.0
    return reputation.recent_clipped / reputation.recent_pushes


def mean_cosine(reputation: Reputation) -> float:
    """Mean cosine of the agent's tested pushes with the root gradient, over its life; 0.0
    with none."""
    return reputation.cosine_sum / reputation.tested if reputation.tested else 0.0


def cosine_t(reputation: Reputation) -> float:
    """The t statistic of the tested pushes' mean cosine: ``mean / (sd / sqrt(n))``, with
    the standard deviation floored at :data:`MIN_COSINE_SD`; 0.0 with fewer than 2."""
    n = reputation.tested
    if n < 2:
        return 0.0
    mean = reputation.cosine_sum / n
    variance = max(0.0, reputation.cosine_sq_sum / n - mean * mean) * n / (n - 1)
    return mean / (max(math.sqrt(variance), MIN_COSINE_SD) / math.sqrt(n))


def points_away(
    reputation: Reputation,
    *,
    max_mean_cosine: float = DEFAULT_MAX_MEAN_COSINE,
    max_cosine_t: float = DEFAULT_MAX_COSINE_T,
    min_tested: int = DEFAULT_MIN_PUSHES,
) -> bool:
    """Whether the agent's tested pushes point away from the root gradient, once it has
    ``min_tested`` of them (part of :func:`should_ban`): their mean cosine is below
    ``max_mean_cosine``, or its t statistic (:func:`cosine_t`) below ``max_cosine_t``.

    The mean catches the clearly opposed; the t statistic catches the consistently
    opposed. IPM pushes (``-epsilon`` times the honest mean) barely vary, so a mean cosine
    of only -0.1 is already far outside what noise gives an honest agent."""
    if reputation.tested < min_tested:
        return False
    return mean_cosine(reputation) < max_mean_cosine or cosine_t(reputation) < max_cosine_t


def judge_interval(
    pending: Sequence[PushFlags], interval_s: float, projected: Reputation | None = None
) -> float:
    """Seconds the server may wait before folding ``pending`` pushes into a reputation.

    ``interval_s`` (the consumer's flush interval) normally; :data:`OPPOSED_JUDGE_INTERVAL_S`
    once any pending push was opposed; and 0 once ``projected`` (the reputation last judged,
    with the pending pushes folded in as they came) is due a ban. The last matters because
    the mean of a few tens of cosines wanders: a sign flipper whose mean stood at -0.24 at its
    20th tested push had drifted back above the line by the next timed judgement and was
    banned only at its 144th push (``bench/attacks.py``). Folding one push into
    ``projected`` is a few additions, so every push is judged in memory, and the database
    sees the verdict at once while honest agents keep the timed rhythm.
    """
    if projected is not None and should_ban(projected):
        return 0.0
    if any(flag.opposed for flag in pending):
        return min(interval_s, OPPOSED_JUDGE_INTERVAL_S)
    return interval_s


def min_pushes_for_shards(n_shards: int, rounds: int = DEFAULT_MIN_PUSHES // 2) -> int:
    """``min_pushes`` for a model of ``n_shards`` shards: at least ``rounds`` push rounds.

    Every shard push counts, and the shards of one round share one gradient, so an honest
    agent's unlucky round is clipped on all its shards at once. Asking for ``rounds`` rounds
    of evidence keeps the ban rule as strict for a 20-shard model as for a 2-shard one; never
    less than :data:`DEFAULT_MIN_PUSHES`.
    """
    if n_shards < 1 or rounds < 1:
        raise ValueError(f"n_shards and rounds must be >= 1, got {n_shards} and {rounds}")
    return max(DEFAULT_MIN_PUSHES, rounds * n_shards)


def should_ban(
    reputation: Reputation,
    *,
    max_clipped_fraction: float = DEFAULT_MAX_CLIPPED_FRACTION,
    min_pushes: int = DEFAULT_MIN_PUSHES,
    max_failed_spot_checks: int = DEFAULT_MAX_FAILED_SPOT_CHECKS,
    max_mean_cosine: float = DEFAULT_MAX_MEAN_COSINE,
) -> bool:
    """Whether to ban the agent automatically (staff review every ban).

    Parameters
    ----------
    reputation : Reputation
    max_clipped_fraction : float
        Ban when more than this fraction of pushes were clipped, in ``[0, 1)``; checked over
        the agent's life and over its recent pushes.
    min_pushes : int
        Pushes (tested pushes, for opposition) needed before the rule applies, ``>= 1``: a
        handful of unlucky
        pushes from a new agent is no evidence. For a model of many shards use
        :func:`min_pushes_for_shards`.
    max_failed_spot_checks : int
        Ban when more spot checks than this failed, ``>= 0``.
    max_mean_cosine : float
        Ban when the mean cosine of the agent's tested pushes with the root gradient is
        below this (:func:`points_away`).

    Notes
    -----
    Defaults: honest agents are clipped on 1 to 4 % of their pushes (at most 8.7 % for any
    one agent in ``bench/attacks.py``, with 40 % ALIE attackers). Were clipping independent,
    an agent at 8.7 % would exceed 50 % of 20 pushes with probability ``2e-7``; it is not (the
    first minutes of training clip many pushes at once), hence the wide margin. An agent
    that scales its gradients is clipped on every push and is banned at its 20th. A failed
    spot check is direct evidence of faking.
    """
    if not 0 <= max_clipped_fraction < 1:
        raise ValueError(f"max_clipped_fraction must be in [0, 1), got {max_clipped_fraction}")
    if min_pushes < 1:
        raise ValueError(f"min_pushes must be >= 1, got {min_pushes}")
    if max_failed_spot_checks < 0:
        raise ValueError(f"max_failed_spot_checks must be >= 0, got {max_failed_spot_checks}")
    if reputation.spot_checks_failed > max_failed_spot_checks:
        return True
    if points_away(reputation, max_mean_cosine=max_mean_cosine, min_tested=min_pushes):
        return True
    if reputation.pushes < min_pushes:
        return False
    return (
        clipped_fraction(reputation) > max_clipped_fraction
        or recent_clipped_fraction(reputation) > max_clipped_fraction
    )


def lift_ban(reputation: Reputation) -> Reputation:
    """The reputation after staff lift a ban: the agent starts afresh.

    Push, clipping, direction and failed-check counts go back to zero (passed checks stay), so the
    agent must again make ``min_pushes`` pushes before the clipping rule can ban it.
    """
    return Reputation(spot_checks_passed=reputation.spot_checks_passed)


def spot_check_probability_of_catch(fraction: float, tasks: int) -> float:
    """Probability that an agent faking every one of ``tasks`` work units is spot-checked.

    Each unit is checked independently with probability ``fraction``, so the agent escapes
    with probability ``(1 - fraction) ** tasks``. For the default 5 % and 100 units:
    ``1 - 0.95 ** 100 = 0.9941``.

    Parameters
    ----------
    fraction : float
        Probability that a unit is recomputed, in ``[0, 1]``.
    tasks : int
        Work units the agent completes, ``>= 0``.
    """
    _check_fraction(fraction)
    if tasks < 0:
        raise ValueError(f"tasks must be >= 0, got {tasks}")
    return 1.0 - (1.0 - fraction) ** tasks


def min_spot_check_fraction(tasks: int, probability: float) -> float:
    """Smallest spot-check fraction that catches an always-faking agent in time.

    ``1 - (1 - probability) ** (1 / tasks)``: 0.0450 for 100 units and probability 0.99.

    Parameters
    ----------
    tasks : int
        Work units within which the agent must be caught, ``>= 1``.
    probability : float
        Wanted probability of catching it, in ``[0, 1)``.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be >= 1, got {tasks}")
    if not 0 <= probability < 1:
        raise ValueError(f"probability must be in [0, 1), got {probability}")
    return 1.0 - math.pow(1.0 - probability, 1.0 / tasks)


class UniformSource(Protocol):
    """Anything with ``random()`` uniform on ``[0, 1)``.

    ``random.SystemRandom``, ``random.Random`` and ``numpy.random.Generator`` all qualify.
    """

    def random(self) -> float: ...


def should_spot_check(rng: UniformSource, fraction: float = DEFAULT_SPOT_CHECK_FRACTION) -> bool:
    """Whether to recompute this work unit, with probability ``fraction``.

    Parameters
    ----------
    rng : UniformSource
        In production ``random.SystemRandom()``, so an agent cannot predict which of its
        units are checked; a seeded generator in tests.
    fraction : float
        In ``[0, 1]``.
    """
    _check_fraction(fraction)
    return fraction > 0 and rng.random() < fraction


Gradients = Mapping[str, np.ndarray] | np.ndarray


def gradients_match(
    a: Gradients, b: Gradients, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> bool:
    """Whether an agent's gradients ``a`` agree with the trusted recomputation ``b``.

    Tensor by tensor, ``||a - b|| <= atol + rtol * ||b||`` (L2 norms over the whole tensor,
    computed in float64). Comparing norms rather than elements tolerates the rounding
    differences of another CPU, GPU or BLAS (relative ``1e-7`` to ``1e-3`` in float32),
    while a faked gradient (scaled, flipped, from other data or made up) is off by a
    relative ``O(1)``.

    Parameters
    ----------
    a, b : mapping of str to ndarray, or ndarray
        The same variable names with the same shapes; any float dtype.
    rtol : float
        Relative tolerance, ``>= 0``.
    atol : float
        Absolute tolerance in gradient units (L2 norm), ``>= 0``.

    Returns
    -------
    bool
        False also when the names or shapes differ or any value is NaN or infinite.
    """
    if not (rtol >= 0 and atol >= 0):
        raise ValueError(f"rtol and atol must be >= 0, got {rtol} and {atol}")
    left = {"": a} if isinstance(a, np.ndarray) else dict(a)
    right = {"": b} if isinstance(b, np.ndarray) else dict(b)
    if left.keys() != right.keys():
        return False
    for name, reference in right.items():
        value = np.asarray(left[name], dtype=np.float64)
        expected = np.asarray(reference, dtype=np.float64)
        if value.shape != expected.shape:
            return False
        if not (np.isfinite(value).all() and np.isfinite(expected).all()):
            return False
        if _norm(value - expected) > atol + rtol * _norm(expected):
            return False
    return True


def _norm(array: np.ndarray) -> float:
    flat = array.reshape(-1)
    return math.sqrt(float(np.dot(flat, flat)))


def _check_fraction(fraction: float) -> None:
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
