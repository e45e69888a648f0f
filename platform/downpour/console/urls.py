from __future__ import annotations

from django.urls import path

from . import views

app_name = "console"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("agents/<uuid:agent_id>/<str:action>/", views.agent_control, name="agent_control"),
]
