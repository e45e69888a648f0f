"""Reading an ``.npz`` from a stranger: bounded, never unpickled, never extracted.

``np.load`` believes the archive. A few KiB of deflated zeros can inflate to gigabytes, and
a forged ``.npy`` header makes it allocate whatever shape it names before reading a byte.
:func:`load_npz` checks the zip's central directory and every member's header first, and
only then reads the arrays it was asked for, from the same open archive it checked.

The server (dataset uploads) and the agent (shards) both load through here.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

MAX_MEMBERS = 64
# The central directory is parsed in full before any member can be checked: bound it first.
# 1,000,000 empty members fit in 82 MiB and take zipfile ~9 s and ~500 MiB to parse.
MAX_DIRECTORY_BYTES = 64 << 10
# Real data deflates far less than a bomb: the digits set 7:1 as float32, random int64
# labels 11:1, 1%-dense float32 features 140:1, while zeros reach deflate's ceiling of about
# 1030:1. At 200:1 an upload inflates to at most 200 times its size (plus 64 exempt members
# of up to 1 MiB). Rarer data beyond it (labels sorted by class, 0.1%-dense features) is
# refused with a hint: np.savez writes it uncompressed, at 1:1.
MAX_RATIO = 200
RATIO_EXEMPT_BYTES = 1 << 20

# np.savez writes "<key>.npy"; nothing with a folder, a drive or a leading dot.
_MEMBER = re.compile(r"\w[\w.-]{0,99}\.npy", re.ASCII)
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory; field 5 is its size in bytes
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # field 8 is the directory's size
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # field 2 is the zip64 record's offset
_COMPRESSIONS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}  # what np.savez{,_compressed} write
_BROKEN = (
    zipfile.BadZipFile,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    RuntimeError,
    NotImplementedError,
    zlib.error,
    struct.error,
)


class ArchiveRejected(Exception):
    """The file is not an ``.npz`` we are willing to load; the message says why."""


class MissingArrays(ArchiveRejected):
    """The archive is fine but lacks some of the arrays asked for."""

    def __init__(self, missing: Sequence[str]) -> None:
        super().__init__(f"missing arrays {', '.join(missing)}")
        self.missing = list(missing)


@dataclass(frozen=True)
class Member:
    """One ``.npy`` member, as its header describes it.

    ``shape`` and ``dtype`` come from the header; the header has been checked to account for
    exactly ``info.file_size`` bytes, so reading the array allocates no more than that.
    """

    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


def load_npz(
    source: bytes | Path,
    keys: Sequence[str] | None,
    max_expanded_bytes: int,
    *,
    max_members: int = MAX_MEMBERS,
) -> dict[str, npt.NDArray[Any]]:
    """Check an ``.npz`` archive, then load the arrays ``keys`` from it.

    Parameters
    ----------
    source : bytes or Path
        The archive.
    keys : sequence of str, or None
        Arrays to load (member ``<key>.npy``); other members are checked but not read.
        None loads every member.
    max_expanded_bytes : int
        Most bytes all members together may inflate to, as the central directory declares.

    Returns
    -------
    dict of str to ndarray
        Each array exactly as stored: dtype and shape from its header. No object arrays.

    Raises
    ------
    MissingArrays
        A key has no member.
    ArchiveRejected
        Not a zip; too many members or too large a central directory; a member that is not
        a plainly named ``.npy``, is encrypted, or uses a compression other than stored or
        deflated; members declaring more than ``max_expanded_bytes`` in all, or one over
        1 MiB inflating more than ``MAX_RATIO``:1; a header that holds Python objects or
        does not account for its member's declared size; bytes that fail to inflate or do
        not match their CRC-32.
    OSError
        ``source`` is a path that cannot be opened.
    """
    with open(source, "rb") if isinstance(source, Path) else io.BytesIO(source) as fh:
        archive_bytes = _check_directory_size(fh)
        try:
            with zipfile.ZipFile(fh) as archive:
                members = _inspect(archive, archive_bytes, max_expanded_bytes, max_members)
                wanted = list(members) if keys is None else list(keys)
                missing = [key for key in wanted if key not in members]
                if missing:
                    raise MissingArrays(missing)
                return {key: _read(archive, members[key]) for key in wanted}
        except ArchiveRejected:
            raise
        except _BROKEN as exc:
            raise ArchiveRejected(f"not a valid .npz archive ({exc})") from None


def _inspect(
    archive: zipfile.ZipFile, archive_bytes: int, max_expanded_bytes: int, max_members: int
) -> dict[str, Member]:
    infos = archive.infolist()
    if len(infos) > max_members:
        raise ArchiveRejected(f"the archive has {len(infos)} members; at most {max_members}")
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if not _MEMBER.fullmatch(name):
            raise ArchiveRejected(f"member {name[:120]!r} is not a plainly named .npy array")
        if name in seen:
            raise ArchiveRejected(f"member {name!r} appears twice")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise ArchiveRejected(f"member {name!r} is encrypted")
        if info.compress_type not in _COMPRESSIONS:
            raise ArchiveRejected(f"member {name!r} is compressed with an unsupported method")
    # The ratio is only a bound if compressed sizes cannot be inflated too: together they
    # must fit in the file (overlapping members, each claiming the same bytes, do not).
    if sum(info.compress_size for info in infos) > archive_bytes:
        raise ArchiveRejected("the members claim more compressed bytes than the file holds")
    expanded = sum(info.file_size for info in infos)
    if expanded > max_expanded_bytes:
        raise ArchiveRejected(
            f"the archive expands to {_human(expanded)}, over the limit of "
            f"{_human(max_expanded_bytes)}"
        )
    for info in infos:
        if info.file_size > RATIO_EXEMPT_BYTES and info.file_size > MAX_RATIO * info.compress_size:
            ratio = info.file_size / max(1, info.compress_size)
            raise ArchiveRejected(
                f"member {info.filename!r} inflates {ratio:.0f}:1 "
                f"({_human(info.compress_size)} to {_human(info.file_size)}), over the "
                f"{MAX_RATIO}:1 allowed; save it with np.savez, uncompressed"
            )
    members = [_member(archive, info) for info in infos]
    return {member.key: member for member in members}


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
    """Read just the member's ``.npy`` header and check it against the declared size."""
    name = info.filename
    with archive.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ArchiveRejected(f"member {name!r} has .npy format version {version}")
        header_bytes = fh.tell()
    if dtype.hasobject:
        # An object array is a pickle; its size follows from nothing in the header either.
        raise ArchiveRejected(
            f"the file holds something other than plain arrays: {name!r} holds "
            "Python objects, which are never unpickled"
        )
    if any(d < 0 for d in shape):
        raise ArchiveRejected(f"member {name!r} has a negative dimension in {shape}")
    data_bytes = math.prod(shape) * dtype.itemsize
    if header_bytes + data_bytes != info.file_size:
        raise ArchiveRejected(
            f"the header of member {name!r} promises {list(shape)} {dtype} "
            f"({_human(data_bytes)}) but the archive declares "
            f"{_human(max(0, info.file_size - header_bytes))}"
        )
    return Member(name.removesuffix(".npy"), info, tuple(shape), dtype)


def _read(archive: zipfile.ZipFile, member: Member) -> npt.NDArray[Any]:
    with archive.open(member.info) as fh:
        # zipfile yields at most the declared size and checks the CRC-32 once it has yielded
        # the last byte, which read_array reads: the header was checked to end exactly there.
        array: npt.NDArray[Any] = np.lib.format.read_array(fh, allow_pickle=False)
        if fh.read(1):
            raise ArchiveRejected(f"member {member.info.filename!r} has trailing bytes")
    if array.shape != member.shape or array.dtype != member.dtype:
        raise ArchiveRejected(f"member {member.info.filename!r} changed while being read")
    return array


def _check_directory_size(fh: IO[bytes]) -> int:
    """Refuse a central directory over ``MAX_DIRECTORY_BYTES`` before zipfile parses it.

    The directory is found the way ``zipfile`` finds it: an end record at the very end, else
    the last signature in the final 64 KiB; a zip64 locator before it points to a zip64
    record that overrides the size. The zip64 record is looked for both just before the
    locator (where Python 3.11's zipfile reads it) and where the locator says; the largest
    size counts. Returns the archive's size in bytes.
    """
    end = fh.seek(0, io.SEEK_END)
    start = max(0, end - _EOCD.size - 0xFFFF)
    fh.seek(start)
    tail = fh.read()
    last = tail[-_EOCD.size :]
    if len(last) == _EOCD.size and last.startswith(_EOCD_SIGNATURE) and last.endswith(b"\0\0"):
        at = len(tail) - _EOCD.size
    else:
        at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        raise ArchiveRejected("not a valid .npz archive (no zip end record)")
    size: int = _EOCD.unpack_from(tail, at)[5]
    locator_at = start + at - _ZIP64_LOCATOR.size
    if locator_at >= 0:
        fh.seek(locator_at)
        signature, _, record_offset, _ = _ZIP64_LOCATOR.unpack(fh.read(_ZIP64_LOCATOR.size))
        if signature == b"PK\x06\x07":
            for record_at in (locator_at - _ZIP64_EOCD.size, record_offset):
                if record_at < 0:
                    continue
                fh.seek(record_at)
                record = fh.read(_ZIP64_EOCD.size)
                if len(record) == _ZIP64_EOCD.size and record.startswith(b"PK\x06\x06"):
                    size = max(size, _ZIP64_EOCD.unpack(record)[8])
    fh.seek(0)
    if size > MAX_DIRECTORY_BYTES:
        raise ArchiveRejected(
            f"the archive's central directory is {_human(size)}, over the "
            f"{_human(MAX_DIRECTORY_BYTES)} a few arrays need"
        )
    return end


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value, unit = n / 1024, "KiB"
    for larger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f} {unit}"
