"""The device description sent at registration."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from downpour_agent.device import benchmark_samples_per_s, device_info, total_ram_bytes

KEYS = {
    "os",
    "python",
    "cpu_cores",
    "ram_bytes",
    "gpu_name",
    "gpu_memory_bytes",
    "tf_version",
    "samples_per_s",
}


def test_device_info_without_a_benchmark_describes_the_machine() -> None:
    info = device_info(benchmark_seconds=0)

    assert set(info) == KEYS
    assert info["os"] == platform.platform()
    assert info["python"] == platform.python_version()
    assert info["cpu_cores"] == os.cpu_count()
    assert info["samples_per_s"] is None
    assert json.loads(json.dumps(info)) == info


def test_device_info_reports_the_tensorflow_version() -> None:
    tf = pytest.importorskip("tensorflow")

    assert device_info(benchmark_seconds=0)["tf_version"] == tf.__version__


def test_a_machine_without_a_gpu_reports_null_gpu_fields() -> None:
    tf = pytest.importorskip("tensorflow")
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")

    info = device_info(benchmark_seconds=0)

    assert info["gpu_name"] is None and info["gpu_memory_bytes"] is None


def test_ram_is_reported_in_bytes() -> None:
    ram = total_ram_bytes()

    assert ram is None or ram > 64 << 20


def test_the_benchmark_measures_a_positive_speed() -> None:
    pytest.importorskip("tensorflow")

    speed = benchmark_samples_per_s(0.3)

    assert speed > 0


@pytest.mark.slow  # a process that imports TensorFlow: tens of seconds on a busy machine
def test_the_device_command_prints_the_device_json() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "downpour_agent", "device", "--benchmark-seconds", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=True,
    )

    assert set(json.loads(result.stdout)) == KEYS
