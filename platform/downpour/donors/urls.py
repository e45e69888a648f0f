from __future__ import annotations

from django.urls import path

from . import views

app_name = "donors"
urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("leaderboard/", views.leaderboard_settings, name="leaderboard_settings"),
    path("tokens/new/", views.token_new, name="token_new"),
    path("tokens/<uuid:token_id>/revoke/", views.token_revoke, name="token_revoke"),
]
