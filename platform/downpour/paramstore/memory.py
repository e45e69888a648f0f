"""In-process shard storage: the embedded default and the backend of the unit tests."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from downpour.paramstore.robust import RobustState, RobustStats
from downpour.paramstore.statistics import StatisticsState
from downpour.paramstore.storage import CommitOutcome, ShardState
from downpour.paramstore.sync import SyncBatch, SyncCounts, SyncOffer, SyncOutcome

DEFAULT_APPLIED_CAPACITY = 100_000


@dataclass
class _Shard:
    state: ShardState
    capacity: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    applied: set[str] = field(default_factory=set)
    applied_order: deque[str] = field(default_factory=deque)
    deleted: bool = False
    # Synchronous jobs: the step's buffer (push id -> lease, worker, samples, gradient) at
    # ``sync_version``, when its first gradient arrived (monotonic), and the dropped ids.
    sync_version: int = -1
    sync_first: float = 0.0
    sync_entries: dict[str, tuple[str, str, int, np.ndarray]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)

    def remember(self, push_id: str) -> None:
        self.applied.add(push_id)
        self.applied_order.append(push_id)
        if len(self.applied_order) > self.capacity:
            self.applied.discard(self.applied_order.popleft())


class InMemoryStorage:
    """Thread-safe :class:`~downpour.paramstore.store.ShardStorage` in process memory.

    Parameters
    ----------
    applied_capacity : int
        How many recent push ids each shard remembers for duplicate detection. Every applied
        push bumps the version, so an id forgotten after ``applied_capacity`` newer pushes can
        only be replayed with staleness above ``applied_capacity``; it is still rejected as
        stale whenever ``applied_capacity >= max_staleness``.

    Notes
    -----
    Each (job, shard) has its own lock. Stored arrays never leave this object: ``load`` copies
    them out and ``commit`` copies into them, both under the lock, so a commit allocates
    nothing and a reader never sees half an update.
    """

    def __init__(
        self,
        applied_capacity: int = DEFAULT_APPLIED_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if applied_capacity < 1:
            raise ValueError(f"applied_capacity must be >= 1, got {applied_capacity}")
        self._applied_capacity = applied_capacity
        # Seconds, for the age of a synchronous step (its timeout); the convergence
        # simulator passes its virtual clock.
        self._clock = clock
        self._shards: dict[tuple[str, int], _Shard] = {}
        self._registry_lock = threading.Lock()
        # job -> (statistics, applied report ids, their order); under _statistics_lock.
        self._statistics: dict[str, tuple[StatisticsState, set[str], deque[str]]] = {}
        self._statistics_lock = threading.Lock()
        self._sync_counts: dict[str, SyncCounts] = {}

    def memory_bytes(self) -> int:
        """Bytes held in arrays (weights, accumulators, robust centres, averages) over every
        shard."""
        total = 0
        for slot in list(self._shards.values()):
            state = slot.state
            if slot.deleted:
                continue
            total += state.weights.nbytes + state.accumulators.nbytes
            if state.robust is not None:
                total += state.robust.momentum.nbytes
            if state.average is not None:
                total += state.average.nbytes
        return total

    def load(self, job: str, shard: int) -> ShardState | None:
        """Copy of the shard's state, or None."""
        slot = self._shards.get((job, shard))
        if slot is None:
            return None
        with slot.lock:
            if slot.deleted:
                return None
            state = slot.state
            return ShardState(
                state.version,
                state.weights.copy(),
                state.accumulators.copy(),
                None if state.robust is None else state.robust.copy(),
                None if state.average is None else state.average.copy(),
            )

    def load_version(self, job: str, shard: int) -> int | None:
        """The shard's version, or None."""
        slot = self._shards.get((job, shard))
        if slot is None:
            return None
        with slot.lock:
            return None if slot.deleted else slot.state.version

    def initialize(self, job: str, shard: int, state: ShardState) -> None:
        """Store a copy of ``state``, replacing the shard and its applied push ids."""
        stored = _private_copy(state, state.version)
        with self._registry_lock:
            old = self._shards.get((job, shard))
            self._shards[(job, shard)] = _Shard(stored, self._applied_capacity)
        if old is not None:
            with old.lock:
                old.deleted = True

    def commit(
        self, job: str, shard: int, expected_version: int, state: ShardState, push_id: str
    ) -> CommitOutcome:
        """Compare-and-set on the version; see ``ShardStorage.commit``."""
        if state.version != expected_version + 1:
            raise ValueError(
                f"state.version must be expected_version + 1 = {expected_version + 1}, "
                f"got {state.version}"
            )
        slot = self._shards.get((job, shard))
        if slot is None:
            return CommitOutcome.CONFLICT
        with slot.lock:
            if push_id in slot.applied:
                return CommitOutcome.DUPLICATE
            if slot.deleted or slot.state.version != expected_version:
                return CommitOutcome.CONFLICT
            current = slot.state
            if state.weights.shape != current.weights.shape or (
                state.accumulators.shape != current.accumulators.shape
            ):
                raise ValueError(
                    f"shard {shard} holds {current.weights.shape[0]} parameters; got weights "
                    f"{state.weights.shape} and accumulators {state.accumulators.shape}"
                )
            if state.robust is not None and state.robust.momentum.shape != current.weights.shape:
                raise ValueError(
                    f"shard {shard} holds {current.weights.shape[0]} parameters; got a "
                    f"momentum of {state.robust.momentum.shape}"
                )
            if state.average is not None and state.average.shape != current.weights.shape:
                raise ValueError(
                    f"shard {shard} holds {current.weights.shape[0]} parameters; got an "
                    f"average of {state.average.shape}"
                )
            # Copy into the stored buffers: no allocation, and readers copy under this lock.
            np.copyto(current.weights, state.weights, casting="no")
            np.copyto(current.accumulators, state.accumulators, casting="no")
            slot.state = ShardState(
                expected_version + 1,
                current.weights,
                current.accumulators,
                _commit_robust(current.robust, state.robust),
                _commit_average(current.average, state.average),
            )
            slot.remember(push_id)
        return CommitOutcome.APPLIED

    def was_applied(self, job: str, shard: int, push_id: str) -> bool:
        """Whether ``push_id`` is among the shard's remembered push ids."""
        slot = self._shards.get((job, shard))
        if slot is None:
            return False
        with slot.lock:
            return not slot.deleted and push_id in slot.applied

    def load_robust_stats(self, job: str, shards: Sequence[int]) -> list[RobustStats | None]:
        """Each shard's robust statistics; see ``ShardStorage.load_robust_stats``."""
        found: list[RobustStats | None] = []
        for shard in shards:
            slot = self._shards.get((job, shard))
            if slot is None:
                found.append(None)
                continue
            with slot.lock:
                robust = slot.state.robust
                if slot.deleted:
                    found.append(None)
                else:
                    found.append(RobustStats() if robust is None else robust.stats)
        return found

    # -- non-trainable statistics (``downpour.paramstore.statistics.StatisticsStorage``) ----

    def load_statistics(self, job: str) -> StatisticsState | None:
        """Copy of the job's statistics, or None."""
        with self._statistics_lock:
            entry = self._statistics.get(job)
            return None if entry is None else entry[0].copy()

    def initialize_statistics(self, job: str, state: StatisticsState) -> None:
        """Store a copy of ``state`` and forget the applied report ids."""
        with self._statistics_lock:
            self._statistics[job] = (state.copy(), set(), deque())

    def commit_statistics(
        self, job: str, expected_version: int, state: StatisticsState, push_id: str
    ) -> CommitOutcome:
        """Compare-and-set on the statistics' version, exactly once per ``push_id``."""
        with self._statistics_lock:
            entry = self._statistics.get(job)
            if entry is None:
                return CommitOutcome.CONFLICT
            current, applied, order = entry
            if push_id in applied:
                return CommitOutcome.DUPLICATE
            if current.version != expected_version:
                return CommitOutcome.CONFLICT
            applied.add(push_id)
            order.append(push_id)
            if len(order) > self._applied_capacity:
                applied.discard(order.popleft())
            self._statistics[job] = (state.copy(), applied, order)
        return CommitOutcome.APPLIED

    # -- synchronous steps (``downpour.paramstore.sync.SyncStorage``) ----------------------

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
        """Classify a gradient and buffer it if counted, under the shard's lock."""
        slot = self._shards.get((job, shard))
        if slot is None:
            return SyncOffer(SyncOutcome.ABSENT, 0)
        with slot.lock:
            if slot.deleted:
                return SyncOffer(SyncOutcome.ABSENT, 0)
            version = slot.state.version
            if push_id in slot.applied:
                return SyncOffer(SyncOutcome.DUPLICATE, version)
            if push_id in slot.dropped:
                return SyncOffer(SyncOutcome.DUPLICATE_LATE, version)
            if base_version > version:
                return SyncOffer(SyncOutcome.AHEAD, version)
            if slot.sync_version != version:
                slot.sync_version, slot.sync_entries = version, {}
            entries = slot.sync_entries
            if base_version == version and push_id in entries:
                return SyncOffer(SyncOutcome.DUPLICATE, version)
            held = [e[0] for e in entries.values() if e[1] == worker]
            if base_version == version and lease_id in held:
                return SyncOffer(SyncOutcome.SAME_LEASE, version)
            if base_version < version or len(entries) >= capacity or held:
                slot.dropped.add(push_id)
                if counted:
                    self._count(job, late=1)
                return SyncOffer(SyncOutcome.LATE, version, len(entries))
            now = self._clock()
            if not entries:
                slot.sync_first = now
            entries[push_id] = (
                lease_id,
                worker,
                samples,
                np.array(gradient, np.float32, copy=True),
            )
            return SyncOffer(SyncOutcome.COUNTED, version, len(entries), now - slot.sync_first)

    def sync_pending(self, job: str, shard: int) -> SyncBatch | None:
        """Copy of the buffer at the shard's current version, or None if empty."""
        slot = self._shards.get((job, shard))
        if slot is None:
            return None
        with slot.lock:
            if slot.deleted or slot.sync_version != slot.state.version or not slot.sync_entries:
                return None
            items = list(slot.sync_entries.items())
            return SyncBatch(
                slot.sync_version,
                tuple(push_id for push_id, _ in items),
                tuple(entry[2] for _, entry in items),
                tuple(entry[3].copy() for _, entry in items),
                self._clock() - slot.sync_first,
            )

    def sync_age(self, job: str, shard: int) -> tuple[int, float]:
        """Gradients in the current step and seconds since its first; see ``SyncStorage``."""
        slot = self._shards.get((job, shard))
        if slot is None:
            return 0, 0.0
        with slot.lock:
            if slot.deleted or slot.sync_version != slot.state.version or not slot.sync_entries:
                return 0, 0.0
            return len(slot.sync_entries), self._clock() - slot.sync_first

    def sync_commit(
        self,
        job: str,
        shard: int,
        batch: SyncBatch,
        state: ShardState,
        timed_out: bool,
        counted: bool,
    ) -> CommitOutcome:
        """Compare-and-set on the version and the buffer's contents; see ``SyncStorage``."""
        if state.version != batch.version + 1:
            raise ValueError(f"state.version must be {batch.version + 1}, got {state.version}")
        slot = self._shards.get((job, shard))
        if slot is None:
            return CommitOutcome.CONFLICT
        with slot.lock:
            current = slot.state
            if (
                slot.deleted
                or current.version != batch.version
                or slot.sync_version != batch.version
                or tuple(slot.sync_entries) != batch.push_ids
            ):
                return CommitOutcome.CONFLICT
            np.copyto(current.weights, state.weights, casting="no")
            np.copyto(current.accumulators, state.accumulators, casting="no")
            slot.state = ShardState(batch.version + 1, current.weights, current.accumulators)
            for push_id in batch.push_ids:
                slot.remember(push_id)
            slot.sync_entries = {}
            if counted:
                self._count(job, steps=1, timeouts=int(timed_out))
        return CommitOutcome.APPLIED

    def sync_counts(self, job: str) -> SyncCounts:
        """The job's synchronous counters."""
        with self._statistics_lock:
            return self._sync_counts.get(job, SyncCounts())

    def _count(self, job: str, steps: int = 0, timeouts: int = 0, late: int = 0) -> None:
        with self._statistics_lock:
            old = self._sync_counts.get(job, SyncCounts())
            self._sync_counts[job] = SyncCounts(
                old.steps + steps, old.timeouts + timeouts, old.late + late
            )

    def delete(self, job: str) -> None:
        """Forget every shard of ``job``, its statistics and its synchronous counters."""
        with self._statistics_lock:
            self._statistics.pop(job, None)
            self._sync_counts.pop(job, None)
        with self._registry_lock:
            keys = [key for key in self._shards if key[0] == job]
            slots = [self._shards.pop(key) for key in keys]
        for slot in slots:
            with slot.lock:
                slot.deleted = True


def _commit_robust(stored: RobustState | None, new: RobustState | None) -> RobustState | None:
    """``new``, copied into ``stored``'s momentum buffer when there is one."""
    if new is None:
        return None
    if stored is None:
        return _private_robust(new)
    np.copyto(stored.momentum, new.momentum, casting="no")
    return replace(new, momentum=stored.momentum)


def _commit_average(stored: np.ndarray | None, new: np.ndarray | None) -> np.ndarray | None:
    """Into the stored buffer when there is one, as the weights; None drops it."""
    if new is None:
        return None
    if stored is None:
        return np.array(new, dtype=np.float32, copy=True)
    np.copyto(stored, new, casting="no")
    return stored


def _private_robust(robust: RobustState) -> RobustState:
    return replace(robust, momentum=np.array(robust.momentum, dtype=np.float32, copy=True))


def _private_copy(state: ShardState, version: int) -> ShardState:
    weights = np.array(state.weights, dtype=np.float32, copy=True)
    accumulators = np.array(state.accumulators, dtype=np.float32, copy=True)
    if weights.ndim != 1 or weights.shape != accumulators.shape:
        raise ValueError(
            f"weights and accumulators must be flat vectors of one length, "
            f"got {weights.shape} and {accumulators.shape}"
        )
    robust = None if state.robust is None else _private_robust(state.robust)
    if robust is not None and robust.momentum.shape != weights.shape:
        raise ValueError(
            f"the momentum must have the weights' shape {weights.shape}, "
            f"got {robust.momentum.shape}"
        )
    average = None
    if state.average is not None:
        average = np.array(state.average, dtype=np.float32, copy=True)
        if average.shape != weights.shape:
            raise ValueError(
                f"the average must have the weights' shape {weights.shape}, got {average.shape}"
            )
    return ShardState(int(version), weights, accumulators, robust, average)
