"""The GPU path: the CPU machine here, and the calls made when TensorFlow lists a GPU.

Only the device list is stood in for, because no GPU can exist on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from downpour_agent.desktop.gpu import configure_gpu


def test_on_a_machine_without_a_gpu_it_reports_none() -> None:
    tf = pytest.importorskip("tensorflow")

    assert configure_gpu(0, 0, tf.config) == {
        "gpu_device": None,
        "gpu_count": 0,
        "gpu_memory_limit_mb": None,
        "gpu_memory_growth": None,
    }


@dataclass
class Device:
    name: str


@dataclass
class Config:
    """``tf.config`` as it answers on a machine with two GPUs; records what is set."""

    gpus: list[Device] = field(default_factory=lambda: [Device("GPU:0"), Device("GPU:1")])
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.experimental = self

    def list_physical_devices(self, kind: str) -> list[Device]:
        return self.gpus if kind == "GPU" else []

    def set_visible_devices(self, devices: list[Device], kind: str) -> None:
        self.calls.append(("visible", [d.name for d in devices]))

    def set_memory_growth(self, device: Device, on: bool) -> None:
        self.calls.append(("growth", (device.name, on)))

    def set_logical_device_configuration(self, device: Device, configs: list[Any]) -> None:
        self.calls.append(("limit", (device.name, configs[0])))

    @staticmethod
    def LogicalDeviceConfiguration(memory_limit: int) -> int:  # noqa: N802
        return memory_limit


def test_the_chosen_gpu_gets_memory_growth() -> None:
    config = Config()

    info = configure_gpu(1, 0, config)

    assert info == {
        "gpu_device": "GPU:1",
        "gpu_count": 2,
        "gpu_memory_limit_mb": None,
        "gpu_memory_growth": True,
    }
    assert config.calls == [("visible", ["GPU:1"]), ("growth", ("GPU:1", True))]


def test_a_memory_cap_becomes_a_logical_device_limit() -> None:
    config = Config()

    info = configure_gpu(0, 2048, config)

    assert info["gpu_memory_limit_mb"] == 2048 and info["gpu_memory_growth"] is False
    assert config.calls == [("visible", ["GPU:0"]), ("limit", ("GPU:0", 2048))]


def test_device_minus_one_hides_every_gpu() -> None:
    config = Config()

    assert configure_gpu(-1, 0, config)["gpu_device"] is None
    assert config.calls == [("visible", [])]
