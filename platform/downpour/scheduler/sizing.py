"""How much work one agent may hold: units sized from measured work, and caps on hoarding.

An agent's reported ``samples_per_s`` is its own word: one that claimed 1e9 got one lease
of a job's whole budget and kept it alive with heartbeats. So the scheduler sizes units
from what the agent has *done*:

* **Measured rate.** When a lease completes, its samples (the server's tally of applied
  pushes) over its seconds from issue (or from the end of the agent's lease still running
  then) to completion is one measurement, normalised to the
  reference model (:func:`reference_rate`). The agent's rate is an exponentially weighted
  average of them (:func:`update_measured_rate`), and a single measurement may raise it
  at most ``max_growth``-fold, so a burst of fast fakes grows units only step by step.
* **First unit.** Until an agent has a measured rate, its units are
  ``SizingRule.first_unit_steps`` long, whatever it reports.
* **Leases per agent.** An agent holds at most ``max_active_leases`` leases at once.
* **Share of a budget.** An agent's in-flight samples of a job with a sample budget stay
  within ``max_budget_share`` of what is left of it (:func:`share_cap_steps`); an agent
  holding nothing of the job may always take one step, so a job's last step is not stuck.

Pure functions over numbers; the adapter is ``downpour.training.actions.claims``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .policy import REFERENCE_FLOPS_PER_SAMPLE


@dataclass(frozen=True)
class SizingRule:
    """The limits on what one agent is given.

    Attributes
    ----------
    first_unit_steps : int
        Steps of a unit for an agent with no measured rate yet.
    max_active_leases : int
        Leases one agent may hold at once.
    max_budget_share : float
        In ``(0, 1]``: the largest fraction of a budgeted job's remaining samples that one
        agent's active leases may cover.
    ewma_weight : float
        In ``(0, 1]``: weight of the newest measurement in the measured rate.
    max_growth : float
        ``>= 1``: one measurement raises the measured rate at most this many times.
    min_lease_seconds : float
        Leases shorter than this are measured as if they took this long (a clock's noise
        must not make a rate).
    """

    first_unit_steps: int = 20
    max_active_leases: int = 2
    max_budget_share: float = 0.25
    ewma_weight: float = 0.5
    max_growth: float = 4.0
    min_lease_seconds: float = 1.0


def reference_rate(samples: float, seconds: float, flops_per_sample: float | None) -> float:
    """One lease's throughput, in samples per second of the reference model.

    The inverse of the model scaling in :func:`~downpour.scheduler.policy.unit_steps`:
    a model costlier than the reference ran fewer samples per second than the agent would
    on the reference.

    Parameters
    ----------
    samples : float
        Samples the lease's applied pushes covered (the server's count).
    seconds : float
        Seconds from issue (or the end of the lease before it) to completion, > 0.
    flops_per_sample : float or None
        Multiply-adds per sample of the job's model; None for "as the reference".
    """
    rate = max(0.0, samples) / seconds
    if flops_per_sample and flops_per_sample > 0:
        rate /= min(1.0, REFERENCE_FLOPS_PER_SAMPLE / flops_per_sample)
    return rate


def update_measured_rate(
    previous: float | None,
    samples: float,
    seconds: float,
    flops_per_sample: float | None = None,
    rule: SizingRule = SizingRule(),
) -> float:
    """The agent's measured rate after one more completed lease, reference samples/s.

    Parameters
    ----------
    previous : float or None
        The measured rate so far; None before the first measurement.
    samples, seconds, flops_per_sample
        The completed lease, as for :func:`reference_rate`.
    rule : SizingRule
    """
    measured = reference_rate(samples, max(seconds, rule.min_lease_seconds), flops_per_sample)
    if previous is None or not math.isfinite(previous) or previous <= 0:
        return measured
    measured = min(measured, previous * rule.max_growth)
    return (1 - rule.ewma_weight) * previous + rule.ewma_weight * measured


def may_take_lease(active_leases: int, rule: SizingRule = SizingRule()) -> bool:
    """Whether an agent holding ``active_leases`` leases may be given another."""
    return active_leases < rule.max_active_leases


def share_cap_steps(
    batch_size: int,
    remaining_samples: float | None,
    held_samples: float,
    rule: SizingRule = SizingRule(),
) -> int | None:
    """The most steps a new unit of a job may have for this agent; None for no cap.

    Parameters
    ----------
    batch_size : int
        Samples per step, > 0.
    remaining_samples : float or None
        The job's budget minus its samples done; None for a job without a sample budget.
    held_samples : float
        Samples still to run on the agent's active leases of this job.
    rule : SizingRule

    Returns
    -------
    int or None
        0 when the agent already holds its share (the job is not for it now); at least 1
        when it holds nothing of the job.
    """
    if remaining_samples is None:
        return None
    allowed = math.floor((rule.max_budget_share * remaining_samples - held_samples) / batch_size)
    if held_samples <= 0:
        return max(1, allowed)
    return max(0, allowed)


def measured_unit_steps(
    measured_rate: float | None,
    agent_steps: int,
    scale: float = 1.0,
    rule: SizingRule = SizingRule(),
) -> int:
    """``agent_steps`` (from :func:`~downpour.scheduler.policy.unit_steps` on the measured
    rate) once the agent has a measured rate; else the first unit, times ``scale``."""
    if measured_rate is None:
        return max(1, int(rule.first_unit_steps * max(0.0, min(1.0, scale))))
    return agent_steps
