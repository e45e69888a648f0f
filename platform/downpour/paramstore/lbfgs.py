"""L-BFGS for Sandblaster's coordinator (Dean et al. 2012, section 4.2), as a state machine.

The coordinator cannot call ``f(x)`` and wait: each evaluation of the loss and gradient is a
*pass* of many work units over the agents, and may take seconds. So the optimizer is driven
from outside: :meth:`LbfgsState.trial` is the point to evaluate next, :meth:`LbfgsState.tell`
takes its loss and gradient and moves on. The state is plain arrays and numbers, and
:func:`state_to_bytes` / :func:`state_from_bytes` keep it between the coordinator's ticks.

The algorithm (Nocedal and Wright 2006, algorithms 7.4 and 3.1):

* direction ``d = -H g`` by the two-loop recursion over the last ``m`` pairs
  ``s = x_{k+1} - x_k``, ``y = g_{k+1} - g_k`` (a pair is kept only when ``s.y > 1e-10 y.y``),
  with ``H0 = (s.y / y.y) I`` from the newest pair; ``d = -g`` with no pairs, or when the
  recursion's ``d`` is not a descent direction (the history is then dropped);
* a backtracking line search: the first step is ``t = 1`` (``t = 1 / max(1, ||g||)`` with no
  history); a trial is accepted when ``f(x + t d) <= f(x) + c1 t g.d`` (Armijo) and finite,
  else ``t`` is multiplied by ``backtrack`` (0.5); after ``max_backtracks`` refusals the
  history is dropped and the search starts again along ``-g``;
* every trial point is rounded to float32 (what the store holds and agents evaluate), so
  ``s`` is measured between the points that were really evaluated.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float64]

#: Line-search phases, as the job page names them.
INITIAL = "initial"  # evaluating the starting point
SEARCHING = "searching"  # evaluating x + t d
CONVERGED = "converged"  # ||g||_inf below tolerance: nothing more to evaluate


@dataclass(frozen=True)
class LbfgsConfig:
    """Settings of the optimizer.

    Attributes
    ----------
    history : int
        ``m``, (s, y) pairs kept, ``>= 1``.
    armijo : float
        ``c1`` of the sufficient-decrease test, in ``(0, 1)``.
    backtrack : float
        Factor ``t`` shrinks by after a refused trial, in ``(0, 1)``.
    max_backtracks : int
        Refused trials along one direction before the history is dropped.
    gradient_tolerance : float
        Converged when ``max |g_i|`` is below this.
    """

    history: int = 10
    armijo: float = 1e-4
    backtrack: float = 0.5
    max_backtracks: int = 12
    gradient_tolerance: float = 1e-7

    def __post_init__(self) -> None:
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        if not 0 < self.armijo < 1 or not 0 < self.backtrack < 1:
            raise ValueError("armijo and backtrack must lie in (0, 1)")


def two_loop(gradient: Vector, pairs: list[tuple[Vector, Vector]]) -> Vector:
    """``-H g`` by the two-loop recursion over ``pairs`` (oldest first); float64 ``(n,)``."""
    q = gradient.copy()
    alphas = []
    for s, y in reversed(pairs):
        rho = 1.0 / float(y @ s)
        alpha = rho * float(s @ q)
        q -= alpha * y
        alphas.append((rho, alpha))
    if pairs:
        s, y = pairs[-1]
        q *= float(s @ y) / float(y @ y)
    for (s, y), (rho, alpha) in zip(pairs, reversed(alphas), strict=True):
        beta = rho * float(y @ q)
        q += (alpha - beta) * s
    return -q


def _float32(vector: Vector) -> Vector:
    return vector.astype(np.float32).astype(np.float64)


@dataclass
class LbfgsState:
    """Where the optimizer is: the accepted point and its loss and gradient, the history,
    and the trial point it waits on.

    ``x``, ``gradient``, ``direction``, ``trial`` and the pairs are float64 ``(n,)``;
    ``x`` and ``trial`` hold float32-representable values.
    """

    config: LbfgsConfig
    trial: Vector
    x: Vector | None = None
    loss: float = float("nan")
    gradient: Vector | None = None
    direction: Vector | None = None
    step: float = 0.0
    backtracks: int = 0
    phase: str = INITIAL
    iterations: int = 0
    evaluations: int = 0
    restarts: int = 0
    pairs: list[tuple[Vector, Vector]] = field(default_factory=list)

    @classmethod
    def start(cls, x0: npt.ArrayLike, config: LbfgsConfig | None = None) -> LbfgsState:
        """A state whose first trial is ``x0`` (float32-rounded)."""
        start = _float32(np.asarray(x0, dtype=np.float64).reshape(-1))
        return cls(config or LbfgsConfig(), trial=start)

    def tell(self, loss: float, gradient: npt.ArrayLike) -> None:
        """Take the loss and gradient at :attr:`trial`; :attr:`trial` is then the next point.

        Parameters
        ----------
        loss : float
            The mean loss over the training data at ``trial``.
        gradient : array, float, shape ``(n,)``
            Its gradient.
        """
        if self.phase == CONVERGED:
            raise ValueError("the optimizer has converged; nothing is being evaluated")
        g = np.asarray(gradient, dtype=np.float64).reshape(-1)
        if g.shape != self.trial.shape:
            raise ValueError(f"gradient has shape {g.shape}, expected {self.trial.shape}")
        self.evaluations += 1
        finite = bool(np.isfinite(loss)) and bool(np.isfinite(g).all())
        if self.phase == INITIAL:
            if not finite:
                raise ValueError("the loss or gradient at the starting point is not finite")
            self._accept(float(loss), g)
            return
        assert self.x is not None and self.gradient is not None and self.direction is not None
        slope = float(self.gradient @ self.direction)
        if finite and loss <= self.loss + self.config.armijo * self.step * slope:
            s, y = self.trial - self.x, g - self.gradient
            if float(s @ y) > 1e-10 * float(y @ y):
                self.pairs.append((s, y))
                del self.pairs[: -self.config.history]
            self.iterations += 1
            self._accept(float(loss), g)
            return
        self.backtracks += 1
        if self.backtracks > self.config.max_backtracks:
            self.restarts += 1
            self.pairs.clear()
            self._search_from_here()
            return
        self.step *= self.config.backtrack
        self.trial = _float32(self.x + self.step * self.direction)

    def _accept(self, loss: float, gradient: Vector) -> None:
        self.x, self.loss, self.gradient = self.trial, loss, gradient
        self._search_from_here()

    def _search_from_here(self) -> None:
        assert self.x is not None and self.gradient is not None
        self.backtracks = 0
        if float(np.max(np.abs(self.gradient))) < self.config.gradient_tolerance:
            self.phase, self.direction = CONVERGED, None
            return
        direction = two_loop(self.gradient, self.pairs)
        if not float(self.gradient @ direction) < 0:
            self.pairs.clear()
            direction = -self.gradient
        self.direction = direction
        norm = float(np.linalg.norm(self.gradient))
        self.step = 1.0 if self.pairs else 1.0 / max(1.0, norm)
        self.trial = _float32(self.x + self.step * direction)
        self.phase = SEARCHING

    def describe(self) -> str:
        """The line-search state in words, for the job page."""
        if self.phase == INITIAL:
            return "evaluating the starting point"
        if self.phase == CONVERGED:
            return "converged"
        tried = f"step {self.step:.3g}"
        if self.backtracks:
            return f"backtracking ({self.backtracks}), {tried}"
        return f"trying {tried} along the L-BFGS direction ({len(self.pairs)} pairs)"


_ARRAYS = ("trial", "x", "gradient", "direction")


def state_to_bytes(state: LbfgsState) -> bytes:
    """The state as one ``.npz`` (arrays, pairs, and the numbers as JSON)."""
    arrays: dict[str, np.ndarray] = {}
    for name in _ARRAYS:
        value = getattr(state, name)
        if value is not None:
            arrays[name] = value
    for index, (s, y) in enumerate(state.pairs):
        arrays[f"s{index}"], arrays[f"y{index}"] = s, y
    config = state.config
    meta = {
        "config": [
            config.history,
            config.armijo,
            config.backtrack,
            config.max_backtracks,
            config.gradient_tolerance,
        ],
        "loss": state.loss,
        "step": state.step,
        "backtracks": state.backtracks,
        "phase": state.phase,
        "iterations": state.iterations,
        "evaluations": state.evaluations,
        "restarts": state.restarts,
        "pairs": len(state.pairs),
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def state_from_bytes(data: bytes) -> LbfgsState:
    """Inverse of :func:`state_to_bytes`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: np.array(npz[name]) for name in npz.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    history, armijo, backtrack, max_backtracks, tolerance = meta["config"]
    pairs = [(arrays[f"s{i}"], arrays[f"y{i}"]) for i in range(meta["pairs"])]
    return LbfgsState(
        LbfgsConfig(int(history), armijo, backtrack, int(max_backtracks), tolerance),
        trial=arrays["trial"],
        x=arrays.get("x"),
        loss=float(meta["loss"]),
        gradient=arrays.get("gradient"),
        direction=arrays.get("direction"),
        step=float(meta["step"]),
        backtracks=int(meta["backtracks"]),
        phase=str(meta["phase"]),
        iterations=int(meta["iterations"]),
        evaluations=int(meta["evaluations"]),
        restarts=int(meta["restarts"]),
        pairs=pairs,
    )
