"""The convergence simulator's other training modes (issue #12): sync, local steps, Sandblaster.

Each mode is a :class:`convergence_sim.Simulation` with the same world (virtual time,
links, donors, churn, scoring every 0.5 virtual s), the same student, data shards and
gradients, and the mode's own real server-side code:

``sync``         ``SyncAggregator`` (Chen et al. 2016) on the memory store, its step timeout
                 on the virtual clock. A donor pushes the gradient of one batch computed on
                 version ``v`` and waits, as ``syncloop.fetch_next_step`` does, for a fetch
                 with ``min_version v + 1``; the first N of the gradients of ``v`` are
                 averaged, later ones are dropped as late. N + b are all the donors:
                 ``b = max(1, round(backup_share * donors))`` backups (0 with one donor).
``local-steps``  The store with the outer Nesterov optimizer (``paramstore.outer``). A donor
                 runs rounds of H inner AdamW steps (``local_steps``' rules, in numpy:
                 state reset per round, rebase ``w = G + (w - S)`` when weights arrive
                 mid-round), pushes ``S - w`` and fetches in the background while the next
                 round computes (``local_training``). H comes from
                 ``scheduler.choose_inner_steps`` with the donor's compute rate and link, as
                 the server chooses it from the rates the agent reports (16 on a donor's
                 first lease).
``sandblaster``  ``LbfgsState`` (the coordinator's L-BFGS) on the store's weights. Each pass
                 evaluates the loss and gradient at the trial point over all the training
                 data, cut by ``scheduler.split_pass`` into ``max(units_min,
                 units_per_donor * donors)`` units; a donor claims a unit, fetches the pass's
                 weights if it does not hold them, computes and sends the unit's answer.
                 Idle donors get backup copies of stragglers (``pass_backup_due``) and
                 otherwise ask again after ``SANDBLASTER_RETRY_S``. When every unit has an
                 answer the coordinator (after ``coordinator_s``) tells L-BFGS the pass's
                 loss and gradient, computed here at once over the training set (what the
                 units' answers sum to), and writes the next trial point as the next
                 version, as ``training.sandblaster`` does.

What is simplified, beyond Downpour's list in ``convergence_sim``: donors keep every data
shard they downloaded (the agent's disk cache) where Downpour's simulated donor keeps one;
a Sandblaster copy whose donor left is forgotten after ``LEASE_TTL_S`` (the server's lease
expiry) and meanwhile covered by backups; compression is ``none`` in every mode.

Usage::

    .venv/bin/python bench/sim_modes.py --donors 1 16 64 --json-out bench/results/sim_modes.json \\
        --plot docs/modes-sim.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

from convergence_sim import (  # noqa: E402
    Calibration,
    Donor,
    Fetch,
    JobSettings,
    Simulation,
    Student,
    mlp_gradients,
    sim_unit_steps,
)
from downpour.paramstore import (  # noqa: E402
    DEFAULT_MAX_GRAD_NORM,
    AdagradConfig,
    InMemoryStorage,
    ParameterStore,
)
from downpour.paramstore.lbfgs import LbfgsConfig, LbfgsState  # noqa: E402
from downpour.paramstore.outer import OuterConfig  # noqa: E402
from downpour.paramstore.storage import CommitOutcome, ShardState  # noqa: E402
from downpour.paramstore.sync import SyncAggregator, SyncRule  # noqa: E402
from downpour.scheduler import (  # noqa: E402
    choose_inner_steps,
    pass_backup_due,
    split_pass,
    typical_unit_s,
)
from downpour.teacher import teacher_data  # noqa: E402
from downpour_agent.trainer import BatchSampler  # noqa: E402
from simworld import FETCH_REQUEST_BYTES, DonorSpec, Population  # noqa: E402

MODES = ("downpour", "sync", "local-steps", "sandblaster")
#: ``training.queries.SANDBLASTER_RETRY_S``: an idle agent's wait while a Sandblaster job runs.
SANDBLASTER_RETRY_S = 0.25
#: A Sandblaster copy whose donor left is given up after this long (the lease's expiry).
LEASE_TTL_S = 60.0

# The agent's inner AdamW (downpour_agent.local_steps; docs/protocol.md, "Local steps").
ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON, ADAMW_WEIGHT_DECAY = 0.9, 0.999, 1e-7, 0.004


@dataclass(frozen=True)
class ModeSettings:
    """Each mode's own settings: the job form's defaults unless stated."""

    sync_backup_share: float = 0.1  # b as a share of the donors (the form's b is per job)
    sync_step_timeout_s: float = 10.0
    inner_steps: int = 0  # 0: chosen per donor
    inner_learning_rate: float = 0.001
    # The form's defaults since 4 December (learning rate 1.0, no momentum); ``--outer
    # 0.7:0.9`` gives DiLoCo's, with which the first mode figures were simulated.
    outer_learning_rate: float = 1.0
    outer_momentum: float = 0.0
    units_min: int = 24  # the form's default units a pass
    units_per_donor: int = 4  # "many more units than agents" (Dean et al.)
    lbfgs_history: int = 10
    coordinator_s: float = 0.05  # a coordinator turn after the last answer (assumed)
    sandblaster_backups: bool = True  # off only to measure what the backups buy


def sync_rule(donors: int, modes: ModeSettings) -> SyncRule:
    """N + b = every donor, ``b`` a share of them (none with one donor)."""
    backups = 0 if donors == 1 else max(1, round(modes.sync_backup_share * donors))
    return SyncRule(donors - backups, backups, modes.sync_step_timeout_s)


class _ModeBase(Simulation):
    """What the modes share: a claim as the Downpour donor makes one, with a shard cache."""

    def __init__(self, *args: Any, modes: ModeSettings, **kwargs: Any) -> None:
        self.modes = modes
        super().__init__(*args, **kwargs)
        self.shards_held: dict[int, set[int]] = {}

    def _session(self, donor: Donor, start: float, end: float) -> Generator[Any, None, None]:
        yield "until", start
        donor.session_end = end
        donor.up.free_at = donor.down.free_at = max(start, donor.up.free_at)

    def _claim(self, donor: Donor) -> Generator[Any, None, int]:
        """Ask for a lease (one RTT and the server's time), then make sure the data shard is
        held and the model built; returns the shard."""
        yield "sleep", donor.spec.link.rtt_s + self.cal.lease_overhead_s
        shard = self.units_issued % len(self.shards)  # fewest units first, as claims
        self.units_issued += 1
        yield from self._prepare(donor, shard)
        return shard

    def _prepare(self, donor: Donor, shard: int) -> Generator[Any, None, None]:
        donor.leases += 1
        self.counts.leases += 1
        held = self.shards_held.setdefault(donor.spec.index, set())
        # Unlike Downpour's loop (convergence_sim), the modes fetch only after this: their
        # first fetch is in series with the data and the model.
        ready = self._start_up(donor, shard, download=shard not in held)
        held.add(shard)
        yield "until", ready

    def _arrays(self, flats: Sequence[np.ndarray]) -> list[np.ndarray]:
        weights: dict[str, np.ndarray] = {}
        for shard, flat in enumerate(flats):
            weights |= self.student.layout.unflatten_shard(shard, flat)
        return [weights[name] for name in self.student.names]

    def _as_shards(self, arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.student.names, arrays, strict=True))

    def _step_s(self, donor: Donor) -> float:
        return self.settings.batch_size / donor.spec.speed + self.cal.step_overhead_s


# --- sync -----------------------------------------------------------------------------------


class SyncSimulation(_ModeBase):
    def __init__(self, *args: Any, rule: SyncRule, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rule = rule
        self.sync = SyncAggregator(self.store, rule)
        self.waiting: list[tuple[Donor, Fetch, list[int]]] = []
        self.ticks_for: set[int] = set()

    def _donor(self, donor: Donor) -> Generator[Any, None, None]:
        s = self.settings
        step_s = self._step_s(donor)
        for start, end in donor.spec.sessions:
            if start >= self.horizon_s:
                return
            yield from self._session(donor, start, end)
            while self._alive(donor):
                shard = yield from self._claim(donor)
                if not self._alive(donor):
                    break
                x, y = self.shards[shard]
                steps = sim_unit_steps(s, donor.spec.speed, len(x))
                sampler = BatchSampler(len(x), s.batch_size, int(self.rng.integers(1 << 31)))
                fetch = self._fetch(donor)
                yield "fetch", fetch
                for step in range(steps):
                    if not self._alive(donor) or self.counts.steps >= self.max_steps:
                        break
                    base = list(fetch.versions)
                    idx = sampler.next_indices()
                    grads = mlp_gradients(self._arrays(fetch.flats), x[idx], y[idx])
                    yield "sleep", step_s
                    if not self._alive(donor):
                        break
                    donor.steps += 1
                    donor.compute_s += step_s
                    self.counts.steps += 1
                    self._sync_push(donor, self._as_shards(grads), base, step)
                    if step + 1 < steps:
                        fetch = self._fetch_after(donor, base)
                        yield "fetch", fetch

    def _sync_push(
        self, donor: Donor, grads: dict[str, np.ndarray], base: list[int], step: int
    ) -> None:
        at_server = donor.up.send(self.queue.now, sum(self.push_bytes))
        session_end = donor.session_end
        lease = f"{donor.spec.index}:{donor.leases}"

        def offer() -> None:
            if self.queue.now > session_end:
                self.counts.pushes_lost += 1
                return
            for shard, specs in enumerate(self.student.layout.shards):
                result = self.sync.push(
                    shard,
                    {spec.name: grads[spec.name] for spec in specs},
                    base[shard],
                    f"{lease}:{step}:{shard}",
                    lease,
                    self.settings.batch_size,
                    worker=str(donor.spec.index),
                )
                if result.late:
                    self.counts.pushes_stale += 1
                elif result.applied:
                    self.counts.pushes_applied += 1
            version = base[0]
            if version not in self.ticks_for and self.store.versions()[0] == version:
                self.ticks_for.add(version)  # the step's first gradient: its timeout runs
                # One ulp later: (now + timeout) - now can round to just under the timeout,
                # and the step would then never be applied.
                due = math.nextafter(self.queue.now + self.rule.step_timeout_s, math.inf)
                self.queue.at(due, lambda: self._tick(version))
            self._serve_waiting()

        self.queue.at(at_server, offer)

    def _tick(self, version: int) -> None:
        for shard, current in enumerate(self.store.versions()):
            if current == version:
                self.sync.tick(shard)
        self._serve_waiting()

    def _fetch_after(self, donor: Donor, base: list[int]) -> Fetch:
        """A fetch with ``min_version = base + 1``: answered once every shard is past it."""
        fetch = Fetch()
        at_server = donor.up.send(self.queue.now, FETCH_REQUEST_BYTES * len(base))
        self.counts.fetches += 1

        def held() -> None:
            self.waiting.append((donor, fetch, base))
            self._serve_waiting()

        def give_up() -> None:  # the donor left: let its process see that
            if not fetch.done and fetch.waiter is not None:
                self.waiting = [w for w in self.waiting if w[1] is not fetch]
                self._serve(donor, fetch)

        self.queue.at(at_server, held)
        self.queue.at(max(at_server, donor.session_end), give_up)
        return fetch

    def _serve_waiting(self) -> None:
        versions = self.store.versions()
        ready = [w for w in self.waiting if all(v > b for v, b in zip(versions, w[2], strict=True))]
        if not ready:
            return
        self.waiting = [w for w in self.waiting if w not in ready]
        for donor, fetch, _ in ready:
            self._serve(donor, fetch)

    def run(self) -> dict[str, Any]:
        result = super().run()
        counts = self.sync.counts()
        result["sync"] = {
            "workers": self.rule.workers,
            "backups": self.rule.backups,
            "steps": counts.steps,
            "timeouts": counts.timeouts,
            "late": counts.late,
        }
        return result


# --- local steps ----------------------------------------------------------------------------


class AdamW:
    """The agent's inner AdamW in numpy float32, in place (``local_steps.InnerOptimizer``)."""

    def __init__(self, learning_rate: float) -> None:
        self.lr = np.float32(learning_rate)
        self.m: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.t = 0

    def reset(self, weights: Sequence[np.ndarray]) -> None:
        """A round's start: moments and step count from zero."""
        self.m = [np.zeros_like(w) for w in weights]
        self.v = [np.zeros_like(w) for w in weights]
        self.t = 0

    def step(self, weights: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        self.t += 1
        lr = self.lr
        alpha = np.float32(lr * math.sqrt(1 - ADAM_BETA_2**self.t) / (1 - ADAM_BETA_1**self.t))
        for w, g, m, v in zip(weights, grads, self.m, self.v, strict=True):
            w -= w * np.float32(ADAMW_WEIGHT_DECAY) * lr
            m += (g - m) * np.float32(1 - ADAM_BETA_1)
            v += (g * g - v) * np.float32(1 - ADAM_BETA_2)
            w -= (m * alpha) / (np.sqrt(v) + np.float32(ADAM_EPSILON))


class LocalStepsSimulation(_ModeBase):
    def _make_store(self) -> ParameterStore:
        s, m = self.settings, self.modes
        return ParameterStore(
            InMemoryStorage(clock=lambda: self.queue.now),
            "sim",
            self.student.layout,
            AdagradConfig(s.learning_rate),
            s.max_staleness,
            max_grad_norm=DEFAULT_MAX_GRAD_NORM,
            outer=OuterConfig(m.outer_learning_rate, m.outer_momentum),
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_bytes = 4.0 * sum(w.size for w in self.student.initial.values())
        self.inner_steps: list[int] = []

    def _h(self, donor: Donor) -> int:
        link = donor.spec.link
        measured = donor.leases > 1  # the agent reports its rates from its first lease on
        up = link.up_mbit * 1e6 / 8 / (1 + link.rtt_s * link.up_mbit * 1e6 / 8 / self.model_bytes)
        down = (
            link.down_mbit
            * 1e6
            / 8
            / (1 + link.rtt_s * link.down_mbit * 1e6 / 8 / self.model_bytes)
        )
        return choose_inner_steps(
            fixed=self.modes.inner_steps,
            batch_size=self.settings.batch_size,
            push_bytes=self.model_bytes,
            fetch_bytes=self.model_bytes,
            compute_samples_per_s=donor.spec.speed if measured else None,
            push_bytes_per_s=up if measured else None,
            fetch_bytes_per_s=down if measured else None,
        )

    def _donor(self, donor: Donor) -> Generator[Any, None, None]:
        s = self.settings
        step_s = self._step_s(donor)
        adamw = AdamW(self.modes.inner_learning_rate)
        for start, end in donor.spec.sessions:
            if start >= self.horizon_s:
                return
            yield from self._session(donor, start, end)
            while self._alive(donor):
                shard = yield from self._claim(donor)
                if not self._alive(donor):
                    break
                h = self._h(donor)
                self.inner_steps.append(h)
                x, y = self.shards[shard]
                steps = sim_unit_steps(s, donor.spec.speed, len(x))
                sampler = BatchSampler(len(x), s.batch_size, int(self.rng.integers(1 << 31)))
                fetch = self._fetch(donor)
                yield "fetch", fetch
                held, held_versions = self._arrays(fetch.flats), list(fetch.versions)
                inflight: Fetch | None = None
                round_start = 0
                start_w: list[np.ndarray] = []
                w: list[np.ndarray] = []
                base: list[int] = []
                for step in range(steps):
                    if not self._alive(donor) or self.counts.steps >= self.max_steps:
                        break
                    if inflight is not None and inflight.done:
                        held, held_versions = self._arrays(inflight.flats), list(inflight.versions)
                        inflight = None
                        if step != round_start:  # rebase: w = G + (w - S), S = G
                            w = [g + (wi - si) for g, wi, si in zip(held, w, start_w, strict=True)]
                            start_w = [g.copy() for g in held]
                    if step == round_start:
                        start_w = [g.copy() for g in held]
                        w = [g.copy() for g in held]
                        adamw.reset(w)
                        base = list(held_versions)
                    idx = sampler.next_indices()
                    adamw.step(w, mlp_gradients(w, x[idx], y[idx]))
                    yield "sleep", step_s
                    if not self._alive(donor):
                        break
                    donor.steps += 1
                    donor.compute_s += step_s
                    self.counts.steps += 1
                    if step + 1 - round_start == h or step + 1 == steps:
                        delta = [si - wi for si, wi in zip(start_w, w, strict=True)]
                        tag = f"{donor.spec.index}:{donor.leases}:{step}"
                        self._push(donor, self._as_shards(delta), base, tag)
                        round_start = step + 1
                        if step + 1 < steps:
                            inflight = self._fetch(donor)  # after the push on the uplink

    def run(self) -> dict[str, Any]:
        result = super().run()
        hs = sorted(self.inner_steps)
        result["inner_steps"] = {
            "median": hs[len(hs) // 2] if hs else None,
            "min": hs[0] if hs else None,
            "max": hs[-1] if hs else None,
        }
        return result


# --- Sandblaster ----------------------------------------------------------------------------


@dataclass
class _Unit:
    shard: int
    start: int
    stop: int
    answered: bool = False
    copies: list[tuple[int, float]] = field(default_factory=list)  # (donor, claimed at)


class SandblasterSimulation(_ModeBase):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        n = len(self.donors)
        units = max(self.modes.units_min, self.modes.units_per_donor * n)
        self.slices = split_pass([len(sx) for sx, _ in self.shards], units)
        x0 = np.concatenate(
            [self.store.fetch_flat(k)[1] for k in range(len(self.student.layout.shards))]
        )
        self.lbfgs = LbfgsState.start(x0, LbfgsConfig(history=self.modes.lbfgs_history))
        self.version = 0
        self.passes = 0
        self.backups = 0
        self.late = 0
        self.units: list[_Unit] = []
        self.durations: list[float] = []
        self._new_pass()

    def _new_pass(self) -> None:
        self.units = [_Unit(p.shard, p.start, p.stop) for p in self.slices]
        self.durations = []

    def _donor(self, donor: Donor) -> Generator[Any, None, None]:
        s = self.settings
        held_version = -1
        for start, end in donor.spec.sessions:
            if start >= self.horizon_s:
                return
            yield from self._session(donor, start, end)
            while self._alive(donor):
                yield "sleep", donor.spec.link.rtt_s + self.cal.lease_overhead_s
                unit = self._pick(donor)
                if unit is None:
                    yield "sleep", SANDBLASTER_RETRY_S
                    continue
                version = self.version
                unit.copies.append((donor.spec.index, self.queue.now))
                yield from self._prepare(donor, unit.shard)
                if held_version != version:
                    fetch = self._fetch(donor)
                    yield "fetch", fetch
                    held_version = min(fetch.versions)
                samples = unit.stop - unit.start
                compute_s = samples / donor.spec.speed + self.cal.step_overhead_s * math.ceil(
                    samples / s.batch_size
                )
                yield "sleep", compute_s
                if not self._alive(donor):
                    break
                donor.steps += math.ceil(samples / s.batch_size)
                donor.compute_s += compute_s
                self.counts.steps += math.ceil(samples / s.batch_size)
                self._answer(donor, unit, version, held_version)

    def _pick(self, donor: Donor) -> _Unit | None:
        now = self.queue.now
        for unit in self.units:  # drop copies whose donor left long ago (lease expiry)
            unit.copies = [(d, t) for d, t in unit.copies if now - t < LEASE_TTL_S]
        pending = [u for u in self.units if not u.answered and not u.copies]
        if pending:
            return pending[0]
        if not self.modes.sandblaster_backups:
            return None
        typical = typical_unit_s(self.durations)
        running = [u for u in self.units if not u.answered and u.copies]
        running.sort(key=lambda u: min(t for _, t in u.copies))
        for unit in running:
            oldest = min(t for _, t in unit.copies)
            mine = any(d == donor.spec.index for d, _ in unit.copies)
            if not mine and pass_backup_due(0, now - oldest, typical, len(unit.copies)):
                self.backups += 1
                return unit
        return None

    def _answer(self, donor: Donor, unit: _Unit, version: int, computed_on: int) -> None:
        at_server = donor.up.send(self.queue.now, sum(self.push_bytes))
        session_end = donor.session_end
        index = donor.spec.index

        def arrive() -> None:
            claimed = [t for d, t in unit.copies if d == index]
            unit.copies = [(d, t) for d, t in unit.copies if d != index]
            if self.queue.now > session_end:
                self.counts.pushes_lost += 1
                return
            if unit.answered or version != self.version or computed_on != version:
                self.late += 1  # another copy won, or the pass moved on: credited, not summed
                self.counts.pushes_stale += 1
                return
            unit.answered = True
            self.counts.pushes_applied += 1
            if claimed:
                self.durations.append(self.queue.now - claimed[0])
            if all(u.answered for u in self.units):
                self.queue.at(self.queue.now + self.modes.coordinator_s, self._coordinate)

        self.queue.at(at_server, arrive)

    def _coordinate(self) -> None:
        """Tell L-BFGS the pass's loss and gradient; write the next trial as a new version."""
        arrays = self._arrays([self.store.fetch_flat(k)[1] for k in range(len(self.shards_layout))])
        loss, grads = mlp_loss_and_gradients(
            arrays, self.student.data.x_train, self.student.data.y_train
        )
        named = self._as_shards(grads)
        flat = np.concatenate(
            [
                self.student.layout.flatten_shard(
                    k, {spec.name: named[spec.name] for spec in specs}
                )
                for k, specs in enumerate(self.shards_layout)
            ]
        )
        self.lbfgs.tell(loss, flat)
        self.passes += 1
        self._write_trial(self.lbfgs.trial)
        self._new_pass()

    @property
    def shards_layout(self) -> list[Any]:
        return self.student.layout.shards

    def _write_trial(self, trial: np.ndarray) -> None:
        offset = 0
        self.version += 1
        for shard in range(len(self.shards_layout)):
            size = self.student.layout.shard_size(shard)
            piece = trial[offset : offset + size].astype(np.float32)
            offset += size
            current = self.store.storage.load(self.store.job_id, shard)
            assert current is not None
            state = ShardState(self.version, piece, current.accumulators, None)
            outcome = self.store.storage.commit(
                self.store.job_id, shard, current.version, state, f"pass:{self.passes}:{shard}"
            )
            assert outcome is CommitOutcome.APPLIED

    def run(self) -> dict[str, Any]:
        result = super().run()
        result["sandblaster"] = {
            "units_per_pass": len(self.slices),
            "passes": self.passes,
            "iterations": self.lbfgs.iterations,
            "backups": self.backups,
            "late_answers": self.late,
        }
        return result


def mlp_loss_and_gradients(
    arrays: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray, chunk: int = 50_000
) -> tuple[float, list[np.ndarray]]:
    """Mean cross-entropy and its gradient over all of ``x`` (in chunks, summed in float64)."""
    total_loss = 0.0
    total = [np.zeros(a.shape, np.float64) for a in arrays]
    for begin in range(0, len(x), chunk):
        xb, yb = x[begin : begin + chunk], y[begin : begin + chunk]
        h = xb
        n_layers = len(arrays) // 2
        for i in range(n_layers):
            h = h @ arrays[2 * i] + arrays[2 * i + 1]
            if i + 1 < n_layers:
                h = np.maximum(h, 0)
        h = h - h.max(axis=1, keepdims=True)
        log_p = h - np.log(np.exp(h).sum(axis=1, keepdims=True))
        total_loss += float(-log_p[np.arange(len(yb)), yb].sum())
        for acc, g in zip(total, mlp_gradients(arrays, xb, yb), strict=True):
            acc += g.astype(np.float64) * len(yb)
    n = len(x)
    return total_loss / n, [(acc / n).astype(np.float32) for acc in total]


# --- the comparison -------------------------------------------------------------------------


def make_simulation(
    mode: str,
    student: Student,
    donors: Sequence[DonorSpec],
    settings: JobSettings,
    cal: Calibration,
    modes: ModeSettings,
    **kwargs: Any,
) -> Simulation:
    if mode == "downpour":
        return Simulation(student, donors, settings, cal, **kwargs)
    if mode == "sync":
        rule = sync_rule(len(donors), modes)
        return SyncSimulation(student, donors, settings, cal, modes=modes, rule=rule, **kwargs)
    if mode == "local-steps":
        return LocalStepsSimulation(student, donors, settings, cal, modes=modes, **kwargs)
    if mode == "sandblaster":
        return SandblasterSimulation(student, donors, settings, cal, modes=modes, **kwargs)
    raise ValueError(f"unknown mode {mode!r}")


def outer_setting(text: str) -> tuple[float, float]:
    """``LR:MOMENTUM`` within the job form's bounds (0 < LR <= 10, 0 <= MOMENTUM < 1)."""
    try:
        lr, momentum = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LR:MOMENTUM, got {text!r}") from None
    if not (0 < lr <= 10 and 0 <= momentum < 1):
        raise argparse.ArgumentTypeError(f"out of range: {text!r}")
    return lr, momentum


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--donors", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.86)
    p.add_argument("--train-size", type=int, default=500_000)
    p.add_argument("--data-shards", type=int, default=64)
    p.add_argument("--churn", type=float, default=0.3)
    p.add_argument("--horizon", type=float, default=600.0, help="virtual seconds at most")
    p.add_argument("--max-steps", type=int, default=200_000, help="batches per run at most")
    p.add_argument("--calibration", type=Path, default=None)
    p.add_argument(
        "--max-staleness",
        type=int,
        default=JobSettings.max_staleness,
        help=f"the job's bound ({JobSettings.max_staleness}, the form's default)",
    )
    p.add_argument(
        "--max-unit-epochs",
        type=float,
        default=0.0,
        help="experiment: units of at most this many passes over their shard (0: none)",
    )
    p.add_argument(
        "--outer",
        type=outer_setting,
        default=None,
        metavar="LR:MOMENTUM",
        help="local steps' outer step (the form's defaults, 1.0:0; DiLoCo's 0.7:0.9)",
    )
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="accuracy against virtual time")
    p.add_argument(
        "--inputs",
        type=Path,
        nargs="+",
        default=None,
        help="instead of running: merge the runs of these --json-out files (and plot them)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.inputs:
        merged = [json.loads(path.read_text()) for path in args.inputs]
        out = {
            "settings": [m["settings"] for m in merged],
            "runs": [run for m in merged for run in m["runs"]],
        }
        if args.json_out:
            args.json_out.write_text(json.dumps(out, indent=1))
        if args.plot:
            plot(out["runs"], args.plot, args.target)
        return 0
    cal = Calibration.load(args.calibration)
    modes = ModeSettings()
    if args.outer is not None:
        modes = replace(modes, outer_learning_rate=args.outer[0], outer_momentum=args.outer[1])
    data = teacher_data(args.train_size)
    population = Population(speed=cal.speed, churn=args.churn)
    runs = []
    for mode in args.modes:
        # Sync and Downpour push every n_push batches; sync's step is one batch per donor,
        # as in the 2-agent comparison on the real stack (n_fetch = n_push = 1).
        n = 1 if mode == "sync" else 4
        settings = JobSettings(
            n_fetch=n,
            n_push=n,
            n_data_shards=args.data_shards,
            target_accuracy=args.target,
            seed=args.seed,
            max_unit_epochs=args.max_unit_epochs,
            max_staleness=args.max_staleness,
        )
        student = Student(settings, data)
        for count in args.donors:
            donors = population.draw(count, args.horizon, args.seed)
            # A Sandblaster pass is 15,625 batches of the 500k set: bounded by the horizon.
            max_steps = 10**12 if mode == "sandblaster" else args.max_steps
            sim = make_simulation(
                mode,
                student,
                donors,
                settings,
                cal,
                modes,
                horizon_s=args.horizon,
                max_steps=max_steps,
            )
            result = sim.run()
            result["mode"] = mode
            runs.append(result)
            print(
                f"{mode:12s} N={count:3d} time_to_{args.target}={result['time_to_target_s']} "
                f"best={result['best_accuracy']} samples={result['samples']} "
                f"wall={result['wall_s']} s",
                flush=True,
            )
    for run in runs:
        one = next((r for r in runs if r["mode"] == run["mode"] and r["donors"] == 1), None)
        t, t1 = run["time_to_target_s"], one and one["time_to_target_s"]
        run["speedup"] = round(t1 / t, 2) if t and t1 else None
    out = {
        "settings": {"argv": sys.argv[1:], "modes": vars(modes), "calibration": vars(cal)},
        "runs": runs,
    }
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(runs, args.plot, args.target)
    return 0


def plot(runs: Sequence[dict[str, Any]], path: Path, target: float) -> None:
    """One panel per donor count: test accuracy against virtual seconds, a line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["donors"] for r in runs})
    fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 4), squeeze=False)
    colours = {"downpour": "C0", "sync": "C1", "sandblaster": "C2", "local-steps": "C3"}
    for ax, count in zip(axes[0], counts, strict=True):
        for run in (r for r in runs if r["donors"] == count):
            curve = run["curve"]
            ax.plot(
                [c[0] for c in curve],
                [c[2] for c in curve],
                label=run["mode"],
                color=colours.get(run["mode"]),
            )
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_ylim(0.3, 0.95)
        ax.set_title(f"{count} donor{'s' if count > 1 else ''} (simulated)")
        ax.set_xlabel("virtual seconds (log)")
        ax.set_ylabel("test accuracy")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
