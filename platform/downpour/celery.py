"""The Celery app: workers and beat run the server-side jobs in ``training/tasks.py``."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "downpour.settings")

app = Celery("downpour")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["downpour.training"])
