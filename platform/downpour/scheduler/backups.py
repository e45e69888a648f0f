"""Backup copies of straggling units near the end of a job, as in Sandblaster.

Dean et al. (2012) found that a few slow machines hold up the end of a batch, and had
Sandblaster hand their unfinished work to other replicas, using whichever copy finished
first. Here, once a budgeted job is in its tail, a unit whose lease has run much longer
than the unit was sized for gets one more copy, given to a reliable agent it fits.

The first copy to *complete* wins: the server marks the unit done with a compare-and-set
``UPDATE ... WHERE status='leased'``, ends the other copies' leases, and rejects their
further pushes. Pushes a losing copy made before that were applied like any other, as
everything in asynchronous SGD is; the unit's samples count once towards the budget.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackupRule:
    """When a running unit deserves a backup copy.

    Attributes
    ----------
    tail_fraction : float
        Only when less than this fraction of the job's budget is left unfinished.
    slowness : float
        Only when the lease has run more than ``slowness`` times its expected duration.
    max_copies : int
        Copies of one unit running at once, the original included.
    """

    tail_fraction: float = 0.1
    slowness: float = 1.5
    max_copies: int = 2


def expected_duration_s(unit_samples: float, samples_per_s: float | None) -> float:
    """Seconds a unit of ``unit_samples`` should take at ``samples_per_s`` (inf if unknown)."""
    if not samples_per_s or samples_per_s <= 0:
        return float("inf")
    return unit_samples / samples_per_s


def should_issue_backup(
    elapsed_s: float,
    expected_s: float,
    fraction_left: float,
    copies: int,
    rule: BackupRule = BackupRule(),
) -> bool:
    """Whether to start another copy of a running unit.

    Parameters
    ----------
    elapsed_s : float
        Seconds since the unit's oldest running lease was issued.
    expected_s : float
        Seconds the unit was sized to take on that lease's agent
        (:func:`expected_duration_s`).
    fraction_left : float
        Fraction of the job's budget not yet done
        (:func:`~downpour.scheduler.reliability.remaining_fraction`).
    copies : int
        Copies of the unit running now.
    rule : BackupRule
    """
    return (
        fraction_left < rule.tail_fraction
        and copies < rule.max_copies
        and elapsed_s > rule.slowness * expected_s
    )


def straggler_order(elapsed_s: float, expected_s: float) -> float:
    """Sort key, smaller first: the unit furthest behind its expected duration leads."""
    if expected_s <= 0:
        return -float("inf")
    return -elapsed_s / expected_s
