from __future__ import annotations

from django.contrib import admin

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
    readonly_fields = ("layout",)


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
