"""Adagrad, exactly as Keras 3 applies it, on flat float32 vectors.

Dean et al. (2012) use Adagrad in Downpour SGD: each parameter's learning rate is
``gamma / sqrt(sum of its squared gradients)``. Keras 3 adds ``epsilon`` inside the root and
starts the accumulator at ``initial_accumulator_value``; we match it bit for bit::

    accumulator += gradient * gradient
    weights     -= (learning_rate * gradient) / sqrt(accumulator + epsilon)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# Elements per block. Working block by block keeps the two temporaries in the L2 cache, so
# the update costs about one pass over each input from memory instead of seven.
BLOCK_ELEMENTS = 32_768


@dataclass(frozen=True)
class AdagradConfig:
    """Optimizer settings, with Keras 3 ``Adagrad`` defaults.

    Parameters
    ----------
    learning_rate : float
        Base step size (Dean et al.'s gamma), ``> 0``.
    initial_accumulator : float
        Starting value of every accumulator, ``>= 0`` (Keras ``initial_accumulator_value``).
    epsilon : float
        Added inside the square root, ``>= 0``.
    """

    learning_rate: float
    initial_accumulator: float = 0.1
    epsilon: float = 1e-7

    def __post_init__(self) -> None:
        if not np.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be finite and > 0, got {self.learning_rate}")
        if not np.isfinite(self.initial_accumulator) or self.initial_accumulator < 0:
            raise ValueError(
                f"initial_accumulator must be finite and >= 0, got {self.initial_accumulator}"
            )
        if not np.isfinite(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"epsilon must be finite and >= 0, got {self.epsilon}")


def adagrad_apply(
    weights: np.ndarray,
    accumulators: np.ndarray,
    grad: np.ndarray,
    learning_rate: float,
    epsilon: float,
    *,
    out_weights: np.ndarray | None = None,
    out_accumulators: np.ndarray | None = None,
) -> None:
    """Apply one Adagrad step.

    Parameters
    ----------
    weights, accumulators, grad : ndarray
        float32, same 1-D shape ``(n,)``.
    learning_rate : float
        Step size for this update (already multiplied by any per-push scale); cast to float32.
    epsilon : float
        Added to the accumulator inside the square root; cast to float32.
    out_weights, out_accumulators : ndarray, optional
        float32 ``(n,)`` arrays to receive the results. By default the update happens in place
        in ``weights`` and ``accumulators``. Passing both leaves the inputs untouched.

    Notes
    -----
    The arithmetic is float32 in the same operation order as Keras 3, so results are
    identical to ``keras.optimizers.Adagrad`` on the CPU. Temporaries are a few blocks of
    ``BLOCK_ELEMENTS`` floats, whatever ``n`` is.
    """
    _check_vector("grad", grad, weights.shape[0] if weights.ndim == 1 else -1)
    adagrad_apply_pieces(
        weights,
        accumulators,
        [grad],
        learning_rate,
        epsilon,
        out_weights=out_weights,
        out_accumulators=out_accumulators,
    )


def adagrad_apply_pieces(
    weights: np.ndarray,
    accumulators: np.ndarray,
    grad_pieces: Sequence[np.ndarray],
    learning_rate: float,
    epsilon: float,
    *,
    out_weights: np.ndarray | None = None,
    out_accumulators: np.ndarray | None = None,
) -> None:
    """:func:`adagrad_apply` with the gradient given as consecutive pieces.

    Equivalent to ``adagrad_apply(weights, accumulators, np.concatenate([p.ravel() for p in
    grad_pieces]), ...)`` but never builds the concatenation: each block of the gradient is
    a view into one piece, or is gathered into a cache-sized buffer where pieces meet. This
    lets a push apply a shard's per-variable gradients without flattening them first.

    Parameters
    ----------
    grad_pieces : sequence of ndarray
        float32 arrays of any shape (read in C order) whose sizes add up to ``n``.
    """
    n = weights.shape[0] if weights.ndim == 1 else -1
    out_w = weights if out_weights is None else out_weights
    out_a = accumulators if out_accumulators is None else out_accumulators
    for name, array in (
        ("weights", weights),
        ("accumulators", accumulators),
        ("out_weights", out_w),
        ("out_accumulators", out_a),
    ):
        _check_vector(name, array, n)
    pieces = [piece.reshape(-1) for piece in grad_pieces]
    for piece in pieces:
        if piece.dtype != np.float32:
            raise ValueError(f"adagrad_apply: gradient pieces must be float32, got {piece.dtype}")
    total = sum(piece.shape[0] for piece in pieces)
    if total != n:
        raise ValueError(f"adagrad_apply: gradient pieces hold {total} elements, expected {n}")
    if n == 0:
        return
    lr = np.float32(learning_rate)
    eps = np.float32(epsilon)
    block = min(BLOCK_ELEMENTS, n)
    scratch_a = np.empty(block, dtype=np.float32)
    scratch_b = np.empty(block, dtype=np.float32)
    gather = np.empty(block, dtype=np.float32)
    for start, g in zip(range(0, n, block), _grad_blocks(pieces, n, block, gather), strict=True):
        stop = start + g.shape[0]
        a = out_a[start:stop]
        t = scratch_a[: g.shape[0]]
        d = scratch_b[: g.shape[0]]
        np.multiply(g, g, out=t)
        np.add(accumulators[start:stop], t, out=a)
        np.add(a, eps, out=d)
        np.sqrt(d, out=d)
        np.multiply(lr, g, out=t)
        np.divide(t, d, out=t)
        np.subtract(weights[start:stop], t, out=out_w[start:stop])


def _grad_blocks(
    pieces: Sequence[np.ndarray], n: int, block: int, gather: np.ndarray
) -> Iterator[np.ndarray]:
    """Yield the concatenated gradient block by block; ``gather`` is reused between yields."""
    index, position = 0, 0
    for start in range(0, n, block):
        wanted = min(block, n - start)
        while pieces[index].shape[0] == position:
            index, position = index + 1, 0
        piece = pieces[index]
        if piece.shape[0] - position >= wanted:
            yield piece[position : position + wanted]
            position += wanted
            continue
        filled = 0
        while filled < wanted:
            while pieces[index].shape[0] == position:
                index, position = index + 1, 0
            piece = pieces[index]
            take = min(wanted - filled, piece.shape[0] - position)
            gather[filled : filled + take] = piece[position : position + take]
            filled += take
            position += take
        yield gather[:wanted]


def _check_vector(name: str, array: np.ndarray, n: int) -> None:
    if array.dtype != np.float32 or array.ndim != 1 or array.shape[0] != n:
        raise ValueError(
            f"adagrad_apply: {name} must be a float32 vector of {n} elements, "
            f"got {array.dtype} {array.shape}"
        )
