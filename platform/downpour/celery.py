"""The Celery app: workers and beat run the server-side jobs in ``training/tasks.py``."""

from __future__ import annotations

import faulthandler
import os
from typing import Any

from celery import Celery
from celery.concurrency import get_implementation
from celery.signals import worker_init

from downpour.devprocs import STACKS_SIGNAL

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "downpour.settings")

app = Celery("downpour")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["downpour.training"])


@worker_init.connect
def prepare_worker(sender: Any = None, **_: Any) -> None:
    """Arm the stack dump, then import TensorFlow in the main thread, before the pool exists.

    Starting a job, evaluating, replaying and root gradients all need TensorFlow. Left to
    the first such task, the import (6 s idle, far longer on a busy machine) runs in a pool
    thread beside the other thread's tasks and the consumer. A CI run once saw a worker
    finish no task for 2 minutes from the moment its first job began to start; this
    import is the one heavy first-time step there. Beat and the production server never
    import it. Only a threads pool gets it: a forked child must not inherit it.
    """
    faulthandler.register(STACKS_SIGNAL, all_threads=True)
    if get_implementation(sender.pool_cls).__module__ == "celery.concurrency.thread":
        import tensorflow  # noqa: F401
