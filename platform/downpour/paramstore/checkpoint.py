"""Checkpoints: every shard's weights, accumulators, version, robust state and average in one
``.npz``.

File contents (``numpy.savez``, no pickles):

- ``manifest``: 0-d unicode array holding JSON
  ``{"format": "downpour-paramstore", "format_version": 1, "layout": ..., "meta": ...}``
- ``w{i}``, ``a{i}``: float32 ``(shard_size(i),)`` weights and accumulators of shard ``i``
- ``v{i}``: 0-d int64 version of shard ``i``
- ``m{i}``, ``s{i}`` (only for a shard with centred-clipping state): float32
  ``(shard_size(i),)`` momentum and float64 ``(4,)`` statistics in the order of
  ``downpour.paramstore.robust.STATS_FIELDS``. The two arrays are optional and were added
  without changing ``format_version``: a file without them loads with ``robust=None``, and
  an older reader ignores them.
- ``d{i}`` (only beside ``m{i}`` and ``s{i}``): float64 ``(k,)``, the shard's recent
  untrusted distances ``||g - m||``, oldest first (``RobustState.untrusted_deviations``).
  Optional in the same way: a file written before it existed loads with an empty window,
  which refills within a few untrusted pushes; an older reader ignores it.
- ``p{i}`` (only for a shard whose store keeps an average of its versions): float32
  ``(shard_size(i),)``, ``ShardState.average``. Optional in the same way: a file without it
  loads with ``average=None`` (the store then starts the average again from the weights),
  and an older reader ignores it.
- ``statistics`` and ``statistics_meta`` (only for a model with non-trainable variables,
  ``layout.statistics``): float32 ``(layout.statistics_size,)`` running averages and float64
  ``(2,)`` ``[version, samples]`` (``downpour.paramstore.statistics.StatisticsState``).
  Optional in the same way; a layout with statistics requires them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from downpour.paramstore.errors import CorruptCheckpoint
from downpour.paramstore.layout import ShardLayout
from downpour.paramstore.robust import RobustState
from downpour.paramstore.statistics import StatisticsState
from downpour.paramstore.storage import ShardState

FORMAT = "downpour-paramstore"
FORMAT_VERSION = 1

# Typed loosely because numpy's stub types **kwds as clashing with ``allow_pickle``.
_savez: Callable[..., None] = np.savez


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint read back from disk.

    Attributes
    ----------
    layout : ShardLayout
    states : list of ShardState
        One per shard, float32 arrays of ``layout.shard_size(i)`` elements.
    meta : dict
        The JSON metadata given to :func:`write_checkpoint`.
    sha256 : str
        Hex digest of the file's bytes.
    statistics : StatisticsState or None
        The non-trainable statistics, for a layout that has any.
    """

    layout: ShardLayout
    states: list[ShardState]
    meta: dict[str, Any]
    sha256: str
    statistics: StatisticsState | None = None

    def weights(self, *, scored: bool = False) -> dict[str, np.ndarray]:
        """Every variable by name: the shards' weights (with ``scored``, each shard's average
        where it has one, as the job was scored: ``ShardState.scored``), then the
        statistics (if any)."""
        layout = self.layout
        merged = layout.merge(
            [
                layout.unflatten_shard(i, state.scored if scored else state.weights)
                for i, state in enumerate(self.states)
            ]
        )
        if self.statistics is not None:
            merged |= layout.unflatten_statistics(self.statistics.values)
        return merged


def write_checkpoint(
    path: str | os.PathLike[str],
    layout: ShardLayout,
    states: Sequence[ShardState],
    meta: dict[str, Any],
    statistics: StatisticsState | None = None,
) -> str:
    """Write a checkpoint atomically.

    The file is written to a temporary name in the same directory, flushed and fsynced,
    renamed over ``path`` and the directory is fsynced, so readers see either the old file
    or the complete new one, even after a crash.

    Parameters
    ----------
    path : path-like
        Destination, conventionally ending in ``.npz`` (used verbatim).
    layout : ShardLayout
    states : sequence of ShardState
        One per shard: float32 weights and accumulators (and momentum, if the shard has
        robust state) of ``layout.shard_size(i)`` elements.
    meta : dict
        JSON-serialisable metadata (job id, step, wall-clock time, ...).
    statistics : StatisticsState, optional
        Required when ``layout.statistics`` is not empty.

    Returns
    -------
    str
        SHA-256 hex digest of the written file.
    """
    destination = Path(path)
    if len(states) != layout.n_shards:
        raise ValueError(f"expected {layout.n_shards} shard states, got {len(states)}")
    arrays: dict[str, np.ndarray] = {}
    for shard, state in enumerate(states):
        size = layout.shard_size(shard)
        vectors = [("w", state.weights), ("a", state.accumulators)]
        if state.average is not None:
            vectors.append(("p", state.average))
        if state.robust is not None:
            vectors.append(("m", state.robust.momentum))
            arrays[f"s{shard}"] = state.robust.stats_vector()
            arrays[f"d{shard}"] = state.robust.deviations_vector()
        for key, array in vectors:
            if array.dtype != np.float32 or array.shape != (size,):
                raise ValueError(
                    f"shard {shard}: {key} must be float32 with shape ({size},), "
                    f"got {array.dtype} {array.shape}"
                )
            arrays[f"{key}{shard}"] = array
        arrays[f"v{shard}"] = np.array(state.version, dtype=np.int64)
    if layout.statistics:
        if statistics is None or statistics.values.shape != (layout.statistics_size,):
            raise ValueError(
                f"the layout has {layout.statistics_size} statistics values; pass them"
            )
        arrays["statistics"] = np.asarray(statistics.values, dtype=np.float32)
        arrays["statistics_meta"] = np.array(
            [statistics.version, statistics.samples], dtype=np.float64
        )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout": layout.to_json(),
        "meta": meta,
    }
    arrays["manifest"] = np.array(json.dumps(manifest))  # raises before any file is created

    directory = destination.parent
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{destination.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            _savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        digest = _sha256_of(Path(temp_name))
        os.replace(temp_name, destination)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    return digest


def read_checkpoint(path: str | os.PathLike[str], expected_sha256: str | None = None) -> Checkpoint:
    """Read and validate a checkpoint written by :func:`write_checkpoint`.

    Parameters
    ----------
    path : path-like
    expected_sha256 : str, optional
        If given, the file's digest must match it.

    Raises
    ------
    CorruptCheckpoint
        The file is truncated, is not a checkpoint, its digest differs from
        ``expected_sha256``, or its arrays do not match its own layout.
    """
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise CorruptCheckpoint(
            f"{path}: sha256 is {digest}, expected {expected_sha256}; the file was changed or "
            "damaged"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            manifest = json.loads(str(archive["manifest"][()]))
            if not isinstance(manifest, dict):
                raise CorruptCheckpoint(f"{path}: the manifest is not a JSON object")
            if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
                raise CorruptCheckpoint(
                    f"{path}: not a {FORMAT} v{FORMAT_VERSION} checkpoint "
                    f"(format {manifest.get('format')!r} v{manifest.get('format_version')!r})"
                )
            layout = ShardLayout.from_json(manifest["layout"])
            states = [_read_shard(archive, layout, shard, path) for shard in range(layout.n_shards)]
            statistics = _read_statistics(archive, layout, path)
            meta = manifest["meta"]
    except CorruptCheckpoint:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise CorruptCheckpoint(
            f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); the file is "
            "truncated, damaged or not a parameter-store checkpoint"
        ) from exc
    if not isinstance(meta, dict):
        raise CorruptCheckpoint(f"{path}: meta must be a JSON object, got {type(meta).__name__}")
    return Checkpoint(layout, states, meta, digest, statistics)


def _read_statistics(archive: Any, layout: ShardLayout, path: object) -> StatisticsState | None:
    if not layout.statistics:
        return None
    if "statistics" not in archive.files or "statistics_meta" not in archive.files:
        raise CorruptCheckpoint(f"{path}: the layout has statistics but the file holds none")
    values, meta = archive["statistics"], archive["statistics_meta"]
    if values.dtype != np.float32 or values.shape != (layout.statistics_size,):
        raise CorruptCheckpoint(
            f"{path}: statistics should be float32 ({layout.statistics_size},), "
            f"found {values.dtype} {values.shape}"
        )
    if meta.shape != (2,) or not np.isfinite(meta).all() or meta[0] < 0:
        raise CorruptCheckpoint(f"{path}: bad statistics_meta {meta!r}")
    return StatisticsState(int(meta[0]), values, float(meta[1]))


def _read_shard(archive: Any, layout: ShardLayout, shard: int, path: object) -> ShardState:
    size = layout.shard_size(shard)
    weights = archive[f"w{shard}"]
    accumulators = archive[f"a{shard}"]
    version = archive[f"v{shard}"]
    for key, array in (("weights", weights), ("accumulators", accumulators)):
        if array.dtype != np.float32 or array.shape != (size,):
            raise CorruptCheckpoint(
                f"{path}: shard {shard} {key} should be float32 with shape ({size},) per the "
                f"layout, found {array.dtype} {array.shape}"
            )
    if version.shape != () or version.dtype.kind not in "iu" or int(version) < 0:
        raise CorruptCheckpoint(
            f"{path}: shard {shard} version should be a non-negative integer scalar, "
            f"found {version.dtype} {version.shape}"
        )
    average = None
    if f"p{shard}" in archive.files:
        average = archive[f"p{shard}"]
        if average.dtype != np.float32 or average.shape != (size,):
            raise CorruptCheckpoint(
                f"{path}: shard {shard} average should be float32 with shape ({size},) per the "
                f"layout, found {average.dtype} {average.shape}"
            )
    robust = _read_robust(archive, size, shard, path)
    return ShardState(int(version), weights, accumulators, robust, average)


def _read_robust(archive: Any, size: int, shard: int, path: object) -> RobustState | None:
    present = {key for key in (f"m{shard}", f"s{shard}") if key in archive.files}
    deviations_key = f"d{shard}"
    if not present:
        if deviations_key in archive.files:
            raise CorruptCheckpoint(
                f"{path}: shard {shard} has untrusted distances {deviations_key} but no robust "
                f"state (m{shard} and s{shard})"
            )
        return None
    if len(present) == 1:
        raise CorruptCheckpoint(
            f"{path}: shard {shard} has only {present.pop()} of its robust state "
            f"(m{shard} momentum and s{shard} statistics go together)"
        )
    momentum = archive[f"m{shard}"]
    if momentum.dtype != np.float32 or momentum.shape != (size,):
        raise CorruptCheckpoint(
            f"{path}: shard {shard} momentum should be float32 with shape ({size},) per the "
            f"layout, found {momentum.dtype} {momentum.shape}"
        )
    try:
        deviations = archive[deviations_key] if deviations_key in archive.files else None
        return RobustState.from_arrays(momentum, archive[f"s{shard}"], deviations)
    except ValueError as exc:
        raise CorruptCheckpoint(f"{path}: shard {shard}: {exc}") from exc


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
