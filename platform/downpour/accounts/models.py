from __future__ import annotations

from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A person: a researcher who submits jobs, a donor who runs agents, or both."""

    is_researcher = models.BooleanField(default=False)
    is_donor = models.BooleanField(default=False)
    # Weighted max-min fair share of donated compute between researchers.
    share_weight = models.FloatField(default=1.0)
