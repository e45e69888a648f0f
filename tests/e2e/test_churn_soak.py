"""The churn soak, short: five agent kills and a server kill on the production path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.services]
ROOT = Path(__file__).resolve().parents[2]


def load_soak():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("churn_soak", ROOT / "bench" / "churn_soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nothing_is_lost_or_applied_twice_through_five_agent_kills_and_a_server_kill(
    tmp_path: Path,
) -> None:
    soak = load_soak()
    args = soak.parser().parse_args(
        [
            "--kills",
            "5",
            "--interval",
            "3",
            "--after-restart",
            "15",
            "--redis-db",
            "14",
            "--workdir",
            str(tmp_path),
        ]
    )
    result = soak.run(args)
    assert result["double_applied"] == 0, result
    assert result["lost_units"] == 0, result
    assert result["passed_over"] == 0, result
    assert result["applied_pushes"] > 0
    assert result["reissued_leases"] >= 1, result
    # The job still learns after the kills and the restart (the last evaluation alone is
    # one sample of weights mid-stream: bench/churn_soak.py).
    print("churn soak:", result)
    assert (result["best_test_accuracy_after_restart"] or 0.0) >= 0.9, result
