"""Synchronous jobs want N + b agents at once (Chen et al. 2016), each with one lease.

Each step averages the first N gradients computed on the same weights, so a second lease
of the same job on one agent would only compete with itself, and leases past N + b would
only add late gradients. Fair share counts a synchronous job like any other: by the
samples of its leases, done and in flight, so its N + b agents weigh N + b agents' worth
against its owner's share.
"""

from __future__ import annotations


def sync_admits(leases_held: int, agent_holds_one: bool, wanted: int) -> bool:
    """Whether a synchronous job takes one more lease from this agent.

    Parameters
    ----------
    leases_held : int
        Agents holding an active lease of the job now.
    agent_holds_one : bool
        This agent is one of them.
    wanted : int
        N + b, the agents the job wants at once.
    """
    return not agent_holds_one and leases_held < wanted
