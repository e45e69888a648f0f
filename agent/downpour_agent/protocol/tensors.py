"""Binary tensor frames.

Layout of one binary websocket frame (all integers little-endian)::

    b"DPT\\x01"            4 bytes: magic + frame format version
    header_len            uint32
    header                header_len bytes of UTF-8 JSON:
                            {"msg": {...control message...},
                             "tensors": [{"name", "dtype", "shape", "compression", "nbytes"}]}
    payload               the tensors' buffers back to back, in header order

Each buffer is the tensor's raw C-order little-endian bytes, optionally compressed.
There is no pickle anywhere: the only things decoded are JSON and raw numbers.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ErrorCode, ProtocolError, wire_ref
from .messages import _Field, validate_message
from .quantize import int8_decode, int8_encode

MAGIC = b"DPT\x01"
MAX_FRAME_BYTES = 256 << 20
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 4096
#: Largest tensor a frame may decode to: bounds zlib inflation whatever the shape claims.
MAX_TENSOR_BYTES = 1 << 30

#: Wire dtype names and their little-endian numpy types.
DTYPES: dict[str, np.dtype[Any]] = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
#: ``none``: raw bytes. ``zlib``: deflate of the raw bytes. ``fp16``: a float32 tensor
#: sent as float16 (half the bytes, ~3 significant digits) and widened on arrival. ``int8``:
#: a float32 tensor as per-block scales and int8 values (``quantize.py``; about a quarter of
#: the bytes, each element off by at most half its block's scale).
COMPRESSIONS = ("none", "zlib", "fp16", "int8")

_HEAD = struct.Struct("<4sI")


@dataclass(frozen=True)
class WireTensor:
    """One tensor as it travels: the buffer plus what is needed to rebuild it.

    ``buffer`` holds ``prod(shape)`` elements of ``dtype`` after undoing ``compression``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    compression: str
    buffer: bytes


def tensor_to_wire(name: str, array: npt.NDArray[Any], compression: str = "none") -> WireTensor:
    """Encode ``array`` (any supported dtype, any shape) as a :class:`WireTensor`."""
    dtype_name = _dtype_name(array.dtype)
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}")
    if compression in ("fp16", "int8") and dtype_name != "float32":
        raise ValueError(f"{compression} compression applies to float32 tensors only")
    if compression == "fp16":
        raw = np.ascontiguousarray(array, dtype="<f2").tobytes()
    elif compression == "int8":
        raw = int8_encode(array)
    else:
        raw = np.ascontiguousarray(array, dtype=DTYPES[dtype_name]).tobytes()
        if compression == "zlib":
            raw = zlib.compress(raw, 1)
    return WireTensor(name, dtype_name, tuple(int(d) for d in array.shape), compression, raw)


def tensor_from_wire(tensor: WireTensor) -> npt.NDArray[Any]:
    """Decode a :class:`WireTensor` into a writable numpy array of its dtype and shape.

    Raises
    ------
    ProtocolError
        ``wrong_dtype`` for an unknown dtype, ``bad_frame`` when the buffer size does not
        match ``shape`` or the compression is unknown or corrupt.
    """
    if tensor.dtype not in DTYPES:
        raise ProtocolError(
            ErrorCode.WRONG_DTYPE, f"tensor {tensor.name!r}: dtype {tensor.dtype!r}"
        )
    if tensor.compression not in COMPRESSIONS:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown compression {tensor.compression!r}")
    count = 1
    for dim in tensor.shape:
        count *= dim
    wire_dtype = DTYPES["float16"] if tensor.compression == "fp16" else DTYPES[tensor.dtype]
    expected = count * wire_dtype.itemsize
    if expected > MAX_TENSOR_BYTES or count * DTYPES[tensor.dtype].itemsize > MAX_TENSOR_BYTES:
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"tensor {tensor.name!r}: shape {list(tensor.shape)} is over {MAX_TENSOR_BYTES} bytes",
        )
    raw = tensor.buffer
    if tensor.compression == "zlib":
        raw = _inflate(raw, expected, tensor.name)
    if tensor.compression in ("fp16", "int8") and tensor.dtype != "float32":
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"{tensor.compression} compression applies to float32 only"
        )
    if tensor.compression == "int8":
        # Sized from the shape before anything is read: scales then values, nothing else.
        try:
            flat = int8_decode(raw, count)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {tensor.name!r}: {exc}") from None
        return flat.reshape(tensor.shape)
    if len(raw) != expected:
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"tensor {tensor.name!r}: {len(raw)} bytes for shape {list(tensor.shape)} "
            f"of {tensor.dtype} (expected {expected})",
        )
    array = np.frombuffer(raw, dtype=wire_dtype).reshape(tensor.shape)
    return array.astype(DTYPES[tensor.dtype], copy=True)


def frame_to_wire(
    msg: dict[str, Any],
    tensors: Mapping[str, npt.NDArray[Any]],
    compression: str | Mapping[str, str] = "none",
) -> bytes:
    """Pack a control message and named tensors into one binary frame.

    ``compression`` is one for every tensor, or one per tensor name (``none`` if unnamed).
    """
    wire = [
        tensor_to_wire(
            name,
            arr,
            compression if isinstance(compression, str) else compression.get(name, "none"),
        )
        for name, arr in tensors.items()
    ]
    header = {
        "msg": msg,
        "tensors": [
            {
                "name": t.name,
                "dtype": t.dtype,
                "shape": list(t.shape),
                "compression": t.compression,
                "nbytes": len(t.buffer),
            }
            for t in wire
        ],
    }
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([_HEAD.pack(MAGIC, len(head)), head, *(t.buffer for t in wire)])


@dataclass(frozen=True)
class FrameHeader:
    """A binary frame's validated message and its tensors, not yet decoded.

    What :func:`frame_header_from_wire` reads: enough for a receiver to check the message
    (who sends it, for which lease and shard) before it spends memory on inflating.
    """

    msg: dict[str, Any]
    tensors: tuple[WireTensor, ...]


def frame_from_wire(
    data: bytes,
    schemas: dict[str, dict[str, _Field]],
    max_bytes: int = MAX_FRAME_BYTES,
) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """Unpack a binary frame into ``(message, {name: array})``.

    The message is validated against ``schemas``; the tensors are checked for size,
    dtype and shape consistency but not for content (finite values are the receiver's
    business, since only it knows what the tensor is for). A receiver that must check the
    message before decoding calls :func:`frame_header_from_wire` and
    :func:`frame_tensors_from_wire` itself.

    Raises
    ------
    ProtocolError
        ``frame_too_large``, ``bad_frame``, ``wrong_dtype`` or a message-schema code.
    """
    header = frame_header_from_wire(data, schemas, max_bytes)
    return header.msg, frame_tensors_from_wire(header)


def frame_header_from_wire(
    data: bytes,
    schemas: dict[str, dict[str, _Field]],
    max_bytes: int = MAX_FRAME_BYTES,
) -> FrameHeader:
    """Read a binary frame's header and split its payload, inflating nothing.

    Costs at most a parse of the JSON header (``MAX_HEADER_BYTES``) and a copy of the
    payload, whatever the descriptors claim.

    Raises
    ------
    ProtocolError
        ``frame_too_large``, ``bad_frame`` (framing, header or descriptors, duplicate names,
        trailing bytes) or a message-schema code (carrying the message's ``ref``).
    """
    if len(data) > max_bytes:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE, f"frame of {len(data)} bytes over {max_bytes}"
        )
    if len(data) < _HEAD.size:
        raise ProtocolError(ErrorCode.BAD_FRAME, "frame shorter than its header")
    magic, head_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_FRAME, "bad magic: not a Downpour tensor frame")
    if head_len > MAX_HEADER_BYTES or _HEAD.size + head_len > len(data):
        raise ProtocolError(ErrorCode.BAD_FRAME, "header length out of range")
    try:
        header = json.loads(data[_HEAD.size : _HEAD.size + head_len])
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_FRAME, "header is not valid JSON") from None
    if not isinstance(header, dict) or set(header) != {"msg", "tensors"}:
        raise ProtocolError(ErrorCode.BAD_FRAME, "header must have exactly 'msg' and 'tensors'")
    msg = validate_message(header["msg"], schemas)
    try:
        tensors = _split_payload(header["tensors"], data, _HEAD.size + head_len)
    except ProtocolError as exc:
        exc.ref = wire_ref(msg)
        raise
    return FrameHeader(msg, tensors)


def frame_ref(data: bytes) -> str | int | None:
    """The ``ref`` of a binary frame's message, read from its header alone (or None).

    For answering a frame that is refused before it is read (no registration yet): parses at
    most ``MAX_HEADER_BYTES`` of JSON, validates nothing and decodes no tensor.
    """
    if len(data) < _HEAD.size:
        return None
    magic, head_len = _HEAD.unpack_from(data)
    if magic != MAGIC or head_len > MAX_HEADER_BYTES or _HEAD.size + head_len > len(data):
        return None
    try:
        header = json.loads(data[_HEAD.size : _HEAD.size + head_len])
    except (ValueError, RecursionError):
        return None
    return wire_ref(header.get("msg")) if isinstance(header, dict) else None


def _split_payload(descs: Any, data: bytes, offset: int) -> tuple[WireTensor, ...]:
    if not isinstance(descs, list) or len(descs) > MAX_TENSORS:
        raise ProtocolError(ErrorCode.BAD_FRAME, "'tensors' must be a list of descriptors")
    tensors: list[WireTensor] = []
    names: set[str] = set()
    for desc in descs:
        wire = _descriptor(desc, data, offset)
        offset += len(wire.buffer)
        if wire.name in names:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {wire.name!r} appears twice")
        names.add(wire.name)
        tensors.append(wire)
    if offset != len(data):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{len(data) - offset} trailing bytes in frame")
    return tuple(tensors)


def frame_tensors_from_wire(
    header: FrameHeader, max_decoded_bytes: int | None = None
) -> dict[str, npt.NDArray[Any]]:
    """Decode the tensors of a frame read by :func:`frame_header_from_wire`.

    Parameters
    ----------
    header : FrameHeader
        The frame's message and tensors.
    max_decoded_bytes : int, optional
        Most bytes the tensors may decode to together, as the receiver expects them (a
        parameter shard's float32 size, say); checked against the declared shapes before
        anything is inflated. Without it each tensor is bounded by ``MAX_TENSOR_BYTES``.

    Raises
    ------
    ProtocolError
        ``bad_frame`` when a buffer does not match its shape, its compression is unknown or
        corrupt, or the tensors are over ``max_decoded_bytes``; ``wrong_dtype``.
    """
    if max_decoded_bytes is not None:
        declared = sum(_decoded_bytes(t) for t in header.tensors)
        if declared > max_decoded_bytes:
            raise ProtocolError(
                ErrorCode.BAD_FRAME,
                f"tensors of {declared} bytes where at most {max_decoded_bytes} are expected",
            )
    return {wire.name: tensor_from_wire(wire) for wire in header.tensors}


def _decoded_bytes(tensor: WireTensor) -> int:
    # Unknown dtypes count as one byte: tensor_from_wire refuses them before allocating.
    count = 1
    for dim in tensor.shape:
        count *= dim
    dtype = DTYPES.get(tensor.dtype)
    return count * (dtype.itemsize if dtype is not None else 1)


def _descriptor(desc: Any, data: bytes, offset: int) -> WireTensor:
    ok = (
        isinstance(desc, dict)
        and set(desc) == {"name", "dtype", "shape", "compression", "nbytes"}
        and isinstance(desc["name"], str)
        and len(desc["name"]) <= 256
        and isinstance(desc["dtype"], str)
        and isinstance(desc["compression"], str)
        and isinstance(desc["shape"], list)
        and len(desc["shape"]) <= 8
        and all(type(d) is int and 0 <= d < 1 << 31 for d in desc["shape"])
        and type(desc["nbytes"]) is int
        and 0 <= desc["nbytes"] <= len(data) - offset
    )
    if not ok:
        raise ProtocolError(ErrorCode.BAD_FRAME, "malformed tensor descriptor")
    end = offset + desc["nbytes"]
    return WireTensor(
        desc["name"], desc["dtype"], tuple(desc["shape"]), desc["compression"], data[offset:end]
    )


def _inflate(raw: bytes, expected: int, name: str) -> bytes:
    # Bound the output so a small zlib bomb cannot allocate more than the shape promises.
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(raw, expected + 1)
    except zlib.error:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {name!r}: corrupt zlib data") from None
    if len(out) > expected or inflater.unconsumed_tail:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"tensor {name!r}: inflates past its shape")
    return out


def _dtype_name(dtype: np.dtype[Any]) -> str:
    for name, wire in DTYPES.items():
        if np.dtype(dtype).newbyteorder("=") == wire.newbyteorder("="):
            return name
    raise ValueError(f"dtype {dtype} cannot travel on the wire")
