"""The per-socket state's bookkeeping: what a socket forgets when its leases end."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from downpour.agents import checked_rounds
from downpour.agents.state import ENDED_LEASES_KEPT, SocketState
from downpour.training.spotchecks.recording import Recording


def test_a_lease_its_job_took_back_drops_its_spot_check_recording() -> None:
    # A checked lease keeps copies of the weights it was served (up to 16 per shard) until
    # its round settles; one taken back by its job's end never settles, so without this
    # the copies stayed until the socket closed.
    state = SocketState()
    recording = Recording()
    state.recordings["lease-1"] = Recording()
    state.recordings["lease-2"] = recording

    state.forget_lease("lease-1")

    assert "lease-1" not in state.recordings
    assert state.recordings == {"lease-2": recording}


def test_a_fetch_under_way_when_the_job_took_the_lease_back_records_nothing() -> None:
    # A fetch that read the lease before its job's end took it back serves the weights
    # after: it must not start the dropped recording again.
    state = SocketState()
    cached: Any = SimpleNamespace(lease_id="lease-1", job="job-1", spot_check_round=2)
    state.leases["lease-1"] = cached
    assert checked_rounds.recording(state, cached) is not None

    state.forget_lease("lease-1")

    assert checked_rounds.recording(state, cached) is None
    assert state.recordings == {}


def test_the_leases_remembered_as_ended_are_bounded() -> None:
    state = SocketState()
    for i in range(ENDED_LEASES_KEPT + 10):
        state.leases[f"lease-{i}"] = SimpleNamespace(job=f"job-{i}")  # type: ignore[assignment]
        state.forget_lease(f"lease-{i}")

    assert len(state.ended) == ENDED_LEASES_KEPT
    assert "lease-0" not in state.ended
    assert state.ended[f"lease-{ENDED_LEASES_KEPT + 9}"] == f"job-{ENDED_LEASES_KEPT + 9}"
