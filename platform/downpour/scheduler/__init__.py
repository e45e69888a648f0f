"""Scheduling policy over plain dataclasses: no Django, no I/O (see docs/scheduling.md).

The server rebuilds these dataclasses from PostgreSQL rows for every decision; the
simulator in ``bench/simulate.py`` keeps them in memory. Both call the same functions.

* :mod:`.policy` -- which job gets the next unit (weighted max-min fair share) and its size.
* :mod:`.fairness` -- water-filling, Jain's index, decaying windows.
* :mod:`.leases` -- time to live, heartbeats, expiry, resumption, reissue.
* :mod:`.sizing` -- units sized from measured work; leases per agent; share of a budget.
* :mod:`.reliability` -- completed vs abandoned leases, unit scale, the tail of a job.
* :mod:`.backups` -- backup copies of straggling units near the end of a job.
* :mod:`.staleness` -- push cadence, admission, staleness-aware step, warm start, histogram.
* :mod:`.credit` -- the donors' credit per push.
* :mod:`.gang` -- synchronous jobs want N + b agents at once, one lease each.
* :mod:`.sandblaster` -- Sandblaster's passes cut into units; backup copies of stragglers.
* :mod:`.trust` -- robust jobs warming up go to trusted agents only.
* :mod:`.reputation` -- clipping and spot-check verdicts, and when they ban an agent.
"""

from __future__ import annotations

from .backups import BackupRule, expected_duration_s, should_issue_backup, straggler_order
from .credit import credit_for_push
from .fairness import (
    DecayingTotals,
    active_seconds,
    decayed_span,
    jain_index,
    runnable_since,
    weighted_max_min_shares,
)
from .gang import sync_admits
from .inner_steps import InnerStepsRule, choose_inner_steps
from .leases import LeaseView, can_resume, is_expired, should_reissue
from .policy import (
    REFERENCE_FLOPS_PER_SAMPLE,
    FairWindow,
    JobLoad,
    fits_agent,
    pick_job,
    rank_jobs,
    split_unit,
    unit_steps,
)
from .reliability import (
    HostRecord,
    TailRule,
    admits_to_tail,
    is_reliable,
    record_outcome,
    reliability,
    remaining_fraction,
    tail_unit_scale,
    unit_scale,
)
from .sandblaster import (
    PassBackupRule,
    PassSlice,
    pass_backup_due,
    split_pass,
    typical_unit_s,
)
from .sizing import (
    SizingRule,
    may_take_lease,
    measured_unit_steps,
    reference_rate,
    share_cap_steps,
    update_measured_rate,
)
from .staleness import (
    StalenessHistogram,
    WarmStart,
    admits_replica,
    expected_staleness,
    push_every_steps,
    push_interval_s,
)
from .trust import admits_during_warmup, warmup_eligible

__all__ = [
    "PassBackupRule",
    "PassSlice",
    "pass_backup_due",
    "split_pass",
    "typical_unit_s",
    "InnerStepsRule",
    "choose_inner_steps",
    "sync_admits",
    "may_take_lease",
    "measured_unit_steps",
    "reference_rate",
    "share_cap_steps",
    "update_measured_rate",
    "REFERENCE_FLOPS_PER_SAMPLE",
    "BackupRule",
    "DecayingTotals",
    "FairWindow",
    "HostRecord",
    "JobLoad",
    "LeaseView",
    "SizingRule",
    "StalenessHistogram",
    "TailRule",
    "WarmStart",
    "active_seconds",
    "decayed_span",
    "admits_during_warmup",
    "admits_replica",
    "admits_to_tail",
    "can_resume",
    "credit_for_push",
    "expected_duration_s",
    "expected_staleness",
    "fits_agent",
    "is_expired",
    "is_reliable",
    "jain_index",
    "pick_job",
    "push_every_steps",
    "push_interval_s",
    "rank_jobs",
    "record_outcome",
    "reliability",
    "remaining_fraction",
    "runnable_since",
    "should_issue_backup",
    "should_reissue",
    "split_unit",
    "straggler_order",
    "tail_unit_scale",
    "unit_scale",
    "unit_steps",
    "warmup_eligible",
    "weighted_max_min_shares",
]
