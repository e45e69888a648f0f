"""Shared fixtures of the server tests: Alice's tiny dataset and a donor's agent (Charlie's)."""

from __future__ import annotations

import pytest

from downpour.donors.models import Agent, AgentToken
from downpour.training.actions.datasets import create_dataset

from .helpers import npz_upload, small_dataset


@pytest.fixture
def dataset(alice):  # type: ignore[no-untyped-def]
    return create_dataset(alice, "tiny", npz_upload(**small_dataset()), n_shards=2)


@pytest.fixture
def agent(charlie):  # type: ignore[no-untyped-def]
    token, _ = AgentToken.issue(charlie, "pc")
    return Agent.objects.create(token=token, name="pc-1", samples_per_s=1000.0)
