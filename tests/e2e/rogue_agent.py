"""A dishonest volunteer for end-to-end tests: the real agent CLI with tampered gradients.

::

    python tests/e2e/rogue_agent.py --mode scale  join http://server:8000 --token TOKEN ...
    python tests/e2e/rogue_agent.py --mode signflip join http://server:8000 --token TOKEN ...
    python tests/e2e/rogue_agent.py --mode random join http://server:8000 --token TOKEN ...
    python tests/e2e/rogue_agent.py --mode disguised --factor 0.1 join http://server:8000 ...

Everything after ``--mode`` (and ``--factor``/``--seed``) goes to ``downpour_agent.cli``
unchanged, so the process registers, leases, fetches, heartbeats, pushes and exits exactly
as a donor's agent does. Only ``trainer.GradientComputer.compute`` is wrapped, in this
process; the agent package itself is untouched:

* ``scale``: every gradient times ``--factor`` (1e6): the "scale" attack. Centred clipping
  clips each of its pushes, and the agent is banned.
* ``random``: every gradient replaced by Gaussian noise with the same L2 norm, variable by
  variable: a "faking" agent whose pushes look plausible in size but carry no information.
  Clipping alone does not catch it; spot checks do.
* ``signflip``: every gradient negated (``-g``): plausible in size, pointing against the
  server's root reference gradient, which the direction test flags.
* ``disguised``: ``-factor`` times (the gradient plus Gaussian noise of the same L2 norm,
  variable by variable; give ``--factor``, e.g. 0.1). Inner product manipulation (Xie et
  al. 2020), with the agent's own gradient standing in for the honest mean, disguised so
  that few single pushes fail the per-push direction test (cosine < -0.5) while their mean
  points against the root gradient. Small, so centred clipping passes it: only the
  direction rule (``reputation.points_away``) can ban it.
* ``late``: honest for the first ``--honest-steps`` steps of every lease, ``random`` after:
  a faker that expects only the start of a lease to be checked.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

MODES = ("scale", "random", "late", "signflip", "disguised")
#: ``--factor`` when not given: a huge scale, a small disguised push.
DEFAULT_FACTORS = {"scale": 1e6, "disguised": 0.1}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rogue_agent.py", description=__doc__, allow_abbrev=False)
    parser.add_argument("--mode", choices=MODES, required=True, help="how to tamper")
    parser.add_argument(
        "--factor",
        type=float,
        default=None,
        help="multiplier of --mode scale (default 1e6); -factor of --mode disguised (default 0.1)",
    )
    parser.add_argument("--seed", type=int, default=None, help="noise seed of --mode random")
    parser.add_argument(
        "--honest-steps", type=int, default=2, help="honest steps per lease of --mode late"
    )
    parser.add_argument("agent_args", nargs=argparse.REMAINDER, help="downpour-agent arguments")
    args = parser.parse_args(argv)
    if args.factor is None:
        args.factor = DEFAULT_FACTORS.get(args.mode, 1.0)
    return args


def tamper(mode: str, factor: float = 1e6, seed: int | None = None, honest_steps: int = 2) -> None:
    """Wrap ``GradientComputer.compute`` so the gradients it returns are tampered with."""
    from downpour_agent import trainer

    honest = trainer.GradientComputer.compute
    rng = np.random.default_rng(seed)
    steps_in_lease = [0]
    # The agent makes a new BatchSampler for every lease: that is where a lease starts.
    new_sampler = trainer.BatchSampler.__init__

    def sampler_init(self: Any, *args: Any, **kwargs: Any) -> None:
        steps_in_lease[0] = 0
        new_sampler(self, *args, **kwargs)

    trainer.BatchSampler.__init__ = sampler_init  # type: ignore[method-assign]

    def forged(gradient: np.ndarray) -> np.ndarray:
        if mode == "scale":
            return (gradient * np.float32(factor)).astype(np.float32)
        if mode == "signflip":
            return (-gradient).astype(np.float32)
        noise = rng.standard_normal(gradient.shape).astype(np.float32)
        scale = float(np.linalg.norm(gradient)) / max(float(np.linalg.norm(noise)), 1e-30)
        noise = noise * np.float32(scale)
        if mode == "disguised":
            return ((gradient + noise) * np.float32(-factor)).astype(np.float32)
        return noise.astype(np.float32)

    def compute(self: Any, x: Any, y: Any) -> tuple[dict[str, np.ndarray], float]:
        gradients, loss = honest(self, x, y)
        steps_in_lease[0] += 1
        if mode == "late" and steps_in_lease[0] <= honest_steps:
            return gradients, loss
        return {name: forged(gradient) for name, gradient in gradients.items()}, loss

    trainer.GradientComputer.compute = compute  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    tamper(args.mode, args.factor, args.seed, args.honest_steps)
    from downpour_agent import cli

    return cli.main(args.agent_args)


if __name__ == "__main__":
    sys.exit(main())
