"""Credit for donors: per accepted sample, discounted by staleness.

A push of ``samples`` samples applied with staleness ``s`` earns ``samples / (1 + s)``
credit; a rejected push earns nothing, and so does a push replayed after a reconnect
(the store applies each ``(lease, seq, shard)`` push id at most once). The server adds it
to ``Contribution.credit`` (``downpour.training.actions.contributions.Tally``).
"""

from __future__ import annotations


def credit_for_push(samples: int, staleness: int, accepted: bool) -> float:
    """Credit for one push, in sample-equivalents.

    Parameters
    ----------
    samples : int
        Training samples behind the pushed gradient.
    staleness : int
        Versions applied between the fetch and the push, >= 0.
    accepted : bool
        Whether the store applied it.
    """
    if not accepted or samples <= 0:
        return 0.0
    return samples / (1 + max(0, staleness))
