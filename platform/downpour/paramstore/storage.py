"""What a parameter store keeps per shard, and the interface of the backends that keep it.

:class:`ShardState` is one shard's whole state; :class:`ShardStorage` is implemented by
``memory.InMemoryStorage`` (the embedded default) and ``downpour.hotstate.store.RedisStorage``
(production). ``store.ParameterStore`` does the numerics on top.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from downpour.paramstore.robust import RobustState, RobustStats


@dataclass(frozen=True, eq=False)
class ShardState:
    """Everything stored for one shard.

    Parameters
    ----------
    version : int
        Number of pushes applied since initialization (or the restored version), ``>= 0``.
    weights : ndarray
        float32, shape ``(shard_size,)``.
    accumulators : ndarray
        float32, shape ``(shard_size,)``: the optimizer slot. Adagrad's running sum of squared
        gradients, or with an ``outer`` optimizer the Nesterov momentum (``outer.py``).
    robust : RobustState or None
        Centred-clipping state (momentum float32 ``(shard_size,)`` and statistics) when the
        store clips pushes; None for a plain-Adagrad shard. Stored and committed atomically
        with the weights.
    average : ndarray or None
        float32 ``(shard_size,)``: the running (Polyak) average of the shard's versions when
        the store averages (``ParameterStore(average=...)``), else None. Agents train on
        ``weights``; the job is scored and exported at the average. Committed atomically
        with the weights.
    """

    version: int
    weights: np.ndarray
    accumulators: np.ndarray
    robust: RobustState | None = None
    average: np.ndarray | None = None

    @property
    def scored(self) -> np.ndarray:
        """What the job is scored and exported at: the average when kept, else the weights."""
        return self.weights if self.average is None else self.average


class CommitOutcome(enum.Enum):
    """Result of :meth:`ShardStorage.commit`."""

    APPLIED = "applied"
    CONFLICT = "conflict"
    DUPLICATE = "duplicate"


class ShardStorage(Protocol):
    """Where shard states live. Backends: ``InMemoryStorage``, ``downpour.hotstate.store``.

    Arrays returned by ``load`` belong to the caller (the backend keeps no reference), and
    arrays passed to ``initialize``/``commit`` are copied, so neither side can alias the other.
    """

    def load(self, job: str, shard: int) -> ShardState | None:
        """Return a consistent (version, weights, accumulators, robust, average), or None if
        absent."""
        ...

    def load_version(self, job: str, shard: int) -> int | None:
        """Return the shard's version, or None if absent."""
        ...

    def initialize(self, job: str, shard: int, state: ShardState) -> None:
        """Overwrite the shard with ``state`` and forget its applied push ids."""
        ...

    def commit(
        self, job: str, shard: int, expected_version: int, state: ShardState, push_id: str
    ) -> CommitOutcome:
        """Atomically store ``state`` if the shard is still at ``expected_version``.

        If ``push_id`` was already applied to this shard: DUPLICATE, nothing written. Else if
        the version differs from ``expected_version`` (or the shard is absent): CONFLICT.
        Else write weights, accumulators, robust state and average (None removes either), set
        the version
        to ``expected_version + 1`` (which ``state.version`` must equal), remember
        ``push_id``: APPLIED.
        """
        ...

    def was_applied(self, job: str, shard: int, push_id: str) -> bool:
        """Whether ``push_id`` has been applied to this shard."""
        ...

    def load_robust_stats(self, job: str, shards: Sequence[int]) -> list[RobustStats | None]:
        """The statistics of each shard's robust state, in the order of ``shards``.

        ``RobustStats()`` (all zero, as for a fresh state) for a shard stored without robust
        state; None for an absent shard. Reads neither weights nor momentum.
        """
        ...

    def delete(self, job: str) -> None:
        """Remove every shard of ``job``; a no-op for an unknown job."""
        ...
