"""The server's root reference gradients, published per job and shard for the push path.

The worker (Celery, or the embedded runner thread) computes FLTrust's root gradient at the
store's current weights (``training/actions/references.py``) and publishes each parameter
shard's part here; every process that applies pushes reads the freshest one and passes it to
``ParameterStore.push(reference=...)`` for the direction test. A reference lives
``max_age_s`` (bounded staleness): past that, or when the worker found the root sample's two
halves disagreeing (None), pushes are not direction-tested, exactly as before references.

Two boards with one interface: :class:`RedisReferences` (key
``{prefix}job:{j}:shard:{i}:ref``, raw float32 little-endian, expiring with ``PX``) when the
server has ``REDIS_URL``, and :class:`LocalReferences` in process for the embedded default,
where the worker thread and the consumers share one process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from downpour.hotstate import keys

WIRE_DTYPE = np.dtype("<f4")
#: Seconds a process reuses a reference it read from Redis before asking again (one ``GET``
#: per shard per this, not per push).
READ_CACHE_S = 0.5


class ReferenceBoard(Protocol):
    def publish(self, job: str, references: Sequence[np.ndarray | None], max_age_s: float) -> None:
        """Replace every shard's reference of ``job`` (None: that shard has none now)."""

    def latest(self, job: str, shard: int, size: int) -> np.ndarray | None:
        """The shard's reference (float32, shape ``(size,)``), or None: none, too old, or
        not of ``size`` values (a layout it was not computed for)."""

    def forget(self, job: str) -> None:
        """Drop the job's references (the job's store was freed or deleted)."""


class LocalReferences:
    """In-process board for the embedded default."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[tuple[str, int], tuple[float, np.ndarray]] = {}

    def publish(self, job: str, references: Sequence[np.ndarray | None], max_age_s: float) -> None:
        expires = time.monotonic() + max_age_s
        with self._lock:
            for shard, reference in enumerate(references):
                if reference is None:
                    self._refs.pop((job, shard), None)
                else:
                    self._refs[(job, shard)] = (expires, np.array(reference, np.float32))

    def latest(self, job: str, shard: int, size: int) -> np.ndarray | None:
        with self._lock:
            found = self._refs.get((job, shard))
        if found is None or found[0] < time.monotonic() or found[1].shape != (size,):
            return None
        return found[1]

    def forget(self, job: str) -> None:
        with self._lock:
            for key in [k for k in self._refs if k[0] == job]:
                del self._refs[key]


class RedisReferences:
    """Board in Redis, shared by every server process (``client``: ``decode_responses=False``)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int], tuple[float, np.ndarray | None]] = {}

    def key(self, job: str, shard: int) -> str:
        return keys.shard_key(self.prefix, job, shard, "ref")

    def publish(self, job: str, references: Sequence[np.ndarray | None], max_age_s: float) -> None:
        pipe = self.client.pipeline(transaction=True)
        for shard, reference in enumerate(references):
            if reference is None:
                pipe.delete(self.key(job, shard))
            else:
                data = np.ascontiguousarray(reference, WIRE_DTYPE).tobytes()
                pipe.set(self.key(job, shard), data, px=max(1, round(max_age_s * 1000)))
        pipe.execute()

    def latest(self, job: str, shard: int, size: int) -> np.ndarray | None:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get((job, shard))
        if cached is not None and now - cached[0] < READ_CACHE_S:
            reference = cached[1]
        else:
            data = self.client.get(self.key(job, shard))
            reference = None
            if isinstance(data, bytes) and len(data) == size * WIRE_DTYPE.itemsize:
                reference = np.frombuffer(data, WIRE_DTYPE).astype(np.float32)
            with self._lock:
                self._cache[(job, shard)] = (now, reference)
        return reference if reference is not None and reference.shape == (size,) else None

    def forget(self, job: str) -> None:
        with self._lock:
            shards = [k[1] for k in self._cache if k[0] == job]
            for shard in shards:
                del self._cache[(job, shard)]
        pattern = keys.shard_key(self.prefix, job, "*", "ref")
        names = list(self.client.scan_iter(match=pattern, count=1000))
        if names:
            self.client.delete(*names)
