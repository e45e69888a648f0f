from __future__ import annotations

from django.apps import AppConfig


class DonorsConfig(AppConfig):
    name = "downpour.donors"
    label = "donors"
