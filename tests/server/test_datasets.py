from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from tests.security import corpus

from downpour.training.actions.datasets import create_dataset
from downpour.training.datasets import DatasetRejected, parse_npz, sha256_file
from downpour.training.models import Dataset

from .helpers import npz_bytes, npz_upload, small_dataset

LIMIT = 10 << 20


def test_it_accepts_a_well_formed_dataset_and_counts_its_classes() -> None:
    parsed = parse_npz(npz_bytes(**small_dataset(classes=3)), LIMIT, LIMIT)
    assert parsed.input_shape == [8]
    assert parsed.n_classes == 3
    assert parsed.x_train.dtype == np.float32 and parsed.y_train.dtype == np.int64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y_train": np.zeros(5, dtype=np.int64)}, "x_train has 60 samples but y_train has 5"),
        ({"x_test": np.zeros((20, 9), dtype=np.float32)}, "x_test samples have [9]"),
        ({"x_train": np.array(["a"] * 60)}, "x_train must be numeric"),
        ({"x_train": np.full((60, 8), np.nan, dtype=np.float32)}, "NaN or infinity"),
        ({"y_train": -np.ones(60, dtype=np.int64)}, "class labels must lie in"),
        (
            {"x_test": np.zeros((0, 8), dtype=np.float32), "y_test": np.zeros(0, dtype=np.int64)},
            "the test split is empty",
        ),
    ],
)
def test_it_rejects_a_malformed_dataset_with_a_clear_reason(
    change: dict[str, np.ndarray], message: str
) -> None:
    arrays = {**small_dataset(), **change}
    with pytest.raises(DatasetRejected, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_npz(npz_bytes(**arrays), LIMIT, LIMIT)


def test_it_rejects_missing_arrays_by_name() -> None:
    arrays = small_dataset()
    del arrays["y_test"]
    with pytest.raises(DatasetRejected, match="missing arrays y_test"):
        parse_npz(npz_bytes(**arrays), LIMIT, LIMIT)


def test_it_never_unpickles_an_object_array() -> None:
    arrays = {**small_dataset(), "x_train": np.array([{"evil": 1}] * 60, dtype=object)}
    with pytest.raises(DatasetRejected, match="other than plain arrays"):
        parse_npz(npz_bytes(**arrays), LIMIT, LIMIT)


def test_it_rejects_bytes_that_are_not_an_npz() -> None:
    with pytest.raises(DatasetRejected, match="not a valid .npz"):
        parse_npz(b"PK\x03\x04 definitely not a zip", LIMIT, LIMIT)


def test_it_rejects_an_upload_over_the_size_limit() -> None:
    with pytest.raises(DatasetRejected, match="larger than the limit"):
        parse_npz(npz_bytes(**small_dataset()), 100, LIMIT)


@pytest.mark.django_db
def test_create_dataset_writes_verifiable_shards_and_the_test_split(alice) -> None:  # type: ignore[no-untyped-def]
    dataset = create_dataset(alice, "tiny", npz_upload(**small_dataset()), n_shards=4)
    shards = list(dataset.shards.all())
    assert [s.index for s in shards] == [0, 1, 2, 3]
    assert sum(s.n_samples for s in shards) == 60
    for shard in shards:
        assert sha256_file(Path(shard.path)) == shard.sha256
        with np.load(shard.path, allow_pickle=False) as npz:
            assert npz["x"].shape == (shard.n_samples, 8)
    with np.load(dataset.test_path, allow_pickle=False) as npz:
        assert npz["x"].shape == (20, 8)


@pytest.mark.django_db
def test_a_rejected_upload_leaves_nothing_behind(alice) -> None:  # type: ignore[no-untyped-def]
    bad = {**small_dataset(), "y_train": np.zeros(3, dtype=np.int64)}
    with pytest.raises(DatasetRejected):
        create_dataset(alice, "bad", npz_upload(**bad))
    assert Dataset.objects.count() == 0


@pytest.mark.django_db
def test_an_upload_that_would_inflate_past_the_setting_is_refused(alice, settings) -> None:  # type: ignore[no-untyped-def]
    # Prepare: 3.6 KiB of arrays, uncompressed, against a 2 KiB bound.
    settings.MAX_DATASET_EXPANDED_BYTES = 2048

    # Execute / Assert
    with pytest.raises(DatasetRejected, match="expands to 3.6 KiB, over the limit of 2.0 KiB"):
        create_dataset(alice, "big", npz_upload(**small_dataset()))
    assert Dataset.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("bomb", "reason"),
    [
        ("deflate-bomb-of-zeros", "inflates 10"),
        ("forged-npy-header", "promises [1048576, 1048576] float32 (4.0 TiB)"),
        ("declared-size-over-the-limit", "expands to 7.5 GiB, over the limit of 4.0 GiB"),
        ("central-directory-bomb", "central directory is 1.1 MiB"),
    ],
)
def test_a_bomb_upload_is_refused_in_the_form_and_nothing_is_stored(
    bomb: str,
    reason: str,
    alice,
    client,
    tmp_path: Path,
    settings,  # type: ignore[no-untyped-def]
) -> None:
    # Prepare: a media root of this test's own (test-fast's other workers store datasets
    # in the shared one while this runs).
    settings.MEDIA_ROOT = tmp_path / "media"
    artefact = corpus.build(bomb, tmp_path / "canary")
    client.force_login(alice)
    datasets_dir = Path(settings.MEDIA_ROOT) / "datasets"
    before = set(datasets_dir.iterdir()) if datasets_dir.exists() else set()

    # Execute
    response = client.post(
        reverse("portal:dataset_new"),
        {
            "name": bomb,
            "n_shards": 2,
            "file": SimpleUploadedFile(artefact.filename, artefact.data),
        },
    )

    # Assert: the researcher reads why, and neither a row nor a file was left.
    assert response.status_code == 200
    errors = response.context["form"].errors["file"]
    assert any(reason in error for error in errors), errors
    assert reason in response.content.decode()
    assert Dataset.objects.count() == 0
    after = set(datasets_dir.iterdir()) if datasets_dir.exists() else set()
    assert after == before
