"""Contributions: push outcomes added to the job, the lease, the agent and its credit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import F

from downpour.donors.models import Agent
from downpour.scheduler import credit_for_push
from downpour.training.actions.leases import lease_size
from downpour.training.models import Contribution, Job, Lease
from downpour.training.trainloss import record_training_loss


@dataclass
class Tally:
    """One lease's push outcomes since they were last recorded (a consumer batches them)."""

    job_id: str
    samples: int = 0
    accepted: int = 0
    rejected: int = 0
    credit: float = 0.0
    staleness: dict[int, int] = field(default_factory=dict)
    #: Samples of the rounds that reached the store, applied or not: what ``complete`` claims.
    pushed: int = 0
    # The agent's training loss over its applied push rounds, weighted by their samples.
    loss_sum: float = 0.0
    loss_samples: int = 0

    def add_applied(
        self,
        job: Job,
        shard: int,
        samples: int,
        staleness: int,
        round_steps: int | None = None,
        unit_samples: int | None = None,
    ) -> None:
        """Count an applied push of ``shard`` that claims ``samples`` samples (a round is
        ``round_steps`` steps when the lease sets its own, else the job's ``n_push``; a
        Sandblaster unit's one round is its slice, ``unit_samples``)."""
        self.accepted += 1
        self.staleness[staleness] = self.staleness.get(staleness, 0) + 1
        # One push round sends every shard with the same samples; count them once. The
        # claim is the agent's word, so it is capped at what one push round can cover.
        samples = max(0, min(samples, _round_cap(job, round_steps, unit_samples)))
        if shard == 0 and samples:
            self.samples += samples
            self.credit += credit_for_push(samples, staleness, accepted=True)

    def add_late(self, job: Job, shard: int, samples: int, unit_samples: int | None = None) -> None:
        """Count a synchronous job's gradient (or a Sandblaster unit's answer, of
        ``unit_samples``) dropped as late, the first time only: not applied, but computed,
        so its samples count and the donor is credited for them."""
        samples = max(0, min(samples, _round_cap(job, None, unit_samples)))
        if shard == 0 and samples:
            self.samples += samples
            self.credit += credit_for_push(samples, 0, accepted=True)

    def add_pushed(self, shard: int, samples: int) -> None:
        """Count a round that reached the store (once: by its shard 0), whatever its verdict."""
        if shard == 0:
            self.pushed += samples

    def add_loss(self, loss: object, samples: int) -> None:
        """Count a push round's mean training loss (the agent's word: only for the chart)."""
        if isinstance(loss, int | float) and math.isfinite(loss) and samples > 0:
            self.loss_sum += float(loss) * samples
            self.loss_samples += samples


def _round_cap(job: Job, round_steps: int | None, unit_samples: int | None) -> int:
    """The most samples one push round can claim: a Sandblaster unit's whole slice, else
    ``batch × steps`` of the round."""
    if unit_samples is not None:
        return unit_samples
    return job.batch_size * (round_steps or job.n_push)


def record_tallies(agent_id: str, tallies: Mapping[str, Tally]) -> None:
    """Record an agent's tallies, keyed by lease id (:func:`record_contribution` each)."""
    for lease_id, t in tallies.items():
        record_contribution(
            t.job_id,
            agent_id,
            lease_id,
            t.samples,
            t.accepted,
            t.rejected,
            t.credit,
            t.staleness,
            pushed=t.pushed,
        )
        if t.loss_samples:
            record_training_loss(t.job_id, t.loss_sum / t.loss_samples)


def _within_lease(lease_id: str, samples: int, credit: float) -> tuple[int, float]:
    """Cut ``samples`` (and the credit with them) to what the lease has left of its size, so
    a lease counts at most ``steps × batch`` even if its rounds are applied twice (after a
    restore forgot the applied push ids). Locks the lease row (call inside a transaction)."""
    lease = (
        Lease.objects.select_for_update(of=("self",))
        .select_related("unit__job", "unit__shard")
        .filter(id=lease_id)
        .first()
    )
    if lease is None or samples <= 0:
        return samples, credit
    room = max(0, lease_size(lease) - lease.samples)
    if samples <= room:
        return samples, credit
    return room, credit * room / samples


def record_contribution(
    job_id: str,
    agent_id: str,
    lease_id: str,
    samples: int,
    accepted: int,
    rejected: int,
    credit: float,
    staleness: dict[int, int] | None = None,
    pushed: int = 0,
) -> None:
    """Add a batch of push outcomes to the job, the lease, the agent and their ledger.

    ``staleness`` counts accepted pushes by staleness; it is merged into the job's
    distribution (the job page shows its p50 and p95). ``pushed`` adds to the lease's
    ``samples_pushed``, which its ``complete`` must match.
    """
    if not (samples or accepted or rejected or pushed):
        return
    with transaction.atomic():
        # The job's row first, then the lease's: the order the other writers take them in.
        job = Job.objects.select_for_update().only("staleness_hist").get(id=job_id)
        samples, credit = _within_lease(lease_id, samples, credit)
        if staleness:
            merged = {int(k): v for k, v in job.staleness_hist.items()}
            for value, count in staleness.items():
                merged[value] = merged.get(value, 0) + count
            Job.objects.filter(id=job_id).update(
                staleness_hist={str(k): v for k, v in sorted(merged.items())}
            )
        Job.objects.filter(id=job_id).update(
            samples_done=F("samples_done") + samples,
            pushes_accepted=F("pushes_accepted") + accepted,
            pushes_rejected=F("pushes_rejected") + rejected,
        )
        Lease.objects.filter(id=lease_id).update(
            samples=F("samples") + samples,
            samples_pushed=F("samples_pushed") + pushed,
            pushes_accepted=F("pushes_accepted") + accepted,
            pushes_rejected=F("pushes_rejected") + rejected,
        )
        row, _ = Contribution.objects.get_or_create(job_id=job_id, agent_id=agent_id)
        Contribution.objects.filter(id=row.id).update(
            samples=F("samples") + samples,
            pushes_accepted=F("pushes_accepted") + accepted,
            pushes_rejected=F("pushes_rejected") + rejected,
            credit=F("credit") + credit,
        )
        Agent.objects.filter(id=agent_id).update(credit=F("credit") + credit)
