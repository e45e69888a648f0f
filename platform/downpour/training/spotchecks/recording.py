"""What a checked lease's round was computed from, kept while it runs and stored as a check.

The consumer keeps, per checked lease, the weights it served at the last few versions of
each shard (:class:`Recording`) and the gradients of the chosen round; when every shard of
the round is in, :func:`save` stores them as a queued ``SpotCheck`` for the worker
(``replay``). A round that names weights never served, or breaks the protocol, is judged at
once.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.db import transaction

from downpour.training.models import Job, Lease, SpotCheck
from downpour.training.spotcheck_selection import round_span

from .verdict import finish

#: Most versions of each shard a checked lease's consumer keeps the weights of. A round needs
#: those served from just before it to its end: ``ceil(n_push / n_fetch) + 2``.
MAX_SERVED_KEPT = 16


@dataclass
class Recording:
    """A spot-checked lease: the weights served it lately, and its chosen round's pushes."""

    served: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)
    served_versions: dict[int, set[int]] = field(default_factory=dict)  # every one, no weights
    gradients: dict[int, dict[str, Any]] = field(default_factory=dict)
    base_versions: dict[int, int] = field(default_factory=dict)
    loads: list[list[Any]] = field(default_factory=list)
    samples: int = 0
    # int8 pushes, per variable: the largest L2 quantisation error of the checked round's
    # push and of the round before's (whose residual the agent carried into it).
    bounds: dict[str, float] = field(default_factory=dict)
    previous_bounds: dict[str, float] = field(default_factory=dict)

    def keep_served(self, job: Job, shard: int, version: int, tensors: dict[str, Any]) -> None:
        """Keep the weights served at ``version`` of ``shard`` (a copy), dropping the oldest."""
        keep = min(MAX_SERVED_KEPT, -(-job.n_push // job.n_fetch) + 2)
        self.served_versions.setdefault(shard, set()).add(version)
        kept = self.served.setdefault(shard, {})
        kept[version] = tensors
        for stale in sorted(kept)[:-keep]:
            del kept[stale]

    def add_push(
        self,
        msg: Mapping[str, Any],
        tensors: dict[str, Any],
        bounds: Mapping[str, float] | None = None,
    ) -> None:
        """One shard's push of the checked round: its gradient, base version and loads, and
        the quantisation bounds of its int8 tensors."""
        self.bounds.update(bounds or {})
        self.gradients[msg["shard"]] = tensors
        self.base_versions[msg["shard"]] = msg["base_version"]
        self.loads = msg.get("loads", [])
        self.samples = msg["samples"]

    def add_previous_bounds(self, bounds: Mapping[str, float]) -> None:
        """The round before the checked one: the residuals its int8 pushes left are at most
        these (the larger if it arrived twice)."""
        for name, bound in bounds.items():
            self.previous_bounds[name] = max(bound, self.previous_bounds.get(name, 0.0))

    def allowances(self) -> dict[str, float]:
        """Per variable, how far an honest int8 push may be from the recomputed gradient
        beyond rounding: what its own encoding lost plus the residual it carried in."""
        names = self.bounds.keys() | self.previous_bounds.keys()
        return {n: self.bounds.get(n, 0.0) + self.previous_bounds.get(n, 0.0) for n in names}

    def complete(self, n_shards: int) -> bool:
        """Whether every shard of the round has been pushed."""
        return len(self.gradients) >= n_shards


def copy_tensors(tensors: dict[str, Any]) -> dict[str, Any]:
    """A copy to keep: the in-memory store's arrays change with the next push."""
    return {name: value.copy() for name, value in tensors.items()}


def save(lease_id: str, round_index: int, recording: Recording) -> None:
    """Store a complete round as a check, with the weights it names (sync: ORM writes)."""
    base = recording.base_versions
    wanted = [base] + [dict(enumerate(versions)) for _, versions in recording.loads]
    sets: list[dict[str, Any]] = []
    for versions in wanted:
        weights: dict[str, Any] = {}
        for shard, version in versions.items():
            served = recording.served.get(shard, {}).get(version)
            if served is None:
                pruned = version in recording.served_versions.get(shard, set())
                record_unservable(lease_id, round_index, versions, pruned)
                return
            weights.update(served)
        sets.append(weights)
    record(
        lease_id,
        round_index,
        sets,
        base,
        recording.loads,
        {k: v for shard in recording.gradients.values() for k, v in shard.items()},
        recording.samples,
        recording.allowances(),
    )


def to_npz(tensors: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {name: np.asarray(value) for name, value in tensors.items()}
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def from_npz(data: bytes | memoryview) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def record(
    lease_id: str,
    round_index: int,
    weight_sets: Sequence[Mapping[str, np.ndarray]],
    versions: Mapping[int, int],
    loads: Sequence[Sequence[Any]],
    gradients: Mapping[str, np.ndarray],
    samples: int,
    allowances: Mapping[str, float] | None = None,
) -> SpotCheck | None:
    """Queue a check of one round of a lease.

    ``versions`` are the round's base versions per shard and ``loads`` the round's
    ``[[offset, [version per shard]], ...]``; ``weight_sets`` are what the server served at
    those versions: the base, then one set per load. A round claiming more or fewer samples
    than its steps cover, or loads at offsets outside it, breaks the protocol and fails at
    once. ``allowances``: per variable pushed as int8, the L2 error its quantisation may
    explain (:meth:`Recording.allowances`). Returns None if the lease already has a check.
    """
    lease = Lease.objects.select_related("unit__job", "unit__shard", "agent").get(id=lease_id)
    job, unit = lease.unit.job, lease.unit
    first_step, steps = round_span(job, unit.steps, round_index, lease.round_steps)
    expected_samples = steps * min(job.batch_size, unit.shard.n_samples)
    check = _create_once(
        lease,
        round_index,
        versions,
        first_step=first_step,
        steps=steps,
        samples=samples,
        loads=[[int(offset), list(v)] for offset, v in loads],
        weights=to_npz(
            {f"{i}|{k}": v for i, weights in enumerate(weight_sets) for k, v in weights.items()}
        ),
        gradients=to_npz(gradients),
        quantisation_allowance={k: float(v) for k, v in (allowances or {}).items()},
    )
    if check is None:
        return None
    problems = []
    if steps == 0 or samples != expected_samples:
        problems.append(
            f"round {round_index} claims {samples} samples; its {steps} steps cover "
            f"{expected_samples}"
        )
    if any(not 0 < int(offset) < steps for offset, _ in loads):
        problems.append(f"round {round_index} claims loads outside its {steps} steps")
    if problems:
        finish(check, passed=False, relative_error=None, detail="; ".join(problems))
    return check


def record_unservable(
    lease_id: str, round_index: int, versions: Mapping[int, int], pruned: bool = False
) -> None:
    """The checked round names weights the consumer does not have.

    ``pruned``: they were served but no longer kept (a round of many loads): no verdict.
    Otherwise they were never served on this connection: on a lease that was never resumed
    that is a protocol violation and fails; a resumed lease may have fetched them on its
    earlier connection: no verdict.
    """
    lease = Lease.objects.select_related("unit__job", "agent").get(id=lease_id)
    check = _create_once(
        lease, round_index, versions, steps=0, samples=0, weights=b"", gradients=b""
    )
    if check is None:
        return
    if pruned:
        detail = f"round {round_index}: versions {dict(versions)} are no longer kept"
    else:
        detail = f"round {round_index} names versions {dict(versions)} never served to it"
    verdict = None if pruned or lease.resumed else False
    finish(check, passed=verdict, relative_error=None, detail=detail)


def record_skipped(lease_id: str, round_index: int, seq: int) -> None:
    """The lease pushed round ``seq`` before its checked round arrived in full: that fails.

    Rounds are pushed in order, and a resumed lease sends its interrupted round again, so an
    agent that moves past the checked round without sending it skipped it. Nothing if the
    lease already has a check.
    """
    lease = Lease.objects.select_related("unit__job", "agent").get(id=lease_id)
    check = _create_once(lease, round_index, {}, steps=0, samples=0, weights=b"", gradients=b"")
    if check is not None:
        detail = f"round {seq} arrived before round {round_index} had arrived in full"
        finish(check, passed=False, relative_error=None, detail=detail)


def _create_once(
    lease: Lease, round_index: int, versions: Mapping[int, int], **fields: Any
) -> SpotCheck | None:
    """The lease's check, or None if it has one already (a resumed lease pushes again)."""
    with transaction.atomic():
        if SpotCheck.objects.filter(lease_id=lease.id).exists():
            return None
        return SpotCheck.objects.create(
            lease=lease,
            job=lease.unit.job,
            agent=lease.agent,
            round=round_index,
            versions={str(k): v for k, v in versions.items()},
            **fields,
        )
