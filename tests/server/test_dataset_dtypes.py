"""Datasets keep their uploaded dtype when stored (issue 10, Medium 4)."""

from __future__ import annotations

import numpy as np
import pytest

from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.evaluations import evaluate_job
from downpour.training.actions.jobs import start_job, submit_job
from downpour.training.datasets import DatasetRejected, parse_npz

from .helpers import job_params, npz_bytes, npz_upload

pytestmark = pytest.mark.django_db


def pixels(n_train: int = 600, n_test: int = 200) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, 8), dtype=np.uint8),
        "y_train": rng.integers(0, 3, n_train),
        "x_test": rng.integers(0, 256, (n_test, 8), dtype=np.uint8),
        "y_test": rng.integers(0, 3, n_test),
    }


def test_a_uint8_dataset_stays_uint8_in_its_shards_and_test_split(alice) -> None:  # type: ignore[no-untyped-def]
    dataset = create_dataset(alice, "bytes", npz_upload(**pixels()), n_shards=2)

    for path in [dataset.test_path, *(s.path for s in dataset.shards.all())]:
        with np.load(path, allow_pickle=False) as npz:
            assert npz["x"].dtype == np.uint8
    # 800 samples of 8 bytes, plus labels and headers: far from 800 × 8 × 4 of float32.
    assert dataset.stored_bytes < 800 * 8 + 800 * 8 + 4096


def test_float64_features_are_stored_as_float32() -> None:
    data = {k: (v.astype(np.float64) if k.startswith("x") else v) for k, v in pixels().items()}

    parsed = parse_npz(npz_bytes(**data), 1 << 30, 1 << 30)

    assert parsed.x_train.dtype == np.float32 and parsed.x_test.dtype == np.float32


def test_a_dataset_whose_stored_size_passes_the_limit_is_refused(alice, settings) -> None:  # type: ignore[no-untyped-def]
    settings.MAX_DATASET_STORED_BYTES = 4096

    with pytest.raises(DatasetRejected, match="stored, over the limit"):
        create_dataset(alice, "bytes", npz_upload(**pixels()))


def test_a_uint8_dataset_evaluates_exactly_like_its_float32_copy(alice) -> None:  # type: ignore[no-untyped-def]
    as_bytes = pixels()
    as_floats = {k: (v.astype(np.float32) if k.startswith("x") else v) for k, v in as_bytes.items()}
    scores = []
    for name, arrays in (("bytes", as_bytes), ("floats", as_floats)):
        dataset = create_dataset(alice, name, npz_upload(**arrays), n_shards=2)
        job = submit_job(alice, dataset, job_params(name=name))
        assert start_job(job)
        job.refresh_from_db()
        point = evaluate_job(job)
        assert point is not None
        scores.append((point.accuracy, point.loss))

    assert scores[0] == pytest.approx(scores[1], rel=1e-6)
