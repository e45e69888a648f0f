from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from downpour.accounts.views import ThrottledLoginView
from downpour.agents import views as agent_views
from downpour.portal import views as portal_views

urlpatterns = [
    path("", portal_views.home, name="home"),
    path("signup/", portal_views.signup, name="signup"),
    path("login/", ThrottledLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("jobs/", include("downpour.portal.urls")),
    path("donor/", include("downpour.donors.urls")),
    path("console/", include("downpour.console.urls")),
    path("api/agent/shards/<uuid:shard_id>/", agent_views.shard_download, name="shard_download"),
    path("admin/", admin.site.urls),
]
