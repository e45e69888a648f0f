"""The one definition of Downpour's wire protocol (see docs/protocol.md).

The server imports this package too, so both ends agree by construction.
"""

from __future__ import annotations

from .errors import ERROR_TEXTS, CloseCode, ErrorCode, ProtocolError, wire_ref
from .messages import (
    AGENT_MESSAGES,
    BINARY_TYPES,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    banned_message,
    error_message,
    job_finished_message,
    message_from_wire,
    message_to_wire,
    validate_message,
)
from .payloads import (
    DatasetSpec,
    Hyper,
    LeaseSpec,
    VariableSpec,
    WeightsLoad,
    dataset_from_wire,
    dataset_to_wire,
    lease_from_wire,
    lease_to_wire,
    loads_from_wire,
    loads_to_wire,
)
from .tensors import (
    COMPRESSIONS,
    DTYPES,
    MAX_FRAME_BYTES,
    FrameHeader,
    WireTensor,
    frame_from_wire,
    frame_header_from_wire,
    frame_ref,
    frame_tensors_from_wire,
    frame_to_wire,
    tensor_from_wire,
    tensor_to_wire,
)

__all__ = [
    "AGENT_MESSAGES",
    "BINARY_TYPES",
    "COMPRESSIONS",
    "DTYPES",
    "ERROR_TEXTS",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "SERVER_MESSAGES",
    "CloseCode",
    "DatasetSpec",
    "ErrorCode",
    "FrameHeader",
    "Hyper",
    "LeaseSpec",
    "ProtocolError",
    "VariableSpec",
    "WeightsLoad",
    "WireTensor",
    "banned_message",
    "dataset_from_wire",
    "dataset_to_wire",
    "error_message",
    "frame_from_wire",
    "frame_header_from_wire",
    "frame_ref",
    "frame_tensors_from_wire",
    "frame_to_wire",
    "job_finished_message",
    "lease_from_wire",
    "lease_to_wire",
    "loads_from_wire",
    "loads_to_wire",
    "message_from_wire",
    "message_to_wire",
    "tensor_from_wire",
    "tensor_to_wire",
    "validate_message",
    "wire_ref",
]
