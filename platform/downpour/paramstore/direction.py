"""The direction test (FLTrust, Cao et al., NDSS 2021): numpy only.

A push is compared with a reference gradient the server computes on a root sample of the
job's training data; one that points away from it is flagged (``robust.robust_step``).
"""

from __future__ import annotations

import math

import numpy as np


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two flat vectors, computed in float64.

    Parameters
    ----------
    a, b : ndarray
        Shape ``(n,)``, any float dtype, finite.

    Returns
    -------
    float
        In ``[-1, 1]``; 1.0 when either vector is zero (no direction to disagree with).
    """
    left = np.asarray(a, dtype=np.float64)
    right = np.asarray(b, dtype=np.float64)
    norms = math.sqrt(float(np.dot(left, left))) * math.sqrt(float(np.dot(right, right)))
    if norms == 0 or not math.isfinite(norms):
        return 1.0
    return max(-1.0, min(1.0, float(np.dot(left, right)) / norms))


def passes_direction_test(
    gradient: np.ndarray, reference: np.ndarray, min_cosine: float = 0.0
) -> bool:
    """FLTrust's test (Cao et al., NDSS 2021): does a push point the way the root gradient does?

    Parameters
    ----------
    gradient : ndarray
        float32 ``(n,)``: the pushed gradient of one shard.
    reference : ndarray
        ``(n,)``, any float dtype: the server's reference gradient of the same shard, computed
        on a root sample of the training data (drawn from every data shard) at recent weights.
        FLTrust weighs each update by ``ReLU(cos)``; one push at a time, that is accept or
        reject.
    min_cosine : float
        Threshold in ``[-1, 1)``.

    Returns
    -------
    bool
        ``cos(gradient, reference) >= min_cosine`` (True when either vector is zero).
    """
    return cosine_similarity(gradient, reference) >= min_cosine


def root_reference(
    half_a: np.ndarray, half_b: np.ndarray, min_agreement: float = 0.3
) -> np.ndarray | None:
    """The reference gradient for :func:`passes_direction_test`, if the root sample has one.

    The server computes its root gradient on two halves of its root sample, at the same
    weights. Near a minimum the mean gradient is small against the noise of a few hundred
    samples, the two halves disagree, and a cosine with either says nothing: honest pushes
    then fail a direction test about half the time (``docs/robustness.md``). So the test runs
    only while the halves agree, which is also when a sign flip does harm: an attacker that
    pushes the model away from the minimum makes the gradient coherent again, and is tested.

    Parameters
    ----------
    half_a, half_b : ndarray
        ``(n,)``, any float dtype: the mean gradients of the two halves, one shard's part.
    min_agreement : float
        Least ``cos(half_a, half_b)``, in ``[-1, 1]``, for the reference to count.

    Returns
    -------
    ndarray or None
        float32 ``(n,)``: the mean of the halves (the whole root sample's gradient for equal
        halves), or None when they agree less than ``min_agreement``.
    """
    if half_a.shape != half_b.shape:
        raise ValueError(f"halves of shapes {half_a.shape} and {half_b.shape}")
    if cosine_similarity(half_a, half_b) < min_agreement:
        return None
    mean: np.ndarray = ((np.asarray(half_a, np.float64) + half_b) / 2).astype(np.float32)
    return mean
