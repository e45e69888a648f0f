"""Pages for researchers: datasets, jobs, live progress, downloads."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from downpour.accounts.http import AuthenticatedRequest
from downpour.paramstore import DEFAULT_MAX_GRAD_NORM
from downpour.training.actions import control
from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.jobs import JobParams, JobRejected, submit_job
from downpour.training.datasets import DatasetRejected
from downpour.training.models import Dataset, Job
from downpour.training.queries import (
    inner_steps_by_agent,
    job_activity,
    robust_summary,
    spot_check_summary,
    staleness_summary,
    sync_summary,
)
from downpour.uploads import OVER_LIMIT

from .forms import DatasetForm, JobForm, SignupForm


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/home.html")


def signup(request: HttpRequest) -> HttpResponse:
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user)
        return redirect(
            "donors:dashboard" if user.is_donor and not user.is_researcher else "portal:jobs"
        )
    return render(request, "registration/signup.html", {"form": form})


@login_required
def jobs(request: AuthenticatedRequest) -> HttpResponse:
    return render(
        request,
        "portal/jobs.html",
        {
            "jobs": Job.objects.filter(owner=request.user).order_by("-created_at"),
            "datasets": Dataset.objects.filter(owner=request.user).order_by("-created_at"),
        },
    )


@login_required
def dataset_new(request: AuthenticatedRequest) -> HttpResponse:
    form = DatasetForm(request.POST or None, request.FILES or None)
    if _upload_over_limit(request, form):
        pass
    elif request.method == "POST" and form.is_valid():
        try:
            dataset = create_dataset(
                request.user,
                form.cleaned_data["name"],
                form.cleaned_data["file"],
                form.cleaned_data["n_shards"],
            )
        except DatasetRejected as exc:
            form.add_error("file", str(exc))
        else:
            messages.success(
                request,
                f"Dataset {dataset.name}: {dataset.n_train} training and "
                f"{dataset.n_test} test samples of shape {dataset.input_shape}.",
            )
            return redirect("portal:jobs")
    return render(request, "portal/dataset_new.html", {"form": form})


@login_required
def job_new(request: AuthenticatedRequest) -> HttpResponse:
    form = JobForm(
        request.user,
        request.POST or None,
        request.FILES or None,
        initial=_clone_initial(request),
    )
    if _upload_over_limit(request, form):
        pass
    elif request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        params = JobParams(
            name=data["name"],
            model_json=data["model_json"],
            loss=data["loss"],
            learning_rate=data["learning_rate"],
            batch_size=data["batch_size"],
            n_fetch=data["n_fetch"],
            n_push=data["n_push"],
            n_param_shards=data["n_param_shards"],
            compression=data["compression"],
            max_staleness=data["max_staleness"],
            staleness_aware_lr=data["staleness_aware_lr"],
            weight_average=data["weight_average"] or 0.0,
            warm_start_pushes=data["warm_start_pushes"] or 0,
            robust_aggregation=data["robust_aggregation"],
            max_grad_norm=(
                DEFAULT_MAX_GRAD_NORM if data["max_grad_norm"] is None else data["max_grad_norm"]
            ),
            spot_check_fraction=(
                0.05 if data["spot_check_fraction"] is None else data["spot_check_fraction"]
            ),
            initial_weights=_read_upload(data["initial_weights"]),
            target_accuracy=data["target_accuracy"],
            budget_samples=data["budget_samples"],
            budget_seconds=data["budget_seconds"],
            **_local_steps_params(data),
            sync_workers=_or(data["sync_workers"], 2),
            sync_backups=_or(data["sync_backups"], 1),
            sync_step_timeout_s=_or(data["sync_step_timeout_s"], 10.0),
            lbfgs_history=_or(data["lbfgs_history"], 10),
            sandblaster_units=_or(data["sandblaster_units"], 24),
        )
        try:
            job = submit_job(request.user, data["dataset"], params)
        except JobRejected as exc:
            form.add_error(None, str(exc))
        else:
            return redirect("portal:job", job_id=job.id)
    return render(request, "portal/job_new.html", {"form": form})


def _local_steps_params(data: dict[str, Any]) -> dict[str, Any]:
    """The algorithm and, for local steps, its settings (empty fields: the defaults)."""
    params: dict[str, Any] = {"algorithm": data.get("algorithm") or "downpour"}
    defaults = {
        "inner_steps": 0,
        "inner_optimizer": "adamw",
        "inner_learning_rate": 0.001,
        "outer_learning_rate": 1.0,
        "outer_momentum": 0.0,
    }
    for name, default in defaults.items():
        value = data.get(name)
        params[name] = default if value in (None, "") else value
    return params


#: JobForm fields a clone copies from the job it was made from.
CLONED_FIELDS = (
    "loss",
    "algorithm",
    "inner_steps",
    "inner_optimizer",
    "inner_learning_rate",
    "outer_learning_rate",
    "outer_momentum",
    "learning_rate",
    "batch_size",
    "n_fetch",
    "n_push",
    "n_param_shards",
    "compression",
    "max_staleness",
    "staleness_aware_lr",
    "weight_average",
    "warm_start_pushes",
    "robust_aggregation",
    "spot_check_fraction",
    "target_accuracy",
    "budget_samples",
    "budget_seconds",
    "algorithm",
    "sync_workers",
    "sync_backups",
    "sync_step_timeout_s",
    "lbfgs_history",
    "sandblaster_units",
)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _clone_initial(request: AuthenticatedRequest) -> dict[str, Any]:
    """``?from=<job id>``: the form pre-filled with that job's settings, to run it again."""
    source = request.GET.get("from")
    if request.method != "GET" or not source:
        return {}
    job = _visible_jobs(request).filter(id=source).first() if _is_uuid(source) else None
    if job is None:
        return {}
    initial = {name: getattr(job, name) for name in CLONED_FIELDS}
    initial.update(
        name=f"{job.name} (again)"[:100],
        model_json=json.dumps(job.model_config),
    )
    if job.dataset.owner_id == request.user.id:
        initial["dataset"] = job.dataset_id
    return initial


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _visible_jobs(request: AuthenticatedRequest) -> Any:
    """The owner's jobs; staff (operators) see and control every job."""
    if request.user.is_staff:
        return Job.objects.all()
    return Job.objects.filter(owner=request.user)


def _upload_over_limit(request: HttpRequest, form: forms.Form) -> bool:
    """Whether the upload handler stopped a file past the limit (``downpour.uploads``)."""
    if not request.META.get(OVER_LIMIT):
        return False
    form.add_error(None, f"the file is larger than the limit of {settings.DATASET_MAX_BYTES} bytes")
    return True


def _read_upload(upload: Any) -> bytes | None:
    if upload is None:
        return None
    # One byte over the limit is enough for submit_job to refuse it by size.
    return bytes(upload.read(settings.DATASET_MAX_BYTES + 1))


@login_required
def job_detail(request: AuthenticatedRequest, job_id: str) -> HttpResponse:
    job = get_object_or_404(_visible_jobs(request), id=job_id)
    return render(
        request,
        "portal/job.html",
        {
            "job": job,
            "activity": job_activity(job, timezone.now()),
            "staleness": staleness_summary(job),
            "robust": robust_summary(job),
            "sync": sync_summary(job),
            "spot_checks": spot_check_summary(job),
            "inner_steps": inner_steps_by_agent(job),
        },
    )


@login_required
def job_metrics(request: AuthenticatedRequest, job_id: str) -> JsonResponse:
    job = get_object_or_404(_visible_jobs(request), id=job_id)
    points = list(job.evaluations.values_list("elapsed_s", "accuracy", "loss", "samples"))
    return JsonResponse(
        {
            "status": job.status,
            "status_message": job.status_message,
            "activity": job_activity(job, timezone.now()),
            "samples_done": job.samples_done,
            "pushes_accepted": job.pushes_accepted,
            "pushes_rejected": job.pushes_rejected,
            "best_accuracy": job.best_accuracy,
            "staleness": staleness_summary(job),
            "robust": robust_summary(job),
            "sync": sync_summary(job),
            "target_accuracy": job.target_accuracy,
            "downloads": len(job.downloads()),
            "points": [
                {"elapsed_s": e, "accuracy": a, "loss": loss, "samples": s}
                for e, a, loss, s in points
            ],
        }
    )


@login_required
def job_download(request: AuthenticatedRequest, job_id: str, kind: str) -> FileResponse:
    job = get_object_or_404(_visible_jobs(request), id=job_id)
    found = {d["kind"]: d["path"] for d in job.downloads()}
    if kind not in found:
        raise Http404("no such model for this job")
    which = "-best" if kind.startswith("best-") else ""
    name = (
        f"{job.name}{which}.keras" if kind.endswith("keras") else f"{job.name}{which}-weights.npz"
    )
    return FileResponse(open(found[kind], "rb"), as_attachment=True, filename=name)  # noqa: SIM115


#: The job page's control buttons: action -> (function, what the flash message says).
JOB_ACTIONS = {
    "pause": (control.pause_job, "paused"),
    "resume": (control.resume_job, "resumed"),
    "cancel": (control.cancel_job, "cancelled"),
}


@login_required
@require_POST
def job_control(request: AuthenticatedRequest, job_id: str, action: str) -> HttpResponse:
    """Pause, resume, cancel or delete a job (its owner, or staff); POST only, and the
    page's buttons ask for confirmation first."""
    job = get_object_or_404(_visible_jobs(request), id=job_id)
    if action == "delete":
        control.delete_job(job, request.user)
        messages.info(request, f"Job {job.name} deleted with its files and checkpoints.")
        return redirect("portal:jobs")
    if action not in JOB_ACTIONS:
        raise Http404("no such action")
    act, done = JOB_ACTIONS[action]
    if act(job, request.user):
        messages.info(request, f"Job {job.name} {done}.")
    else:
        job.refresh_from_db()
        messages.error(request, f"Job {job.name} is {job.status}; it cannot be {done} now.")
    return redirect("portal:job", job_id=job.id)


@login_required
@require_POST
def dataset_delete(request: AuthenticatedRequest, dataset_id: str) -> HttpResponse:
    dataset = get_object_or_404(Dataset, id=dataset_id, owner=request.user)
    try:
        control.delete_dataset(dataset)
    except control.ControlRefused as exc:
        messages.error(request, str(exc))
    else:
        messages.info(request, f"Dataset {dataset.name} deleted with its files.")
    return redirect("portal:jobs")
