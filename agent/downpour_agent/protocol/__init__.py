"""The one definition of Downpour's wire protocol (see docs/protocol.md).

The server imports this package too, so both ends agree by construction.
"""

from __future__ import annotations

from .errors import ErrorCode, ProtocolError
from .messages import (
    AGENT_MESSAGES,
    BINARY_TYPES,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    error_message,
    message_from_wire,
    message_to_wire,
    validate_message,
)
from .tensors import (
    COMPRESSIONS,
    DTYPES,
    MAX_FRAME_BYTES,
    WireTensor,
    frame_from_wire,
    frame_to_wire,
    tensor_from_wire,
    tensor_to_wire,
)

__all__ = [
    "AGENT_MESSAGES",
    "BINARY_TYPES",
    "COMPRESSIONS",
    "DTYPES",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "SERVER_MESSAGES",
    "ErrorCode",
    "ProtocolError",
    "WireTensor",
    "error_message",
    "frame_from_wire",
    "frame_to_wire",
    "message_from_wire",
    "message_to_wire",
    "tensor_from_wire",
    "tensor_to_wire",
    "validate_message",
]
