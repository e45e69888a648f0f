"""The digits analyses behind the 2-vs-1 key: the batch sweep's choice of rates, and the
local-steps rounds replayed in step time."""

from __future__ import annotations

from tests.sim.test_convergence_sim import _load


def test_each_batch_takes_its_fastest_rate_and_a_miss_counts_as_never() -> None:
    cb = _load("critical_batch_digits")
    runs = [
        # batch 32: 0.001 has median 50, 0.002 median 40 (one seed missed: still 40 of 3).
        *(
            {"optimizer": "adamw", "batch": 32, "rate": 0.001, "seed": s, "steps": n}
            for s, n in enumerate([48, 50, 60])
        ),
        *(
            {"optimizer": "adamw", "batch": 32, "rate": 0.002, "seed": s, "steps": n}
            for s, n in enumerate([40, None, 30])
        ),
        # batch 64: 0.004 missed twice of three, so its median is a miss and 0.001 is chosen.
        *(
            {"optimizer": "adamw", "batch": 64, "rate": 0.001, "seed": s, "steps": n}
            for s, n in enumerate([30, 30, 31])
        ),
        *(
            {"optimizer": "adamw", "batch": 64, "rate": 0.004, "seed": s, "steps": n}
            for s, n in enumerate([10, None, None])
        ),
    ]

    best = cb.best_rates(runs)

    assert best[("adamw", 32)]["rate"] == 0.002 and best[("adamw", 32)]["median_steps"] == 40
    assert best[("adamw", 64)]["rate"] == 0.001 and best[("adamw", 64)]["median_steps"] == 30
    ratios = cb.step_ratios(best, 32)
    assert ratios["adamw"] == {"32": 1.0, "64": 0.75}
    assert ratios["best"] == {"32": 1.0, "64": 0.75}


def test_rounds_in_step_time_count_a_second_agents_push_as_stale() -> None:
    lr = _load("local_rounds_digits")
    data = _load("benchlib").load_digits()

    def run(agents: int) -> dict:
        # Two rounds of 2 steps each, the fetch back at the next step, a target never met.
        return lr.run_once(
            agents, 2, 0, "held", 0.0, False, "staleness", 0, 4, data, 1.01, model="small"
        )

    one, two = run(1), run(2)

    # One agent is never stale. Two agents push at the same tick: the second push of the
    # first round is one version behind, and from then on each starts from the weights
    # fetched after its own push, one version behind the other's: (0 + 1 + 1 + 1) / 4.
    assert one["ticks"] is None and one["pushes"] == 2 and one["mean_staleness"] == 0.0
    assert two["pushes"] == 4 and two["mean_staleness"] == 0.75
