"""The teacher workload: deterministic, balanced enough, and an upload the real stack takes."""

from __future__ import annotations

import io

import numpy as np

from downpour.teacher import TEACHER_CLASSES, TEACHER_INPUTS, teacher_data, teacher_npz_bytes


def test_it_is_the_same_data_for_the_same_seed_and_other_data_for_another() -> None:
    first, again = teacher_data(1000, 100), teacher_data(1000, 100)
    other = teacher_data(1000, 100, seed=1)
    assert np.array_equal(first.x_train, again.x_train)
    assert np.array_equal(first.y_test, again.y_test)
    assert not np.array_equal(first.x_train, other.x_train)


def test_it_matches_the_documented_algorithm_on_a_test_vector() -> None:
    data = teacher_data(8, 4)
    np.testing.assert_allclose(
        data.x_train[0, :4], [1.045981, 0.37639594, -1.2763841, -0.47283992], rtol=1e-6
    )
    assert data.y_train.tolist() == [8, 2, 4, 1, 7, 8, 1, 5]
    assert data.y_test.tolist() == [3, 1, 5, 8]


def test_it_has_the_stated_shapes_and_dtypes_and_uses_every_class() -> None:
    data = teacher_data(20_000, 2_000)
    assert data.x_train.shape == (20_000, TEACHER_INPUTS) and data.x_train.dtype == np.float32
    assert data.y_train.dtype == np.int64 and data.x_test.shape == (2_000, TEACHER_INPUTS)
    shares = np.bincount(data.y_train, minlength=TEACHER_CLASSES) / len(data.y_train)
    assert shares.min() > 0.02 and shares.max() < 0.3  # no class vanishes or dominates


def test_its_upload_holds_the_four_arrays_a_job_reads() -> None:
    with np.load(io.BytesIO(teacher_npz_bytes(500, 50))) as npz:
        assert sorted(npz.files) == ["x_test", "x_train", "y_test", "y_train"]
        assert npz["x_train"].shape == (500, TEACHER_INPUTS)
        assert np.array_equal(npz["y_test"], teacher_data(500, 50).y_test)
