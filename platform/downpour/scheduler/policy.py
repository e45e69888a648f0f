"""Which job gets the next unit of donated compute, and how big that unit is.

Fair share
----------
Donated compute, counted in training samples, is split between the researchers who have
runnable jobs by weighted max-min fairness, then equally between each researcher's jobs.
:func:`rank_jobs` turns that into an order for the next unit. For every researcher it
measures what they *received*: the samples of their leases that ended recently, each
weighted by ``exp(-age / tau)`` (:class:`~downpour.scheduler.fairness.DecayingTotals`),
plus the planned samples of their leases still running. It turns that into a rate by
dividing by the time it covers: the decayed length of the stretch in which the researcher
had runnable work (:func:`~downpour.scheduler.fairness.decayed_span`) plus the in-flight
horizon (about one unit's duration). It water-fills the total rate between researchers
(:func:`~downpour.scheduler.fairness.weighted_max_min_shares`, each researcher's demand
capped by what their jobs have left to do) and serves first the researcher with the
largest shortfall per unit of weight. A finished or paused job is simply not passed in,
so its share goes to the others at once.

Two choices keep the allocation steady over any window:

* The memory decays exponentially rather than over a hard sliding window, so an old
  lump of compute does not fall out all at once and make its owner look owed again one
  window later (with a hard window, every imbalance came back as an echo one window
  later in ``bench/simulate.py``).
* Rates are taken over the stretch in which a researcher had runnable work, so one who
  was away does not come back owed the time they were away (as in start-time fair
  queueing, idle time earns no credit).

Without a :class:`FairWindow` the ranking uses cumulative ``samples_done`` over a span of
1, which is the first version's rule (least done-plus-in-flight per unit of weight).

Unit size
---------
:func:`unit_steps` sizes a unit so that it lasts about ``target_seconds`` on the agent,
scaled down for unreliable agents (:func:`downpour.scheduler.reliability.unit_scale`).
:func:`fits_agent` says whether an already-cut unit (a backup copy) is small enough for an
agent, and :func:`split_unit` cuts a reissued unit that is too big for the agent asking
into a piece it can do and a remainder that stays in the queue, so that a fast agent's
unit does not wait for another fast agent.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from .fairness import decayed_span, weighted_max_min_shares

K = TypeVar("K", int, str)

#: Multiply-adds per sample of the MLP 64-128-128-10 that agents benchmark on; an agent's
#: reported samples/s is scaled by this over the job's own cost to size its units.
REFERENCE_FLOPS_PER_SAMPLE = 64 * 128 + 128 * 128 + 128 * 10

_MIN_WEIGHT = 1e-9


@dataclass(frozen=True)
class JobLoad:
    """What the policy needs to know of one runnable job.

    ``samples_done`` and ``samples_in_flight`` are counts of training samples; ``weight``
    is the owning researcher's share weight (> 0).

    Attributes
    ----------
    job_id : str
    owner_id : int
        The researcher who owns the job.
    weight : float
        The owner's share weight, > 0.
    samples_done : int
        Samples pushed for the job so far (all time).
    samples_in_flight : int
        Planned samples (``steps * batch_size``) of the job's units that are leased now.
    created_order : int
        Rank by age, 0 for the oldest; breaks ties.
    samples_recent : float or None
        Samples processed by the job's ended leases, each weighted by
        ``exp(-age / tau)`` (see :class:`FairWindow`); only read when :func:`rank_jobs`
        is given a :class:`FairWindow`.
    active_s : float or None
        Seconds since the job last became runnable (started or resumed); ``None`` for
        "long enough to fill the window".
    budget_samples : int or None
        The job's sample budget; ``None`` for no budget. A job whose done plus in-flight
        samples reach it takes no new units but still counts towards its owner's share.
    """

    job_id: str
    owner_id: int
    weight: float
    samples_done: int
    samples_in_flight: int
    created_order: int = 0
    samples_recent: float | None = None
    active_s: float | None = None
    budget_samples: int | None = None

    @property
    def samples_left(self) -> float:
        """Samples the job can still be given: budget minus done and in flight (may be inf)."""
        if self.budget_samples is None:
            return math.inf
        return float(self.budget_samples - self.samples_done - self.samples_in_flight)


@dataclass(frozen=True)
class FairWindow:
    """The decaying window over which received compute is compared with fair shares.

    Attributes
    ----------
    time_constant_s : float
        ``tau``, seconds: a lease that ended ``s`` seconds ago counts ``exp(-s / tau)``
        of its samples. 0 keeps no memory: only in-flight work is compared.
    horizon_s : float
        How far ahead leased work reaches, in seconds: about the unit target time. It is
        added to every span so that in-flight samples are counted over the time they take.
    owner_recent : Mapping[int, float]
        Decayed samples of the ended leases of *all* of a researcher's jobs (finished and
        paused ones too). Researchers missing here are summed from their jobs'
        ``samples_recent``.
    owner_active_s : Mapping[int, float]
        Seconds since the researcher last had no runnable job
        (:func:`~downpour.scheduler.fairness.runnable_since`); missing means "long enough".
    """

    time_constant_s: float = 120.0
    horizon_s: float = 30.0
    owner_recent: Mapping[int, float] = field(default_factory=dict)
    owner_active_s: Mapping[int, float] = field(default_factory=dict)


def _priorities(
    received: Mapping[K, float],
    span: Mapping[K, float],
    left: Mapping[K, float],
    weight: Mapping[K, float],
) -> dict[K, tuple[bool, float]]:
    """Sort keys, smaller first: (not a small unmet demand, minus shortfall per weight).

    Water-filling satisfies demands below the fair level in full, so a key whose whole
    remaining demand fits under its share (a job about to finish) goes before the keys
    that merely fluctuate around theirs; otherwise the largest shortfall goes first.
    """
    rate = {k: received[k] / span[k] for k in received}
    demand = {k: (received[k] + max(0.0, left[k])) / span[k] for k in received}
    shares = weighted_max_min_shares(demand, weight, sum(rate.values()))
    out: dict[K, tuple[bool, float]] = {}
    for k in received:
        shortfall = shares[k] / weight[k] - rate[k] / weight[k]
        small = (
            math.isfinite(demand[k])
            and left[k] > 0
            and shares[k] >= demand[k] * (1 - 1e-9)
            and shortfall > 0
        )
        out[k] = (not small, -shortfall)
    return out


def rank_jobs(
    jobs: Sequence[JobLoad], *, window: FairWindow | None = None, tail_fraction: float = 0.1
) -> list[str]:
    """Every job that can take a new unit, most deserving first.

    Researchers are ordered by shortfall below their weighted max-min fair share (ties to
    the lower ``owner_id``), and within a researcher jobs by shortfall below an equal
    split (ties to the oldest). A researcher whose remaining demand is below their fair
    share -- a budget about to run out -- goes first, as water-filling satisfies small
    demands in full. Within a researcher, a job in its tail (less than ``tail_fraction``
    of its budget left) goes before the others, least left first: which of their own jobs
    finishes first does not change the researcher's share, and finishing it frees it.
    See the module docstring for how compute is counted.

    Parameters
    ----------
    jobs : Sequence[JobLoad]
        Every running job: the ones whose budget is fully leased still count towards
        their owner's share but are not ranked.
    window : FairWindow or None
        Compare over this decaying window; ``None`` compares all-time ``samples_done``.
    tail_fraction : float
        A job with less than this fraction of its budget left goes first within its
        researcher's jobs.

    Returns
    -------
    list[str]
        Job ids; empty when no job can take work.
    """
    owner_jobs: dict[int, list[JobLoad]] = {}
    for job in jobs:
        owner_jobs.setdefault(job.owner_id, []).append(job)

    def received(job: JobLoad) -> float:
        if window is None:
            return float(job.samples_done + job.samples_in_flight)
        return (job.samples_recent or 0.0) + job.samples_in_flight

    def span(active_s: float | None) -> float:
        if window is None:
            return 1.0
        active = math.inf if active_s is None else active_s
        return decayed_span(active, window.time_constant_s) + window.horizon_s

    o_received: dict[int, float] = {}
    o_span: dict[int, float] = {}
    o_left: dict[int, float] = {}
    o_weight: dict[int, float] = {}
    for key, mine in owner_jobs.items():
        if window is not None and key in window.owner_recent:
            o_received[key] = window.owner_recent[key] + sum(j.samples_in_flight for j in mine)
        else:
            o_received[key] = sum(received(j) for j in mine)
        o_span[key] = span(None if window is None else window.owner_active_s.get(key))
        o_left[key] = sum(max(0.0, j.samples_left) for j in mine)
        o_weight[key] = max(max(j.weight for j in mine), _MIN_WEIGHT)
    o_priority = _priorities(o_received, o_span, o_left, o_weight)

    ranked: list[str] = []
    for owner in sorted(owner_jobs, key=lambda o: (o_priority[o], o)):
        mine = owner_jobs[owner]
        j_received = {j.job_id: received(j) for j in mine}
        j_span = {j.job_id: span(j.active_s) for j in mine}
        j_left = {j.job_id: j.samples_left for j in mine}
        j_weight = {j.job_id: 1.0 for j in mine}
        j_priority = _priorities(j_received, j_span, j_left, j_weight)

        def tail_left(job: JobLoad) -> float:
            """Fraction of the budget left if the job is in its tail, else inf."""
            if not job.budget_samples:
                return math.inf
            fraction = job.samples_left / job.budget_samples
            return fraction if fraction < tail_fraction else math.inf

        runnable = [j for j in mine if j.samples_left > 0]
        runnable.sort(key=lambda j: (tail_left(j), j_priority[j.job_id], j.created_order, j.job_id))
        ranked.extend(j.job_id for j in runnable)
    return ranked


def pick_job(
    jobs: Sequence[JobLoad],
    *,
    window: FairWindow | None = None,
    eligible: Container[str] | None = None,
    tail_fraction: float = 0.1,
) -> str | None:
    """Pick the job whose researcher is furthest below their weighted share.

    The first job of :func:`rank_jobs` that is in ``eligible``. Compute is counted as
    samples done (or, with ``window``, recently processed) plus samples leased.

    Parameters
    ----------
    jobs : Sequence[JobLoad]
        Every running job (see :func:`rank_jobs`).
    window : FairWindow or None
        Compare received compute over this decaying window; ``None`` for all time.
    eligible : Container[str] or None
        Ids of the jobs this agent may take (warm start, tail and staleness rules, see
        :mod:`downpour.scheduler.staleness` and :mod:`downpour.scheduler.reliability`);
        ``None`` for all. Ineligible jobs still count towards their owner's share.
    tail_fraction : float
        Passed to :func:`rank_jobs`.

    Returns
    -------
    str or None
        A job id, or ``None`` when there is nothing to run.
    """
    for job_id in rank_jobs(jobs, window=window, tail_fraction=tail_fraction):
        if eligible is None or job_id in eligible:
            return job_id
    return None


def unit_steps(
    samples_per_s: float | None,
    batch_size: int,
    target_seconds: float,
    flops_per_sample: float | None = None,
    min_steps: int = 20,
    max_steps: int = 20_000,
    *,
    scale: float = 1.0,
) -> int:
    """Number of gradient steps so that a unit takes about ``target_seconds`` on this agent.

    ``samples_per_s`` is the agent's benchmark on the reference MLP; it is scaled by the
    ratio of the reference's multiply-adds to ``flops_per_sample`` of the job's model.
    Unknown speed gives ``min_steps``, so a new agent proves itself on small units.

    Parameters
    ----------
    samples_per_s : float or None
        Measured speed of the agent, samples per second on the reference model.
    batch_size : int
        Samples per step.
    target_seconds : float
        Wanted duration of the unit, seconds.
    flops_per_sample : float or None
        Multiply-adds per sample of the job's model; ``None`` if it costs as the reference.
    min_steps, max_steps : int
        Bounds on the result; pass ``max_steps`` to cap a unit at a job's remaining budget.
    scale : float
        Multiplier in ``(0, 1]`` on the duration, from
        :func:`~downpour.scheduler.reliability.unit_scale`: agents that abandon work get
        smaller units.

    Returns
    -------
    int
        Steps, in ``[min_steps, max(min_steps, max_steps)]``.
    """
    if not samples_per_s or samples_per_s <= 0 or batch_size <= 0:
        return min_steps
    speed = samples_per_s
    if flops_per_sample and flops_per_sample > 0:
        speed *= min(1.0, REFERENCE_FLOPS_PER_SAMPLE / flops_per_sample)
    steps = speed * target_seconds * max(0.0, min(1.0, scale)) / batch_size
    if not math.isfinite(steps):  # an absurd reported speed gets the largest unit
        return max(min_steps, max_steps)
    return max(min_steps, min(max_steps, int(steps)))


def fits_agent(
    unit_samples: float,
    samples_per_s: float | None,
    target_seconds: float,
    *,
    slack: float = 2.0,
) -> bool:
    """Whether an agent would finish an already-cut unit within ``slack * target_seconds``.

    Reissued units and backup copies keep the size they were cut to, for the agent that
    first had them; a slow agent must not be handed a fast agent's unit.

    Parameters
    ----------
    unit_samples : float
        Planned samples of the unit (``steps * batch_size``).
    samples_per_s : float or None
        The candidate agent's measured speed on the job's model, samples/s.
    target_seconds : float
        The unit target duration, seconds.
    slack : float
        How many target durations the unit may take on this agent.
    """
    if not samples_per_s or samples_per_s <= 0:
        return False
    return unit_samples / samples_per_s <= slack * target_seconds


def split_unit(steps: int, agent_steps: int, *, slack: float = 2.0) -> tuple[int, int]:
    """Cut a queued unit for the agent asking: ``(steps it takes, steps left queued)``.

    An agent takes the whole unit when it would finish it within ``slack`` of its own unit
    size; otherwise it takes ``agent_steps`` and the rest stays pending as a new unit on
    the same shard. (A unit is only "so many steps on a shard", so a piece is as good.)

    Parameters
    ----------
    steps : int
        Steps of the queued unit.
    agent_steps : int
        The asking agent's own unit size, from :func:`unit_steps`.
    slack : float
        How many of its own units an agent may take at once.
    """
    if agent_steps <= 0 or steps <= slack * agent_steps:
        return steps, 0
    return agent_steps, steps - agent_steps
