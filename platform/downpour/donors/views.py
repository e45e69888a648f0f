"""Pages for donors: agent tokens, devices, credit and the leaderboard."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Sum
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from downpour.accounts.http import AuthenticatedRequest
from downpour.accounts.models import User
from downpour.training.actions.control import revoke_token
from downpour.training.queries import device_activity

from .models import Agent, AgentToken


@login_required
def dashboard(request: AuthenticatedRequest) -> HttpResponse:
    agents = (
        Agent.objects.filter(token__owner=request.user).select_related("token").order_by("name")
    )
    leaderboard = (
        User.objects.filter(agenttoken__agents__isnull=False)
        .annotate(total=Sum("agenttoken__agents__credit"))
        .order_by("-total")[:20]
    )
    return render(
        request,
        "donors/dashboard.html",
        {
            "tokens": AgentToken.objects.filter(owner=request.user).order_by("-created_at"),
            "agents": device_activity(list(agents), timezone.now()),
            "credit": agents.aggregate(total=Sum("credit"))["total"] or 0.0,
            "leaderboard": leaderboard,
            "new_token": request.session.pop("new_token", None),
            "site_root": request.build_absolute_uri("/").rstrip("/"),
        },
    )


@login_required
@require_POST
def leaderboard_settings(request: AuthenticatedRequest) -> HttpResponse:
    """The donor chooses whether the leaderboard names them, and how."""
    user = request.user
    user.show_on_leaderboard = request.POST.get("show_on_leaderboard") == "on"
    user.display_name = (request.POST.get("display_name") or "").strip()[:50]
    user.save(update_fields=["show_on_leaderboard", "display_name"])
    messages.info(
        request,
        f"The leaderboard shows you as {user.leaderboard_name}.",
    )
    return redirect("donors:dashboard")


@login_required
@require_POST
def token_new(request: AuthenticatedRequest) -> HttpResponse:
    name = (request.POST.get("name") or "my PC").strip()[:100]
    _, plain = AgentToken.issue(request.user, name)
    # Shown once on the next page, then only its hash remains.
    request.session["new_token"] = plain
    return redirect("donors:dashboard")


@login_required
@require_POST
def token_revoke(request: AuthenticatedRequest, token_id: str) -> HttpResponse:
    token = get_object_or_404(AgentToken, id=token_id, owner=request.user)
    if revoke_token(token):
        messages.info(request, f"Token {token.name} revoked; its agents were cut off.")
    return redirect("donors:dashboard")
