"""A job's validated model spec, once per process: its model never changes."""

from __future__ import annotations

from downpour_agent.modelspec import ModelSpec, validate_model_config

from .models import Job

_specs: dict[str, ModelSpec] = {}


def model_spec(job: Job) -> ModelSpec:
    """The validated spec of ``job``'s model (validated at submission; cached per process)."""
    key = str(job.id)
    if key not in _specs:
        _specs[key] = validate_model_config(job.model_config)
    return _specs[key]
