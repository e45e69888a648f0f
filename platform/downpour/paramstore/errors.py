"""Errors raised by the parameter store.

Every error carries a stable ``code`` that the agent consumers put on the wire as
``{"type": "error", "code": ..., "message": ...}``. The message is written for a person and
says what was expected and what arrived.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class for parameter-store errors; ``code`` is the wire error code."""

    code: str = "store_error"


class StaleGradient(StoreError):
    """The gradient was computed against weights too old (or unknown) to apply."""

    code = "stale_gradient"


class WrongShape(StoreError):
    """The tensors do not match the shard: missing, unknown or mis-shaped variables."""

    code = "wrong_shape"


class WrongDtype(StoreError):
    """A tensor is not a native-byte-order float32 numpy array."""

    code = "wrong_dtype"


class NonFinite(StoreError):
    """A tensor contains NaN or infinite values."""

    code = "non_finite"


class UnknownShard(StoreError):
    """The shard index is outside ``range(layout.n_shards)``."""

    code = "unknown_shard"


class NotInitialized(StoreError):
    """The job has no parameters in the store (never initialized, or deleted)."""

    code = "unknown_job"


class Conflict(StoreError):
    """A concurrent commit won the race.

    ``ParameterStore.push`` retries internally; this escapes only when the bounded retries
    are exhausted, and the caller should treat it as "busy, try again".
    """

    code = "conflict"


class CorruptState(StoreError):
    """Stored shard data is inconsistent with the layout (an operator problem, not a client one)."""

    code = "corrupt_state"


class CorruptCheckpoint(StoreError):
    """A checkpoint file is truncated, malformed or does not match its own layout."""

    code = "corrupt_checkpoint"
