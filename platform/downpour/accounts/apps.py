from __future__ import annotations

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "downpour.accounts"
    label = "accounts"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the deploy checks
