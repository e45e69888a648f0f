from __future__ import annotations

from typing import Any

from django.contrib import admin, messages

from downpour.training.actions.bans import lift_ban
from downpour.training.actions.control import ban_agent, revoke_token

from .models import Agent, AgentToken


@admin.register(AgentToken)
class AgentTokenAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "prefix", "created_at", "revoked_at", "is_trusted")
    list_filter = ("is_trusted", ("revoked_at", admin.EmptyFieldListFilter))
    # Revoking goes through the action, which also cuts off the token's live sockets.
    readonly_fields = ("token_hash", "prefix", "revoked_at")
    actions = ["revoke"]

    @admin.action(description="Revoke the selected tokens (cuts their agents off at once)")
    def revoke(self, request: Any, queryset: Any) -> None:
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
    list_filter = ("connected", ("banned_at", admin.EmptyFieldListFilter))
    # Bans go through the actions, which also close the agent's live sockets.
    readonly_fields = ("banned_at", "ban_reason")
    actions = ["ban", "unban"]

    @admin.display(boolean=True, ordering="banned_at")
    def banned(self, agent: Agent) -> bool:
        return agent.banned_at is not None

    @admin.action(description="Ban the selected agents (closes their sockets at once)")
    def ban(self, request: Any, queryset: Any) -> None:
        banned = sum(ban_agent(agent, "banned by an operator") for agent in queryset)
        self.message_user(request, f"{banned} agent(s) banned.", messages.INFO)

    @admin.action(description="Lift the ban of the selected agents")
    def unban(self, request: Any, queryset: Any) -> None:
        for agent in queryset:
            lift_ban(agent)
        self.message_user(request, f"{queryset.count()} agent(s) unbanned.", messages.INFO)
