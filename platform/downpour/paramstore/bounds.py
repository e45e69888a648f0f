"""Bounds on a gradient before Adagrad sees it: a norm clip, and no accumulator overflow.

Adagrad divides by the root of the sum of squared gradients, so one huge finite push
(3e38 passes every finiteness check) makes those accumulators enormous, or infinite, and
freezes the weights under them for the rest of the job. Two bounds, both numpy only:

* :func:`clip_to_norm` scales a push down to ``max_grad_norm`` (a job setting, on by
  default at :data:`DEFAULT_MAX_GRAD_NORM`);
* :func:`check_squarable` refuses a push with a value whose square is not finite in
  float32, whatever the clip, and ``ParameterStore.push`` refuses one that would carry an
  accumulator past the float32 range.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from downpour.paramstore.errors import NonFinite
from downpour.paramstore.layout import ShardLayout

#: Default bound on the L2 norm of one push (one shard's gradient). Batch-mean gradients
#: of honest agents are orders of magnitude below it; Adagrad's per-element step barely
#: depends on a uniform scale, so a clip that does bite changes little but the accumulator.
DEFAULT_MAX_GRAD_NORM = 100.0

#: The largest magnitude whose float32 square is finite: sqrt(float32 max) ~ 1.84e19.
MAX_SQUARABLE = float(np.sqrt(np.finfo(np.float32).max))


def check_squarable(layout: ShardLayout, shard: int, pieces: Sequence[np.ndarray]) -> None:
    """Raise NonFinite if any value's square would overflow float32 (``|g| > MAX_SQUARABLE``).

    Parameters
    ----------
    pieces : sequence of ndarray
        float32, finite: the shard's gradient tensors, in the layout's order.
    """
    limit = np.float32(MAX_SQUARABLE)
    problems = []
    for spec, piece in zip(layout.shards[shard], pieces, strict=True):
        if piece.size and float(np.abs(piece).max()) > limit:
            problems.append(f"{spec.name!r} has values beyond ±{MAX_SQUARABLE:.3g}")
    if problems:
        raise NonFinite(
            f"gradient for shard {shard} would overflow Adagrad's float32 accumulator: "
            + "; ".join(problems)
        )


def gradient_norm(pieces: Sequence[np.ndarray]) -> float:
    """The L2 norm of the pieces together, summed in float64 so it cannot overflow."""
    return float(
        np.sqrt(
            sum(
                float(np.einsum("i,i->", p.reshape(-1), p.reshape(-1), dtype=np.float64))
                for p in pieces
            )
        )
    )


def clip_to_norm(pieces: Sequence[np.ndarray], max_norm: float) -> tuple[list[np.ndarray], bool]:
    """The pieces scaled so that their joint L2 norm is at most ``max_norm``.

    Parameters
    ----------
    pieces : sequence of ndarray
        float32 gradient tensors.
    max_norm : float
        > 0, in gradient units.

    Returns
    -------
    pieces : list of ndarray
        float32; the inputs themselves when already within the bound, else scaled copies.
    clipped : bool
    """
    norm = gradient_norm(pieces)
    if norm <= max_norm:
        return list(pieces), False
    scale = np.float32(max_norm / norm)
    return [piece * scale for piece in pieces], True
