"""Sharded parameter store for asynchronous Downpour SGD (numpy only, no Django or Redis).

``ParameterStore`` applies Adagrad pushes to shards held by a ``ShardStorage`` backend:
``InMemoryStorage`` here, or ``downpour.hotstate.store.RedisStorage`` for multi-process servers.
With ``robust=CentredClipping()`` it clips every untrusted push around the shard's momentum
first (:mod:`downpour.paramstore.robust`).
"""

from __future__ import annotations

from downpour.paramstore.adagrad import AdagradConfig, adagrad_apply, adagrad_apply_pieces
from downpour.paramstore.bounds import DEFAULT_MAX_GRAD_NORM
from downpour.paramstore.checkpoint import Checkpoint, read_checkpoint, write_checkpoint
from downpour.paramstore.direction import (
    cosine_similarity,
    passes_direction_test,
    root_reference,
)
from downpour.paramstore.errors import (
    Conflict,
    CorruptCheckpoint,
    CorruptState,
    NonFinite,
    NotInitialized,
    StaleGradient,
    StoreError,
    UnknownShard,
    WrongDtype,
    WrongShape,
)
from downpour.paramstore.layout import ShardLayout, VariableSpec
from downpour.paramstore.memory import InMemoryStorage
from downpour.paramstore.outer import OuterConfig, nesterov_apply_pieces, staleness_discount
from downpour.paramstore.results import PushResult
from downpour.paramstore.robust import (
    CentredClipping,
    RobustState,
    RobustStats,
    RobustStep,
    WarmupStatus,
    centred_clip,
    robust_step,
)
from downpour.paramstore.statistics import StatisticsState, fold_report
from downpour.paramstore.storage import CommitOutcome, ShardState, ShardStorage
from downpour.paramstore.store import ParameterStore

__all__ = [
    "DEFAULT_MAX_GRAD_NORM",
    "AdagradConfig",
    "CentredClipping",
    "Checkpoint",
    "CommitOutcome",
    "Conflict",
    "CorruptCheckpoint",
    "CorruptState",
    "InMemoryStorage",
    "OuterConfig",
    "NonFinite",
    "NotInitialized",
    "ParameterStore",
    "PushResult",
    "RobustState",
    "RobustStats",
    "RobustStep",
    "ShardLayout",
    "ShardState",
    "ShardStorage",
    "StaleGradient",
    "StatisticsState",
    "StoreError",
    "UnknownShard",
    "VariableSpec",
    "WarmupStatus",
    "WrongDtype",
    "WrongShape",
    "adagrad_apply",
    "adagrad_apply_pieces",
    "nesterov_apply_pieces",
    "staleness_discount",
    "centred_clip",
    "cosine_similarity",
    "passes_direction_test",
    "fold_report",
    "read_checkpoint",
    "robust_step",
    "root_reference",
    "write_checkpoint",
]
