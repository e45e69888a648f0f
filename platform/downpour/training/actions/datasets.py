"""Datasets: validate an upload and store its test split and training shards."""

from __future__ import annotations

import shutil
from typing import Any

from django.conf import settings
from django.db import transaction

from downpour.training import datasets
from downpour.training.media import media_dir
from downpour.training.models import Dataset, DatasetShard


def create_dataset(owner: Any, name: str, upload: Any, n_shards: int = 4) -> Dataset:
    """Validate an uploaded ``.npz`` and store its test split and training shards."""
    parsed = datasets.parse_npz(
        upload, settings.DATASET_MAX_BYTES, settings.MAX_DATASET_EXPANDED_BYTES
    )
    dataset = Dataset(
        owner=owner,
        name=name[:100] or "dataset",
        n_train=len(parsed.x_train),
        n_test=len(parsed.x_test),
        input_shape=parsed.input_shape,
        y_dtype=str(parsed.y_train.dtype),
        n_classes=parsed.n_classes,
        test_path="",
        sha256="",
    )
    folder = media_dir("datasets", str(dataset.id))
    test_path = folder / "test.npz"
    dataset.sha256 = datasets.write_npz_atomic(test_path, x=parsed.x_test, y=parsed.y_test)
    dataset.test_path = str(test_path)
    shards = []
    for index, (x, y) in enumerate(datasets.split_train(parsed, n_shards)):
        path = folder / f"shard-{index}.npz"
        digest = datasets.write_npz_atomic(path, x=x, y=y)
        shards.append(
            DatasetShard(
                dataset=dataset,
                index=index,
                path=str(path),
                sha256=digest,
                n_samples=len(x),
                size_bytes=path.stat().st_size,
            )
        )
    try:
        with transaction.atomic():
            dataset.save()
            DatasetShard.objects.bulk_create(shards)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return dataset
