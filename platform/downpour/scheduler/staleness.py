"""Bounding and living with stale gradients.

A push's *staleness* is the number of pushes applied to the same parameter shard between
the agent's fetch of that shard and its push (``PushResult.staleness`` in the store). The
store rejects a push staler than the job's ``max_staleness``.

* **Push cadence.** If every replica pushes every ``n_push`` *steps*, a replica of speed
  ``s_i`` in a job whose replicas together do ``S`` samples/s sees on average
  ``(S - s_i) / s_i`` other pushes between its fetch and its push: with speeds spread
  100x, the slowest agents' gradients are ~100x staler than the fastest's and are all
  rejected. :func:`push_every_steps` instead sizes ``n_push`` to the agent's speed so
  that every replica pushes about every ``interval_s`` *seconds*; staleness is then about
  the number of other replicas, whatever their speed.
* **Admission.** :func:`expected_staleness` predicts the mean staleness a new replica
  would see; :func:`admits_replica` refuses it when even the 95th percentile (Poisson)
  would pass ``max_staleness``, so compute is not spent on gradients the store would
  reject.
* **Step size.** The store's ``staleness_scaled_step`` (``downpour.paramstore``) divides
  the step by the staleness (Zhang, Gupta, Lian and Liu, "Staleness-aware Async-SGD for
  Distributed Deep Learning", IJCAI 2016).
* **Warm start.** Dean et al. (2012) trained one replica alone before starting the
  others; :class:`WarmStart` gives a job to a single agent for its first ``k_pushes``
  applied pushes.
* **Record.** :class:`StalenessHistogram` keeps a job's distribution of staleness for
  its p50/p95.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


def push_every_steps(
    samples_per_s: float | None,
    batch_size: int,
    interval_s: float = 2.0,
    *,
    max_steps: int | None = None,
) -> int:
    """Steps between an agent's pushes so that it pushes about every ``interval_s`` seconds.

    Parameters
    ----------
    samples_per_s : float or None
        The agent's measured speed on the job's model, samples/s; ``None`` if unknown.
    batch_size : int
        Samples per step.
    interval_s : float
        Wanted seconds between pushes.
    max_steps : int or None
        Upper bound, e.g. the unit's steps.

    Returns
    -------
    int
        ``n_push`` for this agent's lease, >= 1 (1 when the speed is unknown).
    """
    if not samples_per_s or samples_per_s <= 0 or batch_size <= 0:
        return 1
    steps = max(1, round(samples_per_s * interval_s / batch_size))
    if max_steps is not None:
        steps = max(1, min(steps, max_steps))
    return steps


def push_interval_s(push_steps: int, batch_size: int, samples_per_s: float) -> float:
    """Seconds between pushes of an agent at ``samples_per_s`` that pushes every ``push_steps``."""
    return push_steps * batch_size / samples_per_s


def expected_staleness(others_push_rate: float, push_interval: float) -> float:
    """Mean staleness of a push when the other replicas push ``others_push_rate`` times/s.

    Parameters
    ----------
    others_push_rate : float
        Pushes per second by all *other* replicas of the job (the sum of their
        ``1 / push_interval_s``).
    push_interval : float
        Seconds between this replica's fetch and its push.
    """
    return max(0.0, others_push_rate) * max(0.0, push_interval)


def poisson_quantile_bound(mean: float, z: float = 1.645) -> float:
    """Normal approximation ``mean + z * sqrt(mean)`` of a Poisson quantile (z=1.645: 95%)."""
    return mean + z * math.sqrt(max(0.0, mean))


def admits_replica(expected: float, max_staleness: int, *, z: float = 1.645) -> bool:
    """Whether a new replica whose pushes would have mean staleness ``expected`` may join.

    It may when the ``z``-quantile of a Poisson staleness of that mean stays within
    ``max_staleness`` (about 95% of its pushes accepted with the default ``z``). A job
    with no replica admits anyone.
    """
    return expected <= 0 or poisson_quantile_bound(expected, z) <= max_staleness


@dataclass(frozen=True)
class WarmStart:
    """One replica alone for a job's first ``k_pushes`` applied pushes.

    Attributes
    ----------
    k_pushes : int
        Applied pushes before other replicas are let in; 0 turns warm start off.
    """

    k_pushes: int = 0

    def allows(self, agent_id: str, holder_id: str | None, pushes_applied: int) -> bool:
        """Whether ``agent_id`` may be given a unit of the job.

        Parameters
        ----------
        agent_id : str
            The agent asking for work.
        holder_id : str or None
            The agent holding the job's only active lease, ``None`` if there is none
            (then the asking agent becomes the warm-up replica).
        pushes_applied : int
            Pushes applied to the job so far.
        """
        if pushes_applied >= self.k_pushes:
            return True
        return holder_id is None or holder_id == agent_id


class StalenessHistogram:
    """Counts of pushes by staleness, with percentiles.

    Parameters
    ----------
    counts : Mapping[int, int] or None
        Initial counts by staleness, e.g. the store's ``staleness_counts``.
    """

    def __init__(self, counts: Mapping[int, int] | None = None) -> None:
        self.counts: dict[int, int] = {}
        for staleness, n in (counts or {}).items():
            self.add(staleness, n)

    def add(self, staleness: int, count: int = 1) -> None:
        """Count ``count`` more pushes of ``staleness`` (>= 0) versions."""
        if staleness < 0 or count < 0:
            raise ValueError(f"need staleness >= 0 and count >= 0, got {staleness}, {count}")
        if count:
            self.counts[staleness] = self.counts.get(staleness, 0) + count

    def add_all(self, stalenesses: Iterable[int]) -> None:
        """Count one push for each staleness in ``stalenesses``."""
        for staleness in stalenesses:
            self.add(int(staleness))

    def merge(self, other: StalenessHistogram) -> None:
        """Add ``other``'s counts to this histogram."""
        for staleness, n in other.counts.items():
            self.add(staleness, n)

    @property
    def total(self) -> int:
        """Pushes counted."""
        return sum(self.counts.values())

    def percentile(self, q: float) -> int:
        """Nearest-rank ``q``-th percentile (``0 < q <= 100``) of staleness; 0 if empty."""
        if not 0 < q <= 100:
            raise ValueError(f"q must be in (0, 100], got {q}")
        total = self.total
        if total == 0:
            return 0
        rank = math.ceil(q / 100 * total)
        seen = 0
        for staleness in sorted(self.counts):
            seen += self.counts[staleness]
            if seen >= rank:
                return staleness
        raise AssertionError("unreachable: ranks are within the total")

    @property
    def p50(self) -> int:
        """Median staleness."""
        return self.percentile(50)

    @property
    def p95(self) -> int:
        """95th percentile of staleness."""
        return self.percentile(95)

    def mean(self) -> float:
        """Mean staleness; 0.0 if empty."""
        total = self.total
        return sum(s * n for s, n in self.counts.items()) / total if total else 0.0
