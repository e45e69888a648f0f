"""The ``int8`` tensor compression: its documented bytes, its error bound, its refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from downpour_agent.protocol import (
    AGENT_MESSAGES,
    ErrorCode,
    ProtocolError,
    WireTensor,
    frame_from_wire,
    frame_to_wire,
    tensor_from_wire,
    tensor_to_wire,
)
from downpour_agent.protocol.quantize import (
    BLOCK,
    encoded_nbytes,
    error_bound,
    int8_decode,
    int8_encode,
    int8_round_trip,
)

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def vectors(kind: str) -> list[dict[str, Any]]:
    pattern = rf"<!-- test-vector: {kind} -->\s*```json\n(.*?)```"
    found = [json.loads(block) for block in re.findall(pattern, PROTOCOL.read_text(), re.S)]
    assert found, f"docs/protocol.md has no {kind} test vector"
    return found


PUSH = {
    "type": "push",
    "lease_id": "l",
    "seq": 0,
    "shard": 0,
    "base_version": 0,
    "samples": 32,
}


@pytest.mark.parametrize("vector", vectors("int8"), ids=lambda v: f"n{len(v['values'])}")
def test_it_encodes_the_documented_bytes(vector: dict[str, object]) -> None:
    # Prepare
    values = np.array(vector["values"], dtype=np.float32)

    # Execute
    encoded = int8_encode(values)

    # Assert
    assert encoded.hex() == vector["hex"]
    decoded = int8_decode(bytes.fromhex(str(vector["hex"])), values.size)
    assert decoded.tolist() == pytest.approx(vector["decoded"], abs=0)


def test_the_second_documented_vector_has_a_zero_block_then_a_short_one() -> None:
    # Prepare: the prose's 258 values; its bytes are spelled out beside the vector
    x = np.zeros(258, np.float32)
    x[256:] = [0.5, -0.25]
    documented = bytes.fromhex("000000000402813b") + bytes(256) + bytes.fromhex("7fc0")

    # Execute
    encoded = int8_encode(x)

    # Assert
    assert encoded == documented
    assert "`00000000` `0402813b`" in PROTOCOL.read_text()
    assert int8_decode(encoded, 258)[256:].tolist() == [0.5, pytest.approx(-64 * 0.5 / 127)]


def test_the_documented_vectors_follow_the_recipe_in_words() -> None:
    # Scales max|x|/127 as <f4, then round-half-to-even(x/scale) as int8, block by block.
    for vector in vectors("int8"):
        x = np.array(vector["values"], dtype=np.float32)
        scales, values = [], []
        for start in range(0, x.size, BLOCK):
            block = x[start : start + BLOCK]
            scale = np.float32(np.abs(block).max() / np.float32(127))
            scales.append(scale)
            q = np.rint(block / scale) if scale > 0 else np.zeros_like(block)
            values.extend(np.clip(q, -127, 127).astype(np.int8).tolist())
        expected = np.array(scales, "<f4").tobytes() + np.array(values, "i1").tobytes()
        assert expected.hex() == vector["hex"]


@pytest.mark.parametrize("size", [1, 255, 256, 257, 1000, 70_001])
@pytest.mark.parametrize("spread", [1e-6, 1.0, 1e4])
def test_a_round_trip_stays_within_the_stated_bound(size: int, spread: float) -> None:
    # Prepare: heavy-tailed values, so block scales differ a lot
    rng = np.random.default_rng(size)
    x = (rng.standard_t(3, size) * spread).astype(np.float32)

    # Execute
    decoded = int8_round_trip(x)

    # Assert: per element at most half the block's scale, and in L2 the documented bound
    blocks = -(-size // BLOCK)
    padded = np.zeros(blocks * BLOCK, np.float32)
    padded[:size] = np.abs(x)
    scales = padded.reshape(blocks, BLOCK).max(axis=1) / np.float32(127)
    per_element = np.repeat(scales, BLOCK)[:size]
    error = np.abs(decoded.astype(np.float64) - x)
    assert np.all(error <= per_element * (0.5 + 1e-5))
    assert np.linalg.norm(error) <= error_bound(decoded) * (1 + 1e-5)
    assert len(int8_encode(x)) == encoded_nbytes(size) == 4 * blocks + size


def test_an_all_zero_block_has_scale_zero_and_decodes_to_zeros() -> None:
    x = np.zeros(300, np.float32)
    x[299] = 3.0

    encoded = int8_encode(x)

    assert np.frombuffer(encoded[:8], "<f4").tolist() == [0.0, pytest.approx(3 / 127)]
    assert int8_round_trip(x)[:256].tolist() == [0.0] * 256
    assert int8_round_trip(x)[299] == pytest.approx(3.0)


def test_a_tensor_travels_as_int8_in_about_a_quarter_of_the_bytes() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    grads = {"k": rng.standard_normal((64, 128)).astype(np.float32), "b": np.zeros(3, "f4")}

    # Execute
    frame = frame_to_wire(PUSH, grads, "int8")
    msg, decoded = frame_from_wire(frame, {"push": AGENT_MESSAGES["push"]})

    # Assert
    assert msg["seq"] == 0
    assert decoded["k"].dtype == np.float32 and decoded["k"].shape == (64, 128)
    assert np.array_equal(decoded["k"], int8_round_trip(grads["k"]))
    assert len(frame) < 64 * 128 * 4 * 0.27


def test_a_frame_may_name_one_compression_per_tensor() -> None:
    tensors = {"a": np.ones(4, np.float32), "b": np.full(4, 0.1, np.float32)}

    frame = frame_to_wire(PUSH, tensors, {"a": "int8"})
    _, decoded = frame_from_wire(frame, {"push": AGENT_MESSAGES["push"]})

    assert decoded["b"].tolist() == tensors["b"].tolist()  # unnamed: none, exact
    assert decoded["a"].tolist() == [1.0] * 4


def _wire(buffer: bytes, shape: tuple[int, ...] = (10,), dtype: str = "float32") -> WireTensor:
    return WireTensor("g", dtype, shape, "int8", buffer)


@pytest.mark.parametrize("cut", [-1, 1])
def test_a_buffer_of_the_wrong_size_is_a_bad_frame(cut: int) -> None:
    good = tensor_to_wire("g", np.arange(10, dtype=np.float32), "int8").buffer
    buffer = good[:cut] if cut < 0 else good + b"\0"

    with pytest.raises(ProtocolError) as caught:
        tensor_from_wire(_wire(buffer))

    assert caught.value.code == ErrorCode.BAD_FRAME


def test_a_value_of_minus_128_or_a_negative_scale_is_a_bad_frame() -> None:
    good = tensor_to_wire("g", np.arange(10, dtype=np.float32), "int8").buffer
    minus_128 = good[:4] + b"\x80" + good[5:]
    negative = np.float32(-1).tobytes() + good[4:]

    for buffer in (minus_128, negative):
        with pytest.raises(ProtocolError) as caught:
            tensor_from_wire(_wire(buffer))
        assert caught.value.code == ErrorCode.BAD_FRAME


def test_int8_of_another_dtype_is_refused_both_ways() -> None:
    with pytest.raises(ValueError, match="float32"):
        tensor_to_wire("g", np.arange(3, dtype=np.int32), "int8")
    with pytest.raises(ProtocolError) as caught:
        tensor_from_wire(_wire(b"\0" * 7, (3,), "int32"))
    assert caught.value.code == ErrorCode.BAD_FRAME


def test_a_huge_declared_shape_is_refused_before_anything_is_allocated() -> None:
    with pytest.raises(ProtocolError) as caught:
        tensor_from_wire(_wire(b"\0" * 16, (1 << 30, 2)))
    assert caught.value.code == ErrorCode.BAD_FRAME


def test_non_finite_values_decode_to_non_finite_values_for_the_receiver_to_refuse() -> None:
    x = np.array([1.0, np.nan, 2.0], np.float32)

    decoded = int8_round_trip(x)

    assert not np.isfinite(decoded).all()
