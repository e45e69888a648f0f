"""The job page's chart data: every evaluation of the job and of the researcher's other
runs on the same dataset, with the job's live counters for a throughput point per poll."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import JsonResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone

from downpour.accounts.http import AuthenticatedRequest
from downpour.training.models import Evaluation, Job
from downpour.training.trainloss import training_loss

#: Other runs on the dataset shown for comparison, newest first.
MAX_OTHER_RUNS = 6
#: Evaluations sent per run; a longer series is thinned evenly (the last point kept).
MAX_POINTS = 1500


def _points(job: Job) -> list[list[float]]:
    rows = list(
        Evaluation.objects.filter(job=job)
        .order_by("created_at")
        .values_list("elapsed_s", "accuracy", "loss", "samples")
    )
    if len(rows) > MAX_POINTS:
        step = len(rows) / MAX_POINTS
        rows = [rows[int(i * step)] for i in range(MAX_POINTS - 1)] + [rows[-1]]
    return [[round(e, 3), a, loss, s] for e, a, loss, s in rows]


def _run(job: Job, current: bool) -> dict[str, Any]:
    return {"id": str(job.id), "name": job.name, "current": current, "points": _points(job)}


@login_required
def job_chart(request: AuthenticatedRequest, job_id: str) -> JsonResponse:
    """``points`` are ``[elapsed_s, test accuracy, test loss, samples]``; ``now_s`` is the
    job's age (seconds since it started) as the server reads it, with ``samples_done``;
    ``train_loss`` is the agents' ``[elapsed_s, training loss]``.

    ``?others=1`` adds the owner's other jobs on the same dataset.
    """
    jobs = Job.objects.all() if request.user.is_staff else Job.objects.filter(owner=request.user)
    job = get_object_or_404(jobs.select_related("dataset"), id=job_id)
    now_s = None
    if job.started_at is not None:
        end = job.finished_at or timezone.now()
        now_s = round((end - job.started_at).total_seconds(), 3)
    train_loss = []
    if job.started_at is not None:
        start = job.started_at.timestamp()
        train_loss = [[round(t - start, 3), loss] for t, loss in training_loss(job.id)]
    runs = [_run(job, current=True)]
    if request.GET.get("others"):
        others = (
            Job.objects.filter(owner=job.owner, dataset=job.dataset)
            .exclude(id=job.id)
            .order_by("-created_at")[:MAX_OTHER_RUNS]
        )
        runs += [_run(other, current=False) for other in others]
    return JsonResponse(
        {
            "status": job.status,
            "now_s": now_s,
            "samples_done": job.samples_done,
            "pushes_accepted": job.pushes_accepted,
            "pushes_rejected": job.pushes_rejected,
            "target_accuracy": job.target_accuracy,
            "runs": runs,
            "train_loss": train_loss,
        }
    )
