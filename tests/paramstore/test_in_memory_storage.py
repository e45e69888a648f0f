"""InMemoryStorage honours the ShardStorage contract."""

from __future__ import annotations

import numpy as np
import pytest

from downpour.paramstore import CommitOutcome, InMemoryStorage, ShardState


def state(version: int, value: float, size: int = 4) -> ShardState:
    return ShardState(
        version, np.full(size, value, np.float32), np.full(size, value + 0.5, np.float32)
    )


def test_a_missing_shard_loads_as_none() -> None:
    storage = InMemoryStorage()

    assert storage.load("job", 0) is None
    assert storage.load_version("job", 0) is None
    assert storage.was_applied("job", 0, "p") is False


def test_commit_applies_once_then_reports_duplicates_and_conflicts() -> None:
    storage = InMemoryStorage()
    storage.initialize("job", 0, state(0, 1.0))

    applied = storage.commit("job", 0, 0, state(1, 2.0), "p1")
    duplicate = storage.commit("job", 0, 1, state(2, 3.0), "p1")
    conflict = storage.commit("job", 0, 0, state(1, 4.0), "p2")

    assert (applied, duplicate, conflict) == (
        CommitOutcome.APPLIED,
        CommitOutcome.DUPLICATE,
        CommitOutcome.CONFLICT,
    )
    loaded = storage.load("job", 0)
    assert loaded is not None
    assert loaded.version == 1
    np.testing.assert_array_equal(loaded.weights, np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(loaded.accumulators, np.full(4, 2.5, np.float32))
    assert storage.was_applied("job", 0, "p1") and not storage.was_applied("job", 0, "p2")


def test_a_commit_to_a_missing_shard_is_a_conflict() -> None:
    assert InMemoryStorage().commit("job", 0, 0, state(1, 1.0), "p") is CommitOutcome.CONFLICT


def test_a_commit_must_carry_the_next_version() -> None:
    storage = InMemoryStorage()
    storage.initialize("job", 0, state(0, 1.0))

    with pytest.raises(ValueError, match="expected_version \\+ 1 = 1"):
        storage.commit("job", 0, 0, state(5, 1.0), "p")


def test_neither_the_caller_nor_a_reader_can_alias_stored_arrays() -> None:
    storage = InMemoryStorage()
    given = state(0, 1.0)
    storage.initialize("job", 0, given)
    committed = state(1, 2.0)
    storage.commit("job", 0, 0, committed, "p")

    given.weights[:] = 9.0
    committed.weights[:] = 9.0
    loaded = storage.load("job", 0)
    assert loaded is not None
    loaded.weights[:] = 9.0
    loaded.accumulators[:] = 9.0

    again = storage.load("job", 0)
    assert again is not None
    np.testing.assert_array_equal(again.weights, np.full(4, 2.0, np.float32))
    np.testing.assert_array_equal(again.accumulators, np.full(4, 2.5, np.float32))


def test_initialize_overwrites_the_shard_and_forgets_its_push_ids() -> None:
    storage = InMemoryStorage()
    storage.initialize("job", 0, state(0, 1.0))
    storage.commit("job", 0, 0, state(1, 2.0), "p")

    storage.initialize("job", 0, state(7, 3.0))

    assert storage.load_version("job", 0) == 7
    assert not storage.was_applied("job", 0, "p")


def test_only_the_most_recent_push_ids_are_remembered() -> None:
    storage = InMemoryStorage(applied_capacity=3)
    storage.initialize("job", 0, state(0, 0.0))

    for version in range(5):
        storage.commit("job", 0, version, state(version + 1, 1.0), f"p{version}")

    remembered = [storage.was_applied("job", 0, f"p{v}") for v in range(5)]
    assert remembered == [False, False, True, True, True]


def test_delete_removes_every_shard_of_the_job_and_nothing_else() -> None:
    storage = InMemoryStorage()
    for shard in range(3):
        storage.initialize("alice", shard, state(0, 1.0))
    storage.initialize("bob", 0, state(0, 1.0))

    storage.delete("alice")
    storage.delete("never-existed")

    assert [storage.load_version("alice", s) for s in range(3)] == [None, None, None]
    assert storage.load_version("bob", 0) == 0
