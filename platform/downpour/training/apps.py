from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_save


class TrainingConfig(AppConfig):
    name = "downpour.training"
    label = "training"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model

        post_save.connect(_cut_off_if_deactivated, sender=get_user_model())


def _cut_off_if_deactivated(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    """However an account is deactivated (admin, shell), its agents stop at once."""
    if not created and not instance.is_active:
        from .actions.control import cut_off_user

        cut_off_user(instance)
