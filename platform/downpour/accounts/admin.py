from __future__ import annotations

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from .models import User


@admin.register(User)
class DownpourUserAdmin(UserAdmin):
    list_display = ("username", "email", "is_researcher", "is_donor", "share_weight", "is_staff")
    fieldsets = (
        *(UserAdmin.fieldsets or ()),
        (
            "Downpour",
            {
                "fields": (
                    "is_researcher",
                    "is_donor",
                    "share_weight",
                    "show_on_leaderboard",
                    "display_name",
                )
            },
        ),
        (
            "Quotas (empty: the server's default)",
            {
                "fields": (
                    "max_active_jobs",
                    "max_dataset_bytes",
                    "max_params_per_job",
                    "max_store_bytes",
                )
            },
        ),
    )
