"""What the machine can give: battery power and memory for a lease."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from downpour_agent.modelspec.validator import ModelRejected, validate_model_config

POWER_SUPPLY = Path("/sys/class/power_supply")
#: TensorFlow's runtime, the dataset cache and Python itself, before any model.
BASE_BYTES = 400 << 20


def on_battery(power_supply: Path = POWER_SUPPLY) -> bool:
    """True when the machine runs from a battery (and no mains supply is online).

    On Linux it reads ``/sys/class/power_supply`` (``type`` Mains/USB with ``online``);
    elsewhere psutil's ``sensors_battery``. A desktop with no battery is never on one.
    """
    if power_supply.is_dir():
        supplies = [p for p in power_supply.iterdir() if (p / "type").is_file()]
        kinds = {p: (p / "type").read_text().strip() for p in supplies}
        if "Battery" not in kinds.values():
            return False
        mains = [p for p, kind in kinds.items() if kind in ("Mains", "USB", "USB_C")]
        return not any(_read(p / "online") == "1" for p in mains)
    battery = psutil.sensors_battery()
    return battery is not None and not battery.power_plugged


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a lease needs, from its model config and batch size."""

    params: int
    activations_per_sample: int
    batch_size: int

    @property
    def total_bytes(self) -> int:
        # float32 weights, gradients, the push accumulator and TensorFlow's copy of
        # the weights; activations kept for the backward pass, twice for their gradients.
        weights = 4 * 4 * self.params
        activations = 4 * 2 * self.activations_per_sample * self.batch_size
        return BASE_BYTES + weights + activations


def estimate_lease_memory(model_config: dict[str, Any], batch_size: int) -> MemoryEstimate:
    """Estimate the memory of training ``model_config`` in batches of ``batch_size``.

    Raises
    ------
    ModelRejected
        When the config is not a valid model (the lease is refused anyway).
    """
    spec = validate_model_config(model_config)
    per_sample = sum(math.prod(layer.output_shape) for layer in spec.layers)
    return MemoryEstimate(spec.param_count, per_sample, batch_size)


def memory_limit_bytes(limit_mb: int) -> int:
    """The donor's ceiling in bytes; 0 means half the machine's RAM."""
    if limit_mb > 0:
        return limit_mb << 20
    return int(psutil.virtual_memory().total // 2)


def lease_fits(model_config: dict[str, Any], batch_size: int, limit_mb: int) -> str | None:
    """None when the lease fits under the ceiling, else why it does not."""
    try:
        estimate = estimate_lease_memory(model_config, batch_size)
    except ModelRejected as exc:
        return f"the model is not valid: {exc}"
    limit = memory_limit_bytes(limit_mb)
    if estimate.total_bytes > limit:
        return (
            f"needs about {estimate.total_bytes >> 20} MiB "
            f"({estimate.params:,} parameters, batch {batch_size}); the limit is {limit >> 20} MiB"
        )
    return None
