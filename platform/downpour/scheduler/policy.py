"""Which job gets the next unit of donated compute, and how big that unit is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Multiply-adds per sample of the MLP 64-128-128-10 that agents benchmark on; an agent's
#: reported samples/s is scaled by this over the job's own cost to size its units.
REFERENCE_FLOPS_PER_SAMPLE = 64 * 128 + 128 * 128 + 128 * 10


@dataclass(frozen=True)
class JobLoad:
    """What the policy needs to know of one runnable job.

    ``samples_done`` and ``samples_in_flight`` are counts of training samples; ``weight``
    is the owning researcher's share weight (> 0).
    """

    job_id: str
    owner_id: int
    weight: float
    samples_done: int
    samples_in_flight: int
    created_order: int = 0


def pick_job(jobs: Sequence[JobLoad]) -> str | None:
    """Pick the job whose researcher is furthest below their weighted share.

    Compute is counted as samples done plus samples leased. The researcher with the
    least weighted compute goes first (max-min fairness, weighted), then their job with
    the least compute, then the oldest. Returns ``None`` when there is nothing to run.
    """
    if not jobs:
        return None
    per_owner: dict[int, float] = {}
    weight: dict[int, float] = {}
    for job in jobs:
        per_owner[job.owner_id] = (
            per_owner.get(job.owner_id, 0.0) + job.samples_done + job.samples_in_flight
        )
        weight[job.owner_id] = max(job.weight, 1e-9)
    owner = min(per_owner, key=lambda o: (per_owner[o] / weight[o], o))
    mine = [j for j in jobs if j.owner_id == owner]
    best = min(mine, key=lambda j: (j.samples_done + j.samples_in_flight, j.created_order))
    return best.job_id


def unit_steps(
    samples_per_s: float | None,
    batch_size: int,
    target_seconds: float,
    flops_per_sample: float | None = None,
    min_steps: int = 20,
    max_steps: int = 20_000,
) -> int:
    """Number of gradient steps so that a unit takes about ``target_seconds`` on this agent.

    ``samples_per_s`` is the agent's benchmark on the reference MLP; it is scaled by the
    ratio of the reference's multiply-adds to ``flops_per_sample`` of the job's model.
    Unknown speed gives ``min_steps``, so a new agent proves itself on small units.
    """
    if not samples_per_s or samples_per_s <= 0 or batch_size <= 0:
        return min_steps
    speed = samples_per_s
    if flops_per_sample and flops_per_sample > 0:
        speed *= min(1.0, REFERENCE_FLOPS_PER_SAMPLE / flops_per_sample)
    steps = int(speed * target_seconds / batch_size)
    return max(min_steps, min(max_steps, steps))
