"""Where the server keeps files: datasets, exported models, checkpoints (under MEDIA_ROOT)."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings


def media_dir(*parts: str) -> Path:
    path = Path(settings.MEDIA_ROOT).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
