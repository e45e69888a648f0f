"""Fixtures of the modelspec tests: the Keras models, built once per module, and their JSON.

``tests.agent.kerasmodels`` skips what needs Keras when it is not installed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest


@pytest.fixture(scope="module")
def keras_models() -> dict[str, Any]:
    from tests.agent.kerasmodels import MODELS

    return {name: make() for name, make in MODELS.items()}


@pytest.fixture(scope="module")
def configs(keras_models: dict[str, Any]) -> dict[str, str]:
    return {name: model.to_json() for name, model in keras_models.items()}


@pytest.fixture
def mlp_config(configs: dict[str, str]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(configs["mlp"])
    return config


@pytest.fixture
def merges_config(configs: dict[str, str]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(configs["merges"])
    return config
