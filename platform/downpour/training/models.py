from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import models

from downpour.paramstore import DEFAULT_MAX_GRAD_NORM, ShardLayout


class Dataset(models.Model):
    """A researcher's uploaded ``.npz``; its training split lives in shard files."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)
    n_train = models.IntegerField()
    n_test = models.IntegerField()
    input_shape = models.JSONField()
    y_dtype = models.CharField(max_length=16)
    n_classes = models.IntegerField(null=True)
    test_path = models.CharField(max_length=500)
    sha256 = models.CharField(max_length=64)
    # Bytes on disk (test split and shards): counted against the owner's dataset quota.
    stored_bytes = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return self.name


class DatasetShard(models.Model):
    """A slice of the training split that agents download and verify by SHA-256."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="shards")
    index = models.IntegerField()
    path = models.CharField(max_length=500)
    sha256 = models.CharField(max_length=64)
    n_samples = models.IntegerField()
    size_bytes = models.BigIntegerField()

    class Meta:
        ordering = ["index"]
        constraints = [models.UniqueConstraint(fields=["dataset", "index"], name="shard_index")]

    def __str__(self) -> str:
        return f"{self.dataset_id} shard {self.index}"


def keeps_average(algorithm: str, weight_average: float) -> bool:
    """Whether a job's store keeps an average of the weights: Downpour with
    ``weight_average`` above 0 (other algorithms ignore the setting)."""
    return algorithm == Job.Algorithm.DOWNPOUR and weight_average > 0


def store_arrays(robust: bool, averaged: bool) -> int:
    """Float32 arrays the store keeps per parameter: weights and accumulators, the clipping
    centre with robust aggregation, the average when the job keeps one."""
    return 2 + int(robust) + int(averaged)


class Job(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        PAUSED = "paused"
        DONE = "done"
        FAILED = "failed"

    class Algorithm(models.TextChoices):
        # Asynchronous Downpour SGD (Dean et al. 2012): each push is applied as it arrives.
        DOWNPOUR = "downpour"
        # DiLoCo-style: H inner steps on the agent, pseudo-gradients under an outer optimizer.
        LOCAL_STEPS = "local-steps"
        # Synchronous SGD with backup workers (Chen et al. 2016).
        SYNC = "sync"
        # Sandblaster L-BFGS (Dean et al. 2012, section 4.2): a server-side coordinator.
        SANDBLASTER = "sandblaster"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT)
    model_config = models.JSONField()
    loss = models.CharField(max_length=50, default="sparse_categorical_crossentropy")
    param_count = models.BigIntegerField()
    # Only the algorithms whose server and agent sides exist are offered by the form and API.
    algorithm = models.CharField(
        max_length=20, choices=Algorithm.choices, default=Algorithm.DOWNPOUR
    )
    # Synchronous jobs (Chen et al. 2016): each step averages the first N (sync_workers) of
    # N + b (sync_backups) agents' gradients, and waits at most sync_step_timeout_s.
    sync_workers = models.IntegerField(default=2)
    sync_backups = models.IntegerField(default=1)
    sync_step_timeout_s = models.FloatField(default=10.0)
    # Sandblaster L-BFGS (Dean et al. 2012, 4.2): the coordinator keeps lbfgs_history (s, y)
    # pairs, cuts each evaluation pass into sandblaster_units units, and writes what the job
    # page shows (pass, units done, line search) to sandblaster_progress.
    lbfgs_history = models.IntegerField(default=10)
    sandblaster_units = models.IntegerField(default=24)
    sandblaster_progress = models.JSONField(default=dict, blank=True)
    sandblaster_backups = models.BigIntegerField(default=0)

    class Compression(models.TextChoices):
        # Pushes and fetches in float32.
        NONE = "none", "none (float32)"
        # int8 with per-block scales; pushes with error feedback, fetches as deltas.
        INT8 = "int8", "int8 with error feedback"

    compression = models.CharField(
        max_length=10, choices=Compression.choices, default=Compression.NONE
    )
    learning_rate = models.FloatField(default=0.05)
    # Local-steps jobs (DiLoCo): H inner steps per round on the agent (0: the scheduler
    # chooses H per agent from its compute rate and link), with the agent's own optimizer;
    # the store applies each round's pseudo-gradient with Nesterov momentum.
    inner_steps = models.IntegerField(default=0)
    inner_optimizer = models.CharField(
        max_length=16,
        choices=[("adamw", "AdamW"), ("sgd-momentum", "SGD with momentum")],
        default="adamw",
    )
    inner_learning_rate = models.FloatField(default=0.001)
    # The whole (staleness-discounted) change, no momentum: DiLoCo's 0.7 / 0.9 overshot with
    # two agents pushing asynchronously (docs/benchmarks.md, "The outer step's defaults").
    outer_learning_rate = models.FloatField(default=1.0)
    outer_momentum = models.FloatField(default=0.0)
    batch_size = models.IntegerField(default=32)
    n_fetch = models.IntegerField(default=1)
    n_push = models.IntegerField(default=1)
    n_param_shards = models.IntegerField(default=2)
    max_staleness = models.IntegerField(default=64)
    # Zhang et al. 2016: divide each push's step by its staleness.
    staleness_aware_lr = models.BooleanField(default=False)
    # Downpour only (other algorithms ignore it): above 0, the store keeps a running average
    # of each shard's versions (average = d * average + (1 - d) * weights, d = min(b, (1 + v)
    # / (10 + v)): ParameterStore's ``average``) and the job is scored and exported at it.
    weight_average = models.FloatField(default=0.0)
    # Dean et al.'s warm start: one replica alone for the first K applied pushes.
    warm_start_pushes = models.IntegerField(default=0)
    # {staleness: accepted pushes}, merged from every consumer's tallies.
    staleness_hist = models.JSONField(default=dict, blank=True)
    # Centred clipping at the store (Karimireddy et al. 2021); needs a trusted agent online.
    robust_aggregation = models.BooleanField(default=False)
    # Each push is scaled down to this L2 norm in the store; null or 0 turns the clip off.
    max_grad_norm = models.FloatField(null=True, blank=True, default=DEFAULT_MAX_GRAD_NORM)
    # Fraction of leases one of whose push rounds a trusted worker recomputes (spot checks).
    spot_check_fraction = models.FloatField(default=0.05)
    # A researcher's starting point (e.g. a finished job's weights.npz), checked at submit
    # and again, with its SHA-256, when the job starts.
    initial_weights_path = models.CharField(max_length=500, blank=True)
    initial_weights_sha256 = models.CharField(max_length=64, blank=True)
    target_accuracy = models.FloatField(null=True, blank=True)
    budget_samples = models.BigIntegerField(null=True, blank=True)
    budget_seconds = models.FloatField(null=True, blank=True)
    seed = models.IntegerField(default=0)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    status_message = models.TextField(blank=True)
    layout = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    samples_done = models.BigIntegerField(default=0)
    pushes_accepted = models.BigIntegerField(default=0)
    pushes_rejected = models.BigIntegerField(default=0)
    best_accuracy = models.FloatField(null=True, blank=True)
    # The exported models: the last evaluated weights (keras_path, weights_path) and, when an
    # earlier evaluation scored higher, the best; each with the test accuracy it scored.
    keras_path = models.CharField(max_length=500, blank=True)
    weights_path = models.CharField(max_length=500, blank=True)
    export_accuracy = models.FloatField(null=True, blank=True)
    best_keras_path = models.CharField(max_length=500, blank=True)
    best_weights_path = models.CharField(max_length=500, blank=True)
    best_export_accuracy = models.FloatField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name

    def shard_layout(self) -> ShardLayout:
        """The parameter layout, set once when the job starts."""
        if self.layout is None:
            raise ValueError(f"job {self.id} has no parameter layout yet")
        return ShardLayout.from_json(self.layout)

    @property
    def store_bytes(self) -> int:
        """Parameter-store memory: weights and Adagrad accumulators, plus the clipping centre
        and the average of the weights when the job keeps them."""
        return int(self.param_count) * 4 * store_arrays(self.robust_aggregation, self.averaged)

    @property
    def averaged(self) -> bool:
        """Whether the store keeps an average of the weights: ``weight_average``, Downpour."""
        return keeps_average(self.algorithm, self.weight_average)

    def downloads(self) -> list[dict[str, Any]]:
        """The exported files that exist, each with the accuracy its weights scored.

        ``kind`` is what ``portal:job_download`` serves; a failed export, or a job that never
        trained, offers nothing rather than links that would 404.
        """
        files = [
            ("keras", "last", self.keras_path, self.export_accuracy),
            ("weights", "last", self.weights_path, self.export_accuracy),
            ("best-keras", "best", self.best_keras_path, self.best_export_accuracy),
            ("best-weights", "best", self.best_weights_path, self.best_export_accuracy),
        ]
        return [
            {
                "kind": kind,
                "which": which,
                "path": path,
                "accuracy": accuracy,
                "percent": "" if accuracy is None else f"{accuracy:.1%}",
            }
            for kind, which, path, accuracy in files
            if path and Path(path).is_file()
        ]

    @property
    def is_finished(self) -> bool:
        return self.status in (self.Status.DONE, self.Status.FAILED)


class WorkUnit(models.Model):
    """``steps`` gradient steps of one job on one dataset shard."""

    class Status(models.TextChoices):
        PENDING = "pending"
        LEASED = "leased"
        DONE = "done"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="units")
    shard = models.ForeignKey(DatasetShard, on_delete=models.CASCADE)
    steps = models.IntegerField()
    seed = models.IntegerField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    done_at = models.DateTimeField(null=True, blank=True)
    # A Sandblaster unit: unit pass_unit of evaluation pass pass_number, samples
    # [sample_start, sample_stop) of its shard, answered at the store's pinned_version.
    pass_number = models.IntegerField(null=True, blank=True)
    pass_unit = models.IntegerField(null=True, blank=True)
    sample_start = models.IntegerField(null=True, blank=True)
    sample_stop = models.IntegerField(null=True, blank=True)
    pinned_version = models.BigIntegerField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["job", "status"])]

    def __str__(self) -> str:
        return f"unit {self.id} ({self.steps} steps, {self.status})"


class Lease(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        COMPLETED = "completed"
        RETURNED = "returned"
        EXPIRED = "expired"
        # A backup copy whose unit another copy finished first: its pushes are refused.
        SUPERSEDED = "superseded"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    unit = models.ForeignKey(WorkUnit, on_delete=models.CASCADE, related_name="leases")
    agent = models.ForeignKey("donors.Agent", on_delete=models.CASCADE, related_name="leases")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    issued_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    resumed = models.IntegerField(default=0)
    # The push round a spot check replays, chosen at issue (None: not checked); the agent
    # is not told.
    spot_check_round = models.IntegerField(null=True, blank=True)
    # Steps per push round of this lease, chosen at issue: a local-steps lease's H (per
    # agent); None: the job's n_push.
    round_steps = models.IntegerField(null=True, blank=True)
    samples = models.BigIntegerField(default=0)
    # Samples of the rounds that reached the store, applied or not (each round once): a
    # ``complete`` must claim exactly these.
    samples_pushed = models.BigIntegerField(default=0)
    pushes_accepted = models.IntegerField(default=0)
    pushes_rejected = models.IntegerField(default=0)

    class Meta:
        indexes = [
            models.Index(fields=["status", "expires_at"]),
            # The agent's lease that ran when another was issued (record_lease_rate).
            models.Index(fields=["agent", "ended_at"]),
        ]

    def __str__(self) -> str:
        return f"lease {self.id} ({self.status})"

    @property
    def push_every(self) -> int:
        """Steps per push round: the lease's own H, else its job's ``n_push``."""
        return self.round_steps or self.unit.job.n_push


class Contribution(models.Model):
    """What one agent gave one job: the basis of the donor's credit."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="contributions")
    agent = models.ForeignKey(
        "donors.Agent", on_delete=models.CASCADE, related_name="contributions"
    )
    samples = models.BigIntegerField(default=0)
    pushes_accepted = models.BigIntegerField(default=0)
    pushes_rejected = models.BigIntegerField(default=0)
    credit = models.FloatField(default=0.0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["job", "agent"], name="one_row_per_job_agent")
        ]

    def __str__(self) -> str:
        return f"{self.agent_id} → {self.job_id}: {self.samples} samples"


class Evaluation(models.Model):
    """One point of a job's test-accuracy time series."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="evaluations")
    created_at = models.DateTimeField(auto_now_add=True)
    elapsed_s = models.FloatField()
    samples = models.BigIntegerField()
    accuracy = models.FloatField()
    loss = models.FloatField()
    versions = models.JSONField()

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"{self.job_id} @ {self.elapsed_s:.1f} s: {self.accuracy:.3f}"


class Checkpoint(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="checkpoints")
    created_at = models.DateTimeField(auto_now_add=True)
    path = models.CharField(max_length=500)
    sha256 = models.CharField(max_length=64)
    versions = models.JSONField()
    # Test accuracy of exactly these weights, when an evaluation wrote the checkpoint.
    accuracy = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.path


class SpotCheck(models.Model):
    """One push round of a lease, kept so a trusted worker can recompute it.

    ``weights`` holds what the server served at the versions the round's pushes name (the
    round's base, then each load, keyed ``"<i>|<variable>"``) and ``gradients`` what the
    agent pushed, keyed by variable; both as ``.npz`` bytes.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        PASSED = "passed"
        FAILED = "failed"
        # Could not be judged (e.g. the model has gone); costs the agent nothing.
        SKIPPED = "skipped"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    lease = models.OneToOneField(Lease, on_delete=models.CASCADE, related_name="spot_check_run")
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="spot_checks")
    agent = models.ForeignKey("donors.Agent", on_delete=models.CASCADE, related_name="spot_checks")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    checked_at = models.DateTimeField(null=True, blank=True)
    round = models.IntegerField(default=0)  # the push round's seq
    first_step = models.IntegerField(default=0)
    steps = models.IntegerField()
    samples = models.IntegerField()
    versions = models.JSONField()  # per shard: the version served (= the push's base_version)
    # Weights loaded within the round: [[step offset, [version per shard]], ...].
    loads = models.JSONField(default=list)
    weights = models.BinaryField()
    gradients = models.BinaryField()
    # Per variable pushed as int8: the L2 error quantisation explains (added to the atol).
    quantisation_allowance = models.JSONField(default=dict, blank=True)
    # Largest ||agent - recomputed|| / ||recomputed|| over the tensors.
    relative_error = models.FloatField(null=True, blank=True)
    detail = models.TextField(blank=True)

    class Meta:
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"spot check of {self.lease_id} ({self.status})"
