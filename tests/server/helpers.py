from __future__ import annotations

import io
import json
from functools import cache
from typing import Any

import numpy as np
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client


def npz_bytes(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npz_upload(**arrays: Any) -> SimpleUploadedFile:
    return SimpleUploadedFile("data.npz", npz_bytes(**arrays))


def small_dataset(
    n_train: int = 60, n_test: int = 20, features: int = 8, classes: int = 3
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.random((n_train, features), dtype=np.float32),
        "y_train": rng.integers(0, classes, n_train),
        "x_test": rng.random((n_test, features), dtype=np.float32),
        "y_test": rng.integers(0, classes, n_test),
    }


@cache
def _mlp_json(inputs: int, hidden: int, classes: int) -> str:
    from downpour.digits import mlp_json

    return mlp_json([hidden], inputs=inputs, classes=classes)


def mlp_config(inputs: int = 8, hidden: int = 16, classes: int = 3) -> dict[str, Any]:
    """Keras 3's own ``to_json()`` of a small Sequential MLP, as a researcher submits it."""
    return dict(json.loads(_mlp_json(inputs, hidden, classes)))


def job_form(name: str, dataset_id: object, model_json: str, **extra: Any) -> dict[str, Any]:
    """The job form's fields as a researcher fills them in, for ``Client.post``."""
    return {
        "name": name,
        "dataset": str(dataset_id),
        "model_json": model_json,
        "loss": "sparse_categorical_crossentropy",
        "learning_rate": 0.05,
        "batch_size": 32,
        "n_fetch": 1,
        "n_push": 1,
        "n_param_shards": 2,
        "compression": "none",
        "max_staleness": 16,
        "warm_start_pushes": 0,
        "target_accuracy": 0.9,
        **extra,
    }


def job_params(**overrides: Any) -> Any:
    """``actions.JobParams`` of a small MLP job on ``small_dataset``, with ``overrides``."""
    from downpour.training.actions.jobs import JobParams

    base: dict[str, Any] = {"name": "mlp", "model_json": mlp_config(), "target_accuracy": 0.9}
    return JobParams(**{**base, **overrides})


def client_of(user: Any) -> Client:
    """A test client logged in as ``user``."""
    client = Client()
    client.force_login(user)
    return client
