"""Scheduling policy over plain dataclasses: no Django, no I/O (see docs/architecture.md)."""

from __future__ import annotations

from .policy import JobLoad, pick_job, unit_steps

__all__ = ["JobLoad", "pick_job", "unit_steps"]
