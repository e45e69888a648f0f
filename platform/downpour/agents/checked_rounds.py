"""Which pushes of a spot-checked lease the socket keeps, and when its round is complete.

The consumer calls these with its per-socket state; they touch no database (saving a
complete or skipped round is the consumer's, through ``database_sync_to_async``).
"""

from __future__ import annotations

from typing import Any

from downpour.training.spotchecks.recording import Recording

from .state import CachedLease, SocketState


def recording(state: SocketState, cached: CachedLease) -> Recording | None:
    """The recording of a checked lease whose round is not yet in; None otherwise (also
    for a lease its job's end took back: a fetch already under way when that happened must
    not start its recording again, which would keep copies of weights until the socket
    closes)."""
    if cached.spot_check_round is None or cached.lease_id in state.recorded:
        return None
    if cached.lease_id in state.ended:
        return None
    return state.recordings.setdefault(cached.lease_id, Recording())


def add_push(
    state: SocketState,
    cached: CachedLease,
    msg: dict[str, Any],
    tensors: dict[str, Any],
    bounds: dict[str, float],
    n_shards: int,
) -> Recording | None:
    """Keep a push of the checked round; returns the recording once every shard is in."""
    # A duplicate counts: a resumed lease sends its interrupted round again in full.
    kept = recording(state, cached)
    if kept is None or cached.spot_check_round is None:
        return None
    if msg["seq"] == cached.spot_check_round - 1:  # its int8 residual rides in the next
        kept.add_previous_bounds(bounds)
    if msg["seq"] != cached.spot_check_round:
        return None
    kept.add_push(msg, tensors, bounds)
    if not kept.complete(n_shards):
        return None
    del state.recordings[cached.lease_id]
    state.recorded.add(cached.lease_id)
    return kept


def skipped(state: SocketState, cached: CachedLease, seq: int) -> bool:
    """A push past the checked round before that round arrived in full: the agent skipped
    it (rounds are pushed in order), which fails the check (issue 10)."""
    checked = cached.spot_check_round
    if checked is None or seq <= checked or cached.lease_id in state.recorded:
        return False
    state.recordings.pop(cached.lease_id, None)
    state.recorded.add(cached.lease_id)
    return True
