"""Everything that changes training state goes through these functions.

Views, consumers, Celery tasks and the embedded runner call them; they hold the rules.
Rows that several processes race for are claimed with a compare-and-set ``UPDATE ...
WHERE status=...`` and a check that exactly one row changed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import shutil
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Max, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from downpour import reputation, scheduler
from downpour.donors.models import Agent, AgentToken
from downpour.paramstore import ShardLayout, StoreError, VariableSpec
from downpour.paramstore.checkpoint import read_checkpoint, write_checkpoint
from downpour_agent.modelspec import ModelRejected, validate_loss, validate_model_config

from . import datasets, spotchecks, weights
from .models import (
    Checkpoint,
    Contribution,
    Dataset,
    DatasetShard,
    Evaluation,
    Job,
    Lease,
    WorkUnit,
)
from .store import (
    forget_job_store,
    forget_warmup,
    job_store,
    restore_lock,
    storage,
    warming_up,
)

log = logging.getLogger(__name__)


class JobRejected(ValueError):
    """The job cannot be submitted as asked; the message says why."""


class LeaseError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def media_dir(*parts: str) -> Path:
    path = Path(settings.MEDIA_ROOT).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- datasets ---------------------------------------------------------------------------


def create_dataset(owner: Any, name: str, upload: Any, n_shards: int = 4) -> Dataset:
    """Validate an uploaded ``.npz`` and store its test split and training shards."""
    parsed = datasets.parse_npz(
        upload, settings.DATASET_MAX_BYTES, settings.MAX_DATASET_EXPANDED_BYTES
    )
    dataset = Dataset(
        owner=owner,
        name=name[:100] or "dataset",
        n_train=len(parsed.x_train),
        n_test=len(parsed.x_test),
        input_shape=parsed.input_shape,
        y_dtype=str(parsed.y_train.dtype),
        n_classes=parsed.n_classes,
        test_path="",
        sha256="",
    )
    folder = media_dir("datasets", str(dataset.id))
    test_path = folder / "test.npz"
    dataset.sha256 = datasets.write_npz_atomic(test_path, x=parsed.x_test, y=parsed.y_test)
    dataset.test_path = str(test_path)
    shards = []
    for index, (x, y) in enumerate(datasets.split_train(parsed, n_shards)):
        path = folder / f"shard-{index}.npz"
        digest = datasets.write_npz_atomic(path, x=x, y=y)
        shards.append(
            DatasetShard(
                dataset=dataset,
                index=index,
                path=str(path),
                sha256=digest,
                n_samples=len(x),
                size_bytes=path.stat().st_size,
            )
        )
    try:
        with transaction.atomic():
            dataset.save()
            DatasetShard.objects.bulk_create(shards)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return dataset


# --- jobs -------------------------------------------------------------------------------


@dataclass
class JobParams:
    name: str
    model_json: str | dict[str, Any]
    loss: str = "sparse_categorical_crossentropy"
    learning_rate: float = 0.05
    batch_size: int = 32
    n_fetch: int = 1
    n_push: int = 1
    n_param_shards: int = 2
    max_staleness: int = 16
    staleness_aware_lr: bool = False
    warm_start_pushes: int = 0
    robust_aggregation: bool = False
    spot_check_fraction: float = 0.05
    #: An ``.npz`` to start from (a finished job's ``weights.npz``); see ``weights.py``.
    initial_weights: bytes | None = None
    target_accuracy: float | None = None
    budget_samples: int | None = None
    budget_seconds: float | None = None
    seed: int = 0


def submit_job(owner: Any, dataset: Dataset, params: JobParams) -> Job:
    """Validate the model against the allow-list and the dataset, then queue the job."""
    try:
        spec = validate_model_config(params.model_json)
        loss = validate_loss(params.loss)
    except ModelRejected as exc:
        raise JobRejected(f"model rejected: {exc}") from None
    if list(spec.input_shape) != list(dataset.input_shape):
        raise JobRejected(
            f"the model takes inputs of shape {list(spec.input_shape)} but the dataset's "
            f"samples have shape {list(dataset.input_shape)}"
        )
    if loss.startswith("sparse") and dataset.n_classes is None:
        raise JobRejected("sparse categorical loss needs integer class labels in the dataset")
    if loss == "sparse_categorical_crossentropy" and dataset.n_classes:
        out = spec.output_shape[-1] if spec.output_shape else None
        if out is not None and out < dataset.n_classes:
            raise JobRejected(
                f"the model has {out} outputs but the dataset has {dataset.n_classes} classes"
            )
    checks = [
        (0 < params.learning_rate <= 10, "learning rate must be in (0, 10]"),
        (1 <= params.batch_size <= 65536, "batch size must be in [1, 65536]"),
        (1 <= params.n_fetch <= 100_000, "n_fetch must be at least 1"),
        (1 <= params.n_push <= 100_000, "n_push must be at least 1"),
        (1 <= params.n_param_shards <= 64, "parameter shards must be in [1, 64]"),
        (0 <= params.max_staleness <= 1_000_000, "max staleness must be ≥ 0"),
        (0 <= params.warm_start_pushes <= 10_000_000, "warm start pushes must be ≥ 0"),
        (0 <= params.spot_check_fraction <= 1, "spot-check fraction must be in [0, 1]"),
        (
            params.target_accuracy is None or 0 < params.target_accuracy <= 1,
            "target accuracy must be in (0, 1]",
        ),
        (
            params.target_accuracy or params.budget_samples or params.budget_seconds,
            "give a target accuracy or a budget in samples or seconds",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise JobRejected(message)
    if params.initial_weights is not None:
        try:
            weights.check_upload(params.initial_weights, settings.DATASET_MAX_BYTES)
        except weights.WeightsRejected as exc:
            raise JobRejected(f"initial weights rejected: {exc}") from None
    with transaction.atomic():
        job = _create_job(owner, dataset, params, spec, loss)
        if params.initial_weights is not None:
            path = media_dir("jobs", str(job.id)) / "initial-weights.npz"
            try:
                path.write_bytes(params.initial_weights)
            except OSError:
                path.unlink(missing_ok=True)
                raise
            job.initial_weights_path = str(path)
            job.initial_weights_sha256 = hashlib.sha256(params.initial_weights).hexdigest()
            job.save(update_fields=["initial_weights_path", "initial_weights_sha256"])
    return job


def _create_job(owner: Any, dataset: Dataset, params: JobParams, spec: Any, loss: str) -> Job:
    return Job.objects.create(
        owner=owner,
        name=params.name[:100] or "job",
        dataset=dataset,
        model_config=spec.config,
        loss=loss,
        param_count=spec.param_count,
        learning_rate=params.learning_rate,
        batch_size=params.batch_size,
        n_fetch=params.n_fetch,
        n_push=params.n_push,
        n_param_shards=params.n_param_shards,
        max_staleness=params.max_staleness,
        staleness_aware_lr=params.staleness_aware_lr,
        warm_start_pushes=params.warm_start_pushes,
        robust_aggregation=params.robust_aggregation,
        spot_check_fraction=params.spot_check_fraction,
        target_accuracy=params.target_accuracy,
        budget_samples=params.budget_samples,
        budget_seconds=params.budget_seconds,
        seed=params.seed,
    )


def start_job(job: Job) -> bool:
    """Build the model once, write its initial weights to the store, and let agents in.

    Needs TensorFlow, so it runs in a Celery worker (or the embedded runner thread).
    """
    specs, start_weights = _starting_weights(job)
    layout = ShardLayout.balanced(
        [VariableSpec(n, tuple(s), d) for n, s, d in specs], job.n_param_shards
    )
    claimed = Job.objects.filter(id=job.id, status=Job.Status.QUEUED).update(
        layout=layout.to_json(), status_message="initialising"
    )
    if claimed != 1:
        return False
    job.refresh_from_db()
    job_store(job).initialize(start_weights)
    Job.objects.filter(id=job.id).update(status=Job.Status.RUNNING, started_at=timezone.now())
    log.info("job %s started: %d parameters in %d shards", job.id, job.param_count, layout.n_shards)
    return True


def _starting_weights(
    job: Job,
) -> tuple[list[tuple[str, tuple[int, ...], str]], dict[str, Any]]:
    """The model's variable specs and the weights the job starts from."""
    from .evaluation import initial_weights

    specs, start = initial_weights(job.model_config, job.seed)
    if job.initial_weights_path:
        try:
            start = weights.load_for_model(
                Path(job.initial_weights_path),
                job.initial_weights_sha256,
                specs,
                settings.DATASET_MAX_BYTES,
            )
        except (weights.WeightsRejected, OSError) as exc:
            raise weights.WeightsRejected(f"initial weights: {exc}") from None
    return specs, start


def start_queued_jobs() -> int:
    started = 0
    for job in Job.objects.filter(status=Job.Status.QUEUED, layout__isnull=True):
        try:
            started += start_job(job)
        except Exception as exc:
            log.exception("job %s failed to start", job.id)
            Job.objects.filter(id=job.id).update(
                status=Job.Status.FAILED, status_message=f"could not start: {exc}"[:500]
            )
    return started


def ensure_store_ready(job: Job) -> None:
    """After a server restart the store may be empty: restore the latest checkpoint.

    Units finished after that checkpoint lost their updates with the store, so they are
    put back in the queue to be done again.
    """
    store = job_store(job)
    if storage().load_version(str(job.id), 0) is not None:
        return
    with restore_lock(str(job.id)):
        if storage().load_version(str(job.id), 0) is not None:
            return  # another thread or process restored it meanwhile
        checkpoint = job.checkpoints.first()
        if checkpoint is None:
            store.initialize(_starting_weights(job)[1])
            forget_warmup(job.id)  # the job warms up again on trusted agents
            requeued = WorkUnit.objects.filter(job=job, status=WorkUnit.Status.DONE).update(
                status=WorkUnit.Status.PENDING, done_at=None
            )
            log.warning(
                "job %s: no checkpoint; restarted from initial weights, %d units requeued",
                job.id,
                requeued,
            )
            return
        restored = read_checkpoint(checkpoint.path)
        store.restore(restored.states)
        forget_warmup(job.id)  # an older checkpoint may be back in warm-up
        requeued = WorkUnit.objects.filter(
            job=job, status=WorkUnit.Status.DONE, done_at__gt=checkpoint.created_at
        ).update(status=WorkUnit.Status.PENDING, done_at=None)
        log.warning(
            "job %s: restored checkpoint %s (versions %s); %d units redone",
            job.id,
            checkpoint.path,
            checkpoint.versions,
            requeued,
        )


def finish_job(job: Job, status: str, message: str) -> bool:
    """Stop the job once (CAS on status), export the model and tell its agents."""
    from downpour.agents import push

    changed = Job.objects.filter(id=job.id, status=Job.Status.RUNNING).update(
        status=status, status_message=message[:500], finished_at=timezone.now()
    )
    if changed != 1:
        return False
    job.refresh_from_db()
    try:
        export_job(job)
    except Exception:
        log.exception("job %s: export failed", job.id)
    Lease.objects.filter(unit__job=job, status=Lease.Status.ACTIVE).update(
        status=Lease.Status.EXPIRED, ended_at=timezone.now()
    )
    push.notify_job_finished_on_commit(str(job.id))
    log.info("job %s finished (%s): %s", job.id, status, message)
    return True


def export_job(job: Job) -> None:
    from .evaluation import export_model

    folder = media_dir("jobs", str(job.id))
    keras_path, weights_path = export_model(job, job_store(job).weights(), folder)
    Job.objects.filter(id=job.id).update(keras_path=str(keras_path), weights_path=str(weights_path))


# --- work and leases --------------------------------------------------------------------


#: Decay of the fair-share window (downpour.scheduler.FairWindow): a lease that ended
#: ``s`` seconds ago counts ``exp(-s / tau)`` of its samples.
FAIR_WINDOW_TAU_S = 120.0
TAIL_RULE = scheduler.TailRule()


@dataclass
class _JobView:
    job: Job
    holders: set[str]
    fraction_left: float


def _host(agent: Agent) -> scheduler.HostRecord:
    return scheduler.HostRecord(
        agent.leases_completed,
        agent.leases_abandoned,
        agent.consecutive_completed,
        agent.unit_scale,
    )


def _job_loads(
    now: datetime,
) -> tuple[list[scheduler.JobLoad], dict[str, _JobView], scheduler.FairWindow]:
    """The running jobs as the scheduler sees them, from PostgreSQL rows.

    ``samples_recent`` decays each ended lease's samples by its age; active leases count
    their samples so far in full and the rest of their unit as in flight.
    """
    jobs = list(
        Job.objects.filter(status=Job.Status.RUNNING).select_related("owner").order_by("created_at")
    )
    horizon = now - timedelta(seconds=6 * FAIR_WINDOW_TAU_S)
    recent: dict[str, float] = {}
    in_flight: dict[str, float] = {}
    holders: dict[str, set[str]] = {}
    owner_recent: dict[int, float] = {}
    leases = Lease.objects.filter(
        Q(status=Lease.Status.ACTIVE) | Q(ended_at__gte=horizon)
    ).values_list(
        "status",
        "samples",
        "ended_at",
        "agent_id",
        "unit__steps",
        "unit__job_id",
        "unit__job__batch_size",
        "unit__job__owner_id",
    )
    for status, samples, ended_at, agent_id, steps, job_id, batch, owner_id in leases:
        key = str(job_id)
        if status == Lease.Status.ACTIVE:
            weight = 1.0
            in_flight[key] = in_flight.get(key, 0.0) + max(0, steps * batch - samples)
            holders.setdefault(key, set()).add(str(agent_id))
        else:
            age = (now - ended_at).total_seconds()
            weight = math.exp(-max(0.0, age) / FAIR_WINDOW_TAU_S)
        recent[key] = recent.get(key, 0.0) + samples * weight
        owner_recent[owner_id] = owner_recent.get(owner_id, 0.0) + samples * weight
    loads, views = [], {}
    owner_active: dict[int, float] = {}
    for order, job in enumerate(jobs):
        key = str(job.id)
        active_s = (now - job.started_at).total_seconds() if job.started_at else 0.0
        owner_active[job.owner_id] = max(owner_active.get(job.owner_id, 0.0), active_s)
        load = scheduler.JobLoad(
            job_id=key,
            owner_id=job.owner_id,
            weight=job.owner.share_weight,
            samples_done=job.samples_done,
            samples_in_flight=int(in_flight.get(key, 0.0)),
            created_order=order,
            samples_recent=recent.get(key, 0.0),
            active_s=active_s,
            budget_samples=job.budget_samples,
        )
        loads.append(load)
        views[key] = _JobView(
            job,
            holders.get(key, set()),
            scheduler.remaining_fraction(job.budget_samples, load.samples_left),
        )
    window = scheduler.FairWindow(
        time_constant_s=FAIR_WINDOW_TAU_S,
        horizon_s=settings.UNIT_TARGET_SECONDS,
        owner_recent=owner_recent,
        owner_active_s=owner_active,
    )
    return loads, views, window


def _admits(agent: Agent, host: scheduler.HostRecord, view: _JobView) -> bool:
    """Warm start and the tail rule: may ``agent`` get a unit of this job now?"""
    job = view.job
    others = view.holders - {str(agent.id)}
    if job.warm_start_pushes and others:
        holder = next(iter(others))
        warm = scheduler.WarmStart(job.warm_start_pushes)
        if not warm.allows(str(agent.id), holder, job.pushes_accepted):
            return False
    if view.fraction_left < TAIL_RULE.tail_fraction:
        return scheduler.admits_to_tail(host, view.fraction_left, TAIL_RULE)
    return True


def _warmup_eligible(agent: Agent, views: dict[str, _JobView], eligible: set[str]) -> set[str]:
    """Robust jobs still warming up go to trusted agents only (``scheduler.trust``)."""
    warming = {key for key in eligible if warming_up(views[key].job)}
    if not warming:
        return eligible  # the common case costs no query
    # Read the token now rather than at connect time, so staff's changes apply at once.
    trusted = AgentToken.objects.filter(id=agent.token_id, is_trusted=True).exists()
    return scheduler.warmup_eligible(eligible, warming, trusted)


_flops_cache: dict[str, float] = {}


def _flops_per_sample(job: Job) -> float:
    # A job's model never changes: validate it once per process, not on every claim.
    key = str(job.id)
    if key not in _flops_cache:
        _flops_cache[key] = float(validate_model_config(job.model_config).flops_per_sample)
    return _flops_cache[key]


def _agent_steps(agent: Agent, job: Job, scale: float) -> int:
    return scheduler.unit_steps(
        agent.samples_per_s,
        job.batch_size,
        settings.UNIT_TARGET_SECONDS,
        _flops_per_sample(job),
        scale=scale,
    )


def claim_work(agent: Agent) -> Lease | None:
    """Give ``agent`` a lease: a reissued unit if one fits, else a new unit.

    The choice of job is ``downpour.scheduler``'s: weighted max-min fair share between
    researchers over a decaying window, warm start, reliable agents only for the last
    units of a job with a budget, and trusted agents only for a robust job still warming
    up. Units are sized to the agent's speed and reliability.
    """
    now = timezone.now()
    ttl = timedelta(seconds=settings.LEASE_TTL_S)
    host = _host(agent)
    loads, views, window = _job_loads(now)
    eligible = {key for key, view in views.items() if _admits(agent, host, view)}
    eligible = _warmup_eligible(agent, views, eligible)
    # First come, first served: a unit joins the queue when it is created or when its last
    # lease ends, so a reissued unit never waits behind units that were queued after it.
    pending = (
        WorkUnit.objects.filter(status=WorkUnit.Status.PENDING, job_id__in=list(eligible))
        .annotate(queued_at=Coalesce(Max("leases__ended_at"), "created_at"))
        .order_by("queued_at", "created_at")
    )
    for unit in pending[:10]:
        view = views[str(unit.job_id)]
        scale = scheduler.unit_scale(host) * scheduler.tail_unit_scale(
            view.fraction_left, TAIL_RULE
        )
        take, rest = scheduler.split_unit(unit.steps, _agent_steps(agent, view.job, scale))
        with transaction.atomic():
            claimed = WorkUnit.objects.filter(id=unit.id, status=WorkUnit.Status.PENDING).update(
                status=WorkUnit.Status.LEASED, attempts=F("attempts") + 1, steps=take
            )
            if claimed == 1:
                if rest > 0:
                    # A reissued unit too big for this agent: it takes what fits, the rest
                    # waits for the next agent.
                    WorkUnit.objects.create(
                        job_id=unit.job_id,
                        shard_id=unit.shard_id,
                        steps=rest,
                        seed=random.randrange(1 << 31),
                    )
                return _new_lease(unit, view.job, agent, now + ttl, take)
    backup = _claim_backup(agent, host, views, eligible, now)
    if backup is not None:
        return backup
    job_id = scheduler.pick_job(loads, window=window, eligible=eligible)
    if job_id is None:
        return None
    view = views[job_id]
    job = view.job
    shard = (
        DatasetShard.objects.filter(dataset_id=job.dataset_id)
        .annotate(n_units=Count("workunit", filter=Q(workunit__job=job)))
        .order_by("n_units", "index")
        .first()
    )
    if shard is None:
        return None
    scale = scheduler.unit_scale(host) * scheduler.tail_unit_scale(view.fraction_left, TAIL_RULE)
    steps = _agent_steps(agent, job, scale)
    if job.budget_samples:
        left = (
            job.budget_samples
            - job.samples_done
            - sum(load.samples_in_flight for load in loads if load.job_id == job_id)
        )
        steps = max(1, min(steps, math.ceil(left / job.batch_size)))
    with transaction.atomic():
        unit = WorkUnit.objects.create(
            job=job,
            shard=shard,
            steps=steps,
            seed=random.randrange(1 << 31),
            status=WorkUnit.Status.LEASED,
            attempts=1,
        )
        return _new_lease(unit, job, agent, now + ttl, steps)


def _new_lease(unit: WorkUnit, job: Job, agent: Agent, expires_at: datetime, steps: int) -> Lease:
    return Lease.objects.create(
        unit=unit,
        agent=agent,
        expires_at=expires_at,
        spot_check_round=spotchecks.choose_round(job, agent, steps),
    )


BACKUP_RULE = scheduler.BackupRule()


def _claim_backup(
    agent: Agent,
    host: scheduler.HostRecord,
    views: dict[str, _JobView],
    eligible: set[str],
    now: datetime,
) -> Lease | None:
    """Near the end of a job, a reliable agent gets a backup copy of a straggling unit.

    As in Sandblaster: the first copy to complete wins and the others are superseded (their
    later pushes are refused).
    """
    tail = [
        key
        for key, view in views.items()
        if key in eligible and view.fraction_left < BACKUP_RULE.tail_fraction
    ]
    if not tail or not scheduler.is_reliable(host):
        return None
    candidates = []
    running = Lease.objects.filter(
        status=Lease.Status.ACTIVE, unit__job_id__in=tail, unit__status=WorkUnit.Status.LEASED
    ).select_related("unit__job", "agent")
    copies: dict[str, int] = {}
    for lease in running:
        copies[str(lease.unit_id)] = copies.get(str(lease.unit_id), 0) + 1
    for lease in running:
        if lease.agent_id == agent.id:
            return None  # never two copies of the tail on one agent
        unit, job = lease.unit, lease.unit.job
        expected = scheduler.expected_duration_s(
            unit.steps * job.batch_size, lease.agent.samples_per_s
        )
        elapsed = (now - lease.issued_at).total_seconds()
        fraction_left = views[str(job.id)].fraction_left
        if scheduler.should_issue_backup(
            elapsed, expected, fraction_left, copies[str(unit.id)], BACKUP_RULE
        ):
            candidates.append((scheduler.straggler_order(elapsed, expected), unit))
    if not candidates:
        return None
    _, unit = max(candidates, key=lambda c: c[0])
    log.info("backup copy of straggling unit %s for agent %s", unit.id, agent.id)
    return _new_lease(
        unit, unit.job, agent, now + timedelta(seconds=settings.LEASE_TTL_S), unit.steps
    )


def lease_message(lease: Lease, base_url_path: str = "/api/agent/shards/") -> dict[str, Any]:
    """The protocol ``lease`` message for ``lease``."""
    unit = lease.unit
    job = unit.job
    layout = ShardLayout.from_json(job.layout)
    return {
        "type": "lease",
        "lease_id": str(lease.id),
        "job_id": str(job.id),
        "work_unit_id": str(unit.id),
        "steps": unit.steps,
        "seed": unit.seed,
        "model": job.model_config,
        "loss": job.loss,
        "hyper": {
            "batch_size": job.batch_size,
            "n_fetch": job.n_fetch,
            "n_push": job.n_push,
            "learning_rate": job.learning_rate,
            "compression": "none",
        },
        "dataset": {
            "url": f"{base_url_path}{unit.shard_id}/",
            "sha256": unit.shard.sha256,
            "n_samples": unit.shard.n_samples,
        },
        "layout": [
            [{"name": v.name, "shape": list(v.shape), "dtype": v.dtype} for v in shard]
            for shard in layout.shards
        ],
        "expires_in_s": settings.LEASE_TTL_S,
    }


def get_agent_lease(lease_id: str, agent: Agent) -> Lease:
    """The active lease ``lease_id`` of ``agent``, or a :class:`LeaseError` with its code."""
    try:
        uuid.UUID(lease_id)
    except (ValueError, TypeError, AttributeError):
        raise LeaseError("unknown_lease", "a lease id is a UUID") from None
    lease = Lease.objects.select_related("unit__job", "unit__shard").filter(id=lease_id).first()
    if lease is None:
        raise LeaseError("unknown_lease", f"no lease {lease_id}")
    if lease.agent_id != agent.id:
        raise LeaseError("lease_not_yours", "this lease belongs to another agent")
    if lease.unit.job.is_finished:
        raise LeaseError("job_finished", "the job has finished")
    if lease.status != Lease.Status.ACTIVE or lease.expires_at <= timezone.now():
        raise LeaseError("lease_expired", "the lease has expired; its work was reissued")
    return lease


def heartbeat(agent: Agent, lease_id: str | None) -> float | None:
    """Mark the agent alive and extend its lease; returns the lease's seconds to live."""
    now = timezone.now()
    Agent.objects.filter(id=agent.id).update(last_seen_at=now, connected=True)
    if lease_id is None:
        return None
    get_agent_lease(lease_id, agent)
    extended = Lease.objects.filter(
        id=lease_id, agent=agent, status=Lease.Status.ACTIVE, expires_at__gt=now
    ).update(expires_at=now + timedelta(seconds=settings.LEASE_TTL_S), heartbeat_at=now)
    if extended != 1:
        raise LeaseError("lease_expired", "the lease has expired; its work was reissued")
    return settings.LEASE_TTL_S


def complete_lease(agent: Agent, lease_id: str, samples: int) -> None:
    lease = get_agent_lease(lease_id, agent)
    now = timezone.now()
    with transaction.atomic():
        done = Lease.objects.filter(id=lease.id, status=Lease.Status.ACTIVE).update(
            status=Lease.Status.COMPLETED, ended_at=now
        )
        if done != 1:
            raise LeaseError("lease_expired", "the lease has expired; its work was reissued")
        WorkUnit.objects.filter(id=lease.unit_id).update(status=WorkUnit.Status.DONE, done_at=now)
        # Backup copies of this unit lost the race: their remaining pushes are refused.
        Lease.objects.filter(unit_id=lease.unit_id, status=Lease.Status.ACTIVE).update(
            status=Lease.Status.SUPERSEDED, ended_at=now
        )
        _record_outcome(str(agent.id), completed=True)


def _record_outcome(agent_id: str, completed: bool) -> None:
    """Update the agent's host record (call inside a transaction)."""
    agent = Agent.objects.select_for_update().get(id=agent_id)
    record = scheduler.record_outcome(_host(agent), completed)
    Agent.objects.filter(id=agent_id).update(
        leases_completed=record.completed,
        leases_abandoned=record.abandoned,
        consecutive_completed=record.consecutive_completed,
        unit_scale=record.unit_scale,
    )


def resume_lease(agent: Agent, lease_id: str) -> Lease:
    """An agent that reconnected in time takes its lease back (same agent, still live)."""
    lease = get_agent_lease(lease_id, agent)
    now = timezone.now()
    view = scheduler.LeaseView(
        str(lease.id), str(lease.unit_id), str(lease.agent_id), lease.expires_at.timestamp()
    )
    if not scheduler.can_resume(view, str(agent.id), now.timestamp()):
        raise LeaseError("lease_expired", "the lease has expired; its work was reissued")
    extended = Lease.objects.filter(
        id=lease.id, agent=agent, status=Lease.Status.ACTIVE, expires_at__gt=now
    ).update(
        expires_at=now + timedelta(seconds=settings.LEASE_TTL_S),
        heartbeat_at=now,
        resumed=F("resumed") + 1,
    )
    if extended != 1:
        raise LeaseError("lease_expired", "the lease has expired; its work was reissued")
    lease.refresh_from_db()
    return lease


def return_lease(agent: Agent, lease_id: str) -> None:
    lease = get_agent_lease(lease_id, agent)
    with transaction.atomic():
        returned = Lease.objects.filter(id=lease.id, status=Lease.Status.ACTIVE).update(
            status=Lease.Status.RETURNED, ended_at=timezone.now()
        )
        others = Lease.objects.filter(unit_id=lease.unit_id, status=Lease.Status.ACTIVE).count()
        if returned == 1 and scheduler.should_reissue(False, others):
            WorkUnit.objects.filter(id=lease.unit_id, status=WorkUnit.Status.LEASED).update(
                status=WorkUnit.Status.PENDING
            )


def reap_expired_leases() -> int:
    """Expire leases whose heartbeats stopped and put their units back in the queue."""
    now = timezone.now()
    reaped = 0
    for lease in Lease.objects.filter(status=Lease.Status.ACTIVE, expires_at__lte=now):
        with transaction.atomic():
            if (
                Lease.objects.filter(id=lease.id, status=Lease.Status.ACTIVE).update(
                    status=Lease.Status.EXPIRED, ended_at=now
                )
                != 1
            ):
                continue
            others = Lease.objects.filter(unit_id=lease.unit_id, status=Lease.Status.ACTIVE).count()
            done = WorkUnit.objects.filter(id=lease.unit_id, status=WorkUnit.Status.DONE).exists()
            if scheduler.should_reissue(done, others):
                WorkUnit.objects.filter(id=lease.unit_id, status=WorkUnit.Status.LEASED).update(
                    status=WorkUnit.Status.PENDING
                )
            _record_outcome(str(lease.agent_id), completed=False)
            reaped += 1
    if reaped:
        log.info("reaped %d expired leases", reaped)
    return reaped


def record_contribution(
    job_id: str,
    agent_id: str,
    lease_id: str,
    samples: int,
    accepted: int,
    rejected: int,
    credit: float,
    staleness: dict[int, int] | None = None,
) -> None:
    """Add a batch of push outcomes to the job, the lease, the agent and their ledger.

    ``staleness`` counts accepted pushes by staleness; it is merged into the job's
    distribution (the job page shows its p50 and p95).
    """
    if not (samples or accepted or rejected):
        return
    with transaction.atomic():
        if staleness:
            job = Job.objects.select_for_update().only("staleness_hist").get(id=job_id)
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


# --- evaluation and checkpoints -----------------------------------------------------------


def evaluate_job(job: Job) -> Evaluation | None:
    """Score the current parameters on the test split; finish the job on target or budget."""
    from .evaluation import evaluate

    ensure_store_ready(job)
    store = job_store(job)
    accuracy, loss = evaluate(job, store.weights())
    job.refresh_from_db()
    elapsed = (timezone.now() - job.started_at).total_seconds() if job.started_at else 0.0
    point = Evaluation.objects.create(
        job=job,
        elapsed_s=elapsed,
        samples=job.samples_done,
        accuracy=accuracy,
        loss=loss,
        versions=store.versions(),
    )
    if job.best_accuracy is None or accuracy > job.best_accuracy:
        Job.objects.filter(id=job.id).update(best_accuracy=accuracy)
    if job.target_accuracy is not None and accuracy >= job.target_accuracy:
        finish_job(job, Job.Status.DONE, f"reached {accuracy:.1%} test accuracy")
    elif job.budget_samples is not None and job.samples_done >= job.budget_samples:
        finish_job(job, Job.Status.DONE, f"used its budget of {job.budget_samples} samples")
    elif job.budget_seconds is not None and elapsed >= job.budget_seconds:
        finish_job(job, Job.Status.DONE, f"used its budget of {job.budget_seconds:.0f} s")
    return point


def evaluate_running_jobs() -> int:
    count = 0
    for job in Job.objects.filter(status=Job.Status.RUNNING):
        try:
            evaluate_job(job)
            count += 1
        except Exception:
            log.exception("job %s: evaluation failed", job.id)
    return count


def checkpoint_job(job: Job) -> Checkpoint:
    """Write weights, accumulators and versions atomically and keep the newest few."""
    store = job_store(job)
    states = store.snapshot()
    folder = media_dir("checkpoints", str(job.id))
    path = folder / f"ckpt-{timezone.now().strftime('%Y%m%dT%H%M%S%f')}.npz"
    layout = ShardLayout.from_json(job.layout)
    digest = write_checkpoint(path, layout, states, {"job": str(job.id)})
    checkpoint = Checkpoint.objects.create(
        job=job, path=str(path), sha256=digest, versions=[s.version for s in states]
    )
    for old in job.checkpoints.all()[settings.CHECKPOINTS_KEPT :]:
        Path(old.path).unlink(missing_ok=True)
        old.delete()
    return checkpoint


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


def _reputation(agent: Agent) -> reputation.Reputation:
    return reputation.Reputation(
        agent.rep_pushes,
        agent.rep_clipped,
        agent.rep_spot_checks_failed,
        agent.rep_spot_checks_passed,
        agent.rep_recent_pushes,
        agent.rep_recent_clipped,
    )


def _judge(agent_id: str, update: Any, why: Any) -> bool:
    """Apply ``update`` to the agent's reputation and ban if due; returns whether banned.

    ``update`` maps a Reputation to the new one; ``why`` words the ban reason from it.
    """
    with transaction.atomic():
        agent = Agent.objects.select_for_update().get(id=agent_id)
        rep = update(_reputation(agent))
        banned_at, reason = agent.banned_at, agent.ban_reason
        if banned_at is None and reputation.should_ban(rep):
            banned_at, reason = timezone.now(), why(rep)[:500]
            log.warning("agent %s banned: %s", agent_id, reason)
        Agent.objects.filter(id=agent_id).update(
            rep_pushes=rep.pushes,
            rep_clipped=rep.clipped,
            rep_spot_checks_failed=rep.spot_checks_failed,
            rep_spot_checks_passed=rep.spot_checks_passed,
            rep_recent_pushes=rep.recent_pushes,
            rep_recent_clipped=rep.recent_clipped,
            banned_at=banned_at,
            ban_reason=reason,
        )
    return banned_at is not None


def record_clipping(agent_id: str, clipped: list[bool]) -> bool:
    """Add pushes applied with centred clipping to the agent's reputation; ban if due.

    Returns whether the agent is banned (now or already). Staff lift bans in the admin.
    """
    if not clipped:
        return False

    def update(rep: reputation.Reputation) -> reputation.Reputation:
        for flag in clipped:
            rep = reputation.record_push(rep, flag)
        return rep

    return _judge(
        agent_id,
        update,
        lambda rep: (
            f"clipped in {rep.clipped} of {rep.pushes} pushes "
            f"({rep.recent_clipped / max(rep.recent_pushes, 1e-9):.0%} recently)"
        ),
    )


def record_spot_check(agent_id: str, passed: bool, detail: str = "") -> bool:
    """Add a spot check's verdict to the agent's reputation; ban if due (one failure)."""
    return _judge(
        agent_id,
        lambda rep: reputation.record_spot_check(rep, passed),
        lambda rep: f"failed {rep.spot_checks_failed} spot check(s): {detail}",
    )


def lift_ban(agent: Agent) -> None:
    """Staff review: the agent starts afresh (downpour.reputation.lift_ban)."""
    rep = reputation.lift_ban(
        reputation.Reputation(spot_checks_passed=agent.rep_spot_checks_passed)
    )
    Agent.objects.filter(id=agent.id).update(
        banned_at=None,
        ban_reason="",
        rep_pushes=rep.pushes,
        rep_clipped=rep.clipped,
        rep_spot_checks_failed=rep.spot_checks_failed,
        rep_recent_pushes=rep.recent_pushes,
        rep_recent_clipped=rep.recent_clipped,
    )


def staleness_summary(job: Job) -> dict[str, Any]:
    """p50/p95 of the job's accepted pushes' staleness (versions behind at apply time)."""
    histogram = scheduler.StalenessHistogram({int(k): v for k, v in job.staleness_hist.items()})
    total = sum(histogram.counts.values())
    if not total:
        return {"pushes": 0, "p50": None, "p95": None}
    return {"pushes": total, "p50": histogram.p50, "p95": histogram.p95}


def robust_summary(job: Job) -> dict[str, Any] | None:
    """What the job page says about centred clipping: warm-up progress, or clipped share.

    None for a job without it. Read fresh from the store (statistics only), not cached.
    """
    if not job.robust_aggregation:
        return None
    status = None
    if job.layout is not None:
        try:
            status = job_store(job).warmup_status()
        except StoreError:  # not in the store (yet, or any more)
            status = None
    if status is None:
        return {"warm": None, "text": "robust: on"}
    if not status.warm:
        progress = f"{status.progress}/{status.required}"
        return {
            "warm": False,
            "trusted_pushes": status.progress,
            "required": status.required,
            "text": f"waiting for trusted agents: {progress} trusted pushes",
        }
    return {
        "warm": True,
        "clipped_fraction": status.clipped_fraction,
        "text": f"robust: warm, {status.clipped_fraction:.1%} of pushes clipped",
    }


def robust_jobs_waiting() -> list[dict[str, Any]]:
    """Running robust jobs still warming up, for the operators: they need a trusted agent."""
    waiting = []
    jobs = Job.objects.filter(status=Job.Status.RUNNING, robust_aggregation=True)
    for job in jobs.select_related("owner").order_by("created_at"):
        summary = robust_summary(job)
        if summary is not None and not summary["warm"]:
            waiting.append({"job": job, "text": summary["text"]})
    return waiting


def fairness_windows(
    now: datetime, window_s: float = 60.0, windows: int = 10
) -> list[dict[str, Any]]:
    """Jain's index of compute per researcher, normalised by share weight, per window.

    Compute is the samples of leases that ended in each window (and, for the newest
    window, of active leases), counted for researchers that had a running job.
    """
    start = now - timedelta(seconds=window_s * windows)
    rows = Lease.objects.filter(Q(status=Lease.Status.ACTIVE) | Q(ended_at__gte=start)).values_list(
        "status", "samples", "ended_at", "unit__job__owner_id", "unit__job__owner__share_weight"
    )
    running = dict(
        Job.objects.filter(status=Job.Status.RUNNING).values_list("owner_id", "owner__share_weight")
    )
    per_window: list[dict[int, float]] = [dict.fromkeys(running, 0.0) for _ in range(windows)]
    weights = dict(running)
    for status, samples, ended_at, owner_id, weight in rows:
        at = now if status == Lease.Status.ACTIVE else ended_at
        index = min(windows - 1, int((at - start).total_seconds() // window_s))
        if index < 0:
            continue
        per_window[index][owner_id] = per_window[index].get(owner_id, 0.0) + samples
        weights[owner_id] = weight
    return [
        {
            "ends_s_ago": window_s * (windows - 1 - i),
            "jain": scheduler.jain_index(alloc, {k: weights[k] for k in alloc}) if alloc else None,
            "researchers": len(alloc),
        }
        for i, alloc in enumerate(per_window)
    ]


def delete_job_state(job: Job) -> None:
    storage().delete(str(job.id))
    forget_job_store(str(job.id))
