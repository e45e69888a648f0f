"""Pages for researchers: datasets, jobs, live progress, downloads."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render

from downpour.accounts.http import AuthenticatedRequest
from downpour.paramstore import DEFAULT_MAX_GRAD_NORM
from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.jobs import JobParams, JobRejected, submit_job
from downpour.training.datasets import DatasetRejected
from downpour.training.models import Dataset, Job
from downpour.training.queries import robust_summary, spot_check_summary, staleness_summary
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
    form = JobForm(request.user, request.POST or None, request.FILES or None)
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
            max_staleness=data["max_staleness"],
            staleness_aware_lr=data["staleness_aware_lr"],
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
        )
        try:
            job = submit_job(request.user, data["dataset"], params)
        except JobRejected as exc:
            form.add_error(None, str(exc))
        else:
            return redirect("portal:job", job_id=job.id)
    return render(request, "portal/job_new.html", {"form": form})


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
    job = get_object_or_404(Job, id=job_id, owner=request.user)
    return render(
        request,
        "portal/job.html",
        {
            "job": job,
            "staleness": staleness_summary(job),
            "robust": robust_summary(job),
            "spot_checks": spot_check_summary(job),
        },
    )


@login_required
def job_metrics(request: AuthenticatedRequest, job_id: str) -> JsonResponse:
    job = get_object_or_404(Job, id=job_id, owner=request.user)
    points = list(job.evaluations.values_list("elapsed_s", "accuracy", "loss", "samples"))
    return JsonResponse(
        {
            "status": job.status,
            "status_message": job.status_message,
            "samples_done": job.samples_done,
            "pushes_accepted": job.pushes_accepted,
            "pushes_rejected": job.pushes_rejected,
            "best_accuracy": job.best_accuracy,
            "staleness": staleness_summary(job),
            "robust": robust_summary(job),
            "target_accuracy": job.target_accuracy,
            "points": [
                {"elapsed_s": e, "accuracy": a, "loss": loss, "samples": s}
                for e, a, loss, s in points
            ],
        }
    )


@login_required
def job_download(request: AuthenticatedRequest, job_id: str, kind: str) -> FileResponse:
    job = get_object_or_404(Job, id=job_id, owner=request.user)
    path = {"keras": job.keras_path, "weights": job.weights_path}.get(kind)
    if not path:
        raise Http404("the trained model is not ready yet")
    name = f"{job.name}.keras" if kind == "keras" else f"{job.name}-weights.npz"
    return FileResponse(open(path, "rb"), as_attachment=True, filename=name)  # noqa: SIM115
