"""int8 with per-block scales: the ``int8`` tensor compression.

A float32 tensor, flattened in C order, is cut into blocks of :data:`BLOCK` elements (the
last block may be short). Each block ``b`` has one float32 scale
``s_b = max(|x_i| for i in b) / 127`` (0 for an all-zero block) and its values travel as
``q_i = clip(round_half_to_even(x_i / s_b), -127, 127)`` in int8; the receiver rebuilds
``x_i ≈ q_i · s_b`` in float32. The buffer is the ``ceil(n / BLOCK)`` scales (``<f4``)
followed by the ``n`` values (``i1``): ``4·ceil(n/256) + n`` bytes for ``n`` elements, about
a quarter of float32. Each element is off by at most ``s_b / 2`` (:func:`error_bound`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

#: Elements per block; one float32 scale each.
BLOCK = 256
_SCALE = np.dtype("<f4")
_VALUE = np.dtype("i1")


def encoded_nbytes(count: int) -> int:
    """Bytes of the ``int8`` encoding of ``count`` float32 elements."""
    return 4 * -(-count // BLOCK) + count


def int8_encode(array: npt.NDArray[Any]) -> bytes:
    """Encode a float32 array as per-block scales then int8 values (see the module doc).

    Parameters
    ----------
    array : ndarray of float32, any shape
        Non-finite values give a non-finite scale, which decodes to non-finite values for
        the receiver to refuse (a push's ``non_finite``), as an uncompressed tensor would.
    """
    flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    n = flat.size
    blocks = -(-n // BLOCK)
    flat_padded = np.zeros(blocks * BLOCK, dtype=np.float32)
    flat_padded[:n] = flat
    padded = flat_padded.reshape(blocks, BLOCK)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        scales = (np.max(np.abs(padded), axis=1) / np.float32(127)).astype(np.float32)
        safe = np.where(scales > 0, scales, np.float32(1))
        q = np.rint(padded / safe[:, None])
    q = np.nan_to_num(q, nan=0.0, posinf=127.0, neginf=-127.0)
    values = np.clip(q, -127, 127).astype(_VALUE).reshape(-1)[:n]
    return bytes(scales.astype(_SCALE).tobytes()) + bytes(values.tobytes())


def int8_decode(buffer: bytes, count: int) -> npt.NDArray[np.float32]:
    """Rebuild ``count`` float32 elements (flat) from :func:`int8_encode`'s buffer.

    Raises
    ------
    ValueError
        When the buffer is not exactly ``encoded_nbytes(count)`` bytes, a scale is
        negative, or a value is -128 (never produced by the encoder).
    """
    if len(buffer) != encoded_nbytes(count):
        raise ValueError(
            f"{len(buffer)} bytes for {count} int8 elements (expected {encoded_nbytes(count)})"
        )
    blocks = -(-count // BLOCK)
    scales = np.frombuffer(buffer, dtype=_SCALE, count=blocks)
    values = np.frombuffer(buffer, dtype=_VALUE, offset=4 * blocks, count=count)
    if np.any(scales < 0):
        raise ValueError("a block scale is negative")
    if count and int(values.min()) < -127:
        raise ValueError("an int8 value is -128")
    per_element = np.repeat(scales.astype(np.float32), BLOCK)[:count]
    return values.astype(np.float32) * per_element


def int8_round_trip(array: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """What a receiver rebuilds from ``int8_encode(array)``, in ``array``'s shape."""
    flat = np.asarray(array, dtype=np.float32)
    return int8_decode(int8_encode(flat), flat.size).reshape(flat.shape)


def error_bound(decoded: npt.NDArray[Any]) -> float:
    """Largest L2 error an int8-encoded tensor that decodes to ``decoded`` can carry.

    Each element is off by at most half its block's scale, and a block's scale is its
    largest decoded magnitude / 127 (the encoder maps the largest element to ±127), so
    the error is at most ``sqrt(Σ_b n_b · (max_b|x̂| / 254)²)``, computed in float64.
    """
    flat = np.asarray(decoded, dtype=np.float64).reshape(-1)
    n = flat.size
    if n == 0:
        return 0.0
    blocks = -(-n // BLOCK)
    padded = np.zeros(blocks * BLOCK)
    padded[:n] = np.abs(flat)
    peaks = padded.reshape(blocks, BLOCK).max(axis=1)
    sizes = np.full(blocks, BLOCK, dtype=np.float64)
    sizes[-1] = n - (blocks - 1) * BLOCK
    return float(np.sqrt(np.sum(sizes * (peaks / 254.0) ** 2)))
