"""Dataset shards: download once over HTTP, cache by SHA-256, verify, load without pickle.

A shard is an ``.npz`` file with two arrays: ``x`` (features, ``[n, *input_shape]``, in
the dataset's stored numeric dtype, e.g. uint8 or float32; the trainer converts each batch
to float32) and ``y`` (``[n, ...]`` int64 labels or float targets). It is cached as
``CACHE_DIR/<sha256>.npz`` and only ever trusted after its hash has been checked.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from .npz import ArchiveRejected, MissingArrays, load_npz
from .protocol import DatasetSpec

logger = logging.getLogger("downpour_agent.data")

MAX_SHARD_BYTES = 4 << 30
# The server writes shards uncompressed (np.savez), so a real one inflates to about its own
# size; the bound still matters for a shard that did not come from our server.
MAX_SHARD_EXPANDED_BYTES = MAX_SHARD_BYTES
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DatasetError(Exception):
    """The shard could not be downloaded or is not a usable ``x``/``y`` archive."""


class ShardIntegrityError(DatasetError):
    """The downloaded bytes do not hash to the SHA-256 the lease promised."""


def shard_url(base_url: str, path: str) -> str:
    """Join the server base URL (``http://host:port[/prefix]``) and a shard path."""
    return base_url.rstrip("/") + path


def cached_shard_path(cache_dir: Path, sha256: str) -> Path:
    """Where a shard with this digest lives in the cache."""
    if not _SHA256.fullmatch(sha256):
        raise DatasetError("sha256 must be 64 lowercase hex digits")
    return cache_dir / f"{sha256}.npz"


def file_sha256(path: Path) -> str:
    """Lowercase hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_shard(
    url: str,
    token: str,
    sha256: str,
    cache_dir: Path,
    *,
    timeout_s: float = 60.0,
    max_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Return the cached path of the shard, downloading and verifying it if needed.

    The download streams into a temporary file beside the cache entry and is renamed
    into place only once its SHA-256 matches, so a half-written or tampered file is
    never found in the cache.

    Raises
    ------
    ShardIntegrityError
        The bytes do not hash to ``sha256`` (the temporary file is deleted).
    DatasetError
        HTTP or network failure, or a body larger than ``max_bytes``.
    """
    target = cached_shard_path(cache_dir, sha256)
    if target.exists():
        if file_sha256(target) == sha256:
            return target
        logger.warning("cached shard %s is corrupt; downloading it again", target.name)
        target.unlink(missing_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(_SameOriginAuthRedirectHandler())
    fd, tmp_name = tempfile.mkstemp(prefix=f".{sha256[:16]}-", suffix=".part", dir=cache_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with opener.open(request, timeout=timeout_s) as response:
                    actual = _copy_hashing(response, out, max_bytes)
            except urllib.error.HTTPError as exc:
                raise DatasetError(f"shard download failed: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, OSError) as exc:
                raise DatasetError(f"shard download failed: {exc}") from None
        if actual != sha256:
            raise ShardIntegrityError(f"shard hashes to {actual[:12]}…, lease says {sha256[:12]}…")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_shard(
    path: Path,
    n_samples: int | None = None,
    *,
    max_expanded_bytes: int = MAX_SHARD_EXPANDED_BYTES,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Load ``(x, y)`` from a shard archive, never unpickling anything.

    Returns
    -------
    x : ndarray, shape ``[n, *input_shape]``, in its stored numeric dtype
    y : ndarray, shape ``[n, ...]``; integer labels are int64, float targets float32

    Raises
    ------
    DatasetError
        Not an ``.npz`` with numeric ``x`` and ``y`` of the same length (and of
        ``n_samples`` rows, when given), or refused by :func:`downpour_agent.npz.load_npz`:
        a decompression bomb, a forged header, more than ``max_expanded_bytes`` in all.
    """
    try:
        arrays = load_npz(path, ("x", "y"), max_expanded_bytes)
    except MissingArrays:
        raise DatasetError("a shard must have arrays 'x' and 'y'") from None
    except (ArchiveRejected, OSError) as exc:
        raise DatasetError(f"cannot read shard: {exc}") from None
    x, y = arrays["x"], arrays["y"]
    for name, array in (("x", x), ("y", y)):
        if array.ndim == 0 or array.dtype.kind not in "biuf":
            raise DatasetError(f"shard array {name!r} must be a numeric array of rank >= 1")
    if len(x) != len(y):
        raise DatasetError(f"shard has {len(x)} rows of x but {len(y)} of y")
    if n_samples is not None and len(x) != n_samples:
        raise DatasetError(f"shard has {len(x)} samples, lease says {n_samples}")
    # x keeps its stored dtype (uint8 images stay uint8: a quarter of float32's memory);
    # the trainer converts each batch to float32.
    y = y.astype(np.int64 if y.dtype.kind in "biu" else np.float32, copy=False)
    return x, y


def fetch_dataset(
    base_url: str, dataset: DatasetSpec, token: str, cache_dir: Path
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Download (or find in the cache), verify and load the shard a lease names."""
    path = download_shard(shard_url(base_url, dataset.url), token, dataset.sha256, cache_dir)
    return load_shard(path, dataset.n_samples)


def _copy_hashing(source: IO[bytes], sink: IO[bytes], max_bytes: int) -> str:
    digest = hashlib.sha256()
    total = 0
    while chunk := source.read(_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise DatasetError(f"shard is larger than {max_bytes} bytes")
        digest.update(chunk)
        sink.write(chunk)
    return digest.hexdigest()


class _SameOriginAuthRedirectHandler(urllib.request.HTTPRedirectHandler):
    # urllib copies every header, Authorization included, onto a redirect to any host.
    # The server may redirect to object storage; the donor's token must not follow.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()
