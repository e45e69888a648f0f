"""Convergence simulator: time to target accuracy against the number of donors, in virtual time.

What is real: the parameter store (``ParameterStore`` on ``InMemoryStorage``, Adagrad, the
job's ``max_staleness`` and gradient clipping), the gradients (the agent's own
``GradientComputer`` on the student MLP of ``downpour.teacher``, each donor on its own data
shard through the agent's ``BatchSampler`` and its own stale copy of the weights), the agent's
start-up (``startup.prepare_lease``: the first fetch, the shard's download and the model's
build at once) and Downpour loop (``connection._train``: that fetch waited for at the start of
a lease, fetches every ``n_fetch`` steps that overlap computation and are waited for at the
next fetch point, a push every ``n_push`` steps), the work-unit size
(``scheduler.unit_steps``) and the byte counts (``frame_to_wire``). What is simulated: time.
Each step takes ``batch / speed + step_overhead_s``; every message queues on its direction of
the donor's link (``bytes / bandwidth``) and then takes half the RTT. Donors draw links and
speeds from ``simworld.Population`` and 30% of them churn (``simulate.churner_sessions``). The
store is scored every ``--eval-interval`` virtual seconds, as Celery beat scores the real one.

Usage::

    .venv/bin/python bench/convergence_sim.py --quick               # about 2 minutes
    .venv/bin/python bench/convergence_sim.py                       # N = 1..64, docs + json
    .venv/bin/python bench/convergence_sim.py --uniform cable --donors 1 2   # vs the real stack
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "platform", ROOT / "agent", ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

from downpour.paramstore import (  # noqa: E402
    DEFAULT_MAX_GRAD_NORM,
    AdagradConfig,
    InMemoryStorage,
    ParameterStore,
    ShardLayout,
    StaleGradient,
    VariableSpec,
)
from downpour.scheduler import unit_steps  # noqa: E402
from downpour.teacher import STUDENT_HIDDEN, TEACHER_INPUTS, TeacherData, teacher_data  # noqa: E402
from downpour_agent.trainer import BatchSampler, GradientAccumulator  # noqa: E402
from simworld import (  # noqa: E402
    FETCH_REQUEST_BYTES,
    Channel,
    DonorSpec,
    EventQueue,
    Population,
    params_frame_bytes,
    push_frame_bytes,
    uniform_population,
)

RESULTS = ROOT / "bench" / "results" / "latest.json"


@dataclass(frozen=True)
class Calibration:
    """The simulator's time parameters, seconds unless stated (see docs/benchmarks.md).

    speed : float
        Reference donor's gradient speed, samples/s of ``GradientComputer.compute``.
    step_overhead_s : float
        Agent's own time per step outside ``compute`` (thread hand-off, sampler, event loop).
    lease_overhead_s : float
        Asking for a lease until it arrives, beyond one RTT (server: claim, rows, reply).
    build_s : float
        First lease of a process: building the model and tracing the step.
    server_fetch_s : float
        Server time to answer one fetch (load, encode) before the answer goes on the link.
    """

    speed: float = 12_000.0
    step_overhead_s: float = 0.0004
    lease_overhead_s: float = 0.05
    build_s: float = 1.0
    server_fetch_s: float = 0.001

    @classmethod
    def load(cls, path: Path | None) -> Calibration:
        if path is None:
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: float(v) for k, v in data["calibration"].items()})


@dataclass(frozen=True)
class JobSettings:
    """The job as the real stack would run it (the real defaults unless stated)."""

    batch_size: int = 32
    learning_rate: float = 0.05
    n_fetch: int = 4
    n_push: int = 4
    n_param_shards: int = 2
    n_data_shards: int = 64
    max_staleness: int = 64
    staleness_aware: bool = False
    unit_target_s: float = 30.0
    target_accuracy: float = 0.86
    seed: int = 0
    # Not a rule of the real scheduler (yet): a unit of at most this many passes over its
    # data shard, 0 for none (see docs/benchmarks.md, "A lone donor on one shard").
    max_unit_epochs: float = 0.0
    # Not a mode of the real store: apply this many accepted pushes of a shard as one update
    # (their sum, one version; FedBuff, Nguyen et al. 2022, buffers so); 1 as the store does.
    aggregate: int = 1
    # The job's weight_average: the store keeps a running average of each shard's versions
    # and the job is scored at it (ParameterStore(average=...)); 0, the default, keeps none.
    average: float = 0.0


def sim_unit_steps(settings: JobSettings, speed: float, shard_samples: int) -> int:
    """The unit's steps as ``scheduler.unit_steps`` sizes them, then at most
    ``max_unit_epochs`` passes over the unit's data shard when that is set."""
    steps = unit_steps(speed, settings.batch_size, settings.unit_target_s)
    if settings.max_unit_epochs > 0:
        epochs = math.ceil(settings.max_unit_epochs * shard_samples / settings.batch_size)
        steps = max(1, min(steps, epochs))
    return steps


@dataclass
class Fetch:
    """A fetch in flight: the weights the server read, once they have arrived."""

    done: bool = False
    flats: list[np.ndarray] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    waiter: Generator[Any, None, None] | None = None


@dataclass
class Donor:
    spec: DonorSpec
    up: Channel
    down: Channel
    session_end: float = 0.0
    built: bool = False
    cached_shard: int | None = None
    flats: list[np.ndarray] = field(default_factory=list)
    leases: int = 0
    steps: int = 0
    compute_s: float = 0.0


@dataclass
class Counts:
    steps: int = 0
    pushes_applied: int = 0
    pushes_stale: int = 0
    pushes_lost: int = 0
    fetches: int = 0
    leases: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    staleness_sum: int = 0


class Student:
    """The student MLP (built by the agent's ``GradientComputer``), its layout and scorer.

    With ``keras`` the gradients come from ``GradientComputer.compute``, the agent's own
    code path (38 ms a step at load average 20-30, cProfile). Without it they come from
    :func:`mlp_gradients`, the same gradient in numpy (tests/sim checks the two agree to
    float32 rounding), which lets a sweep to 64 donors run in minutes.
    """

    def __init__(self, settings: JobSettings, data: TeacherData, keras: bool = False) -> None:
        from downpour.digits import mlp_json
        from downpour_agent.trainer import GradientComputer, configure_threads

        configure_threads(1)  # as the agents run (--threads 1)
        config = json.loads(mlp_json(STUDENT_HIDDEN, inputs=TEACHER_INPUTS))
        self.computer = GradientComputer(config, "sparse_categorical_crossentropy", seed=0)
        self.keras = keras
        specs = self.computer.variable_specs()
        self.layout = ShardLayout.balanced(
            [VariableSpec(n, tuple(s), d) for n, s, d in specs], settings.n_param_shards
        )
        self.initial = self.computer.get_weights()
        self.names = [name for name, _, _ in specs]
        self.data = data
        self.owner: tuple[int, int] | None = None  # (donor, load count) now in the model
        self.weights: dict[str, np.ndarray] = {}

    def load(self, weights: dict[str, np.ndarray], owner: tuple[int, int]) -> None:
        self.weights = weights
        if self.keras:
            self.computer.set_weights(weights)
        self.owner = owner

    def gradients(self, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        if self.keras:
            return self.computer.compute(x, y)[0]
        arrays = [self.weights[name] for name in self.names]
        return dict(zip(self.names, mlp_gradients(arrays, x, y), strict=True))

    def accuracy(self, weights: dict[str, np.ndarray]) -> float:
        h = self.data.x_test
        arrays = [weights[name] for name in self.names]
        for i in range(0, len(arrays), 2):
            h = h @ arrays[i] + arrays[i + 1]
            if i + 2 < len(arrays):
                h = np.maximum(h, 0)
        return float(np.mean(np.argmax(h, axis=1) == self.data.y_test))


def mlp_gradients(arrays: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Gradient of the mean sparse categorical cross-entropy of a ReLU MLP with softmax out.

    Parameters
    ----------
    arrays : sequence of ndarray
        float32 kernel ``(in, out)`` and bias ``(out,)`` of each Dense layer, in order.
    x : ndarray
        float32 ``(batch, inputs)``.
    y : ndarray
        int ``(batch,)`` class labels.

    Returns
    -------
    list of ndarray
        float32 gradients in the order of ``arrays``.
    """
    activations = [x]
    h = x
    n_layers = len(arrays) // 2
    for i in range(n_layers):
        h = h @ arrays[2 * i] + arrays[2 * i + 1]
        if i + 1 < n_layers:
            h = np.maximum(h, 0)
            activations.append(h)
    h = h - h.max(axis=1, keepdims=True)
    p = np.exp(h)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1
    delta = p / len(y)
    grads: list[np.ndarray] = [np.empty(0)] * len(arrays)
    for i in reversed(range(n_layers)):
        grads[2 * i] = (activations[i].T @ delta).astype(np.float32)
        grads[2 * i + 1] = delta.sum(axis=0).astype(np.float32)
        if i:
            delta = (delta @ arrays[2 * i].T) * (activations[i] > 0)
    return grads


class Simulation:
    """One run: ``donors`` train one job until the store scores ``target_accuracy``."""

    def __init__(
        self,
        student: Student,
        donors: Sequence[DonorSpec],
        settings: JobSettings,
        calibration: Calibration,
        *,
        horizon_s: float,
        eval_interval_s: float = 0.5,
        max_steps: int = 200_000,
    ) -> None:
        self.student, self.settings, self.cal = student, settings, calibration
        self.horizon_s, self.eval_interval_s, self.max_steps = horizon_s, eval_interval_s, max_steps
        self.queue = EventQueue()
        self.store = self._make_store()
        self.store.initialize(student.initial)
        x, y = student.data.x_train, student.data.y_train
        order = np.random.default_rng(0).permutation(len(x))  # as datasets.split_train
        self.shards = [(x[idx], y[idx]) for idx in np.array_split(order, settings.n_data_shards)]
        self.shard_bytes = [int(sx.nbytes + sy.nbytes + 400) for sx, sy in self.shards]
        shard_specs = [[(s.name, s.shape) for s in group] for group in student.layout.shards]
        n = len(shard_specs)
        self.push_bytes = [push_frame_bytes(specs, n) for specs in shard_specs]
        self.params_bytes = [params_frame_bytes(specs) for specs in shard_specs]
        self.donors = [
            Donor(spec, Channel(spec.link, up=True), Channel(spec.link, up=False))
            for spec in donors
        ]
        self.counts = Counts()
        self.buffers: dict[int, list[dict[str, np.ndarray]]] = {}  # the aggregate experiment
        self.curve: list[tuple[float, int, float]] = []
        self.time_to_target: float | None = None
        self.samples_to_target: int | None = None
        self.units_issued = 0
        self.rng = np.random.default_rng(settings.seed)

    def _make_store(self) -> ParameterStore:
        """The job's store on the memory backend, timed by the virtual clock."""
        s = self.settings
        return ParameterStore(
            InMemoryStorage(clock=lambda: self.queue.now),
            "sim",
            self.student.layout,
            AdagradConfig(s.learning_rate),
            s.max_staleness,
            staleness_aware=s.staleness_aware,
            max_grad_norm=DEFAULT_MAX_GRAD_NORM,
            average=s.average,
        )

    # -- running -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        for donor in self.donors:
            self._resume(self._donor(donor))
        self.queue.at(self.eval_interval_s, self._evaluate)
        self.queue.run(
            self.horizon_s,
            stop=lambda: self.time_to_target is not None or self.counts.steps >= self.max_steps,
        )
        c = self.counts
        return {
            "donors": len(self.donors),
            "time_to_target_s": self.time_to_target,
            "samples_to_target": self.samples_to_target,
            "target_accuracy": self.settings.target_accuracy,
            "best_accuracy": max((a for _, _, a in self.curve), default=None),
            "virtual_s": round(self.queue.now, 3),
            "steps": c.steps,
            "samples": c.steps * self.settings.batch_size,
            "pushes_applied": c.pushes_applied,
            "pushes_stale": c.pushes_stale,
            "pushes_lost": c.pushes_lost,
            "mean_staleness": round(c.staleness_sum / c.pushes_applied, 2)
            if c.pushes_applied
            else None,
            "leases": c.leases,
            "bytes_up": sum(d.up.bytes_sent for d in self.donors),
            "bytes_down": sum(d.down.bytes_sent for d in self.donors),
            "utilisation": round(
                sum(d.compute_s for d in self.donors) / (len(self.donors) * self.queue.now), 3
            )
            if self.queue.now
            else None,
            "wall_s": round(time.perf_counter() - started, 2),
            "curve": [(round(t, 3), s, round(a, 4)) for t, s, a in self.curve],
        }

    def _evaluate(self) -> None:
        # As evaluations.evaluate_job: the store's average where the job keeps one.
        accuracy = self.student.accuracy(self.store.scored_weights())
        now = self.queue.now
        self.curve.append((now, self.counts.steps * self.settings.batch_size, accuracy))
        if accuracy >= self.settings.target_accuracy:
            self.time_to_target = now
            self.samples_to_target = self.counts.steps * self.settings.batch_size
        else:
            self.queue.at(now + self.eval_interval_s, self._evaluate)

    def _resume(self, process: Generator[Any, None, None]) -> None:
        """Advance a donor's process to its next wait and schedule its wake-up."""
        try:
            what, value = next(process)
        except StopIteration:
            return
        now = self.queue.now
        if what == "sleep":
            self.queue.at(now + value, lambda: self._resume(process))
        elif what == "until":
            self.queue.at(max(now, value), lambda: self._resume(process))
        elif what == "fetch":
            if value.done:
                self.queue.at(now, lambda: self._resume(process))
            else:
                value.waiter = process
        else:  # pragma: no cover - a programming error
            raise ValueError(what)

    # -- the wire ----------------------------------------------------------------------------

    def _fetch(self, donor: Donor) -> Fetch:
        """Request every shard; the server reads them when the request arrives (after this
        donor's earlier pushes, which went first on the same uplink)."""
        fetch = Fetch()
        n = len(self.params_bytes)
        at_server = donor.up.send(self.queue.now, FETCH_REQUEST_BYTES * n)
        self.counts.fetches += 1

        self.queue.at(at_server, lambda: self._serve(donor, fetch))
        return fetch

    def _serve(self, donor: Donor, fetch: Fetch) -> None:
        """The server reads every shard now; the answer arrives over the donor's downlink."""
        n = len(self.params_bytes)
        for shard in range(n):
            version, flat = self.store.fetch_flat(shard)
            fetch.versions.append(version)
            fetch.flats.append(flat)
        ready = self.queue.now + self.cal.server_fetch_s * n

        def arrive() -> None:
            fetch.done = True
            if fetch.waiter is not None:
                waiter, fetch.waiter = fetch.waiter, None
                self._resume(waiter)

        self.queue.at(donor.down.send(ready, sum(self.params_bytes)), arrive)

    def _push(self, donor: Donor, mean: dict[str, np.ndarray], base: list[int], tag: str) -> None:
        at_server = donor.up.send(self.queue.now, sum(self.push_bytes))
        session_end = donor.session_end

        def apply() -> None:
            if self.queue.now > session_end:  # the connection dropped with it in flight
                self.counts.pushes_lost += 1
                return
            for shard, specs in enumerate(self.student.layout.shards):
                grads = {s.name: mean[s.name] for s in specs}
                if self.settings.aggregate > 1:
                    self._aggregate(shard, grads, base[shard], f"{tag}:{shard}")
                    continue
                try:
                    result = self.store.push(shard, grads, base[shard], f"{tag}:{shard}")
                except StaleGradient:
                    self.counts.pushes_stale += 1
                    continue
                self.counts.pushes_applied += 1
                self.counts.staleness_sum += result.staleness

        self.queue.at(at_server, apply)

    def _aggregate(self, shard: int, grads: dict[str, np.ndarray], base: int, tag: str) -> None:
        """The ``aggregate`` experiment: a push within ``max_staleness`` of the shard joins
        its buffer; a full buffer's sum is applied as one update (one version)."""
        store = self.store
        version = store.storage.load_version(store.job_id, shard)
        assert version is not None
        if version - base > self.settings.max_staleness:
            self.counts.pushes_stale += 1
            return
        buffer = self.buffers.setdefault(shard, [])
        buffer.append(grads)
        self.counts.pushes_applied += 1  # when it joins the buffer, as it will be applied
        self.counts.staleness_sum += version - base
        if len(buffer) == self.settings.aggregate:
            total = {k: np.sum([g[k] for g in buffer], axis=0) for k in grads}
            buffer.clear()
            store.push(shard, total, version, tag)

    # -- a donor, as connection._train works a lease -----------------------------------------

    def _start_up(self, donor: Donor, shard: int, download: bool) -> float:
        """When a lease's data and model are ready: the shard (when ``download``) arrives
        over the donor's link while the model builds (its first lease only), as in
        ``startup.prepare_lease``."""
        ready = self.queue.now
        if download:
            request_at = self.queue.now + donor.spec.link.rtt_s / 2
            ready = max(ready, donor.down.send(request_at, self.shard_bytes[shard]))
        if not donor.built:
            ready = max(ready, self.queue.now + self.cal.build_s)
            donor.built = True
        return ready

    def _alive(self, donor: Donor) -> bool:
        return self.queue.now < donor.session_end

    def _donor(self, donor: Donor) -> Generator[Any, None, None]:
        s, cal, link = self.settings, self.cal, donor.spec.link
        step_s = s.batch_size / donor.spec.speed + cal.step_overhead_s
        for start, end in donor.spec.sessions:
            if start >= self.horizon_s:
                return
            yield "until", start
            donor.session_end = end
            donor.up.free_at = donor.down.free_at = max(start, donor.up.free_at)
            while self._alive(donor):
                yield "sleep", link.rtt_s + cal.lease_overhead_s
                shard = self.units_issued % len(self.shards)  # fewest units first, as claims
                self.units_issued += 1
                donor.leases += 1
                self.counts.leases += 1
                # As startup.prepare_lease: the first fetch goes out with the lease, then
                # the data and the model; training waits for all three.
                fetch = self._fetch(donor)
                ready = self._start_up(donor, shard, download=donor.cached_shard != shard)
                donor.cached_shard = shard
                yield "until", ready
                if not self._alive(donor):
                    break
                x, y = self.shards[shard]
                steps = sim_unit_steps(s, donor.spec.speed, len(x))
                sampler = BatchSampler(len(x), s.batch_size, int(self.rng.integers(1 << 31)))
                accumulator = GradientAccumulator()
                yield "fetch", fetch
                loads = 1
                versions, donor.flats = fetch.versions, fetch.flats
                round_base, round_start = list(versions), 0
                inflight: Fetch | None = None
                for step in range(steps):
                    if not self._alive(donor) or self.counts.steps >= self.max_steps:
                        break
                    fetch_point = step != 0 and step % s.n_fetch == 0
                    if inflight is not None and (fetch_point or inflight.done):
                        if not inflight.done:
                            yield "fetch", inflight
                        versions, donor.flats = inflight.versions, inflight.flats
                        loads += 1
                        inflight = None
                        if step == round_start:
                            round_base = list(versions)
                    if fetch_point:
                        inflight = self._fetch(donor)
                    self._load_model(donor, loads)
                    idx = sampler.next_indices()
                    gradients = self.student.gradients(x[idx], y[idx])
                    accumulator.add(gradients, len(idx))
                    yield "sleep", step_s
                    if not self._alive(donor):
                        break  # the step was lost with the session
                    donor.steps += 1
                    donor.compute_s += step_s
                    self.counts.steps += 1
                    if (step + 1) % s.n_push == 0 or step + 1 == steps:
                        tag = f"{donor.spec.index}:{donor.leases}:{step}"
                        self._push(donor, accumulator.mean(), round_base, tag)
                        accumulator.reset()
                        round_base, round_start = list(versions), step + 1

    def _load_model(self, donor: Donor, loads: int) -> None:
        """Put the donor's own (stale) weights into the shared Keras model if another's are."""
        owner = (donor.spec.index, loads)
        if self.student.owner == owner:
            return
        weights = {}
        for shard, flat in enumerate(donor.flats):
            weights |= self.student.layout.unflatten_shard(shard, flat)
        self.student.load(weights, owner)


# --- sweeps and reports ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--donors", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--quick", action="store_true", help="N = 1, 4, 16 on 100k samples")
    p.add_argument("--seed", type=int, default=0, help="population and sampler seed (0)")
    # 90% on 8 shards since 4 December (docs/benchmarks.md, "Time to 90% against donors");
    # the first sweep was 86% on 64.
    p.add_argument("--target", type=float, default=0.90, help="test accuracy to reach (0.90)")
    p.add_argument("--n-fetch", type=int, default=4)
    p.add_argument("--n-push", type=int, default=4)
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
        "--aggregate",
        type=int,
        default=1,
        help="experiment: apply this many accepted pushes of a shard as one update, their "
        "sum (1: each, as the store does)",
    )
    p.add_argument(
        "--average",
        type=float,
        default=0.0,
        help="the job's weight_average: the store keeps each shard's running average of its "
        "versions, avg = B * avg + (1 - B) * weights, and the job is scored at it (0: off, "
        "the default)",
    )
    p.add_argument("--staleness-aware", action="store_true", help="lr / staleness (Zhang 2016)")
    p.add_argument("--data-shards", type=int, default=8)
    p.add_argument("--param-shards", type=int, default=2)
    p.add_argument("--train-size", type=int, default=500_000, help="teacher samples (500k)")
    p.add_argument("--churn", type=float, default=0.3, help="share of donors that churn (0.3)")
    p.add_argument("--spread", type=float, default=2.0, help="speeds in ref*[1/s, s] (2)")
    p.add_argument(
        "--uniform",
        choices=["lan", "fibre", "cable", "dsl", "loopback"],
        default=None,
        help="identical always-on donors on this link instead of the mix",
    )
    p.add_argument("--horizon", type=float, default=600.0, help="virtual seconds at most")
    p.add_argument("--eval-interval", type=float, default=0.5, help="virtual s (0.5)")
    p.add_argument("--max-steps", type=int, default=400_000, help="gradient steps per run")
    p.add_argument("--calibration", type=Path, default=None, help="JSON from calibrate_sim")
    p.add_argument(
        "--keras",
        action="store_true",
        help="gradients from the agent's GradientComputer (slow), not numpy",
    )
    p.add_argument(
        "--batch-sweep",
        type=int,
        nargs="+",
        default=None,
        help="instead: samples to target for each batch size (critical batch), one donor",
    )
    p.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=[JobSettings.learning_rate],
        help="with --batch-sweep: each batch takes the best of these Adagrad rates (0.05)",
    )
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument(
        "--write-results",
        action="store_true",
        help="merge sim_speedup_* into bench/results/latest.json",
    )
    return p


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    settings = JobSettings(
        n_fetch=args.n_fetch,
        n_push=args.n_push,
        n_param_shards=args.param_shards,
        n_data_shards=args.data_shards,
        max_staleness=args.max_staleness,
        staleness_aware=args.staleness_aware,
        target_accuracy=args.target,
        seed=args.seed,
        max_unit_epochs=args.max_unit_epochs,
        aggregate=args.aggregate,
        average=args.average,
    )
    cal = Calibration.load(args.calibration)
    data = teacher_data(args.train_size)
    student = Student(settings, data, keras=args.keras)
    population = Population(speed=cal.speed, spread=args.spread, churn=args.churn)
    runs = []
    for n in args.donors:
        if args.uniform:
            donors = uniform_population(n, args.uniform, cal.speed, args.horizon)
        else:
            donors = population.draw(n, args.horizon, args.seed)
        sim = Simulation(
            student,
            donors,
            settings,
            cal,
            horizon_s=args.horizon,
            eval_interval_s=args.eval_interval,
            max_steps=args.max_steps,
        )
        result = sim.run()
        result["links"] = sorted({d.link.name for d in donors})
        result["churners"] = sum(d.churner for d in donors)
        runs.append(result)
        print(
            f"N={n:3d} time_to_{args.target}={result['time_to_target_s']} s "
            f"steps={result['steps']} stale={result['pushes_stale']} "
            f"mean_staleness={result['mean_staleness']} wall={result['wall_s']} s",
            flush=True,
        )
    base = runs[0]["time_to_target_s"] if runs and runs[0]["donors"] == 1 else None
    for run in runs:
        t = run["time_to_target_s"]
        run["speedup"] = round(base / t, 2) if base and t else None
    return {
        "settings": vars(settings) | {"calibration": vars(cal), "argv": sys.argv[1:]},
        "runs": runs,
    }


def batch_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Samples to target against the batch of each update: one donor, a push every step.

    Where samples to target start to grow with the batch is the critical batch size
    (McCandlish et al. 2018): past it, more samples per update (sync SGD's N * B, or
    Downpour's n_push * B) stop buying fewer updates.
    """
    cal = Calibration.load(args.calibration)
    data = teacher_data(args.train_size)
    rows = []
    for batch in args.batch_sweep:
        # A larger batch wants a larger step (its gradient is less noisy): each batch is
        # judged at the best of the given rates, or the sweep measures the rate instead.
        tries = []
        for rate in args.learning_rates:
            settings = JobSettings(
                batch_size=batch,
                learning_rate=rate,
                n_fetch=1,
                n_push=1,
                n_data_shards=1,
                target_accuracy=args.target,
            )
            student = Student(settings, data, keras=args.keras)
            donors = uniform_population(1, "loopback", cal.speed, args.horizon)
            run = Simulation(
                student,
                donors,
                settings,
                cal,
                horizon_s=args.horizon,
                eval_interval_s=max(batch / cal.speed, 0.002),
                max_steps=args.max_steps,
            ).run()
            samples = run["samples_to_target"]
            tries.append(
                {
                    "learning_rate": rate,
                    "samples_to_target": samples,
                    "updates_to_target": None if samples is None else samples // batch,
                    "best_accuracy": run["best_accuracy"],
                }
            )
            print({"batch": batch, **tries[-1]}, flush=True)
        reached = [t for t in tries if t["samples_to_target"] is not None]
        best = min(reached, key=lambda t: t["samples_to_target"]) if reached else tries[0]
        rows.append({"batch": batch, **best, "tries": tries})
    return {"target_accuracy": args.target, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.aggregate > 1 and args.staleness_aware:
        # The aggregate is pushed at the shard's version, so the store would see staleness 0.
        parser.error("--aggregate applies a buffer at staleness 0: --staleness-aware says nothing")
    if not 0.0 <= args.average < 1.0:
        parser.error(f"--average must be in [0, 1), got {args.average}")
    if args.quick:
        args.donors, args.train_size = [1, 4, 16], 100_000
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.batch_sweep:
        result = batch_sweep(args)
        if args.json_out:
            args.json_out.write_text(json.dumps(result, indent=1))
        return 0
    result = sweep(args)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1))
    print(json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in result["runs"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
