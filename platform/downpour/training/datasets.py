"""Validating an uploaded ``.npz`` and cutting its training split into shard files."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from downpour_agent.npz import ArchiveRejected, MissingArrays, load_npz

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
MAX_CLASSES = 100_000


class DatasetRejected(ValueError):
    """The upload is not a usable dataset; the message says why, for the researcher."""


@dataclass
class ParsedDataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int | None

    @property
    def input_shape(self) -> list[int]:
        return [int(d) for d in self.x_train.shape[1:]]

    @property
    def stored_bytes(self) -> int:
        """About what the stored test split and shards take on disk (uncompressed)."""
        return sum(int(a.nbytes) for a in (self.x_train, self.y_train, self.x_test, self.y_test))


def parse_npz(
    source: IO[bytes] | bytes,
    max_bytes: int,
    max_expanded_bytes: int,
    max_stored_bytes: int | None = None,
) -> ParsedDataset:
    """Load and check an uploaded dataset without ever unpickling.

    The archive is checked before anything is inflated (``downpour_agent.npz``): its
    members may together declare at most ``max_expanded_bytes``, none may inflate like a
    bomb, and each ``.npy`` header must account for exactly its member's declared size.

    ``x_*`` keep their dtype (uint8 images stay uint8; agents and the evaluation convert
    each batch to float32), except that float64 is narrowed to float32 and bool stored as
    uint8; shape ``[n, *input_shape]``. Integer ``y_*`` become int64 class labels of shape
    ``[n]``, float ``y_*`` become float32 regression targets. What would be stored may be at
    most ``max_stored_bytes`` (default: ``max_expanded_bytes``).
    """
    data: bytes | Path
    if isinstance(source, bytes):
        data, size = source, len(source)
    elif hasattr(source, "temporary_file_path"):
        # Django streamed the upload to disk: read it from there, member by member.
        data = Path(source.temporary_file_path())
        size = data.stat().st_size
    else:
        data = source.read(max_bytes + 1)
        size = len(data)
    if size > max_bytes:
        raise DatasetRejected(f"the file is larger than the limit of {max_bytes} bytes")
    try:
        arrays = load_npz(data, REQUIRED_KEYS, max_expanded_bytes)
    except MissingArrays as exc:
        raise DatasetRejected(
            f"missing arrays {', '.join(exc.missing)}; a dataset needs {', '.join(REQUIRED_KEYS)}"
        ) from None
    except ArchiveRejected as exc:
        raise DatasetRejected(str(exc)) from None

    for key, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise DatasetRejected(f"{key} must be numeric, got dtype {arr.dtype}")
        if arr.ndim == 0:
            raise DatasetRejected(f"{key} must be an array with a first (sample) axis")
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    x_test, y_test = arrays["x_test"], arrays["y_test"]
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DatasetRejected(f"x_{split} has {len(x)} samples but y_{split} has {len(y)}")
        if len(x) == 0:
            raise DatasetRejected(f"the {split} split is empty")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetRejected(
            f"x_train samples have shape {list(x_train.shape[1:])} "
            f"but x_test samples have {list(x_test.shape[1:])}"
        )
    x_train, x_test = _stored_features(x_train), _stored_features(x_test)
    if x_train.dtype != x_test.dtype:
        x_test = x_test.astype(np.result_type(x_train, x_test))
        x_train = x_train.astype(x_test.dtype, copy=False)
    if x_train.dtype.kind == "f" and not (np.isfinite(x_train).all() and np.isfinite(x_test).all()):
        raise DatasetRejected("x_train and x_test must not contain NaN or infinity")

    n_classes: int | None = None
    if y_train.dtype.kind in "biu" and y_test.dtype.kind in "biu":
        if y_train.ndim != 1 or y_test.ndim != 1:
            raise DatasetRejected("integer labels must be one-dimensional class indices")
        lo = min(int(y_train.min()), int(y_test.min()))
        hi = max(int(y_train.max()), int(y_test.max()))
        if lo < 0 or hi >= MAX_CLASSES:
            raise DatasetRejected(f"class labels must lie in [0, {MAX_CLASSES}), got {lo}..{hi}")
        n_classes = hi + 1
        y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    else:
        y_train, y_test = y_train.astype(np.float32), y_test.astype(np.float32)
        if not (np.isfinite(y_train).all() and np.isfinite(y_test).all()):
            raise DatasetRejected("y_train and y_test must not contain NaN or infinity")
    parsed = ParsedDataset(x_train, y_train, x_test, y_test, n_classes)
    limit = max_expanded_bytes if max_stored_bytes is None else max_stored_bytes
    if parsed.stored_bytes > limit:
        raise DatasetRejected(
            f"the dataset would take {parsed.stored_bytes} bytes stored, over the limit of "
            f"{limit} bytes"
        )
    return parsed


def _stored_features(x: np.ndarray) -> np.ndarray:
    """The dtype ``x`` is stored in: its own, but float64 as float32 and bool as uint8."""
    if x.dtype == np.bool_:
        return x.astype(np.uint8)
    if x.dtype.kind == "f" and x.dtype.itemsize > 4:
        return x.astype(np.float32)
    return x


def write_npz_atomic(path: Path, **arrays: Any) -> str:
    """Write arrays to ``path`` (temp file, fsync, rename); return the file's SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_train(
    parsed: ParsedDataset, n_shards: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Shuffle the training split once (fixed seed) and cut it into ``n_shards`` parts."""
    n_shards = max(1, min(n_shards, len(parsed.x_train)))
    order = np.random.default_rng(seed).permutation(len(parsed.x_train))
    return [(parsed.x_train[idx], parsed.y_train[idx]) for idx in np.array_split(order, n_shards)]
