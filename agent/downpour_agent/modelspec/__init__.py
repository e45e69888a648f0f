"""The safe model format: validate a Keras ``to_json`` config, then build it ourselves.

``validator`` is pure Python (the server uses it without TensorFlow); ``builder``
imports Keras only inside its functions.
"""

from __future__ import annotations

from downpour_agent.modelspec.builder import (
    build_loss,
    build_model,
    statistic_specs,
    statistic_variables,
    variable_specs,
)
from downpour_agent.modelspec.validator import (
    DEFAULT_LIMITS,
    LOSSES,
    LayerSpec,
    Limits,
    ModelRejected,
    ModelSpec,
    Shape,
    summary,
    validate_loss,
    validate_model_config,
)

__all__ = [
    "DEFAULT_LIMITS",
    "LOSSES",
    "LayerSpec",
    "Limits",
    "ModelRejected",
    "ModelSpec",
    "Shape",
    "build_loss",
    "build_model",
    "summary",
    "validate_loss",
    "validate_model_config",
    "statistic_specs",
    "statistic_variables",
    "variable_specs",
]
