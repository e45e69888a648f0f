"""Synchronous SGD with backup workers (Chen et al. 2016), on top of the parameter store.

Each shard steps on its own. At version ``v`` a shard keeps a buffer of the gradients
computed on ``v``; the first ``workers`` (N) of them win. When the N-th arrives, or when
``step_timeout_s`` has passed since the first one did (then with whatever arrived, at least
one), the sample-weighted mean of the buffer is applied once with Adagrad and the shard
moves to ``v + 1``. Gradients for an older version, and those that arrive when the buffer
already holds N, are *late*: dropped, counted, and reported so the donor is still credited.

Every decision is one atomic step of the storage backend (``SyncStorage``):

* ``sync_offer`` puts a gradient in the buffer exactly once per push id, at most one per
  lease per step, and refuses it as late unless it was computed on the current version;
* ``sync_commit`` is a compare-and-set: it installs the new weights only if the shard is
  still at ``v`` and the buffer still holds exactly the gradients that were averaged, and in
  the same step records their push ids as applied and empties the buffer. Several processes
  may try to apply the same step; exactly one succeeds.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from downpour.paramstore.adagrad import adagrad_apply_pieces
from downpour.paramstore.bounds import check_squarable, clip_to_norm
from downpour.paramstore.errors import NonFinite, NotInitialized, StaleGradient
from downpour.paramstore.results import PushResult
from downpour.paramstore.storage import CommitOutcome, ShardState
from downpour.paramstore.store import BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, ParameterStore

#: The shard whose events the job's counters count (each push round sends every shard).
COUNTED_SHARD = 0


class SyncOutcome(enum.Enum):
    """What ``SyncStorage.sync_offer`` did with a gradient."""

    COUNTED = "counted"  # in the step's buffer: part of the mean when the step applies
    LATE = "late"  # dropped: computed on an older version, or the step already had N
    DUPLICATE = "duplicate"  # this push id was counted before (buffered or applied)
    DUPLICATE_LATE = "duplicate_late"  # this push id was dropped as late before
    SAME_LEASE = "same_lease"  # the lease already has a gradient in this step
    AHEAD = "ahead"  # computed on a version the shard has not reached
    ABSENT = "absent"  # the shard is not in the store


@dataclass(frozen=True)
class SyncOffer:
    """Result of ``sync_offer``: the outcome, the shard's version, and the step's buffer
    (gradients in it and seconds since its first arrived) when the outcome is COUNTED."""

    outcome: SyncOutcome
    version: int
    count: int = 0
    age_s: float = 0.0


@dataclass(frozen=True)
class SyncBatch:
    """The buffer of one step: the gradients computed on ``version``, in arrival order.

    ``gradients`` are float32 ``(shard_size,)``, already norm-clipped; ``samples`` weigh them.
    """

    version: int
    push_ids: tuple[str, ...]
    samples: tuple[int, ...]
    gradients: tuple[np.ndarray, ...]
    age_s: float


@dataclass(frozen=True)
class SyncCounts:
    """A job's synchronous progress, counted on shard 0: steps applied, steps applied by the
    timeout with fewer than N gradients, and late gradients dropped (each push id once)."""

    steps: int = 0
    timeouts: int = 0
    late: int = 0


class SyncStorage(Protocol):
    """The buffer operations a backend adds to ``ShardStorage`` for synchronous jobs."""

    def sync_offer(
        self,
        job: str,
        shard: int,
        base_version: int,
        push_id: str,
        lease_id: str,
        worker: str,
        samples: int,
        gradient: np.ndarray,
        capacity: int,
        counted: bool,
    ) -> SyncOffer:
        """Atomically classify a gradient and, if it is counted, add it to the buffer.

        One gradient per ``worker`` (agent) per step: another of the same lease is
        SAME_LEASE, one of another lease of the same worker (it started a new unit) LATE."""
        ...

    def sync_pending(self, job: str, shard: int) -> SyncBatch | None:
        """The buffer of the shard's current version, or None when it is empty."""
        ...

    def sync_age(self, job: str, shard: int) -> tuple[int, float]:
        """Gradients in the current step's buffer and seconds since the first arrived
        (``(0, 0.0)`` when empty); reads no gradient, so a waiting fetch may poll it."""
        ...

    def sync_commit(
        self,
        job: str,
        shard: int,
        batch: SyncBatch,
        state: ShardState,
        timed_out: bool,
        counted: bool,
    ) -> CommitOutcome:
        """Install ``state`` (version ``batch.version + 1``) if the shard is at
        ``batch.version`` and its buffer holds exactly ``batch.push_ids``; record those ids
        as applied and empty the buffer. Otherwise CONFLICT, nothing written."""
        ...

    def sync_counts(self, job: str) -> SyncCounts:
        """The job's counters (zeros for a job without any)."""
        ...


@dataclass(frozen=True)
class SyncRule:
    """A synchronous job's settings.

    Parameters
    ----------
    workers : int
        N, gradients averaged per step, ``>= 1``.
    backups : int
        b, extra agents leased beyond N so that N arrive sooner, ``>= 0``.
    step_timeout_s : float
        Longest a step waits after its first gradient before it applies what it has, ``> 0``.
    """

    workers: int
    backups: int = 0
    step_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        if isinstance(self.backups, bool) or not isinstance(self.backups, int) or self.backups < 0:
            raise ValueError(f"backups must be an int >= 0, got {self.backups!r}")
        if not (np.isfinite(self.step_timeout_s) and self.step_timeout_s > 0):
            raise ValueError(f"step_timeout_s must be finite and > 0, got {self.step_timeout_s}")

    @property
    def leases(self) -> int:
        """Agents a job wants at once: N + b."""
        return self.workers + self.backups


def weighted_mean(samples: Sequence[int], gradients: Sequence[np.ndarray]) -> np.ndarray:
    """``sum(s_i g_i) / sum(s_i)`` summed in float64, as float32 ``(shard_size,)``."""
    total = np.zeros(gradients[0].shape, np.float64)
    for weight, gradient in zip(samples, gradients, strict=True):
        total += float(weight) * gradient.astype(np.float64)
    return (total / float(sum(samples))).astype(np.float32)


class SyncAggregator:
    """The synchronous step rule over one job's :class:`ParameterStore`.

    The store's storage must implement :class:`SyncStorage` (``InMemoryStorage`` and
    ``RedisStorage`` do). Stateless apart from that storage, so every server process may
    hold one per job.
    """

    def __init__(self, store: ParameterStore, rule: SyncRule) -> None:
        if not hasattr(store.storage, "sync_offer"):
            raise TypeError(f"{type(store.storage).__name__} has no synchronous buffer")
        self.store = store
        self.rule = rule
        self.storage: SyncStorage = store.storage  # type: ignore[assignment]
        self._random = random.Random()

    def push(
        self,
        shard: int,
        grads: Mapping[str, np.ndarray],
        base_version: int,
        push_id: str,
        lease_id: str,
        samples: int,
        worker: str | None = None,
    ) -> PushResult:
        """Offer one agent's gradient of one shard for the step at ``base_version``.

        ``worker`` (the agent; ``lease_id`` when None) has at most one gradient per step:
        the first N *agents'* gradients win, whichever of their leases sent them.

        Returns
        -------
        PushResult
            ``applied`` when the gradient is counted in its step (the step applies it once,
            now or when the step completes); ``late`` when it was dropped; ``duplicate`` for
            a push id seen before (with ``late`` if it had been dropped). ``version`` is the
            shard's version after the call.

        Raises
        ------
        UnknownShard, WrongShape, WrongDtype, NonFinite
            Invalid input, checked before any state is read.
        StaleGradient
            ``base_version`` is negative or ahead of the shard, or the lease already has a
            gradient in this step.
        NotInitialized
            The job has no parameters.
        """
        store = self.store
        shard = store.layout.check_shard(shard)
        if not isinstance(push_id, str) or not push_id:
            raise ValueError(f"push_id must be a non-empty string, got {push_id!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {samples!r}")
        pieces = store.layout.check_tensors(shard, grads)
        if not all(np.isfinite(piece).all() for piece in pieces):
            raise NonFinite(f"gradient for shard {shard} must be finite")
        check_squarable(store.layout, shard, pieces)
        if isinstance(base_version, bool) or not isinstance(base_version, int | np.integer):
            raise StaleGradient(f"base_version must be an integer, got {base_version!r}")
        if base_version < 0:
            raise StaleGradient(f"base_version must be >= 0, got {base_version}")
        if store.max_grad_norm is not None:
            pieces, _ = clip_to_norm(pieces, store.max_grad_norm)
        flat = np.concatenate([piece.reshape(-1) for piece in pieces]).astype(np.float32)
        offer = self.storage.sync_offer(
            store.job_id,
            shard,
            int(base_version),
            push_id,
            lease_id,
            lease_id if worker is None else worker,
            samples,
            flat,
            self.rule.workers,
            shard == COUNTED_SHARD,
        )
        outcome = offer.outcome
        if outcome is SyncOutcome.ABSENT:
            raise NotInitialized(f"job {store.job_id!r} has no parameters for shard {shard}")
        if outcome is SyncOutcome.AHEAD:
            raise StaleGradient(
                f"base_version {base_version} is ahead of shard {shard}'s version "
                f"{offer.version}; fetch the shard again"
            )
        if outcome is SyncOutcome.SAME_LEASE:
            raise StaleGradient(
                f"this lease already has a gradient in step {offer.version} of shard {shard}; "
                f"fetch with min_version {offer.version + 1} before pushing again"
            )
        staleness = max(0, offer.version - int(base_version))
        if outcome is SyncOutcome.DUPLICATE:
            return PushResult(False, True, offer.version, staleness)
        if outcome is SyncOutcome.DUPLICATE_LATE:
            return PushResult(False, True, offer.version, staleness, late=True)
        if outcome is SyncOutcome.LATE:
            return PushResult(False, False, offer.version, staleness, late=True)
        version = offer.version
        if offer.count >= self.rule.workers or offer.age_s >= self.rule.step_timeout_s:
            self.apply_step(shard)
            version = self._version(shard)
        return PushResult(True, False, version, 0)

    def tick(self, shard: int) -> bool:
        """Apply the shard's current step if its timeout has passed; whether this call did."""
        return self.apply_step(self.store.layout.check_shard(shard))

    def apply_step(self, shard: int) -> bool:
        """Apply the current step's mean if it has N gradients or has timed out.

        Returns whether this call applied it: False when the step is not ready, is empty,
        or another caller applied it first (each step is applied exactly once).
        """
        store = self.store
        count, age_s = self.storage.sync_age(store.job_id, shard)
        if count == 0 or (count < self.rule.workers and age_s < self.rule.step_timeout_s):
            return False
        for attempt in range(store.max_commit_attempts):
            batch = self.storage.sync_pending(store.job_id, shard)
            if batch is None or not batch.push_ids:
                return False
            full = len(batch.push_ids) >= self.rule.workers
            if not full and batch.age_s < self.rule.step_timeout_s:
                return False
            state = store.storage.load(store.job_id, shard)
            if state is None:
                raise NotInitialized(f"job {store.job_id!r} has no parameters for shard {shard}")
            if state.version == batch.version:
                mean = weighted_mean(batch.samples, batch.gradients)
                with np.errstate(over="ignore"):
                    adagrad_apply_pieces(
                        state.weights,
                        state.accumulators,
                        [mean],
                        store.optimizer.learning_rate,
                        store.optimizer.epsilon,
                    )
                if not np.isfinite(state.accumulators).all():
                    raise NonFinite(f"step {batch.version} of shard {shard} overflowed Adagrad")
                new = ShardState(batch.version + 1, state.weights, state.accumulators, None)
                outcome = self.storage.sync_commit(
                    store.job_id, shard, batch, new, not full, shard == COUNTED_SHARD
                )
                if outcome is CommitOutcome.APPLIED:
                    with store._counts_lock:
                        store.staleness_counts[0] += len(batch.push_ids)
                    return True
            ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
            time.sleep(self._random.uniform(0, ceiling))
        return False

    def counts(self) -> SyncCounts:
        """The job's steps, timeouts and late gradients (shard 0's)."""
        return self.storage.sync_counts(self.store.job_id)

    def _version(self, shard: int) -> int:
        version = self.store.storage.load_version(self.store.job_id, shard)
        if version is None:
            raise NotInitialized(f"job {self.store.job_id!r} has no parameters for shard {shard}")
        return version
