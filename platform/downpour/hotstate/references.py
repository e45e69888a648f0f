"""The server's root reference gradients, published per job and shard for the push path.

The worker (Celery, or the embedded runner thread) computes FLTrust's root gradient at the
store's current weights (``training/actions/references.py``) and publishes each parameter
shard's part here, with the shard version its weights were read at; every process that
applies pushes reads the freshest one and passes it to ``ParameterStore.push(reference=...)``
for the direction test. A reference lives ``max_age_s`` (bounded staleness): past that, or
when the worker found the root sample's two halves disagreeing (None), pushes are not
direction-tested, exactly as before references.

Two boards with one interface: :class:`RedisReferences` (key
``{prefix}job:{j}:shard:{i}:refv``: the version as 8 bytes of little-endian int64, then the
reference as raw float32 little-endian; expiring with ``PX``. The key was ``:ref``, raw
float32 alone, before references carried versions: a new name, so that in a rolling upgrade
neither kind of process misreads the other's) when the server has
``REDIS_URL``, and :class:`LocalReferences` in process for the embedded default, where the
worker thread and the consumers share one process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from downpour.hotstate import keys

WIRE_DTYPE = np.dtype("<f4")
VERSION_DTYPE = np.dtype("<i8")
#: Seconds a process reuses a reference it read from Redis before asking again (one ``GET``
#: per shard per this, not per push)...
READ_CACHE_S = 0.5
#: ...unless a push's base is ``stale_after_versions`` past the cached reference's version,
#: and the cached read is at least this old: the worker may have published a fresher one.
READ_AGAIN_MIN_S = 0.05


class ReferenceBoard(Protocol):
    def publish(
        self,
        job: str,
        references: Sequence[np.ndarray | None],
        max_age_s: float,
        versions: Sequence[int],
    ) -> None:
        """Replace every shard's reference of ``job`` (None: that shard has none now),
        computed at the shards' ``versions``."""

    def latest(
        self, job: str, shard: int, size: int, base_version: int | None = None
    ) -> np.ndarray | None:
        """The shard's reference (float32, shape ``(size,)``), or None: none, too old, or
        not of ``size`` values (a layout it was not computed for). ``base_version``, the
        version a push was computed from, lets a cache know when to read again."""

    def version(self, job: str, shard: int) -> int | None:
        """The shard version the shard's current reference was computed at, or None."""

    def forget(self, job: str) -> None:
        """Drop the job's references (the job's store was freed or deleted)."""


class LocalReferences:
    """In-process board for the embedded default."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[tuple[str, int], tuple[float, int, np.ndarray]] = {}

    def publish(
        self,
        job: str,
        references: Sequence[np.ndarray | None],
        max_age_s: float,
        versions: Sequence[int],
    ) -> None:
        expires = time.monotonic() + max_age_s
        with self._lock:
            for shard, (reference, version) in enumerate(zip(references, versions, strict=True)):
                if reference is None:
                    self._refs.pop((job, shard), None)
                else:
                    found = (expires, int(version), np.array(reference, np.float32))
                    self._refs[(job, shard)] = found

    def _found(self, job: str, shard: int) -> tuple[float, int, np.ndarray] | None:
        with self._lock:
            found = self._refs.get((job, shard))
        return None if found is None or found[0] < time.monotonic() else found

    def latest(
        self, job: str, shard: int, size: int, base_version: int | None = None
    ) -> np.ndarray | None:
        found = self._found(job, shard)
        return None if found is None or found[2].shape != (size,) else found[2]

    def version(self, job: str, shard: int) -> int | None:
        found = self._found(job, shard)
        return None if found is None else found[1]

    def forget(self, job: str) -> None:
        with self._lock:
            for key in [k for k in self._refs if k[0] == job]:
                del self._refs[key]


class RedisReferences:
    """Board in Redis, shared by every server process (``client``: ``decode_responses=False``)."""

    def __init__(self, client: Any, prefix: str, stale_after_versions: int = 0) -> None:
        self.client = client
        self.prefix = prefix
        self.stale_after_versions = stale_after_versions
        self._lock = threading.Lock()
        # (read at, version, reference): what the last GET of each shard's key found.
        self._cache: dict[tuple[str, int], tuple[float, int | None, np.ndarray | None]] = {}

    def key(self, job: str, shard: int) -> str:
        return keys.shard_key(self.prefix, job, shard, "refv")

    def publish(
        self,
        job: str,
        references: Sequence[np.ndarray | None],
        max_age_s: float,
        versions: Sequence[int],
    ) -> None:
        pipe = self.client.pipeline(transaction=True)
        for shard, (reference, version) in enumerate(zip(references, versions, strict=True)):
            if reference is None:
                pipe.delete(self.key(job, shard))
            else:
                data = (
                    np.array([version], VERSION_DTYPE).tobytes()
                    + np.ascontiguousarray(reference, WIRE_DTYPE).tobytes()
                )
                pipe.set(self.key(job, shard), data, px=max(1, round(max_age_s * 1000)))
        pipe.execute()

    def _read(
        self, job: str, shard: int, base_version: int | None
    ) -> tuple[int | None, np.ndarray | None]:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get((job, shard))
        if cached is not None:
            age, version = now - cached[0], cached[1]
            behind = (
                self.stale_after_versions > 0
                and base_version is not None
                and (version is None or base_version - version >= self.stale_after_versions)
            )
            if age < READ_CACHE_S and not (behind and age >= READ_AGAIN_MIN_S):
                return cached[1], cached[2]
        data = self.client.get(self.key(job, shard))
        version, reference = None, None
        header = VERSION_DTYPE.itemsize
        if isinstance(data, bytes) and len(data) > header and (len(data) - header) % 4 == 0:
            version = int(np.frombuffer(data[:header], VERSION_DTYPE)[0])
            reference = np.frombuffer(data[header:], WIRE_DTYPE).astype(np.float32)
        with self._lock:
            self._cache[(job, shard)] = (now, version, reference)
        return version, reference

    def latest(
        self, job: str, shard: int, size: int, base_version: int | None = None
    ) -> np.ndarray | None:
        reference = self._read(job, shard, base_version)[1]
        return reference if reference is not None and reference.shape == (size,) else None

    def version(self, job: str, shard: int) -> int | None:
        return self._read(job, shard, None)[0]

    def forget(self, job: str) -> None:
        with self._lock:
            shards = [k[1] for k in self._cache if k[0] == job]
            for shard in shards:
                del self._cache[(job, shard)]
        pattern = keys.shard_key(self.prefix, job, "*", "refv")
        names = list(self.client.scan_iter(match=pattern, count=1000))
        if names:
            self.client.delete(*names)
