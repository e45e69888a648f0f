"""The wire protocol: every message type round-trips, every malformed frame is refused."""

from __future__ import annotations

import contextlib
import json
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from downpour_agent.protocol import (
    AGENT_MESSAGES,
    BINARY_TYPES,
    COMPRESSIONS,
    DTYPES,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    SERVER_MESSAGES,
    ErrorCode,
    ProtocolError,
    error_message,
    frame_from_wire,
    frame_to_wire,
    message_from_wire,
    message_to_wire,
    tensor_from_wire,
    tensor_to_wire,
)
from downpour_agent.protocol.messages import MAX_TEXT_BYTES
from downpour_agent.protocol.tensors import MAGIC, MAX_HEADER_BYTES

LEASE_ID = "0f0e0d0c-0000-4000-8000-000000000001"

#: One valid example of every message, keyed by type.
EXAMPLES: dict[str, dict[str, Any]] = {
    "register": {
        "type": "register",
        "protocol_version": PROTOCOL_VERSION,
        "name": "alice-laptop",
        "device": {"os": "Linux", "cpu_cores": 8, "gpu_name": None},
    },
    "heartbeat": {"type": "heartbeat", "lease_id": LEASE_ID},
    "request_work": {"type": "request_work", "ref": 7},
    "resume": {"type": "resume", "lease_id": LEASE_ID, "ref": 8},
    "fetch": {"type": "fetch", "lease_id": LEASE_ID, "shard": 1, "ref": "f-1"},
    "push": {
        "type": "push",
        "lease_id": LEASE_ID,
        "seq": 3,
        "shard": 0,
        "base_version": 41,
        "samples": 128,
    },
    "complete": {"type": "complete", "lease_id": LEASE_ID, "samples": 3200},
    "return_lease": {"type": "return_lease", "lease_id": LEASE_ID},
    "registered": {
        "type": "registered",
        "agent_id": "agent-1",
        "heartbeat_interval_s": 10,
        "lease_ttl_s": 60.5,
    },
    "heartbeat_ack": {"type": "heartbeat_ack", "lease_id": LEASE_ID, "expires_in_s": 59.0},
    "lease": {
        "type": "lease",
        "lease_id": LEASE_ID,
        "job_id": "job-1",
        "work_unit_id": "wu-1",
        "steps": 100,
        "seed": 1234,
        "model": {"class_name": "Sequential", "config": {"layers": []}},
        "loss": "sparse_categorical_crossentropy",
        "hyper": {
            "batch_size": 32,
            "n_fetch": 5,
            "n_push": 5,
            "learning_rate": 0.01,
            "compression": "zlib",
        },
        "dataset": {"url": "/api/agent/shards/abc/", "sha256": "0" * 64, "n_samples": 1000},
        "layout": [[{"name": "dense/kernel", "shape": [4, 2], "dtype": "float32"}]],
        "expires_in_s": 120,
    },
    "no_work": {"type": "no_work", "retry_after_s": 2.5},
    "params": {"type": "params", "lease_id": LEASE_ID, "shard": 0, "version": 42},
    "push_ack": {
        "type": "push_ack",
        "lease_id": LEASE_ID,
        "seq": 3,
        "shard": 0,
        "version": 43,
        "staleness": 1,
        "applied": True,
        "duplicate": False,
    },
    "complete_ack": {"type": "complete_ack", "lease_id": LEASE_ID},
    "lease_returned": {"type": "lease_returned", "lease_id": LEASE_ID},
    "error": {"type": "error", "code": "stale_gradient", "message": "too old", "ref": 3},
    "job_finished": {
        "type": "job_finished",
        "job_id": "job-1",
        "message": "job job-1 has finished",
    },
    "job_paused": {
        "type": "job_paused",
        "job_id": "job-1",
        "message": "job job-1 was paused",
    },
}

TENSORS = {
    "dense/kernel": np.arange(8, dtype=np.float32).reshape(4, 2),
    "dense/bias": np.array([0.5, -0.5], dtype=np.float32),
}


def _schemas_for(mtype: str) -> dict[str, Any]:
    return AGENT_MESSAGES if mtype in AGENT_MESSAGES else SERVER_MESSAGES


def _frame(header: Any, payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<4sI", MAGIC, len(head)) + head + payload


def _push_header(tensors: list[dict[str, Any]]) -> dict[str, Any]:
    return {"msg": EXAMPLES["push"], "tensors": tensors}


def test_every_message_type_has_an_example() -> None:
    assert set(EXAMPLES) == set(AGENT_MESSAGES) | set(SERVER_MESSAGES)


@pytest.mark.parametrize("mtype", sorted(set(EXAMPLES) - BINARY_TYPES))
def test_every_text_message_round_trips(mtype: str) -> None:
    # Prepare
    msg = EXAMPLES[mtype]

    # Execute
    text = message_to_wire(msg)
    decoded = message_from_wire(text, _schemas_for(mtype))

    # Assert
    assert decoded == msg


@pytest.mark.parametrize("mtype", sorted(BINARY_TYPES))
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_every_binary_message_round_trips_with_its_tensors(mtype: str, compression: str) -> None:
    # Prepare
    msg = EXAMPLES[mtype]

    # Execute
    frame = frame_to_wire(msg, TENSORS, compression)
    decoded, tensors = frame_from_wire(frame, _schemas_for(mtype))

    # Assert
    assert decoded == msg
    assert list(tensors) == list(TENSORS)
    for name, array in TENSORS.items():
        assert tensors[name].dtype == np.float32
        if compression == "int8":  # lossy: within half a block scale (test_protocol_int8.py)
            bound = np.abs(array).max() / 254
            np.testing.assert_allclose(tensors[name], array, rtol=0, atol=bound * 1.0001)
        else:
            np.testing.assert_array_equal(tensors[name], array)


def test_a_frame_may_carry_no_tensors() -> None:
    frame = frame_to_wire(EXAMPLES["params"], {})

    msg, tensors = frame_from_wire(frame, SERVER_MESSAGES)

    assert msg == EXAMPLES["params"] and tensors == {}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("compression", ["none", "zlib"])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4)])
def test_tensors_of_every_dtype_and_shape_round_trip(
    dtype: str, compression: str, shape: tuple[int, ...]
) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 50).astype(DTYPES[dtype])

    # Execute
    frame = frame_to_wire(EXAMPLES["push"], {"t": array}, compression)
    _, tensors = frame_from_wire(frame, AGENT_MESSAGES)

    # Assert
    assert tensors["t"].dtype == DTYPES[dtype]
    assert tensors["t"].shape == shape
    np.testing.assert_array_equal(tensors["t"], array)
    assert tensors["t"].flags.writeable


def test_big_endian_arrays_arrive_little_endian_with_the_same_values() -> None:
    array = np.arange(6, dtype=">f4").reshape(2, 3)

    _, tensors = frame_from_wire(frame_to_wire(EXAMPLES["push"], {"t": array}), AGENT_MESSAGES)

    np.testing.assert_array_equal(tensors["t"], array)


@pytest.mark.parametrize("shape", [(), (0,), (7, 3)])
def test_fp16_compression_sends_float32_at_half_precision(shape: tuple[int, ...]) -> None:
    # Prepare
    array = np.random.default_rng(1).standard_normal(shape).astype(np.float32)

    # Execute
    wire = tensor_to_wire("g", array, "fp16")
    decoded = tensor_from_wire(wire)

    # Assert
    assert len(wire.buffer) == array.size * 2
    assert decoded.dtype == np.float32 and decoded.shape == shape
    np.testing.assert_allclose(decoded, array, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", sorted(set(DTYPES) - {"float32"}))
def test_fp16_compression_refuses_anything_but_float32(dtype: str) -> None:
    with pytest.raises(ValueError, match="fp16"):
        tensor_to_wire("t", np.zeros(3, DTYPES[dtype]), "fp16")


def test_an_unknown_compression_is_refused_when_encoding() -> None:
    with pytest.raises(ValueError, match="compression"):
        tensor_to_wire("t", np.zeros(3, np.float32), "lz4")


def test_an_unsupported_dtype_is_refused_when_encoding() -> None:
    with pytest.raises(ValueError, match="wire"):
        tensor_to_wire("t", np.zeros(3, np.complex64))


def test_an_error_message_is_structured_and_echoes_its_ref() -> None:
    msg = error_message(ErrorCode.STALE_GRADIENT, "too old", ref=9)

    assert msg == {"type": "error", "code": "stale_gradient", "message": "too old", "ref": 9}
    assert message_from_wire(message_to_wire(msg), SERVER_MESSAGES) == msg


# -- rejections of text messages --------------------------------------------------


def _rejected(text: str | bytes, schemas: dict[str, Any] = AGENT_MESSAGES) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        message_from_wire(text, schemas)
    return info.value.code


def test_an_unknown_type_is_refused_as_unknown_type() -> None:
    assert _rejected('{"type": "launch_missiles"}') is ErrorCode.UNKNOWN_TYPE


def test_a_server_message_sent_by_an_agent_is_an_unknown_type() -> None:
    assert _rejected(message_to_wire(EXAMPLES["lease"])) is ErrorCode.UNKNOWN_TYPE


def test_a_missing_field_is_refused() -> None:
    assert _rejected('{"type": "fetch", "lease_id": "x"}') is ErrorCode.BAD_MESSAGE


def test_an_unexpected_field_is_refused() -> None:
    assert _rejected('{"type": "request_work", "please": true}') is ErrorCode.BAD_MESSAGE


def test_a_bool_where_an_int_is_expected_is_refused() -> None:
    assert _rejected('{"type": "fetch", "lease_id": "x", "shard": true}') is ErrorCode.BAD_MESSAGE


def test_a_string_where_an_int_is_expected_is_refused() -> None:
    assert _rejected('{"type": "fetch", "lease_id": "x", "shard": "0"}') is ErrorCode.BAD_MESSAGE


def test_a_float_ref_is_refused() -> None:
    assert _rejected('{"type": "request_work", "ref": 1.5}') is ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_in_json_are_refused(constant: str) -> None:
    text = f'{{"type": "no_work", "retry_after_s": {constant}}}'

    assert _rejected(text, SERVER_MESSAGES) is ErrorCode.BAD_FRAME


def test_an_overflowing_float_is_refused_as_not_finite() -> None:
    assert _rejected('{"type": "no_work", "retry_after_s": 1e999}', SERVER_MESSAGES) is (
        ErrorCode.BAD_MESSAGE
    )


def test_nan_is_never_written() -> None:
    with pytest.raises(ValueError):
        message_to_wire({"type": "no_work", "retry_after_s": float("nan")})


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", '"register"', "null", '{"type": 3}'])
def test_text_that_is_not_a_typed_json_object_is_refused(text: str) -> None:
    assert _rejected(text) in {ErrorCode.BAD_FRAME, ErrorCode.BAD_MESSAGE}


def test_deeply_nested_json_is_refused_without_crashing() -> None:
    assert _rejected("[" * 100_000 + "]" * 100_000) is ErrorCode.BAD_FRAME


def test_an_oversize_text_frame_is_refused() -> None:
    text = '{"type": "register", "name": "' + "a" * MAX_TEXT_BYTES + '"}'

    assert _rejected(text) is ErrorCode.FRAME_TOO_LARGE


# -- rejections of binary frames ----------------------------------------------------


def _frame_rejected(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        frame_from_wire(data, AGENT_MESSAGES, max_bytes=max_bytes)
    return info.value.code


def test_a_frame_with_bad_magic_is_refused() -> None:
    frame = frame_to_wire(EXAMPLES["push"], TENSORS)

    assert _frame_rejected(b"XXXX" + frame[4:]) is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("cut", [0, 3, 7, 20, -1])
def test_a_truncated_frame_is_refused(cut: int) -> None:
    frame = frame_to_wire(EXAMPLES["push"], TENSORS)

    assert _frame_rejected(frame[:cut]) is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("head_len", [MAX_HEADER_BYTES + 1, 2**32 - 1, 10_000])
def test_a_header_length_out_of_range_is_refused(head_len: int) -> None:
    frame = frame_to_wire(EXAMPLES["push"], TENSORS)
    bad = struct.pack("<4sI", MAGIC, head_len) + frame[8:]

    assert _frame_rejected(bad) is ErrorCode.BAD_FRAME


def test_trailing_bytes_after_the_last_tensor_are_refused() -> None:
    frame = frame_to_wire(EXAMPLES["push"], TENSORS)

    assert _frame_rejected(frame + b"\x00") is ErrorCode.BAD_FRAME


def test_a_tensor_named_twice_is_refused() -> None:
    desc = {"name": "w", "dtype": "uint8", "shape": [2], "compression": "none", "nbytes": 2}

    frame = _frame(_push_header([desc, desc]), b"\x01\x02\x03\x04")

    assert _frame_rejected(frame) is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    ("shape", "nbytes", "payload"),
    [([3], 8, b"\x00" * 8), ([2, 2], 12, b"\x00" * 12), ([0], 4, b"\x00" * 4)],
)
def test_a_buffer_that_does_not_fill_its_shape_is_refused(
    shape: list[int], nbytes: int, payload: bytes
) -> None:
    desc = {
        "name": "w",
        "dtype": "float32",
        "shape": shape,
        "compression": "none",
        "nbytes": nbytes,
    }

    assert _frame_rejected(_frame(_push_header([desc]), payload)) is ErrorCode.BAD_FRAME


def test_nbytes_beyond_the_frame_is_refused() -> None:
    desc = {"name": "w", "dtype": "float32", "shape": [4], "compression": "none", "nbytes": 16}

    assert _frame_rejected(_frame(_push_header([desc]), b"\x00" * 8)) is ErrorCode.BAD_FRAME


def test_a_zlib_bomb_is_refused_before_it_inflates_past_its_shape() -> None:
    # Prepare: 64 MiB of zeros deflate to ~64 KiB but the shape promises 16 bytes.
    bomb = zlib.compress(b"\x00" * (64 << 20), 9)
    desc = {"name": "w", "dtype": "float32", "shape": [4], "compression": "zlib"}
    frame = _frame(_push_header([{**desc, "nbytes": len(bomb)}]), bomb)

    # Execute / Assert
    assert _frame_rejected(frame) is ErrorCode.BAD_FRAME


def test_corrupt_zlib_data_is_refused() -> None:
    desc = {"name": "w", "dtype": "float32", "shape": [4], "compression": "zlib", "nbytes": 5}

    assert _frame_rejected(_frame(_push_header([desc]), b"nope!")) is ErrorCode.BAD_FRAME


def test_an_unknown_dtype_is_refused_as_wrong_dtype() -> None:
    desc = {"name": "w", "dtype": "complex64", "shape": [1], "compression": "none", "nbytes": 8}

    assert _frame_rejected(_frame(_push_header([desc]), b"\x00" * 8)) is ErrorCode.WRONG_DTYPE


def test_an_unknown_compression_is_refused() -> None:
    desc = {"name": "w", "dtype": "float32", "shape": [1], "compression": "lz4", "nbytes": 4}

    assert _frame_rejected(_frame(_push_header([desc]), b"\x00" * 4)) is ErrorCode.BAD_FRAME


def test_fp16_on_a_non_float32_tensor_is_refused() -> None:
    desc = {"name": "w", "dtype": "int16", "shape": [2], "compression": "fp16", "nbytes": 4}

    assert _frame_rejected(_frame(_push_header([desc]), b"\x00" * 4)) is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "desc",
    [
        {"name": "w", "dtype": "float32", "shape": [1], "compression": "none"},
        {"name": 1, "dtype": "float32", "shape": [1], "compression": "none", "nbytes": 4},
        {"name": "w", "dtype": "float32", "shape": [-1], "compression": "none", "nbytes": 4},
        {"name": "w", "dtype": "float32", "shape": [True], "compression": "none", "nbytes": 4},
        {"name": "w", "dtype": "float32", "shape": [1] * 9, "compression": "none", "nbytes": 4},
        {"name": "w", "dtype": "float32", "shape": [1], "compression": "none", "nbytes": 4.0},
        {"name": "w" * 300, "dtype": "float32", "shape": [1], "compression": "none", "nbytes": 4},
        ["w", "float32", [1], "none", 4],
    ],
)
def test_a_malformed_tensor_descriptor_is_refused(desc: Any) -> None:
    assert _frame_rejected(_frame(_push_header([desc]), b"\x00" * 4)) is ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "header",
    [[], {"msg": EXAMPLES["push"]}, {"msg": EXAMPLES["push"], "tensors": {}, "extra": 1}],
)
def test_a_header_without_exactly_msg_and_tensors_is_refused(header: Any) -> None:
    assert _frame_rejected(_frame(header)) is ErrorCode.BAD_FRAME


def test_a_header_that_is_not_json_is_refused() -> None:
    head = b"{not json"
    frame = struct.pack("<4sI", MAGIC, len(head)) + head

    assert _frame_rejected(frame) is ErrorCode.BAD_FRAME


def test_the_message_inside_a_frame_is_validated_against_the_schema() -> None:
    msg = {**EXAMPLES["push"], "seq": True}

    assert _frame_rejected(_frame({"msg": msg, "tensors": []})) is ErrorCode.BAD_MESSAGE


def test_an_unknown_message_type_inside_a_frame_is_refused() -> None:
    assert _frame_rejected(_frame({"msg": {"type": "nope"}, "tensors": []})) is (
        ErrorCode.UNKNOWN_TYPE
    )


def test_an_oversize_frame_is_refused_before_it_is_parsed() -> None:
    frame = frame_to_wire(EXAMPLES["push"], {"w": np.zeros(1024, np.float32)})

    assert _frame_rejected(frame, max_bytes=1000) is ErrorCode.FRAME_TOO_LARGE


# -- properties ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(sorted(DTYPES)).map(lambda name: DTYPES[name]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    compression=st.sampled_from(["none", "zlib"]),
)
def test_any_array_round_trips_bit_for_bit(array: np.ndarray[Any, Any], compression: str) -> None:
    frame = frame_to_wire(EXAMPLES["push"], {"a": array}, compression)

    _, tensors = frame_from_wire(frame, AGENT_MESSAGES)

    assert tensors["a"].dtype == array.dtype and tensors["a"].shape == array.shape
    assert tensors["a"].tobytes() == np.ascontiguousarray(array).tobytes()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_nothing_but_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        frame_from_wire(data, SERVER_MESSAGES)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=256))
def test_random_bytes_after_a_valid_prefix_raise_nothing_but_protocol_error(data: bytes) -> None:
    frame = frame_to_wire(EXAMPLES["params"], TENSORS)
    with contextlib.suppress(ProtocolError):
        frame_from_wire(frame[: len(frame) // 2] + data, SERVER_MESSAGES)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=256))
def test_random_text_raises_nothing_but_protocol_error(text: str) -> None:
    with contextlib.suppress(ProtocolError):
        message_from_wire(text, SERVER_MESSAGES)
