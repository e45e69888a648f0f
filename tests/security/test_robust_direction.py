"""Sign flips and IPM against a robust job with a root gradient: flagged, banned, honest never.

The first tests drive the real store and the pure ban policy push by push; the last runs a
short job of ``bench/attacks.py``'s server simulation (store, unit sizing, data shards,
asynchronous agents, warm-up, bans flushed every 2 s, the root gradient every 0.5 s).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from tests.paramstore.layouts import initial_weights, model_layout

from downpour.paramstore import AdagradConfig, CentredClipping, InMemoryStorage, ParameterStore
from downpour.scheduler.reputation import (
    DEFAULT_MAX_COSINE_T,
    DEFAULT_MAX_MEAN_COSINE,
    Reputation,
    min_pushes_for_shards,
    record_push,
    should_ban,
)

BENCH = Path(__file__).resolve().parents[2] / "bench" / "attacks.py"
BAN_RULES = BENCH.with_name("ban_rules.py")
CONFIG = CentredClipping(warmup_trusted_pushes=3)


def load_bench(path: Path = BENCH) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"downpour_bench_{path.stem}_direction", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


class Job:
    """A warm robust job of two shards whose honest gradient is ``mean`` plus noise."""

    def __init__(self, seed: int) -> None:
        self.layout = model_layout()
        self.store = ParameterStore(
            InMemoryStorage(),
            "job",
            self.layout,
            AdagradConfig(learning_rate=0.01),
            100,
            robust=CONFIG,
        )
        self.store.initialize(initial_weights(self.layout))
        self.rng = np.random.default_rng(seed)
        self.pushes = 0
        self.mean = [
            {spec.name: np.full(spec.shape, 0.5, np.float32) for spec in specs}
            for specs in self.layout.shards
        ]
        self.references = [
            np.concatenate([part[spec.name].ravel() for spec in specs])
            for part, specs in zip(self.mean, self.layout.shards, strict=True)
        ]
        for _ in range(CONFIG.warmup_trusted_pushes):
            self.push(1.0, trusted=True)

    def push(self, sign: float, trusted: bool = False) -> list[bool]:
        """One agent push of every shard; returns the clipped flags the consumer records."""
        flags = []
        for shard, part in enumerate(self.mean):
            noise = 0.5 * self.rng.standard_normal()  # the same batch noise on every shard
            gradient = {
                name: (
                    sign * value * (1 + noise) + 0.3 * self.rng.standard_normal(value.shape)
                ).astype(np.float32)
                for name, value in part.items()
            }
            self.pushes += 1
            result = self.store.push(
                shard,
                gradient,
                self.store.versions()[shard],
                f"p{self.pushes}",
                trusted=trusted,
                reference=self.references[shard],
            )
            if result.applied and not trusted:
                flags.append(result.clipped)
        return flags


def pushes_until_banned(job: Job, sign: float, limit: int) -> int | None:
    """Store pushes an agent sending ``sign * g`` makes before the ban policy bans it."""
    reputation = Reputation()
    min_pushes = min_pushes_for_shards(job.layout.n_shards)
    while reputation.pushes < limit:
        for flag in job.push(sign):
            reputation = record_push(reputation, flag)
        if should_ban(reputation, min_pushes=min_pushes):
            return reputation.pushes
    return None


def test_a_sign_flipper_is_banned_as_soon_as_there_is_enough_evidence() -> None:
    job = Job(seed=0)
    assert pushes_until_banned(job, -1.0, limit=200) == min_pushes_for_shards(2)


def test_an_ipm_attacker_is_banned_as_soon_as_there_is_enough_evidence() -> None:
    job = Job(seed=1)
    assert pushes_until_banned(job, -0.5, limit=200) == min_pushes_for_shards(2)


def test_an_honest_agent_is_never_banned() -> None:
    job = Job(seed=2)
    assert pushes_until_banned(job, 1.0, limit=1000) is None


def test_on_a_short_job_the_sign_flippers_are_banned_and_no_honest_agent_is() -> None:
    # Prepare: 5 agents (1 trusted, 2 attackers), 4 data shards, a 20 s job. (IPM attackers
    # are banned later, when at all: bench/attacks.py, figures in docs/robustness.md.)
    attacks = load_bench()
    data = attacks.Digits.load()
    # Execute
    attacked = attacks.simulate_stack(
        data,
        attack="signflip",
        fraction=0.4,
        robust=CentredClipping(),
        seconds=10.0,
        seed=0,
        root_sample=400,
    )
    # Assert: banned at the push that made each ban due, within tens of store pushes.
    assert attacked.attackers == 2 and attacked.attackers_banned == 2
    assert attacked.honest_banned == 0
    # (Judged only at timed flushes, the second was banned at its 32nd.)
    assert attacked.pushes_to_ban == [20, 20], attacked.pushes_to_ban
    # The trace (--trace) holds every tested push, each attacker's up to its ban.
    attackers_tested = [push for push in attacked.trace if push[1] == "attacker"]
    assert len(attackers_tested) == sum(
        a["tested"] for a in attacked.agents if a["role"] == "attacker"
    )
    assert all(-1.0 <= push[3] <= 1.0 for push in attacked.trace)
    # With the agent's store pushes so far, its last tested push is its ban's.
    last = {push[0]: push[4] for push in attackers_tested}
    assert sorted(last.values()) == sorted(attacked.pushes_to_ban), last


def test_the_offline_replay_of_a_trace_bans_where_the_job_banned_and_a_laxer_rule_never() -> None:
    # Prepare: a trace of tested pushes, two attackers pushing straight against the root
    # gradient and one honest agent pushing with it, as bench/attacks.py --trace writes it.
    ban_rules = load_bench(BAN_RULES)
    rng = np.random.default_rng(0)
    attacked = [
        [agent, role, 0.1 * step, round(float(cosine), 4), 2 * step + 1]
        for step in range(40)
        for agent, role, cosine in (
            (1, "attacker", -0.4 + 0.1 * rng.standard_normal()),
            (2, "attacker", -0.2 + 0.1 * rng.standard_normal()),
            (3, "honest", 0.1 + 0.1 * rng.standard_normal()),
        )
    ]
    trace = {"clean": [p for p in attacked if p[1] == "honest"], "attacked": attacked}
    # Execute
    server = ban_rules.judge(trace, (DEFAULT_MAX_MEAN_COSINE, DEFAULT_MAX_COSINE_T))
    lax = ban_rules.judge(trace, (-0.5, -100.0))
    # Assert: both attackers at their 20th tested push (store push 39), the honest never.
    assert server["attackers_store_pushes_to_ban"] == [39, 39], server
    assert server["honest_banned"] == 0 and server["honest_low_mean"] > 0, server
    assert lax["attackers_store_pushes_to_ban"] == [None, None], lax


def short_jobs_with_triggered_references(
    attack: str | None, fraction: float, every: int
) -> dict[int, Any]:
    """A 3 s server-terms job (seed 0, references on the 1 s clock), run twice: with the clock
    alone (key 0) and with references also every ``every`` versions of shard 0."""
    attacks = load_bench()
    data = attacks.Digits.load()
    return {
        versions: attacks.simulate_stack(
            data,
            attack=attack,
            fraction=fraction,
            robust=CentredClipping(),
            seconds=3.0,
            seed=0,
            root_sample=400,
            reference_every_s=1.0,
            reference_every_versions=versions,
        )
        for versions in (0, every)
    }


def test_references_triggered_by_versions_are_fresher_than_the_clocks() -> None:
    # Prepare: the same short clean job, references on the 1 s clock alone and also every
    # 8 versions of shard 0 (bench/attacks.py --reference-every-versions).
    runs = short_jobs_with_triggered_references(None, 0.0, every=8)
    # Assert: more references, and pushes tested against ones fewer versions away.
    clock, triggered = runs[0], runs[8]
    assert clock.references_computed <= 4, clock.references_computed
    assert triggered.references_computed > 4 * clock.references_computed
    assert 0 < triggered.reference_lag_p95 < clock.reference_lag_p95 / 2, (
        triggered.reference_lag_p95,
        clock.reference_lag_p95,
    )


def test_ipm_attackers_near_the_line_are_banned_within_tens_of_pushes_by_triggered_refs() -> None:
    # Prepare: the worst case of issue 10 (IPM, 40 % of 5 agents, seed 0; on the clock's
    # references alone banned at 94 and 213 store pushes), the server's reference settings:
    # the 1 s clock plus a reference every 32 versions of shard 0, and the -0.10 ban line.
    runs = short_jobs_with_triggered_references("ipm", 0.4, every=32)
    # Assert: both attackers at their first judgements with triggered references, no honest
    # agent; on the clock alone one of them is still pushing when the job ends (it needed 80
    # pushes at -0.10, by the replay in docs/robustness.md).
    clock, triggered = runs[0], runs[32]
    assert triggered.attackers_banned == 2 and triggered.honest_banned == 0
    assert max(triggered.pushes_to_ban) <= 21, triggered.pushes_to_ban
    assert clock.attackers_banned < 2, clock.pushes_to_ban


def test_the_offline_replay_refuses_a_malformed_rule_and_a_trace_from_before_store_pushes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a trace row as bench/attacks.py wrote it before rows carried store pushes.
    ban_rules = load_bench(BAN_RULES)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"clean": [], "attacked": [[1, "attacker", 0.1, -0.5]]}))
    # Execute and assert: each refused with a usage error that says what is wrong.
    for argv, said in (
        ([str(old), "--rule=-0.1"], "is not MEAN:T"),
        ([str(old), "--rule=a:b"], "is not MEAN:T"),
        ([str(old)], "written before bench/attacks.py --trace recorded store pushes"),
    ):
        with pytest.raises(SystemExit) as exited:
            ban_rules.main(argv)
        assert exited.value.code == 2, argv
        assert said in capsys.readouterr().err, argv
