"""Sandblaster's unit answers kept first-wins, the same in memory and in Redis
(``paramstore.passes.MemoryPassResults``, ``hotstate.passresults.RedisPassResults``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from downpour.paramstore.passes import Answer, MemoryPassResults, UnitAnswer


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.services)])
def results(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        return MemoryPassResults()
    from downpour.hotstate.passresults import RedisPassResults

    client = request.getfixturevalue("client")
    return RedisPassResults(client, request.getfixturevalue("prefix"))


def an_answer(value: float, samples: int = 10) -> UnitAnswer:
    return UnitAnswer(samples, 0.25 * value, np.full(5, value, np.float32))


def test_the_first_answer_of_a_unit_is_kept_and_the_others_are_told_apart(results: Any) -> None:
    # Execute
    first = results.offer("job", 3, 0, 1, "a:0:1", an_answer(1.0))
    again = results.offer("job", 3, 0, 1, "a:0:1", an_answer(1.0))
    other = results.offer("job", 3, 0, 1, "b:0:1", an_answer(2.0))
    elsewhere = results.offer("job", 3, 0, 0, "b:0:0", an_answer(2.0))

    # Assert
    assert (first, again, other, elsewhere) == (
        Answer.FIRST,
        Answer.DUPLICATE,
        Answer.LATE,
        Answer.FIRST,
    )
    kept = results.answers("job", 3, 1)
    assert list(kept) == [0] and kept[0].samples == 10 and kept[0].loss == 0.25
    np.testing.assert_array_equal(kept[0].gradient, np.full(5, 1.0, np.float32))
    assert results.count("job", 3, 1) == 1


def test_a_finished_pass_is_forgotten_and_the_state_is_kept_until_the_job_goes(
    results: Any,
) -> None:
    # Prepare
    results.offer("job", 0, 0, 0, "a:0:0", an_answer(1.0))
    results.offer("job", 1, 0, 0, "b:0:0", an_answer(1.0))
    results.save_state("job", b"lbfgs")

    # Execute
    results.forget_pass("job", 0, 2)

    # Assert
    assert results.count("job", 0, 0) == 0 and results.count("job", 1, 0) == 1
    assert results.load_state("job") == b"lbfgs"
    results.delete("job")
    assert results.load_state("job") is None and results.count("job", 1, 0) == 0


def test_an_answer_to_a_pass_below_the_open_one_is_late_and_keeps_nothing(results: Any) -> None:
    # Prepare: pass 4 is open; pass 3 was finished and forgotten
    results.open_pass("job", 4)

    # Execute
    straggler = results.offer("job", 3, 0, 0, "a:0:0", an_answer(1.0))
    current = results.offer("job", 4, 0, 0, "b:0:0", an_answer(1.0))

    # Assert
    assert (straggler, current) == (Answer.LATE, Answer.FIRST)
    assert results.count("job", 3, 0) == 0 and results.answered("job", 3, 0) == set()
    assert results.answered("job", 4, 0) == {0}
