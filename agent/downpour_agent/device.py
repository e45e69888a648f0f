"""What this machine is, for registration: OS, cores, RAM, GPU and a measured speed."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import time
from typing import Any

logger = logging.getLogger("downpour_agent.device")

#: The benchmark model: an MLP 64-128-128-10 trained on random data in batches of 32.
BENCHMARK_LAYERS = (64, 128, 128, 10)
BENCHMARK_BATCH = 32


def device_info(benchmark_seconds: float = 1.5, gpu_device: int = 0) -> dict[str, Any]:
    """The ``device`` dict sent in ``register``.

    Keys: ``os``, ``python``, ``cpu_cores``, ``ram_bytes``, ``gpu_name`` and
    ``gpu_memory_bytes`` (of GPU number ``gpu_device``, the one the agent computes on),
    ``tf_version`` and ``samples_per_s`` (training samples per second on the benchmark
    MLP; None when ``benchmark_seconds`` is 0 or TensorFlow is missing). Values the
    machine does not reveal are None. The desktop agent adds the GPU settings it applied
    (:func:`downpour_agent.desktop.gpu.configure_gpu`).
    """
    tf_version = _tf_version()
    gpu_name, gpu_memory = gpu_info(gpu_device) if tf_version else (None, None)
    samples_per_s = None
    if tf_version and benchmark_seconds > 0:
        samples_per_s = benchmark_samples_per_s(benchmark_seconds)
    return {
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "ram_bytes": total_ram_bytes(),
        "gpu_name": gpu_name,
        "gpu_memory_bytes": gpu_memory,
        "tf_version": tf_version,
        "samples_per_s": samples_per_s,
    }


def total_ram_bytes() -> int | None:
    """Physical memory in bytes, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def gpu_info(index: int = 0) -> tuple[str | None, int | None]:
    """Name and memory in bytes of GPU number ``index`` among those TensorFlow sees, else
    ``(None, None)`` (no such GPU, or ``index`` -1: the GPU is not used)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not 0 <= index < len(gpus):
        return None, None
    details = tf.config.experimental.get_device_details(gpus[index])
    name = str(details.get("device_name") or gpus[index].name)
    return name, _nvidia_memory_bytes(index)


def _nvidia_memory_bytes(index: int) -> int | None:
    # TensorFlow reports usage, not capacity; nvidia-smi knows the capacity.
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        return int(out.splitlines()[index].strip()) << 20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def benchmark_samples_per_s(seconds: float = 1.5) -> float:
    """Measured training throughput in samples per second.

    Runs gradient steps of the benchmark MLP (``BENCHMARK_LAYERS``, batch
    ``BENCHMARK_BATCH``) for about ``seconds`` seconds after one untimed warm-up step
    that pays for tracing.
    """
    import keras
    import numpy as np

    from downpour_agent.trainer import GradientComputer

    n_in, *hidden, n_out = BENCHMARK_LAYERS
    model = keras.Sequential(
        [keras.Input((n_in,))]
        + [keras.layers.Dense(units, activation="relu") for units in hidden]
        + [keras.layers.Dense(n_out)]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    computer = GradientComputer.from_model(model, loss)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BENCHMARK_BATCH, n_in), dtype=np.float32)
    y = rng.integers(0, n_out, size=BENCHMARK_BATCH)
    computer.compute(x, y)
    steps = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        computer.compute(x, y)
        steps += 1
        elapsed = time.perf_counter() - start
    return round(steps * BENCHMARK_BATCH / elapsed, 1)


def _tf_version() -> str | None:
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return str(tf.__version__)
