"""Checkpoints of the parameter store: round trip, atomic writes and damaged files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from downpour.paramstore import (
    AdagradConfig,
    CorruptCheckpoint,
    InMemoryStorage,
    ParameterStore,
    ShardLayout,
    VariableSpec,
    read_checkpoint,
    write_checkpoint,
)

OPTIMIZER = AdagradConfig(learning_rate=0.1)


def trained_store(job: str = "alice-job") -> ParameterStore:
    specs = [
        VariableSpec("embed", (50, 8)),
        VariableSpec("dense/kernel", (8, 16)),
        VariableSpec("dense/bias", (16,)),
    ]
    layout = ShardLayout.balanced(specs, 2)
    store = ParameterStore(InMemoryStorage(), job, layout, OPTIMIZER, max_staleness=4)
    rng = np.random.default_rng(0)
    store.initialize({s.name: rng.standard_normal(s.shape, dtype=np.float32) for s in specs})
    for step in range(3):
        for shard, group in enumerate(layout.shards):
            grad = {s.name: rng.standard_normal(s.shape, dtype=np.float32) for s in group}
            store.push(shard, grad, step, f"step{step}")
    return store


def states_bytes(states: list) -> list[tuple[int, bytes, bytes]]:  # type: ignore[type-arg]
    return [(s.version, s.weights.tobytes(), s.accumulators.tobytes()) for s in states]


def test_a_checkpoint_reads_back_exactly_what_was_written(tmp_path: Path) -> None:
    store = trained_store()
    path = tmp_path / "job.npz"
    meta = {"job": "alice-job", "step": 3, "note": "ünïcode"}

    digest = write_checkpoint(path, store.layout, store.snapshot(), meta)
    checkpoint = read_checkpoint(path)

    assert checkpoint.layout == store.layout
    assert states_bytes(checkpoint.states) == states_bytes(store.snapshot())
    assert checkpoint.meta == meta
    assert digest == checkpoint.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_restoring_a_checkpoint_into_a_fresh_store_gives_identical_state(tmp_path: Path) -> None:
    store = trained_store()
    path = tmp_path / "job.npz"
    write_checkpoint(path, store.layout, store.snapshot(), {})
    checkpoint = read_checkpoint(path)
    fresh = ParameterStore(InMemoryStorage(), "alice-job", checkpoint.layout, OPTIMIZER, 4)

    fresh.restore(checkpoint.states)

    assert states_bytes(fresh.snapshot()) == states_bytes(store.snapshot())
    assert fresh.versions() == [3, 3]
    grad = {s.name: np.ones(s.shape, np.float32) for s in checkpoint.layout.shards[0]}
    assert fresh.push(0, grad, 3, "after-restore").version == 4


def test_a_write_leaves_no_temporary_files_and_replaces_an_older_checkpoint(
    tmp_path: Path,
) -> None:
    store = trained_store()
    path = tmp_path / "job.npz"
    write_checkpoint(path, store.layout, store.snapshot(), {"round": 1})

    write_checkpoint(path, store.layout, store.snapshot(), {"round": 2})

    assert os.listdir(tmp_path) == ["job.npz"]
    assert read_checkpoint(path).meta == {"round": 2}


def test_metadata_that_is_not_json_fails_before_any_file_is_created(tmp_path: Path) -> None:
    store = trained_store()

    with pytest.raises(TypeError):
        write_checkpoint(tmp_path / "job.npz", store.layout, store.snapshot(), {"x": object()})

    assert os.listdir(tmp_path) == []


def test_a_truncated_checkpoint_raises_a_clear_error(tmp_path: Path) -> None:
    store = trained_store()
    path = tmp_path / "job.npz"
    write_checkpoint(path, store.layout, store.snapshot(), {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CorruptCheckpoint, match="job.npz: unreadable checkpoint .* truncated"):
        read_checkpoint(path)


def test_a_checkpoint_whose_arrays_do_not_match_its_layout_is_refused(tmp_path: Path) -> None:
    layout = ShardLayout.balanced([VariableSpec("w", (10,))], 1)
    manifest = {
        "format": "downpour-paramstore",
        "format_version": 1,
        "layout": layout.to_json(),
        "meta": {},
    }
    path = tmp_path / "bad.npz"
    with path.open("wb") as handle:
        np.savez(
            handle,
            manifest=np.array(json.dumps(manifest)),
            w0=np.zeros(8, np.float32),
            a0=np.zeros(8, np.float32),
            v0=np.array(0, np.int64),
        )

    with pytest.raises(
        CorruptCheckpoint, match=r"shard 0 weights should be float32 with shape \(10,\)"
    ):
        read_checkpoint(path)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    with path.open("wb") as handle:
        np.savez(handle, x=np.zeros(3))

    with pytest.raises(CorruptCheckpoint, match="other.npz: unreadable checkpoint"):
        read_checkpoint(path)


def test_a_checkpoint_with_an_unexpected_digest_is_refused(tmp_path: Path) -> None:
    store = trained_store()
    path = tmp_path / "job.npz"
    write_checkpoint(path, store.layout, store.snapshot(), {})

    with pytest.raises(CorruptCheckpoint, match="sha256 is .* expected 00"):
        read_checkpoint(path, expected_sha256="00" * 32)
