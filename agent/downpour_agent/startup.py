"""A lease's start: the first fetch travels while the data loads and the model builds.

Before the first step an agent needs the data, a model with its traced step, and the
store's weights. None of these needs another, except that tracing needs a batch, so they
overlap: the fetch requests go out first, the dataset and the model are made in two worker
threads, the step is traced on the lease's first batch size, and only then are the answers
awaited (they have usually arrived). On a donor's link the fetch of a large model takes
as long as building it; on loopback the tracing dominates and is done once per job (the
model cache keeps the traced step for the job's later leases).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from downpour_agent.leases import check_layout
from downpour_agent.protocol import DatasetSpec, LeaseSpec
from downpour_agent.session import Pending, Session
from downpour_agent.trainer import GradientComputer
from downpour_agent.transfer import abandon_fetch, request_params


@dataclass
class Prepared:
    """What a lease starts from; ``first_fetch`` is answered or in flight."""

    x: npt.NDArray[Any]
    y: npt.NDArray[Any]
    computer: GradientComputer
    first_fetch: list[Pending]
    #: ``time.perf_counter()`` when the lease arrived.
    started: float
    #: Seconds since the lease arrived, at each stage's end (for the agent log).
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.perf_counter() - self.started, 4)


async def prepare_lease(
    session: Session,
    lease: LeaseSpec,
    load_dataset: Callable[[DatasetSpec], tuple[npt.NDArray[Any], npt.NDArray[Any]]],
    build_model: Callable[[LeaseSpec], GradientComputer],
    on_stage: Callable[[str], None] = lambda stage: None,
) -> Prepared:
    """Fetch, load and build at once; raises what ``load_dataset``/``build_model`` raise
    (after forgetting the fetch requests)."""
    started = time.perf_counter()
    marks: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)
        marks[name] = round(time.perf_counter() - started, 4)
        return result

    pendings = await request_params(session, lease)
    try:
        on_stage("downloading data, building the model")
        data = asyncio.create_task(asyncio.to_thread(timed, "data", load_dataset, lease.dataset))
        try:
            computer = await asyncio.to_thread(timed, "model", build_model, lease)
        finally:
            x, y = await data  # never leave the download running on its own
        check_layout(lease.layout, computer.variable_specs())
        on_stage("tracing the model")
        batch = min(lease.hyper.batch_size, len(x))
        await asyncio.to_thread(timed, "traced", computer.warm_up, x[:batch], y[:batch])
    except BaseException:
        abandon_fetch(session, lease.job_id, pendings)
        raise
    return Prepared(x, y, computer, pendings, started, marks)
