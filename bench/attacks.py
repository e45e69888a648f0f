"""Faulty and malicious agents against the parameter store, with and without centred clipping.

Runs the real ``ParameterStore`` (``InMemoryStorage`` or ``RedisStorage``) with honest,
trusted and attacking agents simulated in one process, on the digits task (the fixed split of
``downpour.digits.digits_npz_bytes``: 1,437 train / 360 test images; MLP 64-128-128-10,
Adagrad gamma 0.05, batch 32). Three runs share a seed and a schedule:

* ``clean``: every agent honest, centred clipping on;
* ``attacked``: ``round(fraction * agents)`` attackers, centred clipping and bans on;
* ``plain_mean``: the same attackers, plain Adagrad (no clipping, so no bans).

Asynchrony is simulated by events: each agent takes ``speed * U(0.8, 1.2)`` time units per
push (speeds log-uniform in ``[0.5, 2]``), computes its gradient on the weights it fetched
when it started and pushes every shard with that base version, so its gradient is as stale
as the number of pushes the others made meanwhile (about ``agents - 1`` on average).

Gradients come from a small numpy MLP (forward and backward by hand): exact, deterministic
and about a hundred times faster per step than calling TensorFlow for batch 32, so a full run
takes seconds. ``tests/security/test_robust_attacks.py`` checks it against TensorFlow.

Data: by default every agent samples the whole training set (IID). With ``--data-shards N``
the agents work as on the server: the training set is cut into ``N`` data shards as
``downpour.training.datasets.split_train`` cuts it (one fixed shuffle, ``array_split``), and
each agent works in *units*, each on one data shard, taking the shard with the fewest units
so far (ties to the lowest index), as ``claim_work`` does. A unit lasts about
``--unit-pushes`` pushes of an average agent: the server sizes units by time, so a fast agent
makes more pushes per unit than a slow one. Trusted agents and attackers claim units the same
way.

Attacks (each attacker transforms the honest gradient it computed):

* ``signflip``: ``-g``; ``scale1e6``: ``1e6 * g``; ``neg1000``: ``-1000 * g``;
* ``alie`` ("A Little Is Enough", Baruch et al., NeurIPS 2019): the attackers collude,
  estimate the honest per-coordinate mean ``mu`` and standard deviation ``sigma`` from
  ``agents - attackers`` mini-batch gradients at their weights, and all send
  ``mu - z * sigma`` with ``z = Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - f``.

Prints JSON: ``clean_accuracy``, ``attacked_accuracy``, ``plain_mean_accuracy`` (test
accuracy, 0..1), ``attackers_banned``, ``honest_banned``, ``pushes_to_ban_p95`` (store pushes,
one per shard, that an attacker made before it was banned) and more. Usage::

    .venv/bin/python bench/attacks.py --attack scale1e6 --fraction 0.2
    .venv/bin/python bench/attacks.py --attack all --plot docs/robustness_attacks.png
"""

from __future__ import annotations

import argparse
import heapq
import io
import json
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLATFORM_DIR = ROOT / "platform"
if str(PLATFORM_DIR) not in sys.path:
    sys.path.insert(0, str(PLATFORM_DIR))

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from downpour.paramstore import (  # noqa: E402
    AdagradConfig,
    CentredClipping,
    InMemoryStorage,
    ParameterStore,
    ShardLayout,
    ShardStorage,
    StaleGradient,
    VariableSpec,
    root_reference,
)
from downpour.scheduler.reputation import (  # noqa: E402
    DEFAULT_MAX_CLIPPED_FRACTION,
    DEFAULT_MIN_PUSHES,
    PushFlags,
    Reputation,
    clipped_fraction,
    cosine_t,
    judge_interval,
    mean_cosine,
    recent_clipped_fraction,
    record_push,
    should_ban,
)

ATTACKS = ("signflip", "ipm", "scale1e6", "neg1000", "alie")
#: Attacks whose pushes lie far outside the honest spread: they must be clipped and banned.
SCALE_ATTACKS = ("scale1e6", "neg1000")
HIDDEN = (128, 128)
INPUTS, CLASSES = 64, 10
BATCH_SIZE = 32
OPTIMIZER = AdagradConfig(learning_rate=0.05)
N_SHARDS = 2
JOB = "attack-bench"
#: With ``--attack all``, a scale1e6 run whose attackers leave after this many applied pushes.
HIT_AND_RUN_PUSHES = 5

Weights = dict[str, np.ndarray]
Gradients = dict[str, np.ndarray]


# -- the model ---------------------------------------------------------------------------------


def mlp_specs(hidden: Sequence[int] = HIDDEN) -> list[VariableSpec]:
    """Variables of the MLP ``64-hidden...-10``, named as Keras names its Dense layers."""
    widths = [INPUTS, *hidden, CLASSES]
    specs = []
    for layer, (fan_in, fan_out) in enumerate(zip(widths, widths[1:], strict=False)):
        name = "dense" if layer == 0 else f"dense_{layer}"
        specs.append(VariableSpec(f"{name}/kernel", (fan_in, fan_out)))
        specs.append(VariableSpec(f"{name}/bias", (fan_out,)))
    return specs


def glorot_weights(specs: Sequence[VariableSpec], rng: np.random.Generator) -> Weights:
    """Keras defaults: Glorot-uniform kernels, zero biases; float32."""
    weights: Weights = {}
    for spec in specs:
        if len(spec.shape) == 2:
            limit = math.sqrt(6.0 / (spec.shape[0] + spec.shape[1]))
            weights[spec.name] = rng.uniform(-limit, limit, spec.shape).astype(np.float32)
        else:
            weights[spec.name] = np.zeros(spec.shape, np.float32)
    return weights


def _layers(weights: Weights) -> list[tuple[np.ndarray, np.ndarray]]:
    kernels = [name for name in weights if name.endswith("/kernel")]
    return [(weights[name], weights[name.removesuffix("kernel") + "bias"]) for name in kernels]


def mlp_probabilities(weights: Weights, x: np.ndarray) -> np.ndarray:
    """Softmax outputs, float32 ``(batch, 10)``, of ReLU hidden layers on ``x`` ``(batch, 64)``."""
    activation = x
    layers = _layers(weights)
    for kernel, bias in layers[:-1]:
        activation = np.maximum(activation @ kernel + bias, 0)
    kernel, bias = layers[-1]
    return _softmax(activation @ kernel + bias)


def mlp_gradients(weights: Weights, x: np.ndarray, y: np.ndarray) -> Gradients:
    """Gradients of the mean sparse categorical cross-entropy on one mini-batch.

    Parameters
    ----------
    weights : dict of str to ndarray
        float32, from :func:`glorot_weights` or the store.
    x : ndarray
        float32 ``(batch, 64)``.
    y : ndarray
        int ``(batch,)``, labels 0..9.

    Returns
    -------
    dict of str to ndarray
        float32, one per variable, with its shape.
    """
    layers = _layers(weights)
    activations = [x]
    for kernel, bias in layers[:-1]:
        activations.append(np.maximum(activations[-1] @ kernel + bias, 0))
    kernel, bias = layers[-1]
    delta = _softmax(activations[-1] @ kernel + bias)
    delta[np.arange(len(y)), y] -= 1
    delta /= len(y)
    names = [name for name in weights if name.endswith("/kernel")]
    grads: Gradients = {}
    for index in range(len(layers) - 1, -1, -1):
        name = names[index].removesuffix("kernel")
        grads[name + "kernel"] = (activations[index].T @ delta).astype(np.float32)
        grads[name + "bias"] = delta.sum(axis=0).astype(np.float32)
        if index:
            delta = (delta @ layers[index][0].T) * (activations[index] > 0)
    return {name: grads[name] for name in weights}


def accuracy(weights: Weights, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``x`` classified as ``y``."""
    return float(np.mean(mlp_probabilities(weights, x).argmax(axis=1) == y))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return result


# -- the attacks -------------------------------------------------------------------------------


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max``: ``Phi^-1((n - s) / n)`` with ``s = floor(n / 2 + 1) - f``."""
    s = math.floor(n / 2 + 1) - f
    return statistics.NormalDist().inv_cdf((n - s) / n)


def scaled(grads: Gradients, factor: float) -> Gradients:
    """Every tensor times ``factor``, float32 (``1e6 * g`` stays finite for gradients)."""
    return {
        name: (tensor * np.float32(factor)).astype(np.float32) for name, tensor in grads.items()
    }


def alie_gradients(samples: Sequence[Gradients], z: float) -> Gradients:
    """``mu - z * sigma`` per coordinate over the colluders' gradient samples."""
    result: Gradients = {}
    for name in samples[0]:
        stack = np.stack([sample[name] for sample in samples]).astype(np.float64)
        result[name] = (stack.mean(axis=0) - z * stack.std(axis=0)).astype(np.float32)
    return result


# -- the simulation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Digits:
    """The fixed digits split: float32 images in [0, 1], int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @classmethod
    def load(cls) -> Digits:
        from downpour.digits import digits_npz_bytes

        with np.load(io.BytesIO(digits_npz_bytes())) as data:
            return cls(data["x_train"], data["y_train"], data["x_test"], data["y_test"])


@dataclass
class Agent:
    """One simulated volunteer."""

    index: int
    role: str  # "trusted", "honest" or "attacker"
    speed: float
    batches: Iterator[np.ndarray]
    versions: list[int] = field(default_factory=list)
    weights: Weights = field(default_factory=dict)
    data_shard: int | None = None
    unit_pushes_left: int = 0
    reputation: Reputation = field(default_factory=Reputation)
    pushes: int = 0
    applied: int = 0
    banned_after: int | None = None


@dataclass(frozen=True)
class RunResult:
    """Outcome of one simulated run.

    Attributes
    ----------
    accuracy : float
        Test accuracy of the final weights, 0..1.
    curve : list of (int, float)
        (agent pushes so far, test accuracy) every ``eval_every`` agent pushes.
    attackers, attackers_banned, honest_banned : int
    pushes_to_ban : list of int
        For each banned attacker, its store pushes (one per shard) when it was banned.
    honest_clipped_fraction : float
        Clipped fraction of all untrusted honest pushes.
    honest_clipped_fraction_max : float
        The highest clipped fraction of any one untrusted honest agent.
    held : int
        Store pushes held during warm-up.
    stale_rejected : int
        Agent pushes refused as too stale (the agent refetched and went on).
    agents : list of dict
        Per agent: role, seconds_per_push, store pushes, clipped pushes, banned_after (or None).
    """

    accuracy: float
    curve: list[tuple[int, float]]
    attackers: int
    attackers_banned: int
    honest_banned: int
    pushes_to_ban: list[int]
    honest_clipped_fraction: float
    honest_clipped_fraction_max: float
    held: int
    stale_rejected: int
    agents: list[dict[str, Any]] = field(default_factory=list)


def batch_stream(n_samples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index arrays of ``BATCH_SIZE`` samples, epoch after epoch, reshuffled each epoch."""
    while True:
        order = rng.permutation(n_samples)
        for start in range(0, n_samples - BATCH_SIZE + 1, BATCH_SIZE):
            yield order[start : start + BATCH_SIZE]


def data_shard_indices(n_samples: int, n_shards: int) -> list[np.ndarray]:
    """Training-set indices of each data shard, cut as the server cuts an uploaded dataset.

    ``downpour.training.datasets.split_train``: one shuffle with seed 0, then
    ``np.array_split`` into ``n_shards`` parts (that module needs Django's settings, so the
    two lines are repeated here).
    """
    order = np.random.default_rng(0).permutation(n_samples)
    return list(np.array_split(order, max(1, min(n_shards, n_samples))))


@dataclass
class UnitDispenser:
    """Units of work on data shards, handed out as ``claim_work`` does.

    Each claim takes the data shard with the fewest units so far (ties to the lowest index);
    the unit lasts ``round(unit_pushes / speed)`` pushes, at least 1, so that it takes about
    the same time on every agent (mean ``speed`` is about 1 time unit per push).
    """

    shards: list[np.ndarray]
    unit_pushes: int
    rng: np.random.Generator
    units: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.units = [0] * len(self.shards)

    def claim(self, agent: Agent) -> None:
        """Give ``agent`` its next unit: a data shard, its batches and its length."""
        shard = min(range(len(self.shards)), key=lambda index: (self.units[index], index))
        self.units[shard] += 1
        indices = self.shards[shard]
        agent.data_shard = shard
        agent.unit_pushes_left = max(1, round(self.unit_pushes / agent.speed))
        agent.batches = (indices[batch] for batch in batch_stream(len(indices), self.rng))


def simulate(
    data: Digits,
    *,
    attack: str | None,
    fraction: float,
    robust: CentredClipping | None,
    agents: int = 20,
    trusted: int = 2,
    pushes: int = 3000,
    seed: int = 0,
    max_staleness: int = 64,
    max_clipped_fraction: float = DEFAULT_MAX_CLIPPED_FRACTION,
    min_pushes: int = DEFAULT_MIN_PUSHES,
    eval_every: int = 0,
    storage_factory: Callable[[], ShardStorage] = InMemoryStorage,
    attacker_pushes: int | None = None,
    data_shards: int = 0,
    unit_pushes: int = 50,
) -> RunResult:
    """Train the digits MLP with simulated asynchronous agents through the real store.

    Parameters
    ----------
    data : Digits
    attack : str or None
        One of :data:`ATTACKS`, or None for no attackers.
    fraction : float
        Fraction of the agents that attack (rounded), in ``[0, 1)``.
    robust : CentredClipping or None
        Centred clipping in the store (and bans by
        :func:`downpour.scheduler.reputation.should_ban`), or None for plain Adagrad.
    agents, trusted : int
        Agents in all, and how many of the honest ones push as trusted.
    pushes : int
        Agent pushes (each sends every shard) before the run stops.
    seed : int
        Seeds the model, the speeds, the batches and the choice of attackers.
    max_staleness : int
        The store's bound; a staler push is refused and the agent refetches.
    max_clipped_fraction, min_pushes : float, int
        Passed to :func:`~downpour.scheduler.reputation.should_ban`.
    eval_every : int
        Record test accuracy every this many agent pushes; 0 records only the end.
    storage_factory : callable
        Builds the store's backend.
    attacker_pushes : int or None
        Each attacker leaves once this many of its pushes were applied (not held), "hit and
        run"; None: never.
    data_shards : int
        0: every agent samples the whole training set. ``N >= 1``: the training set is cut
        into ``N`` data shards and agents work in units on one shard at a time, as on the
        server (see :class:`UnitDispenser`).
    unit_pushes : int
        With ``data_shards``, the pushes of one unit on an agent of average speed.

    Notes
    -----
    BLAS runs on one thread: the matrices are tiny, and on a busy machine OpenBLAS's
    threads spin-wait for one another and make a run ten times slower.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _simulate(
            data,
            attack,
            fraction,
            robust,
            agents,
            trusted,
            pushes,
            seed,
            max_staleness,
            max_clipped_fraction,
            min_pushes,
            eval_every,
            storage_factory,
            attacker_pushes,
            data_shards,
            unit_pushes,
        )


def _simulate(
    data: Digits,
    attack: str | None,
    fraction: float,
    robust: CentredClipping | None,
    agents: int,
    trusted: int,
    pushes: int,
    seed: int,
    max_staleness: int,
    max_clipped_fraction: float,
    min_pushes: int,
    eval_every: int,
    storage_factory: Callable[[], ShardStorage],
    attacker_pushes: int | None,
    data_shards: int,
    unit_pushes: int,
) -> RunResult:
    rng = np.random.default_rng(seed)
    specs = mlp_specs()
    layout = ShardLayout.balanced(specs, N_SHARDS)
    store = ParameterStore(storage_factory(), JOB, layout, OPTIMIZER, max_staleness, robust=robust)
    store.initialize(glorot_weights(specs, rng))
    n_attackers = round(fraction * agents) if attack is not None else 0
    if trusted + n_attackers > agents:
        raise ValueError(f"{trusted} trusted and {n_attackers} attackers exceed {agents} agents")
    attacker_ids = set(
        (trusted + rng.permutation(agents - trusted)[: round(fraction * agents)]).tolist()
    )
    z = alie_z(agents, n_attackers) if attack == "alie" else 0.0
    schedule: list[tuple[float, int]] = []
    crew: list[Agent] = []
    for index in range(agents):
        role = "trusted" if index < trusted else "honest"
        if index in attacker_ids and attack is not None:
            role = "attacker"
        speed = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        agent = Agent(index, role, speed, batch_stream(len(data.y_train), rng))
        crew.append(agent)
    for agent in crew:
        _fetch(store, agent)
        heapq.heappush(schedule, (agent.speed * rng.uniform(0.8, 1.2), agent.index))
    coalition_batches = batch_stream(len(data.y_train), rng)
    # A separate generator, so that the default (IID) runs draw exactly what they always drew.
    units = (
        UnitDispenser(
            data_shard_indices(len(data.y_train), data_shards),
            unit_pushes,
            np.random.default_rng([seed, data_shards]),
        )
        if data_shards
        else None
    )
    if units is not None:
        for agent in crew:
            units.claim(agent)

    curve: list[tuple[int, float]] = []
    held = stale_rejected = 0
    for done in range(1, pushes + 1):
        if not schedule:
            break
        now, index = heapq.heappop(schedule)
        agent = crew[index]
        if units is not None and agent.unit_pushes_left <= 0:
            units.claim(agent)
        agent.unit_pushes_left -= 1
        batch = next(agent.batches)
        grads = mlp_gradients(agent.weights, data.x_train[batch], data.y_train[batch])
        if agent.role == "attacker":
            if attack == "signflip":
                grads = scaled(grads, -1.0)
            elif attack == "scale1e6":
                grads = scaled(grads, 1e6)
            elif attack == "neg1000":
                grads = scaled(grads, -1000.0)
            elif attack == "alie":
                samples = []
                for _ in range(agents - n_attackers):
                    sample = next(coalition_batches)
                    samples.append(
                        mlp_gradients(agent.weights, data.x_train[sample], data.y_train[sample])
                    )
                grads = alie_gradients(samples, z)
        parts = layout.split(grads)
        try:
            for shard, part in enumerate(parts):
                result = store.push(
                    shard,
                    part,
                    agent.versions[shard],
                    f"agent{index}-{agent.pushes}-{shard}",
                    trusted=agent.role == "trusted",
                )
                held += result.held
                agent.applied += result.applied and shard == 0
                if result.applied and robust is not None:
                    agent.reputation = record_push(agent.reputation, result.clipped)
        except StaleGradient:
            stale_rejected += 1
        agent.pushes += 1
        banned = robust is not None and should_ban(
            agent.reputation, max_clipped_fraction=max_clipped_fraction, min_pushes=min_pushes
        )
        leaves = (
            agent.role == "attacker"
            and attacker_pushes is not None
            and agent.applied >= attacker_pushes
        )
        if banned:
            agent.banned_after = agent.reputation.pushes
        elif not leaves:
            _fetch(store, agent)
            heapq.heappush(schedule, (now + agent.speed * rng.uniform(0.8, 1.2), index))
        if eval_every and done % eval_every == 0:
            curve.append((done, accuracy(store.weights(), data.x_test, data.y_test)))

    final = accuracy(store.weights(), data.x_test, data.y_test)
    if not curve or curve[-1][0] != pushes:
        curve.append((pushes, final))
    attackers = [a for a in crew if a.role == "attacker"]
    honest = [a for a in crew if a.role == "honest"]
    honest_pushes = sum(a.reputation.pushes for a in honest)
    return RunResult(
        accuracy=final,
        curve=curve,
        attackers=len(attackers),
        attackers_banned=sum(a.banned_after is not None for a in attackers),
        honest_banned=sum(a.banned_after is not None for a in crew if a.role != "attacker"),
        pushes_to_ban=[a.banned_after for a in attackers if a.banned_after is not None],
        honest_clipped_fraction=(
            sum(a.reputation.clipped for a in honest) / honest_pushes if honest_pushes else 0.0
        ),
        honest_clipped_fraction_max=max(
            (clipped_fraction(a.reputation) for a in honest), default=0.0
        ),
        held=held,
        stale_rejected=stale_rejected,
        agents=[
            {
                "role": a.role,
                "seconds_per_push": round(a.speed, 3),
                "pushes": a.reputation.pushes,
                "clipped": a.reputation.clipped,
                "banned_after": a.banned_after,
            }
            for a in crew
        ],
    )


def _fetch(store: ParameterStore, agent: Agent) -> None:
    versions, parts = [], []
    for shard in range(store.layout.n_shards):
        version, tensors = store.fetch(shard)
        versions.append(version)
        parts.append(tensors)
    agent.versions = versions
    agent.weights = store.layout.merge(parts)


# -- the server's situation --------------------------------------------------------------------

#: The server's defaults that shape a robust job's pushes (``downpour.settings``, the job form).
UNIT_TARGET_SECONDS = 30.0
FLUSH_INTERVAL_S = 2.0  # the consumer folds clipping into reputation this often
WARMUP_CACHE_S = 1.0  # a server process rereads a warming job's status this often
#: IPM's epsilon (Xie, Koyejo and Gupta, UAI 2019): attackers send ``-epsilon * mean(g)``.
IPM_EPSILON = 0.5
#: Mini-batches the colluding IPM and ALIE attackers sample to estimate the honest gradient.
COALITION_BATCHES = 4


@dataclass
class StackAgent:
    """One agent process as the server sees it: units on data shards, n_fetch/n_push steps."""

    index: int
    role: str  # "trusted", "honest" or "attacker"
    samples_per_s: float
    data_shard: int = 0
    shard_x: np.ndarray | None = None
    shard_y: np.ndarray | None = None
    sampler: Any = None
    steps_left: int = 0
    step_in_unit: int = 0
    versions: list[int] = field(default_factory=list)
    weights: Weights = field(default_factory=dict)
    accumulated: list[Gradients] = field(default_factory=list)
    reputation: Reputation = field(default_factory=Reputation)
    unflushed: list[PushFlags] = field(default_factory=list)
    projected: Reputation = field(default_factory=Reputation)  # as SocketState.projected
    last_flush: float = 0.0
    pushes: int = 0
    store_pushes: int = 0
    clipped: int = 0
    max_recent_clipped: float = 0.0
    min_mean_cosine: float = 1.0
    min_cosine_t: float = math.inf
    banned_at_s: float | None = None
    banned_after: int | None = None
    first_unit_s: float | None = None
    staleness: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StackResult:
    """Outcome of one :func:`simulate_stack` run (accuracies 0..1, times in job seconds)."""

    accuracy: float
    best_accuracy: float
    curve: list[tuple[float, float]]
    attackers: int
    attackers_banned: int
    honest_banned: int
    pushes_to_ban: list[int]
    seconds_to_ban: list[float]
    honest_clipped_fraction: float
    honest_clipped_fraction_max: float
    attacker_clipped_fraction: float
    warm_at_s: float | None
    staleness_p50: float
    staleness_p95: float
    stale_rejected: int
    #: Versions between a tested push's base and the version its reference was read at
    #: (median and 95th percentile over every tested push).
    reference_lag_p50: float = 0.0
    reference_lag_p95: float = 0.0
    #: Root references computed (on the clock and on the version trigger).
    references_computed: int = 0
    agents: list[dict[str, Any]] = field(default_factory=list)
    #: Every tested push, ``[agent, role, job seconds, cosine, the agent's store pushes so
    #: far]``: to judge ban rules offline.
    trace: list[list[Any]] = field(default_factory=list)


class KerasGradients:
    """The agent's own :class:`downpour_agent.trainer.GradientComputer` on the digits MLP."""

    def __init__(self) -> None:
        from downpour.digits import mlp_json
        from downpour_agent.trainer import GradientComputer

        self.computer = GradientComputer(
            json.loads(mlp_json()), "sparse_categorical_crossentropy", seed=0
        )

    def specs(self) -> list[VariableSpec]:
        """The model's variables under Keras's own names (``sequential/dense/kernel``...)."""
        return [VariableSpec(name, shape) for name, shape, _ in self.computer.variable_specs()]

    def initial_weights(self) -> Weights:
        return self.computer.get_weights()

    def __call__(self, weights: Weights, x: np.ndarray, y: np.ndarray) -> Gradients:
        self.computer.set_weights(weights)
        gradients, _loss = self.computer.compute(x, y)
        return gradients


def simulate_stack(
    data: Digits,
    *,
    attack: str | None,
    fraction: float,
    robust: CentredClipping | None,
    agents: int = 5,
    trusted: int = 1,
    seconds: float = 60.0,
    data_shards: int = 4,
    n_fetch: int = 1,
    n_push: int = 1,
    samples_per_s: tuple[float, float] = (800.0, 2000.0),
    max_staleness: int = 16,
    seed: int = 0,
    gradients: str = "numpy",
    eval_every_s: float = 1.0,
    root_sample: int = 0,
    reference_every_s: float = 0.5,
    per_shard_reference: bool = False,
    min_agreement: float = 0.5,
    reference_every_versions: int = 0,
    reference_delay_s: float = 0.05,
) -> StackResult:
    """A robust job as the server runs it, with the real store, scheduler policy and bans.

    * **Store**: :class:`~downpour.paramstore.ParameterStore` on ``InMemoryStorage``, 2
      parameter shards, Adagrad 0.05, ``max_staleness`` 16 (the job's default in issue 10's
      runs; 64 since), with ``robust``
      (centred clipping) or without it (plain Adagrad, "plain mean").
    * **Data**: the training set cut into ``data_shards`` as ``split_train`` cuts it. Each unit
      is on the data shard with the fewest units so far (``claim_work``), sized by
      :func:`downpour.scheduler.unit_steps` to ``UNIT_TARGET_SECONDS`` at the agent's speed,
      with a fresh seed; batches come from the agent's own ``BatchSampler``.
    * **Agents** (``trusted`` of them trusted, ``round(fraction * agents)`` attackers) each step
      at ``batch / samples_per_s * U(0.8, 1.2)`` seconds, speeds log-uniform in
      ``samples_per_s``. Within a unit an agent loads the store's weights before every
      ``n_fetch``-th step and pushes the mean gradient of every ``n_push`` steps (and at the
      unit's end), each shard with the version it loaded, as ``downpour_agent`` does. All agents
      run interleaved on one clock, so a push is as stale as the pushes others made meanwhile.
    * **Warm-up**: while the store says the job is warming up, untrusted agents get no unit
      (``downpour.scheduler.trust``), and ask again every second.
    * **Bans**: clipping flags of applied pushes are folded into the agent's
      :class:`~downpour.scheduler.reputation.Reputation` when ``judge_interval`` says, after
      every store push as the consumer does (every ``FLUSH_INTERVAL_S``, sooner once a push
      was opposed, at once when a ban is due), and the
      agent is banned (and leaves) when ``should_ban`` says so with
      ``min_pushes_for_shards(2)``, as ``training.actions.bans.record_clipping`` does.
    * **Gradients**: ``"numpy"`` (the hand-written MLP, exact and fast) or ``"keras"`` (the
      agent's ``GradientComputer`` on ``downpour.digits.mlp_json``).
    * **Root gradient** (``root_sample > 0``, with ``robust``): every ``reference_every_s`` the
      server computes the mean gradient of a fixed root sample of ``root_sample`` training
      images (drawn from the whole training set, so from every data shard) at the store's
      current weights, and passes each shard's part to ``ParameterStore.push(reference=...)``
      for the direction test (FLTrust; ``CentredClipping.min_cosine``).
    * **Version trigger** (``reference_every_versions`` N > 0): as well as on the clock, a
      reference is computed when an applied push brings parameter shard 0 to a multiple of N,
      as the consumer triggers the worker: ``reference_delay_s`` later (the broker's hop and
      the worker's compute), from the weights at that moment, at most one at a time (the
      trigger's ``SET NX``), and none when the clock's comes first.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _simulate_stack(
            data,
            attack,
            fraction,
            robust,
            agents,
            trusted,
            seconds,
            data_shards,
            n_fetch,
            n_push,
            samples_per_s,
            max_staleness,
            seed,
            gradients,
            eval_every_s,
            root_sample,
            reference_every_s,
            per_shard_reference,
            min_agreement,
            reference_every_versions,
            reference_delay_s,
        )


def _simulate_stack(
    data: Digits,
    attack: str | None,
    fraction: float,
    robust: CentredClipping | None,
    agents: int,
    trusted: int,
    seconds: float,
    data_shards: int,
    n_fetch: int,
    n_push: int,
    samples_per_s: tuple[float, float],
    max_staleness: int,
    seed: int,
    gradients: str,
    eval_every_s: float,
    root_sample: int,
    reference_every_s: float,
    per_shard_reference: bool,
    min_agreement: float,
    reference_every_versions: int,
    reference_delay_s: float,
) -> StackResult:
    from downpour.scheduler import admits_during_warmup, unit_steps
    from downpour.scheduler.reputation import min_pushes_for_shards
    from downpour_agent.trainer import BatchSampler

    rng = np.random.default_rng(seed)
    specs = mlp_specs()
    if gradients == "keras":
        keras_gradients = KerasGradients()
        specs = keras_gradients.specs()
        gradient_of: Callable[[Weights, np.ndarray, np.ndarray], Gradients] = keras_gradients
        initial = keras_gradients.initial_weights()
    else:
        gradient_of = mlp_gradients
        initial = glorot_weights(specs, np.random.default_rng(seed))
    layout = ShardLayout.balanced(specs, N_SHARDS)
    store = ParameterStore(InMemoryStorage(), JOB, layout, OPTIMIZER, max_staleness, robust=robust)
    store.initialize(initial)
    n_attackers = round(fraction * agents) if attack is not None else 0
    if trusted + n_attackers > agents:
        raise ValueError(f"{trusted} trusted and {n_attackers} attackers exceed {agents} agents")
    attacker_ids = set((trusted + rng.permutation(agents - trusted)[:n_attackers]).tolist())
    low, high = samples_per_s
    crew = [
        StackAgent(
            index,
            "trusted" if index < trusted else "attacker" if index in attacker_ids else "honest",
            float(np.exp(rng.uniform(np.log(low), np.log(high)))),
        )
        for index in range(agents)
    ]
    shards = data_shard_indices(len(data.y_train), data_shards)
    units_per_shard = [0] * len(shards)
    min_pushes = min_pushes_for_shards(layout.n_shards)
    coalition = batch_stream(len(data.y_train), rng)
    alie_z_value = alie_z(agents, n_attackers) if attack == "alie" else 0.0

    # The server's root samples: per data shard (the lease's shard is known when a push
    # arrives), or one from the whole training set.
    root_rng = np.random.default_rng([seed, 7])
    roots = (
        [root_rng.permutation(indices)[:root_sample] for indices in shards]
        if per_shard_reference
        else [root_rng.permutation(len(data.y_train))[:root_sample]]
    )
    references: list[list[np.ndarray | None]] = []
    reference_versions: list[int] = []
    trace: list[list[Any]] = []
    lags: list[int] = []
    reference_at = -math.inf
    computed = [0]
    # When a version-triggered reference is due to be published (the worker reads the weights
    # as it runs, so they are read then).
    pending: list[float] = []

    def refresh_references(now: float) -> None:
        nonlocal reference_at
        if robust is None or not root_sample:
            return
        on_clock = now - reference_at >= reference_every_s
        if on_clock:
            reference_at = now
        if on_clock or (pending and pending[0] <= now):
            pending.clear()  # a clock's reference is as fresh as a pending one
            compute_references()

    def trigger_reference(now: float, version: int) -> None:
        if (
            robust is None
            or not root_sample
            or not reference_every_versions
            or version % reference_every_versions
            or pending
        ):
            return
        pending.append(now + reference_delay_s)

    def compute_references() -> None:
        """The root references at the store's current weights, and the versions read."""
        nonlocal references, reference_versions
        computed[0] += 1
        reference_versions = store.versions()
        weights = store.weights()
        references = []
        for root in roots:
            halves = [
                layout.split(gradient_of(weights, data.x_train[half], data.y_train[half]))
                for half in np.array_split(root, 2)
            ]
            references.append(
                [
                    root_reference(
                        *(
                            np.concatenate([h[shard][spec.name].ravel() for spec in specs_])
                            for h in halves
                        ),
                        min_agreement=min_agreement,
                    )
                    for shard, specs_ in enumerate(layout.shards)
                ]
            )

    def reference_for(agent: StackAgent, shard: int) -> np.ndarray | None:
        if not references:
            return None
        return references[agent.data_shard if per_shard_reference else 0][shard]

    def warming_up() -> bool:
        status = store.warmup_status()
        return status is not None and not status.warm

    def claim(agent: StackAgent, now: float) -> bool:
        if not admits_during_warmup(agent.role == "trusted", warming_up()):
            return False
        shard = min(range(len(shards)), key=lambda index: (units_per_shard[index], index))
        units_per_shard[shard] += 1
        indices = shards[shard]
        agent.data_shard = shard
        agent.shard_x, agent.shard_y = data.x_train[indices], data.y_train[indices]
        agent.sampler = BatchSampler(len(indices), BATCH_SIZE, int(rng.integers(1 << 31)))
        agent.steps_left = unit_steps(agent.samples_per_s, BATCH_SIZE, UNIT_TARGET_SECONDS)
        agent.step_in_unit = 0
        agent.accumulated = []
        if agent.first_unit_s is None:
            agent.first_unit_s = now
        return True

    def fetch(agent: StackAgent) -> None:
        versions, parts = [], []
        for shard in range(layout.n_shards):
            version, tensors = store.fetch(shard)
            versions.append(version)
            parts.append(tensors)
        agent.versions, agent.weights = versions, layout.merge(parts)

    def tamper(agent: StackAgent, honest: Gradients) -> Gradients:
        if attack == "signflip":
            return scaled(honest, -1.0)
        if attack == "scale1e6":
            return scaled(honest, 1e6)
        if attack == "neg1000":
            return scaled(honest, -1000.0)
        samples = [honest]
        for _ in range(COALITION_BATCHES):
            batch = next(coalition)
            samples.append(gradient_of(agent.weights, data.x_train[batch], data.y_train[batch]))
        if attack == "ipm":
            mean = {name: np.mean([s[name] for s in samples], axis=0) for name in honest}
            return scaled(mean, -IPM_EPSILON)
        return alie_gradients(samples, alie_z_value)

    def push(agent: StackAgent, now: float) -> None:
        count = len(agent.accumulated)
        mean = {
            name: (sum(g[name] for g in agent.accumulated) / count).astype(np.float32)
            for name in agent.accumulated[0]
        }
        agent.accumulated = []
        if agent.role == "attacker":
            mean = tamper(agent, mean)
        agent.pushes += 1
        refresh_references(now)
        for shard, part in enumerate(layout.split(mean)):
            try:
                result = store.push(
                    shard,
                    part,
                    agent.versions[shard],
                    f"agent{agent.index}-{agent.pushes}-{shard}",
                    trusted=agent.role == "trusted",
                    reference=reference_for(agent, shard),
                )
            except StaleGradient:
                stale[0] += 1
                continue
            if result.applied:
                agent.staleness.append(result.staleness)
                agent.store_pushes += 1
                if shard == 0:
                    trigger_reference(now, result.version)
                if result.cosine is not None:
                    # Either way round: a reference newer than the push's base is as far off.
                    lags.append(abs(agent.versions[shard] - reference_versions[shard]))
                if robust is not None:
                    flags = PushFlags(result.clipped, result.cosine, result.opposed)
                    agent.unflushed.append(flags)
                    agent.projected = record_push(agent.projected, flags)
                    if agent.projected.tested >= min_pushes:  # the margins, at every push
                        agent.min_mean_cosine = min(
                            agent.min_mean_cosine, mean_cosine(agent.projected)
                        )
                        agent.min_cosine_t = min(agent.min_cosine_t, cosine_t(agent.projected))
                    if result.cosine is not None:
                        trace.append(
                            [
                                agent.index,
                                agent.role,
                                round(now, 3),
                                round(result.cosine, 4),
                                agent.store_pushes,
                            ]
                        )
                    agent.clipped += result.clipped
            if robust is not None and agent.banned_at_s is None:
                judge(agent, now)
                if agent.banned_at_s is not None:
                    break  # the server closes a banned agent's socket

    def judge(agent: StackAgent, now: float) -> None:
        # As the consumer does after every push: every FLUSH_INTERVAL_S, sooner once a push
        # was opposed, at once when the projected reputation is due a ban.
        interval = judge_interval(agent.unflushed, FLUSH_INTERVAL_S, agent.projected)
        if now - agent.last_flush < interval:
            return
        agent.last_flush = now
        for flag in agent.unflushed:
            agent.reputation = record_push(agent.reputation, flag)
        agent.unflushed = []
        agent.projected = agent.reputation
        if agent.reputation.pushes >= min_pushes:
            agent.max_recent_clipped = max(
                agent.max_recent_clipped, recent_clipped_fraction(agent.reputation)
            )
        if should_ban(agent.reputation, min_pushes=min_pushes):
            agent.banned_at_s = now
            agent.banned_after = agent.reputation.pushes

    stale = [0]
    schedule: list[tuple[float, int]] = []
    for agent in crew:
        heapq.heappush(schedule, (float(rng.uniform(0, 0.2)), agent.index))
    curve: list[tuple[float, float]] = []
    next_eval = eval_every_s
    warm_at: float | None = None
    while schedule:
        now, index = heapq.heappop(schedule)
        while next_eval <= min(now, seconds):
            curve.append((next_eval, accuracy(store.weights(), data.x_test, data.y_test)))
            next_eval += eval_every_s
        if now >= seconds:
            break
        agent = crew[index]
        # The step that ends now was computed on the weights loaded when it began: others
        # pushed in between, so its push is as stale as on the server.
        if agent.accumulated and (len(agent.accumulated) >= n_push or agent.steps_left <= 0):
            push(agent, now)
            if agent.banned_at_s is not None:
                continue
        if agent.steps_left <= 0 and not claim(agent, now):
            heapq.heappush(schedule, (now + WARMUP_CACHE_S, index))
            continue
        if warm_at is None and robust is not None and not warming_up():
            warm_at = now
        # One step: load the weights every n_fetch steps, compute, push every n_push steps.
        if agent.step_in_unit % n_fetch == 0:
            fetch(agent)
        batch = agent.sampler.next_indices()
        agent.accumulated.append(
            gradient_of(agent.weights, agent.shard_x[batch], agent.shard_y[batch])
        )
        agent.step_in_unit += 1
        agent.steps_left -= 1
        step_s = BATCH_SIZE / agent.samples_per_s * float(rng.uniform(0.8, 1.2))
        heapq.heappush(schedule, (now + step_s, index))

    final = accuracy(store.weights(), data.x_test, data.y_test)
    curve.append((seconds, final))
    attackers = [a for a in crew if a.role == "attacker"]
    honest = [a for a in crew if a.role == "honest"]
    honest_pushes = sum(a.store_pushes for a in honest)
    attacker_pushes = sum(a.store_pushes for a in attackers)
    staleness = [s for a in crew for s in a.staleness]
    return StackResult(
        accuracy=final,
        best_accuracy=max(value for _, value in curve),
        curve=curve,
        attackers=len(attackers),
        attackers_banned=sum(a.banned_after is not None for a in attackers),
        honest_banned=sum(a.banned_after is not None for a in crew if a.role != "attacker"),
        pushes_to_ban=[a.banned_after for a in attackers if a.banned_after is not None],
        seconds_to_ban=[
            round(a.banned_at_s - (a.first_unit_s or 0.0), 2)
            for a in attackers
            if a.banned_at_s is not None
        ],
        honest_clipped_fraction=(
            sum(a.clipped for a in honest) / honest_pushes if honest_pushes else 0.0
        ),
        honest_clipped_fraction_max=max(
            (a.clipped / a.store_pushes for a in honest if a.store_pushes), default=0.0
        ),
        attacker_clipped_fraction=(
            sum(a.clipped for a in attackers) / attacker_pushes if attacker_pushes else 0.0
        ),
        warm_at_s=warm_at,
        staleness_p50=float(np.percentile(staleness, 50)) if staleness else 0.0,
        staleness_p95=float(np.percentile(staleness, 95)) if staleness else 0.0,
        stale_rejected=stale[0],
        reference_lag_p50=float(np.percentile(lags, 50)) if lags else 0.0,
        reference_lag_p95=float(np.percentile(lags, 95)) if lags else 0.0,
        references_computed=computed[0],
        trace=trace,
        agents=[
            {
                "role": a.role,
                "samples_per_s": round(a.samples_per_s),
                "store_pushes": a.store_pushes,
                "clipped": a.clipped,
                "banned_after": a.banned_after,
                "banned_at_s": a.banned_at_s and round(a.banned_at_s, 2),
                "max_recent_clipped": round(a.max_recent_clipped, 3),
                "tested": a.reputation.tested,
                "mean_cosine": round(mean_cosine(a.reputation), 3),
                "min_mean_cosine": round(a.min_mean_cosine, 3),
                "min_cosine_t": round(a.min_cosine_t, 2) if math.isfinite(a.min_cosine_t) else None,
            }
            for a in crew
        ],
    )


# -- the benchmark -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; :func:`run` accepts the parsed namespace."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engine",
        choices=["stack", "simple"],
        default="stack",
        help="stack (default): the server's situation (simulate_stack): few agents, data "
        "shards, units, n_fetch/n_push steps, warm-up, flushed bans, job seconds; simple: the "
        "older push-level simulation (simulate), 20 agents",
    )
    parser.add_argument("--attack", choices=[*ATTACKS, "all"], default="signflip")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="stack: job length, seconds (default 60)"
    )
    parser.add_argument("--n-fetch", type=int, default=1, help="stack: the job's n_fetch")
    parser.add_argument("--n-push", type=int, default=1, help="stack: the job's n_push")
    parser.add_argument(
        "--gradients",
        choices=["numpy", "keras"],
        default="numpy",
        help="stack: the numpy MLP, or the agent's GradientComputer (TensorFlow, slower)",
    )
    parser.add_argument(
        "--min-cosine",
        type=float,
        default=CentredClipping.min_cosine,
        help="direction test: flag untrusted pushes below this cosine with the root gradient",
    )
    parser.add_argument(
        "--root-sample",
        type=int,
        default=400,
        help="stack: training images in the server's root sample for the reference gradient "
        "of the direction test (default 400; 0: no reference, no direction test)",
    )
    parser.add_argument(
        "--reference-every-s",
        type=float,
        default=0.5,
        help="stack: seconds between the server's reference gradients (default 0.5)",
    )
    parser.add_argument(
        "--per-shard-reference",
        action="store_true",
        help="stack: a root sample and reference per data shard, each push tested against "
        "its lease's shard's (default: one from the whole training set)",
    )
    parser.add_argument(
        "--reference-every-versions",
        type=int,
        default=32,
        help="stack: also compute a reference when shard 0 reaches a multiple of this many "
        "versions, as the consumer triggers the worker (default 32, the server's "
        "REFERENCE_EVERY_VERSIONS; 0: the clock only)",
    )
    parser.add_argument(
        "--reference-delay-s",
        type=float,
        default=0.05,
        help="stack: seconds from a version trigger to its reference's publication",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=0.5,
        help="stack: least cosine between the root sample's two halves for a reference",
    )
    parser.add_argument(
        "--reject-opposed", action="store_true", default=CentredClipping.reject_opposed
    )
    parser.add_argument(
        "--flag-multiplier",
        type=float,
        default=CentredClipping.flag_multiplier,
        help="flag clipped pushes beyond this multiple of tau only (default %(default)s)",
    )
    parser.add_argument("--output", type=Path, help="also write the JSON to this file")
    parser.add_argument(
        "--trace",
        type=Path,
        help="stack: write every tested push's cosine (clean and attacked runs) to this JSON",
    )
    parser.add_argument(
        "--fraction", type=float, default=0.2, help="fraction of attacking agents (default 0.2)"
    )
    parser.add_argument("--agents", type=int, default=20, help="agents in all (default 20)")
    parser.add_argument(
        "--trusted", type=int, default=2, help="honest agents that push as trusted (default 2)"
    )
    parser.add_argument(
        "--pushes", type=int, default=3000, help="agent pushes per run (default 3000)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--attacker-pushes",
        type=int,
        help="attackers leave once this many of their pushes were applied (default: never)",
    )
    parser.add_argument(
        "--data-shards",
        type=int,
        default=0,
        help="cut the training set into this many data shards and give agents units on one "
        "shard at a time, as the server does (default 0: every agent samples all of it)",
    )
    parser.add_argument(
        "--unit-pushes",
        type=int,
        default=50,
        help="with --data-shards, pushes per unit of an average-speed agent (default 50)",
    )
    parser.add_argument("--max-staleness", type=int, default=64)
    parser.add_argument("--beta", type=float, default=CentredClipping.beta)
    parser.add_argument("--tau-multiplier", type=float, default=CentredClipping.tau_multiplier)
    parser.add_argument(
        "--warmup-trusted-pushes", type=int, default=CentredClipping.warmup_trusted_pushes
    )
    parser.add_argument("--tau-decay", type=float, default=CentredClipping.tau_decay)
    parser.add_argument(
        "--untrusted-window",
        type=int,
        default=CentredClipping.untrusted_window,
        help="recent untrusted distances that widen the radius; 0: trusted radius only",
    )
    parser.add_argument(
        "--untrusted-multiplier", type=float, default=CentredClipping.untrusted_multiplier
    )
    parser.add_argument("--max-widening", type=float, default=CentredClipping.max_widening)
    parser.add_argument("--max-clipped-fraction", type=float, default=DEFAULT_MAX_CLIPPED_FRACTION)
    parser.add_argument("--min-pushes", type=int, default=DEFAULT_MIN_PUSHES)
    parser.add_argument("--storage", choices=["memory", "redis"], default="memory")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis for --storage redis (default: $REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    parser.add_argument("--plot", type=Path, help="write accuracy curves of every run to this PNG")
    parser.add_argument(
        "--eval-every", type=int, default=100, help="agent pushes between curve points"
    )
    return parser


def run_stack(args: argparse.Namespace, robust: CentredClipping) -> dict[str, Any]:
    """``--engine stack``: clean, attacked and plain-mean runs of :func:`simulate_stack`."""
    data = Digits.load()
    common: dict[str, Any] = {
        "agents": args.agents,
        "trusted": args.trusted,
        "seconds": args.seconds,
        "data_shards": args.data_shards,
        "n_fetch": args.n_fetch,
        "n_push": args.n_push,
        "max_staleness": args.max_staleness,
        "seed": args.seed,
        "gradients": args.gradients,
        "root_sample": args.root_sample,
        "reference_every_s": args.reference_every_s,
        "min_agreement": args.min_agreement,
        "reference_every_versions": args.reference_every_versions,
        "reference_delay_s": args.reference_delay_s,
        "per_shard_reference": args.per_shard_reference,
    }
    started = time.perf_counter()
    clean = simulate_stack(data, attack=None, fraction=0.0, robust=robust, **common)
    attacked = simulate_stack(
        data, attack=args.attack, fraction=args.fraction, robust=robust, **common
    )
    plain = simulate_stack(data, attack=args.attack, fraction=args.fraction, robust=None, **common)
    result = {
        "engine": "stack",
        "attack": args.attack,
        "fraction": args.fraction,
        **common,
        "attackers": attacked.attackers,
        "min_cosine": robust.min_cosine,
        "reject_opposed": robust.reject_opposed,
        "flag_multiplier": robust.flag_multiplier,
        "clean_accuracy": clean.accuracy,
        "clean_best_accuracy": clean.best_accuracy,
        "attacked_accuracy": attacked.accuracy,
        "attacked_best_accuracy": attacked.best_accuracy,
        "plain_mean_accuracy": plain.accuracy,
        "plain_mean_best_accuracy": plain.best_accuracy,
        "plain_mean_worst_accuracy": min(value for _, value in plain.curve),
        "attackers_banned": attacked.attackers_banned,
        "honest_banned": attacked.honest_banned,
        "clean_honest_banned": clean.honest_banned,
        "pushes_to_ban": attacked.pushes_to_ban,
        "seconds_to_ban": attacked.seconds_to_ban,
        "honest_clipped_fraction": round(attacked.honest_clipped_fraction, 4),
        "honest_clipped_fraction_max": round(attacked.honest_clipped_fraction_max, 4),
        "attacker_clipped_fraction": round(attacked.attacker_clipped_fraction, 4),
        "clean_honest_clipped_fraction_max": round(clean.honest_clipped_fraction_max, 4),
        "warm_at_s": attacked.warm_at_s,
        "staleness_p50": attacked.staleness_p50,
        "staleness_p95": attacked.staleness_p95,
        "stale_rejected": attacked.stale_rejected,
        "reference_lag_p50": attacked.reference_lag_p50,
        "reference_lag_p95": attacked.reference_lag_p95,
        "references_computed": attacked.references_computed,
        "clean_reference_lag_p95": clean.reference_lag_p95,
        "agents_detail": attacked.agents,
        "clean_agents_detail": clean.agents,
        # The direction rule's margin: the lowest mean cosine any honest agent had at a
        # judgement (clean and attacked runs), against DEFAULT_MAX_MEAN_COSINE.
        "honest_min_cosine_t": min(
            (
                a["min_cosine_t"]
                for a in [*attacked.agents, *clean.agents]
                if a["role"] == "honest" and a["min_cosine_t"] is not None
            ),
            default=None,
        ),
        "honest_min_mean_cosine": min(
            (
                a["min_mean_cosine"]
                for a in [*attacked.agents, *clean.agents]
                if a["role"] == "honest"
            ),
            default=None,
        ),
        "curves": {
            "clean": clean.curve,
            "attacked": attacked.curve,
            "plain_mean": plain.curve,
        },
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    if args.trace is not None:
        args.trace.write_text(json.dumps({"clean": clean.trace, "attacked": attacked.trace}))
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the clean run once and, per attack, the attacked and plain-mean runs.

    Returns
    -------
    dict
        For one attack, its results; for ``--attack all``, results keyed by attack.
    """
    robust = CentredClipping(
        beta=args.beta,
        tau_multiplier=args.tau_multiplier,
        warmup_trusted_pushes=args.warmup_trusted_pushes,
        tau_decay=args.tau_decay,
        untrusted_window=args.untrusted_window,
        untrusted_multiplier=args.untrusted_multiplier,
        max_widening=args.max_widening,
        min_cosine=args.min_cosine,
        reject_opposed=args.reject_opposed,
        flag_multiplier=args.flag_multiplier,
    )
    if args.engine == "stack":
        if args.attack == "all":
            raise SystemExit("--engine stack runs one attack at a time (--attack signflip, ...)")
        return run_stack(args, robust)
    data = Digits.load()
    cleanups: list[Callable[[], None]] = []
    common: dict[str, Any] = {
        "agents": args.agents,
        "trusted": args.trusted,
        "pushes": args.pushes,
        "seed": args.seed,
        "max_staleness": args.max_staleness,
        "max_clipped_fraction": args.max_clipped_fraction,
        "min_pushes": args.min_pushes,
        "eval_every": args.eval_every,
        "storage_factory": _storage_factory(args, cleanups),
        "data_shards": args.data_shards,
        "unit_pushes": args.unit_pushes,
    }
    # (result key, attack, attacker_pushes)
    scenarios: list[tuple[str, str, int | None]] = [
        (attack, attack, args.attacker_pushes)
        for attack in (ATTACKS if args.attack == "all" else [args.attack])
    ]
    if args.attack == "all" and args.attacker_pushes is None:
        scenarios.append(("scale1e6-hit-and-run", "scale1e6", HIT_AND_RUN_PUSHES))
    started = time.perf_counter()
    try:
        clean = simulate(data, attack=None, fraction=0.0, robust=robust, **common)
        results: dict[str, Any] = {}
        curves: dict[str, dict[str, RunResult]] = {}
        for key, attack, attacker_pushes in scenarios:
            runs = {
                "clean": clean,
                **{
                    label: simulate(
                        data,
                        attack=attack,
                        fraction=args.fraction,
                        robust=config,
                        attacker_pushes=attacker_pushes,
                        **common,
                    )
                    for label, config in (("attacked", robust), ("plain_mean", None))
                },
            }
            results[key] = summary(attack, args, runs, attacker_pushes)
            curves[key] = runs
    finally:
        for cleanup in cleanups:
            cleanup()
    if args.plot:
        plot(curves, args.fraction, args.plot)
    for result in results.values():
        result["seconds_total"] = round(time.perf_counter() - started, 1)
    return results[scenarios[0][0]] if len(scenarios) == 1 else results


def summary(
    attack: str,
    args: argparse.Namespace,
    runs: dict[str, RunResult],
    attacker_pushes: int | None,
) -> dict[str, Any]:
    """The JSON result of one attack from its ``clean``, ``attacked`` and ``plain_mean`` runs."""
    clean, attacked, plain = runs["clean"], runs["attacked"], runs["plain_mean"]
    banned = attacked.pushes_to_ban
    return {
        "attack": attack,
        "fraction": args.fraction,
        "agents": args.agents,
        "attackers": attacked.attackers,
        "trusted": args.trusted,
        "pushes": args.pushes,
        "attacker_pushes": attacker_pushes,
        "data_shards": args.data_shards,
        **({"unit_pushes": args.unit_pushes} if args.data_shards else {}),
        "storage": args.storage,
        "clean_accuracy": clean.accuracy,
        "attacked_accuracy": attacked.accuracy,
        "plain_mean_accuracy": plain.accuracy,
        "attackers_banned": attacked.attackers_banned,
        "honest_banned": attacked.honest_banned,
        "pushes_to_ban_p95": float(np.percentile(banned, 95)) if banned else None,
        "pushes_to_ban_max": max(banned) if banned else None,
        "honest_clipped_fraction": round(attacked.honest_clipped_fraction, 4),
        "honest_clipped_fraction_max": round(attacked.honest_clipped_fraction_max, 4),
        "clean_honest_clipped_fraction": round(clean.honest_clipped_fraction, 4),
        "clean_honest_clipped_fraction_max": round(clean.honest_clipped_fraction_max, 4),
        "clean_honest_banned": clean.honest_banned,
        "held_pushes": attacked.held,
        "stale_rejected": attacked.stale_rejected,
        **(
            {"alie_z": round(alie_z(args.agents, attacked.attackers), 4)}
            if attack == "alie"
            else {}
        ),
    }


def plot(curves: dict[str, dict[str, RunResult]], fraction: float, path: Path) -> None:
    """Test accuracy against agent pushes, one panel per attack, three panels a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(curves))
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.2 * rows), sharey=True, squeeze=False
    )
    panels = list(axes.flat)
    for ax, (attack, runs) in zip(panels, curves.items(), strict=False):
        for label, style in (("clean", "k-"), ("attacked", "C0-"), ("plain_mean", "C3--")):
            xs, ys = zip(*runs[label].curve, strict=True)
            ax.plot(xs, [100 * y for y in ys], style, label=label.replace("_", " "))
        ax.set_title(f"{attack}, {fraction:.0%} attackers", fontsize=10)
        ax.set_xlabel("agent pushes")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in panels[: len(panels) : columns]:
        ax.set_ylabel("test accuracy (%)")
    for ax in panels[len(curves) :]:
        ax.axis("off")
    panels[0].legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _storage_factory(
    args: argparse.Namespace, cleanups: list[Callable[[], None]]
) -> Callable[[], ShardStorage]:
    if args.storage == "memory":
        return InMemoryStorage
    from downpour.hotstate.store import RedisStorage

    def make() -> ShardStorage:
        storage = RedisStorage.from_url(args.redis_url, f"downpour-attacks:{uuid.uuid4().hex}:")
        cleanups.append(lambda: storage.delete(JOB))
        return storage

    return make


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.engine == "stack":
        # The stack's defaults: the runs of issue 10 (one trusted agent, 4 data shards).
        for name, value in (
            ("agents", 5),
            ("trusted", 1),
            ("data_shards", 4),
            ("max_staleness", 16),
        ):
            if getattr(args, name) == parser_default(name):
                setattr(args, name, value)
    result = run(args)
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)


def parser_default(name: str) -> Any:
    """The default of option ``name`` in :func:`build_parser`."""
    return build_parser().get_default(name)


if __name__ == "__main__":
    main()
