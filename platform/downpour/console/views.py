"""The operators' overview; the Django admin holds everything else."""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from downpour.donors.models import Agent
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
