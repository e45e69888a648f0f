"""The payloads nested in messages (the lease, a push's loads), close codes and error texts.

Each payload has a fixed test vector: the exact JSON the server writes and the agent reads.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from downpour_agent.protocol import (
    ERROR_TEXTS,
    SERVER_MESSAGES,
    CloseCode,
    DatasetSpec,
    ErrorCode,
    Hyper,
    LeaseSpec,
    ProtocolError,
    WeightsLoad,
    banned_message,
    dataset_from_wire,
    error_message,
    job_finished_message,
    lease_from_wire,
    lease_to_wire,
    loads_from_wire,
    loads_to_wire,
    message_from_wire,
    message_to_wire,
)

SHA = "ab" * 32

LEASE = LeaseSpec(
    lease_id="0f0e0d0c-0000-4000-8000-000000000001",
    job_id="9c4e0f21-0000-4000-8000-000000000002",
    work_unit_id="5b1c0000-0000-4000-8000-000000000003",
    steps=100,
    seed=1234,
    model={"class_name": "Sequential", "config": {"layers": []}},
    loss="sparse_categorical_crossentropy",
    hyper=Hyper(batch_size=32, n_fetch=5, n_push=5, learning_rate=0.05),
    dataset=DatasetSpec(url="/api/agent/shards/5b1c/", sha256=SHA, n_samples=1000),
    layout=[
        [("dense/kernel", (4, 2), "float32"), ("dense/bias", (2,), "float32")],
        [("out/kernel", (2, 3), "float32")],
    ],
    expires_in_s=60,
)

#: The exact text of LEASE on the wire, as the server has always written it.
LEASE_JSON = (
    '{"type":"lease","lease_id":"0f0e0d0c-0000-4000-8000-000000000001",'
    '"job_id":"9c4e0f21-0000-4000-8000-000000000002",'
    '"work_unit_id":"5b1c0000-0000-4000-8000-000000000003","steps":100,"seed":1234,'
    '"model":{"class_name":"Sequential","config":{"layers":[]}},'
    '"loss":"sparse_categorical_crossentropy",'
    '"hyper":{"batch_size":32,"n_fetch":5,"n_push":5,"learning_rate":0.05,"compression":"none"},'
    '"dataset":{"url":"/api/agent/shards/5b1c/","sha256":"' + SHA + '","n_samples":1000},'
    '"layout":[[{"name":"dense/kernel","shape":[4,2],"dtype":"float32"},'
    '{"name":"dense/bias","shape":[2],"dtype":"float32"}],'
    '[{"name":"out/kernel","shape":[2,3],"dtype":"float32"}]],'
    '"expires_in_s":60}'
)


def _wire() -> dict[str, Any]:
    return copy.deepcopy(lease_to_wire(LEASE))


def _refused(msg: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        lease_from_wire(msg)
    assert info.value.code == ErrorCode.BAD_MESSAGE
    return info.value


# -- the lease --------------------------------------------------------------------------


def test_a_lease_is_written_as_the_fixed_test_vector() -> None:
    assert message_to_wire(lease_to_wire(LEASE)) == LEASE_JSON


def test_a_lease_round_trips_through_the_wire() -> None:
    # Execute
    decoded = lease_from_wire(message_from_wire(LEASE_JSON, SERVER_MESSAGES))

    # Assert
    assert decoded == LEASE


def test_a_lease_answering_a_request_may_carry_its_ref() -> None:
    assert lease_from_wire({**_wire(), "ref": 7}) == LEASE


@pytest.mark.parametrize("compression", ["none", "zlib", "fp16"])
def test_every_compression_round_trips(compression: str) -> None:
    lease = LeaseSpec(**{**LEASE.__dict__, "hyper": Hyper(8, 1, 2, 0.1, compression)})

    assert lease_from_wire(lease_to_wire(lease)) == lease


def test_the_dataset_hash_is_read_as_lowercase() -> None:
    wire = _wire()
    wire["dataset"]["sha256"] = SHA.upper()

    assert lease_from_wire(wire).dataset.sha256 == SHA


#: (path to the field, bad value); None as the value removes the field.
BAD_FIELDS: list[tuple[tuple[Any, ...], Any]] = [
    (("type",), "lease_returned"),
    (("lease_id",), 5),
    (("job_id",), None),
    (("work_unit_id",), None),
    (("steps",), 0),
    (("steps",), -3),
    (("steps",), True),
    (("steps",), 2.5),
    (("seed",), -1),
    (("seed",), "42"),
    (("model",), []),
    (("loss",), None),
    (("expires_in_s",), -1),
    (("expires_in_s",), "60"),
    (("hyper",), "fast"),
    (("hyper", "batch_size"), "lots"),
    (("hyper", "batch_size"), 0),
    (("hyper", "n_fetch"), True),
    (("hyper", "n_push"), None),
    (("hyper", "learning_rate"), "0.1"),
    (("hyper", "learning_rate"), -0.1),
    (("hyper", "learning_rate"), float("inf")),
    (("hyper", "learning_rate"), None),
    (("hyper", "compression"), "gzip"),
    (("hyper", "compression"), None),
    (("hyper", "momentum"), 0.9),
    (("dataset",), None),
    (("dataset", "url"), "http://evil.example/shard"),
    (("dataset", "url"), "//evil.example/shard"),
    (("dataset", "url"), 5),
    (("dataset", "sha256"), "../../etc/passwd"),
    (("dataset", "sha256"), "a" * 63),
    (("dataset", "n_samples"), 0),
    (("dataset", "n_samples"), True),
    (("dataset", "n_samples"), None),
    (("dataset", "extra"), 1),
    (("layout",), []),
    (("layout",), {"0": []}),
    (("layout", 1), []),
    (("layout", 1), {"name": "out/kernel"}),
    (("layout", 0, 0), "dense/kernel"),
    (("layout", 0, 0, "name"), ""),
    (("layout", 0, 0, "name"), 3),
    (("layout", 0, 0, "shape"), [4, -2]),
    (("layout", 0, 0, "shape"), [4, True]),
    (("layout", 0, 0, "shape"), "4x2"),
    (("layout", 0, 0, "dtype"), "float64"),
    (("layout", 0, 0, "dtype"), None),
    (("layout", 0, 0, "trainable"), True),
    (("surprise",), 1),
]


@pytest.mark.parametrize(("path", "value"), BAD_FIELDS, ids=lambda p: repr(p))
def test_each_bad_field_of_a_lease_is_refused_as_bad_message(
    path: tuple[Any, ...], value: Any
) -> None:
    # Prepare
    wire = _wire()
    parent = wire
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value

    # Execute / Assert
    _refused(wire)


def test_anything_but_a_dict_is_refused_as_a_lease() -> None:
    _refused([LEASE_JSON])
    _refused(LEASE_JSON)


@pytest.mark.parametrize(
    "dataset",
    [
        {"url": "http://evil.example/shard", "sha256": "a" * 64, "n_samples": 1},
        {"url": "//evil.example/shard", "sha256": "a" * 64, "n_samples": 1},
        {"url": "/s/", "sha256": "../../etc/passwd", "n_samples": 1},
        {"url": "/s/", "sha256": "a" * 63, "n_samples": 1},
        {"url": "/s/", "sha256": "a" * 64, "n_samples": 0},
        {"url": "/s/", "sha256": "a" * 64, "n_samples": True},
        {"url": "/s/", "sha256": "a" * 64},
    ],
    ids=["absolute", "scheme-relative", "traversal", "short-hash", "empty", "bool", "missing"],
)
def test_a_lease_dataset_that_could_leak_the_token_or_escape_the_cache_is_refused(
    dataset: dict[str, Any],
) -> None:
    with pytest.raises(ProtocolError) as info:
        dataset_from_wire(dataset)

    assert info.value.code == ErrorCode.BAD_MESSAGE


# -- a push's loads ---------------------------------------------------------------------


def test_loads_are_written_as_the_fixed_test_vector() -> None:
    loads = [WeightsLoad(1, (4, 7)), WeightsLoad(3, (5, 7))]

    assert json.dumps(loads_to_wire(loads), separators=(",", ":")) == "[[1,[4,7]],[3,[5,7]]]"


def test_loads_round_trip() -> None:
    loads = [WeightsLoad(1, (4, 7)), WeightsLoad(3, (5, 7))]

    decoded = loads_from_wire(json.loads(json.dumps(loads_to_wire(loads))), 5, 2)

    assert decoded == loads
    assert [tuple(load) for load in decoded] == [(1, (4, 7)), (3, (5, 7))]


def test_no_loads_is_an_empty_list() -> None:
    assert loads_to_wire([]) == []
    assert loads_from_wire([], n_push=1, n_shards=3) == []


@pytest.mark.parametrize(
    "loads",
    [
        None,
        {"1": [4, 7]},
        [[1, [4, 7]]] * 5,  # n_push - 1 = 4 at most
        [[1, [4]]],  # one version per shard
        [[1, [4, 7, 9]]],
        [[1, [4, -7]]],
        [[-1, [4, 7]]],
        [[0, [4, 7]]],  # offset 0 runs on base_version
        [[5, [4, 7]]],  # offset n_push is the next round's first step
        [[3, [4, 7]], [1, [5, 7]]],  # offsets increase
        [[2, [4, 7]], [2, [5, 7]]],
        [[True, [4, 7]]],
        [[1, [4, 7.0]]],
        [[1, 4, 7]],
        [[1]],
        [(1, [4, 7])],
        [[1, (4, 7)]],
        ["1:4,7"],
    ],
)
def test_malformed_loads_are_refused_as_bad_message(loads: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        loads_from_wire(loads, n_push=5, n_shards=2)

    assert info.value.code == ErrorCode.BAD_MESSAGE
    assert info.value.message == (
        "push: loads must be at most n_push - 1 pairs [step offset, [a version per shard]]"
    )


def test_a_round_of_one_step_can_load_nothing() -> None:
    assert loads_from_wire([], n_push=1, n_shards=2) == []
    with pytest.raises(ProtocolError):
        loads_from_wire([[0, [1, 1]]], n_push=1, n_shards=2)


# -- server-initiated messages ------------------------------------------------------------


def test_job_finished_is_written_as_the_fixed_test_vector() -> None:
    text = message_to_wire(job_finished_message("9c4e0f21"))

    assert (
        text == '{"type":"job_finished","job_id":"9c4e0f21","message":"job 9c4e0f21 has finished"}'
    )
    assert message_from_wire(text, SERVER_MESSAGES) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"job_finished","message":"done"}',
        '{"type":"job_finished","job_id":7,"message":"done"}',
        '{"type":"job_finished","job_id":"j","message":"done","ref":"job:j","extra":1}',
    ],
)
def test_a_malformed_job_finished_is_refused(text: str) -> None:
    with pytest.raises(ProtocolError) as info:
        message_from_wire(text, SERVER_MESSAGES)

    assert info.value.code == ErrorCode.BAD_MESSAGE


def test_a_ban_is_an_error_whose_text_gives_the_reason() -> None:
    text = message_to_wire(banned_message("a spot check failed"))

    assert text == (
        '{"type":"error","code":"banned","message":"this agent is banned: a spot check failed"}'
    )


# -- close codes and error texts ------------------------------------------------------------


def test_the_close_codes_are_the_documented_numbers() -> None:
    assert {code.name: int(code) for code in CloseCode} == {
        "UNAUTHORIZED": 4401,
        "FORBIDDEN": 4403,
        "RATE_LIMITED": 4429,
    }


def test_every_error_code_has_a_standard_text() -> None:
    assert set(ERROR_TEXTS) == set(ErrorCode)
    assert all(text and text == text.strip() for text in ERROR_TEXTS.values())


def test_an_error_without_a_text_gets_its_codes_standard_text() -> None:
    assert error_message(ErrorCode.LEASE_EXPIRED, ref=4) == {
        "type": "error",
        "code": "lease_expired",
        "message": "the lease has expired; its work was reissued",
        "ref": 4,
    }
    assert ProtocolError(ErrorCode.NOT_REGISTERED).message == "send register first"


def test_an_error_text_can_be_overridden() -> None:
    msg = error_message(ErrorCode.LEASE_EXPIRED, "the lease ended at 12:00")

    assert msg["message"] == "the lease ended at 12:00"
    assert str(ProtocolError("unknown_lease", "no lease x")) == "no lease x"
