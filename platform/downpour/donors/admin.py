from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from downpour.training.actions.bans import ban, lift_ban

from .models import Agent, AgentToken


class BannedFilter(admin.SimpleListFilter):
    title = "banned"
    parameter_name = "banned"

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Agent]
    ) -> list[tuple[str, str]]:
        return [("yes", "Banned"), ("no", "Not banned")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Agent]) -> QuerySet[Agent]:
        if self.value() == "yes":
            return queryset.filter(banned_at__isnull=False)
        if self.value() == "no":
            return queryset.filter(banned_at__isnull=True)
        return queryset


@admin.register(AgentToken)
class AgentTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "prefix", "created_at", "revoked_at")
    readonly_fields = ("token_hash", "prefix")


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "token",
        "cpu_cores",
        "gpu_name",
        "samples_per_s",
        "connected",
        "banned",
        "credit",
    )
    list_filter = ("connected", BannedFilter)
    search_fields = ("name", "token__name", "token__owner__username")
    actions = ("ban_selected", "unban_selected")

    @admin.display(boolean=True, description="banned", ordering="banned_at")
    def banned(self, agent: Agent) -> bool:
        return agent.banned_at is not None

    @admin.action(description="Ban the selected agents")
    def ban_selected(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        agents = list(queryset.filter(banned_at__isnull=True))
        for agent in agents:
            ban(agent, f"banned by {request.user.get_username()}")
        self.message_user(request, f"Banned {len(agents)} agent(s).")

    @admin.action(description="Lift the ban on the selected agents")
    def unban_selected(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        agents = list(queryset.filter(banned_at__isnull=False))
        for agent in agents:
            lift_ban(agent)
        self.message_user(request, f"Lifted the ban on {len(agents)} agent(s).")
