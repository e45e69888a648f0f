"""Store recovery: restore a job's shards after a restart, and the checkpoints it restores from."""

from __future__ import annotations

import logging
from pathlib import Path

from django.db.models import QuerySet
from django.utils import timezone

from downpour.paramstore import NotInitialized, ShardState, StatisticsState
from downpour.paramstore.checkpoint import read_checkpoint, write_checkpoint
from downpour.training.actions.jobs import starting_weights
from downpour.training.media import media_dir
from downpour.training.models import Checkpoint, Job, WorkUnit
from downpour.training.store import forget_warmup, job_store, restore_lock, storage

log = logging.getLogger(__name__)


def ensure_store_ready(job: Job) -> None:
    """After a server restart the store may be empty: restore the latest checkpoint.

    Without a checkpoint the job starts again from its initial weights, which builds the
    model: TensorFlow, so only workers (Celery, the embedded runner) call this.
    """
    restore_store(job, from_initial_weights=True)


def done_units(job: Job) -> QuerySet[WorkUnit]:
    """The job's done units a restore may redo: never a Sandblaster pass's (its coordinator
    opens a new pass at the restored weights; an old pass's units would only be late)."""
    return WorkUnit.objects.filter(job=job, status=WorkUnit.Status.DONE, pass_number__isnull=True)


def restore_store(job: Job, from_initial_weights: bool) -> bool:
    """Refill an empty store from the latest checkpoint; whether the store is ready.

    Units finished after that checkpoint lost their updates with the store, so they are
    put back in the queue to be done again. A job with no checkpoint is restarted from its
    initial weights only with ``from_initial_weights``; otherwise it is left, not ready, for
    a worker's ``ensure_store_ready`` (the agent socket never builds a model).
    """
    store = job_store(job)
    if storage().load_version(str(job.id), 0) is not None:
        return True
    if Job.objects.filter(id=job.id, status__in=(Job.Status.DONE, Job.Status.FAILED)).exists():
        # A finished job's store was freed on purpose (finish_job): a late push or fetch
        # must not bring it back.
        raise NotInitialized(f"job {job.id} has finished")
    with restore_lock(str(job.id)):
        if storage().load_version(str(job.id), 0) is not None:
            return True  # another thread or process restored it meanwhile
        checkpoint = job.checkpoints.first()
        if checkpoint is None:
            if not from_initial_weights:
                return False
            store.initialize(starting_weights(job)[1])
            forget_warmup(job.id)  # the job warms up again on trusted agents
            requeued = done_units(job).update(status=WorkUnit.Status.PENDING, done_at=None)
            log.warning(
                "job %s: no checkpoint; restarted from initial weights, %d units requeued",
                job.id,
                requeued,
            )
            return True
        restored = read_checkpoint(checkpoint.path)
        store.restore(restored.states)
        store.restore_statistics(restored.statistics)
        forget_warmup(job.id)  # an older checkpoint may be back in warm-up
        requeued = (
            done_units(job)
            .filter(done_at__gt=checkpoint.created_at)
            .update(status=WorkUnit.Status.PENDING, done_at=None)
        )
        log.warning(
            "job %s: restored checkpoint %s (versions %s); %d units redone",
            job.id,
            checkpoint.path,
            checkpoint.versions,
            requeued,
        )
        return True


def checkpoint_job(
    job: Job,
    states: list[ShardState] | None = None,
    accuracy: float | None = None,
    statistics: StatisticsState | None = None,
) -> Checkpoint:
    """Write weights, accumulators, versions and statistics atomically; keep the last and
    the best.

    ``states`` and ``statistics`` (default: a snapshot of the store now) and the test
    ``accuracy`` they scored, when an evaluation writes the checkpoint of a new best.
    """
    if states is None:
        store = job_store(job)
        states = store.snapshot()
        statistics = store.statistics_state()
    folder = media_dir("checkpoints", str(job.id))
    path = folder / f"ckpt-{timezone.now().strftime('%Y%m%dT%H%M%S%f')}.npz"
    layout = job.shard_layout()
    digest = write_checkpoint(path, layout, states, {"job": str(job.id)}, statistics)
    checkpoint = Checkpoint.objects.create(
        job=job,
        path=str(path),
        sha256=digest,
        versions=[s.version for s in states],
        accuracy=accuracy,
    )
    prune_checkpoints(job)
    return checkpoint


def prune_checkpoints(job: Job) -> None:
    """Keep the newest checkpoint (to restore from) and the most accurate one; delete the rest."""
    newest = job.checkpoints.order_by("-created_at").first()
    best = job.checkpoints.filter(accuracy__isnull=False).order_by("-accuracy").first()
    keep = {c.pk for c in (newest, best) if c is not None}
    for old in job.checkpoints.exclude(pk__in=keep):
        Path(old.path).unlink(missing_ok=True)
        old.delete()


def checkpoint_running_jobs() -> int:
    count = 0
    for job in Job.objects.filter(status=Job.Status.RUNNING):
        try:
            ensure_store_ready(job)
            checkpoint_job(job)
            count += 1
        except Exception:
            log.exception("job %s: checkpoint failed", job.id)
    return count
