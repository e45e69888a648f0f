from __future__ import annotations

from typing import Any

from django.contrib import admin, messages

from .actions import control
from .models import (
    Checkpoint,
    Contribution,
    Dataset,
    DatasetShard,
    Evaluation,
    Job,
    Lease,
    SpotCheck,
    WorkUnit,
)


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "status", "samples_done", "best_accuracy", "created_at")
    list_filter = ("status",)
    # Status changes go through the actions (compare-and-set, agents told), never the form.
    readonly_fields = ("layout", "status", "status_message")
    actions = ["pause", "resume", "cancel"]

    def _act(self, request: Any, queryset: Any, action: Any, done: str) -> None:
        changed = sum(action(job, request.user) for job in queryset)
        self.message_user(request, f"{changed} job(s) {done}.", messages.INFO)

    @admin.action(description="Pause the selected jobs")
    def pause(self, request: Any, queryset: Any) -> None:
        self._act(request, queryset, control.pause_job, "paused")

    @admin.action(description="Resume the selected jobs")
    def resume(self, request: Any, queryset: Any) -> None:
        self._act(request, queryset, control.resume_job, "resumed")

    @admin.action(description="Cancel the selected jobs")
    def cancel(self, request: Any, queryset: Any) -> None:
        self._act(request, queryset, control.cancel_job, "cancelled")


@admin.register(Lease)
class LeaseAdmin(admin.ModelAdmin):
    list_display = ("id", "agent", "status", "issued_at", "expires_at", "samples")
    list_filter = ("status",)


@admin.register(WorkUnit)
class WorkUnitAdmin(admin.ModelAdmin):
    list_display = ("id", "job", "shard", "steps", "status", "attempts")
    list_filter = ("status",)


@admin.register(SpotCheck)
class SpotCheckAdmin(admin.ModelAdmin):
    # Staff review failed checks before lifting a ban; the evidence itself is binary.
    list_display = ("created_at", "agent", "job", "status", "relative_error", "detail")
    list_filter = ("status",)
    exclude = ("weights", "gradients")
    readonly_fields = (
        "lease",
        "job",
        "agent",
        "status",
        "steps",
        "samples",
        "versions",
        "relative_error",
        "detail",
        "started_at",
        "checked_at",
    )

    def has_add_permission(self, request: object) -> bool:
        return False


admin.site.register(Dataset)
admin.site.register(DatasetShard)
admin.site.register(Contribution)
admin.site.register(Evaluation)
admin.site.register(Checkpoint)
