"""The GPU, where TensorFlow sees one: which device, memory growth and a memory cap.

Kept apart from the rest because it cannot be exercised on a machine without a GPU;
``tf_config`` is ``tensorflow.config`` unless a caller passes a stand-in.
Call :func:`configure_gpu` before TensorFlow runs its first operation.
"""

from __future__ import annotations

from typing import Any


def configure_gpu(device: int, memory_limit_mb: int, tf_config: Any = None) -> dict[str, Any]:
    """Choose GPU number ``device`` (-1: none), turn memory growth on and cap its memory.

    Returns
    -------
    dict
        The GPU fields of the registration's ``device`` (and the status page's):
        ``gpu_device`` (TensorFlow's name of the chosen device, or None), ``gpu_count``
        (GPUs TensorFlow sees), ``gpu_memory_limit_mb`` (None: no cap) and
        ``gpu_memory_growth`` (True when TensorFlow takes memory as it needs it).
    """
    if tf_config is None:
        import tensorflow as tf

        tf_config = tf.config
    gpus = list(tf_config.list_physical_devices("GPU"))
    chosen = gpus[device] if 0 <= device < len(gpus) else None
    tf_config.set_visible_devices([chosen] if chosen is not None else [], "GPU")
    if chosen is None:
        return {
            "gpu_device": None,
            "gpu_count": len(gpus),
            "gpu_memory_limit_mb": None,
            "gpu_memory_growth": None,
        }
    if memory_limit_mb > 0:
        # A logical device with a limit replaces memory growth (TensorFlow allows one).
        tf_config.set_logical_device_configuration(
            chosen, [tf_config.LogicalDeviceConfiguration(memory_limit=memory_limit_mb)]
        )
    else:
        tf_config.experimental.set_memory_growth(chosen, True)
    return {
        "gpu_device": str(chosen.name),
        "gpu_count": len(gpus),
        "gpu_memory_limit_mb": memory_limit_mb or None,
        "gpu_memory_growth": memory_limit_mb <= 0,
    }
