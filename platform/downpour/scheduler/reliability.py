"""How reliable each agent is, and what that changes: unit size and the tail of a job.

Every lease an agent holds ends *completed* or *abandoned* (expired because the agent
vanished). A lease the agent hands back (``return_lease``) is neither: the work goes
straight back to the queue.

* **Unit scale.** Like BOINC's per-host quota (``sched/sched_result.cpp``:
  ``got_bad_result`` lowers a host's ``max_jobs_per_day``, ``got_good_result`` doubles
  it back), an abandonment halves the duration of the agent's next units and each
  completion doubles it again, up to the full target. An agent that keeps vanishing
  loses little work; one that recovers is back to full units after a few completions.
* **Reliability.** The Laplace-smoothed completion rate ``(c + 1) / (c + a + 2)``.
  :func:`is_reliable` also asks, as BOINC's ``consecutive_valid`` does, for a run of
  recent completions with no abandonment.
* **Tail of a job.** Once less than ``tail_fraction`` of a budgeted job is left to hand
  out, new and reissued units of it go only to reliable agents (:func:`admits_to_tail`),
  so that the last units are not the ones that get lost, and they are cut to
  ``TailRule.unit_scale`` of the target duration (:func:`tail_unit_scale`): pushes that
  are rejected as stale and leases that are abandoned leave a job short of its budget,
  and each round of top-up units, and each straggler among them, is then short.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class HostRecord:
    """One agent's record of finished leases.

    Attributes
    ----------
    completed : int
        Leases completed.
    abandoned : int
        Leases that expired while the agent held them.
    consecutive_completed : int
        Completions since the last abandonment.
    unit_scale : float
        Multiplier in ``[min_scale, 1]`` on the agent's unit duration.
    """

    completed: int = 0
    abandoned: int = 0
    consecutive_completed: int = 0
    unit_scale: float = 1.0

    @classmethod
    def from_outcomes(cls, outcomes: Iterable[bool], *, min_scale: float = 1 / 16) -> HostRecord:
        """Fold lease outcomes, oldest first (``True`` = completed), into a record.

        The server can rebuild a record from an agent's recent lease rows ordered by
        ``ended_at``, with no extra column.
        """
        record = cls()
        for completed in outcomes:
            record = record_outcome(record, completed, min_scale=min_scale)
        return record


def record_outcome(
    record: HostRecord,
    completed: bool,
    *,
    min_scale: float = 1 / 16,
    recovery: float = 2.0,
) -> HostRecord:
    """The record after one more lease ended: completed (``True``) or abandoned.

    Parameters
    ----------
    record : HostRecord
    completed : bool
    min_scale : float
        Floor of ``unit_scale``, in ``(0, 1]``.
    recovery : float
        Factor, > 1, by which a completion grows ``unit_scale`` back towards 1.
    """
    if completed:
        return replace(
            record,
            completed=record.completed + 1,
            consecutive_completed=record.consecutive_completed + 1,
            unit_scale=min(1.0, record.unit_scale * recovery),
        )
    return replace(
        record,
        abandoned=record.abandoned + 1,
        consecutive_completed=0,
        unit_scale=max(min_scale, record.unit_scale / 2),
    )


def reliability(record: HostRecord) -> float:
    """Laplace-smoothed fraction of leases completed, in ``(0, 1)``; 0.5 for a new agent."""
    return (record.completed + 1) / (record.completed + record.abandoned + 2)


def unit_scale(record: HostRecord) -> float:
    """Multiplier on the agent's unit duration: halved per abandonment, doubled per completion."""
    return record.unit_scale


def is_reliable(
    record: HostRecord, *, min_reliability: float = 0.8, min_consecutive: int = 3
) -> bool:
    """Whether the agent may have the last units of a job.

    Parameters
    ----------
    record : HostRecord
    min_reliability : float
        Least :func:`reliability`.
    min_consecutive : int
        Least completions since the last abandonment.
    """
    return (
        reliability(record) >= min_reliability and record.consecutive_completed >= min_consecutive
    )


@dataclass(frozen=True)
class TailRule:
    """When a budgeted job is in its tail, and who may have its last units.

    Attributes
    ----------
    tail_fraction : float
        The job is in its tail when less than this fraction of its budget is left.
    min_reliability : float
    min_consecutive : int
        Passed to :func:`is_reliable`.
    unit_scale : float
        Multiplier on the unit duration in the tail, in ``(0, 1]``.
    """

    tail_fraction: float = 0.1
    min_reliability: float = 0.8
    min_consecutive: int = 3
    unit_scale: float = 0.25


def remaining_fraction(budget_samples: int | None, samples_left: float) -> float:
    """Fraction of a job's budget still to hand out or finish; 1.0 for no budget.

    Parameters
    ----------
    budget_samples : int or None
        The job's budget, samples.
    samples_left : float
        Samples of the budget not yet done (or not yet leased, for the unit rule).
    """
    if not budget_samples or budget_samples <= 0:
        return 1.0
    return max(0.0, samples_left) / budget_samples


def admits_to_tail(record: HostRecord, fraction_left: float, rule: TailRule = TailRule()) -> bool:
    """Whether an agent may be given a unit of a job with ``fraction_left`` of it left.

    Outside the tail everybody may; inside it, only reliable agents.
    """
    if fraction_left >= rule.tail_fraction:
        return True
    return is_reliable(
        record, min_reliability=rule.min_reliability, min_consecutive=rule.min_consecutive
    )


def tail_unit_scale(fraction_left: float, rule: TailRule = TailRule()) -> float:
    """Multiplier on the unit duration for a job with ``fraction_left`` of its budget left."""
    return rule.unit_scale if fraction_left < rule.tail_fraction else 1.0
