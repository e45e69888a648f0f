"""The job lifecycle: submit, start (initial weights into the store), finish and export."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from downpour.paramstore import DEFAULT_MAX_GRAD_NORM, ShardLayout, VariableSpec
from downpour.training import weights
from downpour.training.media import media_dir
from downpour.training.models import Dataset, Job, Lease, keeps_average, store_arrays
from downpour.training.store import forget_job_store, job_store, pass_results, storage
from downpour_agent.modelspec import ModelRejected, validate_loss, validate_model_config

log = logging.getLogger(__name__)


#: Longest status message kept on a job: it is shown on the job page, and an exception's
#: text can be long.
STATUS_MESSAGE_CHARS = 500


#: The algorithms whose server and agent sides exist; the form offers exactly these.
OFFERED_ALGORITHMS = (
    Job.Algorithm.DOWNPOUR,
    Job.Algorithm.LOCAL_STEPS,
    Job.Algorithm.SYNC,
    Job.Algorithm.SANDBLASTER,
)
INNER_OPTIMIZERS = ("adamw", "sgd-momentum")
#: The most ``weight_average`` the form and the actions take: about the last 1,000 versions.
MAX_WEIGHT_AVERAGE = 0.999

#: Bounds on a local-steps job's fixed H (inner steps per round).
MAX_INNER_STEPS = 10_000


class JobRejected(ValueError):
    """The job cannot be submitted as asked; the message says why."""


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
    #: ``none`` or ``int8`` (pushes with error feedback, fetches as deltas): Job.Compression.
    compression: str = "none"
    max_staleness: int = 64
    staleness_aware_lr: bool = False
    #: Downpour only: the store's running average of the weights, scored and exported (0: off).
    weight_average: float = 0.0
    warm_start_pushes: int = 0
    robust_aggregation: bool = False
    #: None or 0: pushes are not norm-clipped (``downpour.paramstore.bounds``).
    max_grad_norm: float | None = DEFAULT_MAX_GRAD_NORM
    spot_check_fraction: float = 0.05
    #: An ``.npz`` to start from (a finished job's ``weights.npz``); see ``weights.py``.
    initial_weights: bytes | None = None
    target_accuracy: float | None = None
    budget_samples: int | None = None
    budget_seconds: float | None = None
    seed: int = 0
    algorithm: str = Job.Algorithm.DOWNPOUR
    #: Local-steps only: H (0: chosen per agent), the agents' optimizer, the store's.
    inner_steps: int = 0
    inner_optimizer: str = "adamw"
    inner_learning_rate: float = 0.001
    outer_learning_rate: float = 1.0
    outer_momentum: float = 0.0
    #: Sync only (Chen et al. 2016): N agents per step, b backups, the longest wait.
    sync_workers: int = 2
    sync_backups: int = 1
    sync_step_timeout_s: float = 10.0
    #: Sandblaster only: L-BFGS history pairs, units per evaluation pass.
    lbfgs_history: int = 10
    sandblaster_units: int = 24


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
        (
            0 <= params.weight_average <= MAX_WEIGHT_AVERAGE,
            f"the weight average must be in [0, {MAX_WEIGHT_AVERAGE}]: 0 is off, 0.99 "
            "averages about the last 100 updates",
        ),
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
    checks += _algorithm_checks(params) + _sync_checks(params) + _sandblaster_checks(params)
    for ok, message in checks:
        if not ok:
            raise JobRejected(message)
    if params.initial_weights is not None:
        try:
            weights.check_upload(params.initial_weights, settings.DATASET_MAX_BYTES)
        except weights.WeightsRejected as exc:
            raise JobRejected(f"initial weights rejected: {exc}") from None
    with transaction.atomic():
        # Locked until the job row commits: ``delete_dataset`` takes the same lock before it
        # looks for jobs, so a dataset deleted meanwhile is a clear refusal, not an
        # IntegrityError (a 500) at commit, and a job never refers to a deleted dataset.
        if not Dataset.objects.select_for_update().filter(id=dataset.id).exists():
            raise JobRejected(
                f"the dataset {dataset.name} was deleted; choose another or upload it again"
            )
        averaged = keeps_average(params.algorithm, params.weight_average)
        arrays = store_arrays(params.robust_aggregation, averaged)
        _check_job_quotas(owner, spec.param_count, arrays)
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


def _algorithm_checks(params: JobParams) -> list[tuple[Any, str]]:
    if params.algorithm not in OFFERED_ALGORITHMS:
        return [(False, f"algorithm must be one of {', '.join(OFFERED_ALGORITHMS)}")]
    if params.algorithm != Job.Algorithm.LOCAL_STEPS:
        return []
    return [
        (
            not params.robust_aggregation,
            "local steps cannot be combined with robust aggregation yet: centred clipping "
            "is tuned for gradients, not for the pseudo-gradients of many inner steps",
        ),
        (0 <= params.inner_steps <= MAX_INNER_STEPS, "inner steps must be in [0, 10000]"),
        (params.inner_optimizer in INNER_OPTIMIZERS, "inner optimizer: adamw or sgd-momentum"),
        (0 < params.inner_learning_rate <= 10, "inner learning rate must be in (0, 10]"),
        (0 < params.outer_learning_rate <= 10, "outer learning rate must be in (0, 10]"),
        (0 <= params.outer_momentum < 1, "outer momentum must be in [0, 1)"),
    ]


def _sync_checks(params: JobParams) -> list[tuple[object, str]]:
    if params.algorithm != Job.Algorithm.SYNC:
        return []
    return [
        (1 <= params.sync_workers <= 64, "a synchronous step averages 1 to 64 agents' gradients"),
        (0 <= params.sync_backups <= 64, "backup agents must be 0 to 64"),
        (0.1 <= params.sync_step_timeout_s <= 600, "the step timeout must be 0.1 to 600 s"),
        (
            not params.robust_aggregation,
            "centred clipping is for asynchronous (downpour) jobs; turn it off for sync",
        ),
    ]


def _sandblaster_checks(params: JobParams) -> list[tuple[object, str]]:
    if params.algorithm != Job.Algorithm.SANDBLASTER:
        return []
    return [
        (1 <= params.lbfgs_history <= 100, "L-BFGS keeps 1 to 100 pairs of history"),
        (1 <= params.sandblaster_units <= 10_000, "a pass is 1 to 10000 work units"),
        (
            not params.robust_aggregation,
            "centred clipping is for asynchronous (downpour) jobs; turn it off for Sandblaster",
        ),
        (
            params.compression == Job.Compression.NONE,
            "Sandblaster sums exact gradients: choose no compression",
        ),
    ]


#: Jobs that hold a place in the store or the queue, for the quotas.
ACTIVE_STATUSES = (Job.Status.QUEUED, Job.Status.RUNNING, Job.Status.PAUSED)


def _check_job_quotas(owner: Any, param_count: int, arrays: int) -> None:
    """Refuse a job past the owner's quotas. Call inside a transaction: locks the owner's
    row, so two submits at once cannot both pass."""
    user = get_user_model().objects.select_for_update().get(pk=owner.pk)
    if param_count > user.quota("max_params_per_job"):
        raise JobRejected(
            f"the model has {param_count:,} parameters; your quota is "
            f"{user.quota('max_params_per_job'):,} per job"
        )
    active = list(Job.objects.filter(owner=user, status__in=ACTIVE_STATUSES))
    if len(active) >= user.quota("max_active_jobs"):
        raise JobRejected(
            f"you have {len(active)} queued, running or paused jobs; your quota is "
            f"{user.quota('max_active_jobs')}. Wait for one to finish."
        )
    held = sum(job.store_bytes for job in active)
    needed = param_count * 4 * arrays  # float32 arrays per parameter: models.store_arrays
    if held + needed > user.quota("max_store_bytes"):
        raise JobRejected(
            f"this job needs {needed / 2**20:.0f} MiB of parameter-store memory and your "
            f"active jobs hold {held / 2**20:.0f} MiB; your quota is "
            f"{user.quota('max_store_bytes') / 2**20:.0f} MiB"
        )


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
        compression=params.compression,
        max_staleness=params.max_staleness,
        staleness_aware_lr=params.staleness_aware_lr,
        weight_average=params.weight_average,
        warm_start_pushes=params.warm_start_pushes,
        robust_aggregation=params.robust_aggregation,
        max_grad_norm=params.max_grad_norm or None,
        spot_check_fraction=params.spot_check_fraction,
        target_accuracy=params.target_accuracy,
        budget_samples=params.budget_samples,
        budget_seconds=params.budget_seconds,
        seed=params.seed,
        algorithm=params.algorithm,
        inner_steps=params.inner_steps,
        inner_optimizer=params.inner_optimizer,
        inner_learning_rate=params.inner_learning_rate,
        outer_learning_rate=params.outer_learning_rate,
        outer_momentum=params.outer_momentum,
        sync_workers=params.sync_workers,
        sync_backups=params.sync_backups,
        sync_step_timeout_s=params.sync_step_timeout_s,
        lbfgs_history=params.lbfgs_history,
        sandblaster_units=params.sandblaster_units,
    )


def start_job(job: Job) -> bool:
    """Build the model once, write its initial weights to the store, and let agents in.

    Needs TensorFlow, so it runs in a Celery worker (or the embedded runner thread).
    """
    specs, start_weights, statistics = starting_weights(job)
    layout = ShardLayout.balanced(
        [VariableSpec(n, tuple(s), d) for n, s, d in specs],
        job.n_param_shards,
        [VariableSpec(n, tuple(s), d) for n, s, d in statistics],
    )
    claimed = Job.objects.filter(id=job.id, status=Job.Status.QUEUED).update(
        layout=layout.to_json(), status_message="initialising"
    )
    if claimed != 1:
        return False
    job.refresh_from_db()
    job_store(job).initialize(start_weights)
    started = Job.objects.filter(id=job.id, status=Job.Status.QUEUED).update(
        status=Job.Status.RUNNING, started_at=timezone.now()
    )
    if started != 1:  # cancelled while it was initialising
        free_job_store(job)
        return False
    log.info("job %s started: %d parameters in %d shards", job.id, job.param_count, layout.n_shards)
    return True


def starting_weights(
    job: Job,
) -> tuple[
    list[tuple[str, tuple[int, ...], str]], dict[str, Any], list[tuple[str, tuple[int, ...], str]]
]:
    """The model's trainable specs, the weights the job starts from (every variable), and
    its non-trainable specs (BatchNormalization statistics...)."""
    from downpour.training.evaluation import initial_weights

    specs, start, statistics = initial_weights(job.model_config, job.seed)
    if job.initial_weights_path:
        try:
            uploaded = weights.load_for_model(
                Path(job.initial_weights_path),
                job.initial_weights_sha256,
                specs + statistics,
                settings.DATASET_MAX_BYTES,
                optional={name for name, _, _ in statistics},
            )
            start = start | uploaded
        except (weights.WeightsRejected, OSError) as exc:
            raise weights.WeightsRejected(f"initial weights: {exc}") from None
    return specs, start, statistics


def start_queued_jobs() -> int:
    started = 0
    for job in Job.objects.filter(status=Job.Status.QUEUED, layout__isnull=True):
        try:
            started += start_job(job)
        except Exception as exc:
            log.exception("job %s failed to start", job.id)
            Job.objects.filter(id=job.id).update(
                status=Job.Status.FAILED,
                status_message=f"could not start: {exc}"[:STATUS_MESSAGE_CHARS],
            )
    return started


@dataclass(frozen=True)
class Evaluated:
    """Weights as an evaluation scored them, with the test accuracy they scored."""

    weights: dict[str, Any]
    accuracy: float


def finish_job(job: Job, status: str, message: str, evaluated: Evaluated | None = None) -> bool:
    """Stop the job once (CAS on status), export the model and tell its agents.

    ``evaluated`` is what the evaluation that ended the job scored: exported as the last
    model, so the download is exactly what the page shows.
    """
    from downpour.agents import push

    changed = Job.objects.filter(id=job.id, status=Job.Status.RUNNING).update(
        status=status, status_message=message[:STATUS_MESSAGE_CHARS], finished_at=timezone.now()
    )
    if changed != 1:
        return False
    job.refresh_from_db()
    try:
        export_job(job, evaluated)
    except Exception:
        log.exception("job %s: export failed", job.id)
    Lease.objects.filter(unit__job=job, status=Lease.Status.ACTIVE).update(
        status=Lease.Status.EXPIRED, ended_at=timezone.now()
    )
    push.notify_job_finished_on_commit(str(job.id))
    log.info("job %s finished (%s): %s", job.id, status, message)
    return True


#: How far back ``free_finished_stores`` looks: a job finished longer ago than this plus
#: ``STORE_FREE_AFTER_S`` while no worker ran keeps its store until an operator deletes it.
FREE_HORIZON = timedelta(hours=1)


def free_finished_stores(now: datetime | None = None) -> int:
    """Free the stores of jobs that finished ``STORE_FREE_AFTER_S`` ago; how many were freed.

    Not at ``finish_job`` itself: pushes already in flight still land in the store, so its
    versions stay the exact record of what was applied until every lease has wound down.
    """
    now = now or timezone.now()
    due = now - timedelta(seconds=settings.STORE_FREE_AFTER_S)
    freed = 0
    finished = Job.objects.filter(
        status__in=(Job.Status.DONE, Job.Status.FAILED),
        finished_at__lte=due,
        finished_at__gt=due - FREE_HORIZON,
    )
    for job in finished:
        if storage().load_version(str(job.id), 0) is not None:
            free_job_store(job)
            freed += 1
    return freed


def free_job_store(job: Job) -> None:
    """Delete a finished job's parameters from the store; its checkpoints keep the last and
    the best state, and the export the weights."""
    from downpour.training.actions.recovery import prune_checkpoints

    try:
        job_store(job).delete()
        pass_results().delete(str(job.id))  # a Sandblaster job's answers and L-BFGS state
    except Exception:
        log.exception("job %s: could not free the store", job.id)
    forget_job_store(str(job.id))
    prune_checkpoints(job)


def export_job(job: Job, evaluated: Evaluated | None = None) -> None:
    """Export the last evaluated weights and, if an earlier evaluation scored higher, the best.

    Without ``evaluated`` (a job stopped other than by its evaluation) the store's weights
    now are scored and exported as the last. The best are read from the best checkpoint,
    which holds exactly the weights that scored ``Checkpoint.accuracy``.
    """
    from downpour.paramstore.checkpoint import read_checkpoint
    from downpour.training.evaluation import evaluate, export_model, recalibrated

    folder = media_dir("jobs", str(job.id))
    if evaluated is None:
        store_weights = recalibrated(job, job_store(job).scored_weights())
        evaluated = Evaluated(store_weights, evaluate(job, store_weights)[0])
    keras_path, weights_path = export_model(job, evaluated.weights, folder)
    fields: dict[str, Any] = {
        "keras_path": str(keras_path),
        "weights_path": str(weights_path),
        "export_accuracy": evaluated.accuracy,
    }
    best = job.checkpoints.filter(accuracy__isnull=False).order_by("-accuracy").first()
    if best is not None and best.accuracy is not None and best.accuracy > evaluated.accuracy:
        best_weights = read_checkpoint(best.path, best.sha256).weights(scored=True)
        best_keras, best_npz = export_model(job, best_weights, folder, stem="-best")
        fields |= {
            "best_keras_path": str(best_keras),
            "best_weights_path": str(best_npz),
            "best_export_accuracy": best.accuracy,
        }
    Job.objects.filter(id=job.id).update(**fields)
