"""Battery detection from a power-supply tree, and the memory a lease needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from downpour_agent.desktop import resources


def supply(root: Path, name: str, kind: str, online: str | None = None) -> None:
    path = root / name
    path.mkdir(parents=True)
    (path / "type").write_text(kind + "\n")
    if online is not None:
        (path / "online").write_text(online + "\n")


def test_a_laptop_unplugged_is_on_battery(tmp_path: Path) -> None:
    supply(tmp_path, "AC", "Mains", online="0")
    supply(tmp_path, "BAT0", "Battery")

    assert resources.on_battery(tmp_path)


def test_a_laptop_plugged_in_is_not(tmp_path: Path) -> None:
    supply(tmp_path, "AC", "Mains", online="1")
    supply(tmp_path, "BAT0", "Battery")

    assert not resources.on_battery(tmp_path)


def test_a_desktop_without_a_battery_never_is(tmp_path: Path) -> None:
    supply(tmp_path, "AC", "Mains", online="0")

    assert not resources.on_battery(tmp_path)


@pytest.fixture(scope="module")
def mlp_config() -> dict[str, Any]:
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(128), keras.layers.Dense(10)])
    config: dict[str, Any] = json.loads(model.to_json())
    return config


def test_the_estimate_counts_the_models_parameters_and_activations(
    mlp_config: dict[str, Any],
) -> None:
    estimate = resources.estimate_lease_memory(mlp_config, batch_size=64)

    assert estimate.params == 784 * 128 + 128 + 128 * 10 + 10
    assert estimate.activations_per_sample == 784 + 128 + 10
    assert estimate.total_bytes == resources.BASE_BYTES + 16 * estimate.params + 8 * 922 * 64


def test_a_lease_over_the_ceiling_is_refused_with_its_size(mlp_config: dict[str, Any]) -> None:
    assert resources.lease_fits(mlp_config, 64, limit_mb=1024) is None

    why = resources.lease_fits(mlp_config, 100_000, limit_mb=500)

    assert why is not None
    assert "101,770 parameters, batch 100000" in why
    assert "the limit is 500 MiB" in why


def test_an_invalid_model_is_refused() -> None:
    why = resources.lease_fits({"class_name": "Lambda"}, 32, limit_mb=1024)

    assert why is not None and why.startswith("the model is not valid")


def test_no_limit_means_half_the_machines_memory() -> None:
    import psutil

    assert resources.memory_limit_bytes(0) == psutil.virtual_memory().total // 2
    assert resources.memory_limit_bytes(300) == 300 << 20
