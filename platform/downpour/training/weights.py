"""A researcher's initial weights: an ``.npz`` checked at submit and again at start.

The format is the one a finished job's ``weights.npz`` download has: one float32 array per
trainable variable, keyed by the variable's name with ``/`` written as ``__``
(``dense__kernel``). So a job can carry on from another job's result.

At submit (no TensorFlow in the web process) the archive goes through
``downpour_agent.npz.load_npz`` (no pickles, bounded inflation) and every array must be
float32 and finite. At start, where the worker builds the model anyway, the file must still
hash to the SHA-256 recorded at submit, and its arrays must name exactly the model's
variables with exactly their shapes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from downpour_agent.npz import ArchiveRejected, load_npz

#: Variables a model may have (512 layers, a few variables each).
MAX_VARIABLES = 2048


class WeightsRejected(ValueError):
    """The weights cannot be used; the message says why."""


def npz_key(name: str) -> str:
    """The ``.npz`` key of a variable: ``dense/kernel`` -> ``dense__kernel``."""
    return name.replace("/", "__")


def check_upload(data: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """Load an uploaded weights archive; every array float32 and finite.

    Raises
    ------
    WeightsRejected
        Not a safe ``.npz``, too large, no arrays, or an array that is not finite float32.
    """
    if len(data) > max_bytes:
        raise WeightsRejected(f"the file is larger than the limit of {max_bytes} bytes")
    try:
        arrays = load_npz(data, None, max_bytes, max_members=MAX_VARIABLES)
    except ArchiveRejected as exc:
        raise WeightsRejected(str(exc)) from None
    if not arrays:
        raise WeightsRejected("the archive holds no arrays")
    for key, array in arrays.items():
        if array.dtype != np.float32:
            raise WeightsRejected(f"{key} is {array.dtype}; weights must be float32")
        if not np.isfinite(array).all():
            raise WeightsRejected(f"{key} has NaN or infinite values")
    return arrays


def load_for_model(
    path: Path,
    sha256: str,
    specs: Sequence[tuple[str, tuple[int, ...], str]],
    max_bytes: int,
    optional: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """The stored weights for a model's variables ``specs``, checked against the model.

    Variables named in ``optional`` (non-trainable statistics, which a ``weights.npz`` from
    before they were exported lacks) may be absent; they are then not in the result.

    Returns
    -------
    dict of variable name -> float32 ndarray of the variable's shape

    Raises
    ------
    WeightsRejected
        The file changed since submit, or its arrays do not name exactly the model's
        variables with exactly their shapes and dtypes.
    """
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise WeightsRejected("the stored file no longer has the SHA-256 recorded at submit")
    arrays = check_upload(data, max_bytes)
    present = [spec for spec in specs if spec[0] not in optional or npz_key(spec[0]) in arrays]
    return match_model(arrays, present)


def match_model(
    arrays: Mapping[str, np.ndarray], specs: Sequence[tuple[str, tuple[int, ...], str]]
) -> dict[str, np.ndarray]:
    """Map ``arrays`` (keyed as in ``weights.npz``) onto the model's variables, exactly."""
    by_key = {npz_key(name): (name, tuple(shape), dtype) for name, shape, dtype in specs}
    missing = sorted(by_key.keys() - arrays.keys())
    extra = sorted(arrays.keys() - by_key.keys())
    if missing or extra:
        raise WeightsRejected(
            f"the arrays do not name the model's variables: missing {missing[:5]}, "
            f"not in the model {extra[:5]}"
        )
    weights: dict[str, np.ndarray] = {}
    for key, (name, shape, dtype) in by_key.items():
        array = arrays[key]
        if array.shape != shape:
            raise WeightsRejected(
                f"{key} has shape {list(array.shape)}; the model's {name} is {list(shape)}"
            )
        if array.dtype != np.dtype(dtype):
            raise WeightsRejected(f"{key} is {array.dtype}; the model's {name} is {dtype}")
        weights[name] = array
    return weights
