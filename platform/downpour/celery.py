"""The Celery app: workers and beat run the server-side jobs in ``training/tasks.py``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "downpour.settings")

app = Celery("downpour")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["downpour.training"])


@worker_init.connect
def import_tensorflow(**_: Any) -> None:
    """Import TensorFlow in the worker's main thread, before its pool threads exist.

    Starting a job, evaluating, replaying and root gradients all need it. Left to the
    first such task, the import (6 s idle, far longer on a busy machine) runs in a pool
    thread beside the other thread's tasks and the consumer. A CI run once saw a worker
    finish no task for 2 minutes from the moment its first job began to start; this
    import is the one heavy first-time step there. Beat, the server and ``manage.py``
    never load it.
    """
    import tensorflow  # noqa: F401
