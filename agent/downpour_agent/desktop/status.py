"""What the status page shows: one snapshot object the agent updates as it works,
and a small persisted book of the credit this machine earned."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

# States, and the reasons shown beside "paused".
STARTING: Final = "starting"
COMPUTING: Final = "computing"
PAUSED: Final = "paused"
NO_WORK: Final = "no work"
DISCONNECTED: Final = "disconnected"
STOPPED: Final = "stopped"

PERSON_ACTIVE: Final = "the person is active"
MACHINE_BUSY: Final = "other programs are using the CPU"
ON_BATTERY: Final = "on battery"
OUTSIDE_SCHEDULE: Final = "outside the scheduled hours"
BY_DONOR: Final = "paused by you"


@dataclass
class AgentStatus:
    """The agent's state as the donor sees it. The work loop writes the fields; the
    status page reads :meth:`to_dict` from its own thread."""

    state: str = STARTING
    reason: str = ""
    server_url: str = ""
    job_id: str | None = None
    lease_id: str | None = None
    steps_done: int = 0
    steps_total: int = 0
    samples_per_s: float = 0.0
    credit_today: float = 0.0
    credit_total: float = 0.0
    stop_after_unit: bool = False
    gpu: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    since: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def set_state(self, state: str, reason: str = "") -> None:
        with self._lock:
            if (state, reason) != (self.state, self.reason):
                self.state, self.reason, self.since = state, reason, time.time()

    def update(self, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if not f.name.startswith("_")
            }


class CreditBook:
    """Credit earned on this machine, today (local date) and in total, kept in a JSON
    file so it survives restarts. The server's ledger is the authority; this is what
    the agent saw in its push acknowledgements.

    The file is written at most every ``save_interval_s`` (and by :meth:`save`): a push
    ack must not cost a disk write. A failed write is logged, never raised: the book is
    a convenience and must not stop training.
    """

    def __init__(self, path: Path, save_interval_s: float = 5.0) -> None:
        self.path = path
        self.save_interval_s = save_interval_s
        self._saved_at = -math.inf
        self.day = dt.datetime.now().astimezone().date().isoformat()
        self.today = 0.0
        self.total = 0.0
        try:
            data = json.loads(path.read_text())
            self.total = float(data.get("total", 0.0))
            if data.get("day") == self.day:
                self.today = float(data.get("today", 0.0))
        except (OSError, ValueError, AttributeError):
            pass

    def add(self, credit: float) -> None:
        day = dt.datetime.now().astimezone().date().isoformat()
        if day != self.day:
            self.day, self.today = day, 0.0
        self.today += credit
        self.total += credit
        if time.monotonic() - self._saved_at >= self.save_interval_s:
            self.save()

    def save(self) -> None:
        """Write the book atomically (a private temporary file, then a rename)."""
        self._saved_at = time.monotonic()
        body = json.dumps({"day": self.day, "today": self.today, "total": self.total})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("credit book %s not saved: %s", self.path, exc)
