"""Request types for views behind ``login_required``."""

from __future__ import annotations

from django.http import HttpRequest

from .models import User


class AuthenticatedRequest(HttpRequest):
    """What a ``login_required`` view receives: ``user`` is a real ``User``, never anonymous.

    Only a type: Django still passes its own ``HttpRequest``.
    """

    user: User
