"""Datasets: validate an upload and store its test split and training shards."""

from __future__ import annotations

import shutil
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Sum

from downpour.training import datasets
from downpour.training.media import media_dir
from downpour.training.models import Dataset, DatasetShard


def create_dataset(owner: Any, name: str, upload: Any, n_shards: int = 4) -> Dataset:
    """Validate an uploaded ``.npz`` and store its test split and training shards."""
    parsed = datasets.parse_npz(
        upload,
        settings.DATASET_MAX_BYTES,
        settings.MAX_DATASET_EXPANDED_BYTES,
        settings.MAX_DATASET_STORED_BYTES,
    )
    _check_dataset_quota(owner, parsed.stored_bytes)
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
    dataset.stored_bytes = test_path.stat().st_size + sum(shard.size_bytes for shard in shards)
    try:
        with transaction.atomic():
            # Again under the owner's row lock: two uploads at once cannot both pass.
            _check_dataset_quota(owner, dataset.stored_bytes, lock=True)
            dataset.save()
            DatasetShard.objects.bulk_create(shards)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return dataset


def _check_dataset_quota(owner: Any, new_bytes: int, lock: bool = False) -> None:
    users = get_user_model().objects
    user = (users.select_for_update() if lock else users).get(pk=owner.pk)
    held = Dataset.objects.filter(owner=user).aggregate(total=Sum("stored_bytes"))["total"] or 0
    quota = user.quota("max_dataset_bytes")
    if held + new_bytes > quota:
        raise datasets.DatasetRejected(
            f"this dataset takes {new_bytes / 2**20:.1f} MiB and your datasets already take "
            f"{held / 2**20:.1f} MiB; your quota is {quota / 2**20:.0f} MiB"
        )
