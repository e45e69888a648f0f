from __future__ import annotations

from django.contrib import admin

from .models import Agent, AgentToken


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
        "credit",
    )
    list_filter = ("connected",)
