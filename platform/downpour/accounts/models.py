from __future__ import annotations

from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A person: a researcher who submits jobs, a donor who runs agents, or both."""

    is_researcher = models.BooleanField(default=False)
    is_donor = models.BooleanField(default=False)
    # Weighted max-min fair share of donated compute between researchers.
    share_weight = models.FloatField(default=1.0)
    # The donor leaderboard names a donor only if they opt in, by their display name if
    # they give one; everyone else is an "anonymous donor".
    show_on_leaderboard = models.BooleanField(default=False)
    display_name = models.CharField(max_length=50, blank=True)

    @property
    def leaderboard_name(self) -> str:
        if not self.show_on_leaderboard:
            return "anonymous donor"
        return self.display_name or self.username
