from __future__ import annotations

from django.urls import path

from . import charts, views

app_name = "portal"
urlpatterns = [
    path("", views.jobs, name="jobs"),
    path("datasets/new/", views.dataset_new, name="dataset_new"),
    path("new/", views.job_new, name="job_new"),
    path("<uuid:job_id>/", views.job_detail, name="job"),
    path("<uuid:job_id>/metrics.json", views.job_metrics, name="job_metrics"),
    path("<uuid:job_id>/chart.json", charts.job_chart, name="job_chart"),
    path("<uuid:job_id>/download/<str:kind>/", views.job_download, name="job_download"),
]
