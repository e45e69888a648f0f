from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from downpour.training.actions.bans import lift_ban
from downpour.training.actions.control import ban_agent, revoke_token

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
    list_display = ("name", "owner", "prefix", "created_at", "revoked_at", "is_trusted")
    list_filter = ("is_trusted", ("revoked_at", admin.EmptyFieldListFilter))
    # Revoking goes through the action, which also cuts off the token's live sockets.
    readonly_fields = ("token_hash", "prefix", "revoked_at")
    actions = ["revoke"]

    @admin.action(description="Revoke the selected tokens (cuts their agents off at once)")
    def revoke(self, request: HttpRequest, queryset: QuerySet[AgentToken]) -> None:
        revoked = sum(revoke_token(token) for token in queryset)
        self.message_user(request, f"{revoked} token(s) revoked.", messages.INFO)


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
    # Bans go through the actions, which also close the agent's live sockets.
    readonly_fields = ("banned_at", "ban_reason")
    actions = ("ban_selected", "unban_selected")

    @admin.display(boolean=True, description="banned", ordering="banned_at")
    def banned(self, agent: Agent) -> bool:
        return agent.banned_at is not None

    @admin.action(description="Ban the selected agents (closes their sockets at once)")
    def ban_selected(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        reason = f"banned by {request.user.get_username()}"
        banned = sum(ban_agent(agent, reason) for agent in queryset)
        self.message_user(request, f"Banned {banned} agent(s).", messages.INFO)

    @admin.action(description="Lift the ban on the selected agents")
    def unban_selected(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        agents = list(queryset.filter(banned_at__isnull=False))
        for agent in agents:
            lift_ban(agent)
        self.message_user(request, f"Lifted the ban on {len(agents)} agent(s).", messages.INFO)
