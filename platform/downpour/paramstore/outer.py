"""The outer optimizer of local-steps (DiLoCo) jobs: Nesterov momentum on pseudo-gradients.

An agent runs H inner steps from the global weights and pushes the pseudo-gradient
``delta = start weights - end weights``. The store treats ``delta`` as a gradient and applies
it with SGD and Nesterov momentum, as DiLoCo does (Douillard et al. 2023: outer learning
rate 0.7, momentum 0.9), exactly as Keras 3 ``SGD(learning_rate, momentum, nesterov=True)``::

    g         = delta / (1 + staleness)
    momentum  = mu * momentum - lr * g
    weights  += mu * momentum - lr * g

A job's defaults are learning rate 1 and no momentum (``training.models.Job``): with agents
pushing one after another, DiLoCo's 0.7 / 0.9 overshot (docs/benchmarks.md, "The outer step's
defaults"); :class:`OuterConfig`'s own defaults stay DiLoCo's.

A pseudo-gradient computed on a version ``staleness`` pushes behind the shard is discounted
by ``1 / (1 + staleness)``, the rule of asynchronous local-SGD variants (Liu et al. 2024,
"Asynchronous Local-SGD Training for Language Modeling"): a fresh push counts in full, a
push one version late by half.

The momentum buffer is per-shard state kept in the shard's optimizer slot (the
``accumulators`` vector of :class:`~downpour.paramstore.store.ShardState`), so every
backend, the exactly-once commit and checkpoints keep it with the weights. It starts at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from downpour.paramstore.errors import NonFinite

#: DiLoCo's outer settings (Douillard et al. 2023, section 3).
DEFAULT_OUTER_LEARNING_RATE = 0.7
DEFAULT_OUTER_MOMENTUM = 0.9


@dataclass(frozen=True)
class OuterConfig:
    """Settings of the outer Nesterov step.

    Parameters
    ----------
    learning_rate : float
        Outer step size, ``> 0`` (DiLoCo: 0.7).
    momentum : float
        Nesterov momentum, ``0 <= momentum < 1`` (DiLoCo: 0.9).
    """

    learning_rate: float = DEFAULT_OUTER_LEARNING_RATE
    momentum: float = DEFAULT_OUTER_MOMENTUM

    def __post_init__(self) -> None:
        if not np.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(
                f"outer learning_rate must be finite and > 0, got {self.learning_rate}"
            )
        if not np.isfinite(self.momentum) or not 0 <= self.momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {self.momentum}")


def staleness_discount(staleness: int) -> float:
    """The factor ``1 / (1 + staleness)`` a pseudo-gradient is scaled by (``staleness >= 0``)."""
    return 1.0 / (1.0 + max(0, int(staleness)))


def nesterov_apply_pieces(
    weights: np.ndarray,
    momentum: np.ndarray,
    delta_pieces: Sequence[np.ndarray],
    config: OuterConfig,
    scale: float = 1.0,
) -> None:
    """Apply one outer Nesterov step in place.

    Parameters
    ----------
    weights, momentum : ndarray
        float32 ``(n,)``: the shard's weights and its momentum buffer, updated in place.
    delta_pieces : sequence of ndarray
        float32 arrays of any shape (read in C order) whose sizes add up to ``n``: the
        pseudo-gradient ``start - end`` of the shard's variables, in layout order.
    config : OuterConfig
    scale : float
        Multiplies the pseudo-gradient first (the staleness discount).

    Notes
    -----
    float32 arithmetic in Keras 3's order (``m = m * mu - g * lr``; ``w += m * mu - g * lr``),
    so the result matches ``keras.optimizers.SGD(lr, momentum=mu, nesterov=True)`` given
    ``g = scale * delta``.
    """
    n = weights.shape[0]
    for name, array in (("weights", weights), ("momentum", momentum)):
        if array.dtype != np.float32 or array.ndim != 1 or array.shape[0] != n:
            raise ValueError(f"nesterov_apply: {name} must be a float32 vector of {n} elements")
    flat = [piece.reshape(-1) for piece in delta_pieces]
    if any(piece.dtype != np.float32 for piece in flat):
        raise ValueError("nesterov_apply: pseudo-gradient pieces must be float32")
    if sum(piece.shape[0] for piece in flat) != n:
        raise ValueError(f"nesterov_apply: pseudo-gradient pieces do not hold {n} elements")
    lr = np.float32(config.learning_rate)
    mu = np.float32(config.momentum)
    factor = np.float32(scale)
    start = 0
    for piece in flat:
        stop = start + piece.shape[0]
        g = piece * factor if scale != 1.0 else piece
        step = g * lr
        m = momentum[start:stop]
        np.subtract(m * mu, step, out=m)
        weights[start:stop] += m * mu - step
        start = stop


def outer_step(
    shard: int,
    weights: np.ndarray,
    momentum: np.ndarray,
    delta_pieces: Sequence[np.ndarray],
    config: OuterConfig,
    staleness: int,
) -> None:
    """The store's step for one push: discount by staleness, then Nesterov, in place.

    Works on the loaded copy of the shard, before its commit: a step that carries a weight
    or the momentum past the float32 range raises NonFinite and nothing is stored.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # refused just below
        nesterov_apply_pieces(
            weights, momentum, delta_pieces, config, staleness_discount(staleness)
        )
    if not (np.isfinite(weights).all() and np.isfinite(momentum).all()):
        raise NonFinite(
            f"pseudo-gradient for shard {shard} would overflow the float32 weights; "
            "nothing was applied"
        )
