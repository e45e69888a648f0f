"""Sandblaster's coordinator (Dean et al. 2012, section 4.2): L-BFGS on the store's weights.

The coordinator is the only writer of a Sandblaster job's weights. It runs in the worker
(Celery beat's ``coordinate_sandblaster_jobs``, or the embedded runner's thread), one
process per job at a time (``coordinator_lock``), and each turn does what is due:

1. With no saved state, it starts L-BFGS at the store's weights: the job's first pass
   evaluates them (pass 0, or one past its highest pass if the state was lost).
2. It makes sure the pass's trial point is in the store at the pass's *pinned version*
   (every shard moves from ``v - 1`` to ``v`` by a compare-and-set whose push id is the
   pass's, so a repeated turn writes nothing twice) and that the pass's work units exist.
3. When every unit has its first answer in every shard (``paramstore.passes``), it sums
   them, tells L-BFGS the mean loss and gradient, saves the new state (pass + 1, version +
   1) *before* it writes the next trial point and its units, and retires the old pass.
4. When L-BFGS has converged, the store holds its minimum and the job is finished.

A crash between any two of these steps is repaired by the next turn: the saved state says
which pass is open and which version it is pinned to, and steps 2 and 3 are idempotent.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import dataclass

import numpy as np
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from downpour import scheduler
from downpour.paramstore import CommitOutcome, ParameterStore, ShardState, StoreError
from downpour.paramstore.lbfgs import (
    CONVERGED,
    INITIAL,
    LbfgsConfig,
    LbfgsState,
    state_from_bytes,
    state_to_bytes,
)
from downpour.paramstore.passes import (
    PassResults,
    answered_in_every_shard,
    assemble,
    pass_complete,
)

from .models import DatasetShard, Job, Lease, WorkUnit
from .store import coordinator_lock, job_store, pass_results

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")


@dataclass
class Coordination:
    """What the coordinator saves between turns: L-BFGS and the open pass."""

    state: LbfgsState
    pass_number: int
    version: int
    units: int
    samples: int
    last_loss: float | None = None

    def to_bytes(self) -> bytes:
        header = json.dumps(
            {
                "pass": self.pass_number,
                "version": self.version,
                "units": self.units,
                "samples": self.samples,
                "last_loss": self.last_loss,
            }
        ).encode()
        return _LENGTH.pack(len(header)) + header + state_to_bytes(self.state)

    @classmethod
    def from_bytes(cls, data: bytes) -> Coordination:
        (length,) = _LENGTH.unpack_from(data)
        header = json.loads(data[_LENGTH.size : _LENGTH.size + length])
        state = state_from_bytes(data[_LENGTH.size + length :])
        return cls(
            state,
            int(header["pass"]),
            int(header["version"]),
            int(header["units"]),
            int(header["samples"]),
            header.get("last_loss"),
        )


def pass_push_id(pass_number: int) -> str:
    """The push id of the coordinator's write of a pass's trial point."""
    return f"sandblaster:pass:{pass_number}"


def coordinate_running_jobs(budget_s: float = 0.0, poll_s: float = 0.02) -> int:
    """One coordinator turn for every running Sandblaster job, repeated every ``poll_s``
    for ``budget_s`` seconds (0: once); returns the passes completed."""
    deadline = time.monotonic() + budget_s
    completed = 0
    while True:
        jobs = list(
            Job.objects.filter(
                status=Job.Status.RUNNING, algorithm=Job.Algorithm.SANDBLASTER, layout__isnull=False
            )
        )
        if not jobs:
            return completed  # nothing to coordinate: free the worker thread at once
        for job in jobs:
            try:
                completed += coordinate(job)
            except StoreError as exc:  # not restored yet, or freed: the next turn tries again
                log.info("sandblaster job %s: %s", job.id, exc)
        if time.monotonic() + poll_s > deadline:
            return completed
        time.sleep(poll_s)


def coordinate(job: Job) -> int:
    """One turn of ``job``'s coordinator; returns the passes it completed (0 or 1)."""
    with coordinator_lock(str(job.id)) as turn:
        if turn is None:
            return 0
        store, results = job_store(job), pass_results()
        saved = _load(results, str(job.id))
        if saved is None:  # a new job, or its state was lost: never reuse a pass number
            saved = _begin(job, store, first_pass=_next_pass(job))
            if not turn.renew():
                return 0
            results.save_state(str(job.id), saved.to_bytes())
            results.open_pass(str(job.id), saved.pass_number)
            _retire_pass(job, saved.pass_number - 1)
        try:
            _write_trial(store, saved)
        except _Moved as exc:  # e.g. restored from a checkpoint: start again from there
            log.warning(
                "sandblaster job %s: %s; L-BFGS restarts at the store's weights", job.id, exc
            )
            moved = saved.pass_number
            saved = _begin(job, store, first_pass=moved + 1)
            if not turn.renew():
                return 0
            results.save_state(str(job.id), saved.to_bytes())
            results.open_pass(str(job.id), saved.pass_number)
            _retire_pass(job, moved)
            results.forget_pass(str(job.id), moved, len(store.layout.shards))
        _create_units(job, saved)
        completed = 0
        shards = len(store.layout.shards)
        complete = pass_complete(results, str(job.id), saved.pass_number, saved.units, shards)
        if not complete:
            _requeue_unanswered(job, saved, results, shards)
        if saved.state.phase != CONVERGED and complete:
            answers = [
                results.answers(str(job.id), saved.pass_number, shard) for shard in range(shards)
            ]
            loss, gradient, _ = assemble(answers, saved.units)
            if saved.state.phase == INITIAL and not np.isfinite(loss):
                _fail_not_finite(job)
                return 0
            if not turn.renew():  # the lock expired: another worker coordinates now
                log.warning("sandblaster job %s: lost the coordinator lock; turn ends", job.id)
                return 0
            saved.state.tell(loss, gradient)
            done = saved.pass_number
            last_loss = loss if np.isfinite(loss) else None  # JSON has no infinity
            saved = Coordination(
                saved.state, done + 1, saved.version + 1, saved.units, saved.samples, last_loss
            )
            results.save_state(str(job.id), saved.to_bytes())  # first: a crash redoes the rest
            results.open_pass(str(job.id), saved.pass_number)  # stragglers' answers are late
            if saved.state.phase != CONVERGED:
                _write_trial(store, saved)
                _create_units(job, saved)
            _retire_pass(job, done)
            results.forget_pass(str(job.id), done, shards)
            completed = 1
        _write_progress(job, saved, results)
        if saved.state.phase == CONVERGED:  # the store holds the minimum: the job is done
            _finish_converged(job, saved)
        return completed


def _fail_not_finite(job: Job) -> None:
    from .actions.jobs import finish_job

    message = "the loss or gradient at the starting weights is not finite"
    finish_job(job, Job.Status.FAILED, message)


def _finish_converged(job: Job, saved: Coordination) -> None:
    """Finish a job whose L-BFGS converged (once: a later turn finds it finished)."""
    from .actions.jobs import finish_job

    state = saved.state
    message = (
        f"L-BFGS converged after {state.iterations} iterations "
        f"(loss {state.loss:.4g}, gradient below {state.config.gradient_tolerance:g})"
    )
    finish_job(job, Job.Status.DONE, message)


def _load(results: PassResults, job_id: str) -> Coordination | None:
    data = results.load_state(job_id)
    return None if data is None else Coordination.from_bytes(data)


class _Moved(StoreError):
    """The store is not where the open pass left it (neither before nor at its version)."""


def _begin(job: Job, store: ParameterStore, first_pass: int = 0) -> Coordination:
    """L-BFGS from the weights in the store; pass 0 evaluates them at the shards' version
    (shards at different versions, e.g. after a restore, are first brought level)."""
    versions = store.versions()
    top = max(versions)
    for shard, version in enumerate(versions):
        for step in range(version, top):
            state = store.storage.load(store.job_id, shard)
            assert state is not None
            level = ShardState(step + 1, state.weights, state.accumulators, None)
            store.storage.commit(store.job_id, shard, step, level, f"sandblaster:level:{step}")
    x0 = np.concatenate([store.fetch_flat(shard)[1] for shard in range(len(versions))])
    slices = _slices(job)
    config = LbfgsConfig(history=job.lbfgs_history)
    samples = sum(piece.samples for piece in slices)
    log.info(
        "sandblaster job %s: L-BFGS from version %d, %d units a pass", job.id, top, len(slices)
    )
    return Coordination(LbfgsState.start(x0, config), first_pass, top, len(slices), samples)


def _next_pass(job: Job) -> int:
    """One past the job's highest pass with units (0 for a new job)."""
    highest = WorkUnit.objects.filter(job=job).aggregate(Max("pass_number"))["pass_number__max"]
    return 0 if highest is None else highest + 1


def _slices(job: Job) -> list[scheduler.PassSlice]:
    sizes = list(
        DatasetShard.objects.filter(dataset_id=job.dataset_id)
        .order_by("index")
        .values_list("n_samples", flat=True)
    )
    return scheduler.split_pass(sizes, job.sandblaster_units)


def _write_trial(store: ParameterStore, saved: Coordination) -> None:
    """Put the pass's trial point in every shard at the pass's version, once."""
    offset = 0
    for shard in range(len(store.layout.shards)):
        size = store.layout.shard_size(shard)
        piece = saved.state.trial[offset : offset + size].astype(np.float32)
        offset += size
        current = store.storage.load(store.job_id, shard)
        if current is None:
            raise StoreError(f"job {store.job_id!r} has no shard {shard} in the store")
        if current.version == saved.version:
            continue
        if current.version != saved.version - 1:
            raise _Moved(
                f"shard {shard} is at version {current.version}; pass {saved.pass_number} "
                f"is pinned to {saved.version}"
            )
        state = ShardState(saved.version, piece, current.accumulators, None)
        outcome = store.storage.commit(
            store.job_id, shard, current.version, state, pass_push_id(saved.pass_number)
        )
        if outcome is CommitOutcome.CONFLICT:
            raise StoreError(f"shard {shard} moved while the coordinator wrote it")


def _create_units(job: Job, saved: Coordination) -> None:
    """The pass's units, once (a repeated turn finds them: same pass, same version)."""
    same_pass = WorkUnit.objects.filter(job=job, pass_number=saved.pass_number)
    if same_pass.filter(pinned_version=saved.version).exists():
        return
    shards = {
        shard.index: shard for shard in DatasetShard.objects.filter(dataset_id=job.dataset_id)
    }
    slices = _slices(job)
    if len(slices) != saved.units:
        raise StoreError(f"job {job.id}: the dataset now cuts into {len(slices)} units")
    with transaction.atomic():
        WorkUnit.objects.bulk_create(
            WorkUnit(
                job=job,
                shard=shards[piece.shard],
                steps=1,
                seed=0,
                pass_number=saved.pass_number,
                pass_unit=index,
                sample_start=piece.start,
                sample_stop=piece.stop,
                pinned_version=saved.version,
            )
            for index, piece in enumerate(slices)
        )


def _requeue_unanswered(job: Job, saved: Coordination, results: PassResults, shards: int) -> None:
    """Put done units of the open pass that lack an answer in some shard back in the queue
    (a safety net: ``complete`` already leaves such a unit pending)."""
    answered = answered_in_every_shard(results, str(job.id), saved.pass_number, shards)
    requeued = (
        WorkUnit.objects.filter(
            job=job,
            pass_number=saved.pass_number,
            pinned_version=saved.version,
            status=WorkUnit.Status.DONE,
        )
        .exclude(pass_unit__in=answered)
        .update(status=WorkUnit.Status.PENDING, done_at=None)
    )
    if requeued:
        log.warning("sandblaster job %s: %d done units had no answer; requeued", job.id, requeued)


def _retire_pass(job: Job, pass_number: int) -> None:
    """Every unit of a finished pass has its answer: none is handed out again, and its
    stragglers' leases end (their later pushes are refused)."""
    now = timezone.now()
    WorkUnit.objects.filter(
        job=job, pass_number__lte=pass_number, status=WorkUnit.Status.PENDING
    ).update(status=WorkUnit.Status.DONE, done_at=now)
    Lease.objects.filter(
        unit__job=job, unit__pass_number__lte=pass_number, status=Lease.Status.ACTIVE
    ).update(status=Lease.Status.SUPERSEDED, ended_at=now)


def _write_progress(job: Job, saved: Coordination, results: PassResults) -> None:
    done = results.count(str(job.id), saved.pass_number, 0)
    state = saved.state
    progress = {
        "pass": saved.pass_number,
        "units": saved.units,
        "units_done": min(done, saved.units),
        "line_search": state.describe(),
        "iterations": state.iterations,
        "restarts": state.restarts,
        "loss": None if not np.isfinite(state.loss) else state.loss,
        "last_loss": saved.last_loss,
        "version": saved.version,
    }
    if job.sandblaster_progress != progress:
        Job.objects.filter(id=job.id).update(sandblaster_progress=progress)
        job.sandblaster_progress = progress
