"""The operators' overview; the Django admin holds everything else."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from downpour.donors.models import Agent, AgentToken
from downpour.training.actions.bans import OPERATOR_BAN_REASON, lift_ban
from downpour.training.actions.control import ban_agent, revoke_token
from downpour.training.models import Job, Lease
from downpour.training.queries import fairness_windows, robust_jobs_waiting

from .totals import read_totals


@staff_member_required
def overview(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "console/overview.html",
        {
            "agents": Agent.objects.select_related("token__owner").order_by("-last_seen_at")[:200],
            "jobs": Job.objects.select_related("owner").order_by("-created_at")[:200],
            "active_leases": Lease.objects.filter(status=Lease.Status.ACTIVE).count(),
            "totals": read_totals(timezone.now()),
            "fairness": fairness_windows(timezone.now()),
            "robust_waiting": robust_jobs_waiting(),
            "trusted_online": Agent.objects.filter(
                connected=True, banned_at__isnull=True, token__is_trusted=True
            ).count(),
        },
    )


@staff_member_required
@require_POST
def agent_control(request: HttpRequest, agent_id: str, action: str) -> HttpResponse:
    """Ban or unban an agent, or revoke its token; the page's buttons confirm first."""
    agent = get_object_or_404(Agent.objects.select_related("token"), id=agent_id)
    if action == "ban":
        reason = (request.POST.get("reason") or "").strip() or OPERATOR_BAN_REASON
        done = ban_agent(agent, reason)
        messages.info(request, f"Agent {agent.name} banned." if done else "Already banned.")
    elif action == "unban":
        lift_ban(agent)
        messages.info(request, f"Agent {agent.name}'s ban lifted.")
    elif action == "revoke-token":
        done = revoke_token(AgentToken.objects.get(id=agent.token_id))
        messages.info(request, f"Token {agent.token.name} revoked." if done else "Already revoked.")
    else:
        raise Http404("no such action")
    return redirect("console:overview")
