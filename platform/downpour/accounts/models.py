from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A person: a researcher who submits jobs, a donor who runs agents, or both."""

    is_researcher = models.BooleanField(default=False)
    is_donor = models.BooleanField(default=False)
    # Weighted max-min fair share of donated compute between researchers.
    share_weight = models.FloatField(default=1.0)
    # Quotas set by operators in the admin; empty means the settings' default (QUOTA_*).
    max_active_jobs = models.IntegerField(
        null=True, blank=True, help_text="queued, running or paused jobs at once"
    )
    max_dataset_bytes = models.BigIntegerField(
        null=True, blank=True, help_text="bytes of all stored datasets together"
    )
    max_params_per_job = models.BigIntegerField(
        null=True, blank=True, help_text="trainable parameters of one job's model"
    )
    max_store_bytes = models.BigIntegerField(
        null=True, blank=True, help_text="parameter-store memory of all active jobs together"
    )

    def quota(self, name: str) -> int:
        """The user's quota ``name`` (e.g. ``"max_active_jobs"``), or the settings' default."""
        own = getattr(self, name)
        return int(own if own is not None else getattr(settings, f"QUOTA_{name[4:].upper()}"))

    # The donor leaderboard names a donor only if they opt in, by their display name if
    # they give one; everyone else is an "anonymous donor".
    show_on_leaderboard = models.BooleanField(default=False)
    display_name = models.CharField(max_length=50, blank=True)

    @property
    def leaderboard_name(self) -> str:
        if not self.show_on_leaderboard:
            return "anonymous donor"
        return self.display_name or self.username
