"""Deployment checks of our own, run by ``manage.py check --deploy``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, register


@register(Tags.security, deploy=True)
def check_secret_key_is_not_published(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    if settings.SECRET_KEY in settings.KNOWN_SECRET_KEYS:
        return [
            Error(
                "SECRET_KEY is a default published in the Downpour repository.",
                hint="Set SECRET_KEY in the environment to a long random string.",
                id="downpour.E001",
            )
        ]
    return []
