"""Building blocks of ``.npy`` and ``.npz`` files, for the agent's tests and the corpus.

Plain numpy and zipfile, so ``tests/agent`` runs with only ``agent/`` installed.
"""

from __future__ import annotations

import io
import struct
import zipfile
from typing import Any

import numpy as np


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_header(shape: tuple[int, ...], dtype: Any) -> bytes:
    """A version 1.0 ``.npy`` header for any shape, with no data behind it."""
    buf = io.BytesIO()
    header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def set_declared_sizes(
    data: bytes, member: str, *, file_size: int | None = None, compress_size: int | None = None
) -> bytes:
    """Rewrite what the central directory declares about ``member``; the bytes stay as they are.

    Only for archives without zip64 fields (``zip_of`` writes none for small members).
    """
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        name_len, extra_len, comment_len = struct.unpack_from("<3H", out, at + 28)
        if out[at + 46 : at + 46 + name_len].decode() == member:
            if compress_size is not None:
                struct.pack_into("<L", out, at + 20, compress_size)
            if file_size is not None:
                struct.pack_into("<L", out, at + 24, file_size)
            return bytes(out)
        at = out.find(b"PK\x01\x02", at + 46 + name_len + extra_len + comment_len)
    raise KeyError(member)
