"""Credit for donors: per accepted sample, discounted by staleness.

A push of ``samples`` samples applied with staleness ``s`` earns ``samples / (1 + s)``
credit; a rejected push earns nothing, and so does a push replayed after a reconnect
(the store applies each ``(lease, seq)`` at most once, and the ledger counts it once).
This is what ``agents/consumers.py`` adds to ``Contribution.credit`` today.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class CreditLedger:
    """Credit per agent, with each ``(lease_id, seq)`` counted at most once.

    Attributes
    ----------
    credit : dict[str, float]
        Credit by agent id.
    samples_accepted : dict[str, int]
        Accepted samples by agent id.
    duplicates : int
        Pushes refused because their ``(lease_id, seq)`` was already counted.
    """

    credit: dict[str, float] = field(default_factory=dict)
    samples_accepted: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    _seen: dict[str, set[int]] = field(default_factory=dict, repr=False)

    def record_push(
        self,
        agent_id: str,
        lease_id: str,
        seq: int,
        samples: int,
        staleness: int,
        accepted: bool,
    ) -> float:
        """Count one push and return the credit it earned (0.0 for a duplicate).

        Parameters
        ----------
        agent_id, lease_id : str
        seq : int
            The push's sequence number within its lease.
        samples : int
            Samples behind the gradient.
        staleness : int
            Its staleness, >= 0.
        accepted : bool
            Whether the store applied it.
        """
        seen = self._seen.setdefault(lease_id, set())
        if seq in seen:
            self.duplicates += 1
            return 0.0
        seen.add(seq)
        earned = credit_for_push(samples, staleness, accepted)
        if earned:
            self.credit[agent_id] = self.credit.get(agent_id, 0.0) + earned
            self.samples_accepted[agent_id] = self.samples_accepted.get(agent_id, 0) + samples
        return earned

    def forget_lease(self, lease_id: str) -> None:
        """Drop the ``(lease_id, seq)`` keys of a lease that has ended, to bound memory."""
        self._seen.pop(lease_id, None)
