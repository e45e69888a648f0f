"""The agent works through leases against a FakeServer: the whole conversation, the
gradients it pushes, and the leases it cannot or may no longer work on."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.agent.fakeserver import (
    N_SAMPLES,
    TOKEN,
    FakeServer,
    make_agent,
    run_agent,
)

from downpour_agent.connection import EXIT_OK
from downpour_agent.protocol import (
    PROTOCOL_VERSION,
    error_message,
    job_finished_message,
    job_paused_message,
)
from downpour_agent.trainer import GradientComputer

keras = pytest.importorskip("keras")


# -- a whole lease ------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "zlib", "fp16", "int8"])
async def test_the_agent_registers_fetches_pushes_and_completes_a_lease(
    server: FakeServer, tmp_path: Path, compression: str
) -> None:
    # Prepare
    server.lease_template["hyper"]["compression"] = compression
    server.work = [dict(server.lease_template)]
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert: the conversation
    assert code == EXIT_OK
    register = server.received[0]
    assert register["type"] == "register"
    assert register["protocol_version"] == PROTOCOL_VERSION
    assert register["name"] == "alice-laptop" and register["device"]["cpu_cores"] == 2
    assert server.shard_requests == [f"Bearer {TOKEN}"]
    fetches = server.of_type("fetch")
    assert [(f["lease_id"], f["shard"]) for f in fetches] == [("lease-1", s) for s in (0, 1)] * 3
    [complete] = server.of_type("complete")
    assert complete == {**complete, "lease_id": "lease-1", "samples": 7 * 8}
    assert server.of_type("return_lease") == []

    # Assert: 7 steps pushed every 2 steps -> rounds after steps 1, 3, 5 and the last (6)
    assert [(m["seq"], m["shard"], m["samples"]) for m, _ in server.pushes] == [
        (seq, shard, samples) for seq, samples in enumerate([16, 16, 16, 8]) for shard in (0, 1)
    ]
    # Fetches go out before steps 0, 3 and 6 but overlap training: an answer is applied when
    # it arrives, and a push names the oldest version its steps computed on. So per shard
    # the base versions start at 0, never decrease, and never pass the pushes made before.
    for shard in (0, 1):
        bases = [m["base_version"] for m, _ in server.pushes if m["shard"] == shard]
        assert bases[0] == 0
        assert bases == sorted(bases)
        assert all(base <= round_ for round_, base in enumerate(bases))
    for msg, tensors in server.pushes:
        shard_layout = server.layout[msg["shard"]]
        assert list(tensors) == [entry["name"] for entry in shard_layout]
        for entry in shard_layout:
            grad = tensors[entry["name"]]
            assert grad.dtype == np.float32 and list(grad.shape) == entry["shape"]
            assert np.isfinite(grad).all()
        assert any(np.abs(g).sum() > 0 for g in tensors.values())

    # Assert: what the agent knows
    assert agent.stats.leases_completed == 1
    assert agent.stats.pushes_sent == agent.stats.pushes_acked == 8
    last = agent.stats.last_push
    assert last is not None
    assert (last.seq, last.shard, last.version, last.applied) == (3, 1, 4, True)
    assert 0 <= last.staleness <= 3  # overlapped fetches may leave the last push stale


async def test_an_int8_fetch_left_unapplied_at_a_lease_end_makes_the_next_fetch_whole(
    server: FakeServer, tmp_path: Path
) -> None:
    # Prepare: two int8 leases of one job on one connection, 7 steps each, fetches before
    # steps 0, 3 and 6. The fetch sent before step 6 is still unapplied when the lease's last
    # step ends: the server may have answered it with a delta, and so moved its mirror of
    # what this connection holds past the copy the agent kept.
    server.lease_template["hyper"]["compression"] = "int8"
    server.work = [dict(server.lease_template) for _ in range(2)]
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert: within a lease, a fetch made after an applied answer names the version held
    # (the server may answer with a delta); the next lease's first fetch names none, so it
    # gets whole shards rather than a delta against a base the agent does not hold.
    assert code == EXIT_OK
    fetches = server.of_type("fetch")
    first, second = (
        [f for f in fetches if f["lease_id"] == lease] for lease in ("lease-1", "lease-2")
    )
    assert len(first) == len(second) == 6
    assert [f.get("have") for f in first[:2]] == [None, None]
    assert all(isinstance(f.get("have"), int) for f in first[2:])
    assert [f.get("have") for f in second[:2]] == [None, None]
    assert all(isinstance(f.get("have"), int) for f in second[2:])


async def test_the_pushed_gradient_is_the_mean_gradient_of_the_batches_it_covers(
    server: FakeServer, tmp_path: Path, model_config: dict[str, Any], shard_body: bytes
) -> None:
    # Prepare: one push covering two steps, so both batches see the fetched weights.
    server.lease_template.update(steps=2)
    server.lease_template["hyper"].update(n_fetch=2, n_push=2)
    server.work = [dict(server.lease_template)]
    weights = {name: value.copy() for name, value in server.params.items()}

    # Execute
    await run_agent(make_agent(server, tmp_path))

    # Assert
    from downpour_agent.trainer import BatchSampler

    with np.load(io.BytesIO(shard_body)) as archive:
        x, y = archive["x"], archive["y"]
    sampler = BatchSampler(N_SAMPLES, 8, seed=42)
    idx = np.concatenate([sampler.next_indices(), sampler.next_indices()])
    reference = GradientComputer(model_config, "sparse_categorical_crossentropy")
    reference.set_weights(weights)
    expected, _ = reference.compute(x[idx], y[idx])
    pushed = {name: grad for _, tensors in server.pushes for name, grad in tensors.items()}
    assert pushed.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(pushed[name], expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("n_fetch", "n_push"), [(2, 5), (3, 3), (1, 2), (1, 4), (4, 2)])
async def test_every_round_names_the_weights_it_ran_on_so_a_spot_check_can_replay_it(
    server: FakeServer,
    tmp_path: Path,
    model_config: dict[str, Any],
    shard_body: bytes,
    n_fetch: int,
    n_push: int,
) -> None:
    # Prepare: fetches overlap training, and the server's weights change with every push.
    server.lease_template.update(steps=9)
    server.lease_template["hyper"].update(n_fetch=n_fetch, n_push=n_push)
    server.work = [dict(server.lease_template)]

    # Execute
    await run_agent(make_agent(server, tmp_path))

    # Assert: rounds end at multiples of n_push (and at the last step)...
    rounds = [(m["seq"], m["samples"]) for m, _ in server.pushes if m["shard"] == 0]
    sizes = [min(n_push, 9 - start) for start in range(0, 9, n_push)]
    assert rounds == [(seq, size * 8) for seq, size in enumerate(sizes)]
    # ...and each one replays exactly from the weights served at the versions it names: its
    # base versions, then each load within the round.
    from downpour_agent.trainer import round_gradients

    def served(versions: dict[int, int]) -> dict[str, np.ndarray]:
        return {
            k: v for shard, ver in versions.items() for k, v in server.served[(shard, ver)].items()
        }

    with np.load(io.BytesIO(shard_body)) as archive:
        x, y = archive["x"].astype(np.float32), archive["y"]
    verifier = GradientComputer(model_config, "sparse_categorical_crossentropy", seed=7)
    loaded_mid_round = 0
    for seq, size in enumerate(sizes):
        frames = [(m, t) for m, t in server.pushes if m["seq"] == seq]
        loads = frames[0][0].get("loads", [])
        assert all(m.get("loads", []) == loads for m, _ in frames)
        loaded_mid_round += len(loads)
        verifier.set_weights(served({m["shard"]: m["base_version"] for m, _ in frames}))
        expected, samples = round_gradients(
            verifier,
            x,
            y,
            batch_size=8,
            seed=42,
            first_step=seq * n_push,
            steps=size,
            loads=[(offset, served(dict(enumerate(vs)))) for offset, vs in loads],
        )
        pushed = {name: grad for _, tensors in frames for name, grad in tensors.items()}
        assert samples == size * 8 and pushed.keys() == expected.keys()
        for name in expected:
            np.testing.assert_allclose(pushed[name], expected[name], rtol=1e-4, atol=1e-6)
    if n_fetch < n_push:
        assert loaded_mid_round > 0, "fetches within a round are loaded when they arrive"


async def test_heartbeats_carry_the_lease_while_it_is_worked_on(
    server: FakeServer, tmp_path: Path
) -> None:
    agent = make_agent(server, tmp_path, max_steps_per_second=20)

    await run_agent(agent)

    heartbeats = server.of_type("heartbeat")
    assert len(heartbeats) >= 2
    assert any(hb.get("lease_id") == "lease-1" for hb in heartbeats)


async def test_an_idle_agent_keeps_asking_for_work_then_exits_when_told_to(
    server: FakeServer, tmp_path: Path
) -> None:
    server.work = []

    code = await run_agent(make_agent(server, tmp_path, exit_when_idle_s=0.3))

    assert code == EXIT_OK
    assert len(server.of_type("request_work")) >= 3
    assert server.close_codes == [1000]


async def test_two_leases_of_one_job_download_the_shard_once(
    server: FakeServer, tmp_path: Path
) -> None:
    server.work = [dict(server.lease_template), dict(server.lease_template)]
    agent = make_agent(server, tmp_path)

    await run_agent(agent)

    assert [c["lease_id"] for c in server.of_type("complete")] == ["lease-1", "lease-2"]
    assert len(server.shard_requests) == 1


# -- leases the agent cannot or may no longer work on -------------------------------


async def test_a_shard_with_the_wrong_sha256_is_refused_and_the_lease_handed_back(
    server: FakeServer, tmp_path: Path
) -> None:
    server.lease_template["dataset"] = {
        **server.lease_template["dataset"],
        "sha256": hashlib.sha256(b"another shard").hexdigest(),
    }
    server.work = [dict(server.lease_template)]
    agent = make_agent(server, tmp_path)

    code = await run_agent(agent)

    assert code == EXIT_OK
    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]
    assert server.pushes == [] and server.of_type("complete") == []
    assert await asyncio.to_thread(lambda: list(tmp_path.glob("*.npz"))) == []


async def test_a_layout_that_does_not_match_the_model_is_handed_back(
    server: FakeServer, tmp_path: Path
) -> None:
    wrong = json.loads(json.dumps(server.layout))
    wrong[0][0]["shape"] = [3, 5]
    server.lease_template["layout"] = wrong
    server.work = [dict(server.lease_template)]

    await run_agent(make_agent(server, tmp_path))

    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]
    # The first fetch goes out with the lease, before the model it is checked against
    # exists (it overlaps the build); nothing is trained or pushed, and no fetch follows.
    assert len(server.of_type("fetch")) <= len(wrong) and server.pushes == []
    assert server.of_type("complete") == []


async def test_a_model_the_validator_refuses_is_handed_back(
    server: FakeServer, tmp_path: Path
) -> None:
    server.lease_template["model"] = {"class_name": "Lambda", "config": {"function": "os.system"}}
    server.work = [dict(server.lease_template)]
    agent = make_agent(server, tmp_path)

    code = await run_agent(agent)

    assert code == EXIT_OK
    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]


async def test_a_lease_with_malformed_hyper_parameters_is_handed_back(
    server: FakeServer, tmp_path: Path
) -> None:
    server.lease_template["hyper"] = {**server.lease_template["hyper"], "batch_size": "lots"}
    server.work = [dict(server.lease_template)]

    await run_agent(make_agent(server, tmp_path))

    assert [m["lease_id"] for m in server.of_type("return_lease")] == ["lease-1"]


def expired(msg: dict[str, Any], job_id: str) -> dict[str, Any]:
    return error_message("lease_expired", "too late", msg.get("ref"))


def job_finished(msg: dict[str, Any], job_id: str) -> dict[str, Any]:
    return job_finished_message(job_id)


@pytest.mark.parametrize(
    "reply",
    [expired, job_finished],
    ids=["an expired lease", "a finished job (announced as the first push arrives)"],
)
async def test_a_lease_that_ends_is_abandoned_at_once_and_new_work_requested(
    server: FakeServer, tmp_path: Path, reply: Any
) -> None:
    # Prepare
    server.lease_template.update(steps=200)
    server.lease_template["hyper"].update(n_push=1)
    server.work = [dict(server.lease_template)]
    job_id = server.lease_template["job_id"]
    server.push_reply = lambda msg: reply(msg, job_id)
    agent = make_agent(server, tmp_path)

    # Execute
    code = await run_agent(agent)

    # Assert
    assert code == EXIT_OK
    assert agent.stats.leases_abandoned == 1
    assert server.of_type("complete") == [] and server.of_type("return_lease") == []
    assert len(server.pushes) < 20
    last_push = max(i for i, m in enumerate(server.received) if m["type"] == "push")
    assert any(m["type"] == "request_work" for m in server.received[last_push:])


async def test_stale_gradient_errors_are_counted_and_the_work_goes_on(
    server: FakeServer, tmp_path: Path
) -> None:
    server.push_reply = lambda msg: error_message("stale_gradient", "too stale", msg.get("ref"))
    agent = make_agent(server, tmp_path)

    await run_agent(agent)

    assert agent.stats.pushes_stale == 8
    assert [c["lease_id"] for c in server.of_type("complete")] == ["lease-1"]


@pytest.mark.parametrize(
    ("announce", "said"), [(job_finished_message, "finished"), (job_paused_message, "paused")]
)
async def test_a_job_that_ends_or_pauses_is_one_info_line_and_no_warning(
    server: FakeServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    announce: Any,
    said: str,
) -> None:
    # Prepare: the job ends (or is paused) as the first push arrives.
    server.lease_template.update(steps=200)
    server.lease_template["hyper"].update(n_push=1)
    server.work = [dict(server.lease_template)]
    job_id = server.lease_template["job_id"]
    server.push_reply = lambda msg: announce(job_id)
    agent = make_agent(server, tmp_path)

    # Execute
    with caplog.at_level("INFO", logger="downpour_agent"):
        code = await run_agent(agent)

    # Assert: said once, in words, at INFO; nothing louder
    assert code == EXIT_OK
    assert server.of_type("complete") == []
    lines = [r for r in caplog.records if f"job {job_id} {said}" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []


async def test_the_agent_logs_why_it_is_idle_once_per_reason(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: no work, for a stated reason
    server.work = []
    server.no_work_extra = {"reason": "trusted_warmup", "message": "waiting for a trusted agent"}
    agent = make_agent(server, tmp_path, exit_when_idle_s=0.5)

    # Execute
    with caplog.at_level("INFO", logger="downpour_agent"):
        await run_agent(agent)

    # Assert
    idle = [r.getMessage() for r in caplog.records if r.getMessage().startswith("idle:")]
    assert idle == ["idle: waiting for a trusted agent"]
    assert len(server.of_type("request_work")) > 1


async def test_an_error_that_answers_no_request_does_not_end_the_lease(
    server: FakeServer, tmp_path: Path
) -> None:
    # The job_finished announcement's old form: an error with a ref the agent never sent.
    job_id = server.lease_template["job_id"]
    server.events_on_push = [error_message("job_finished", "done", f"job:{job_id}")]
    agent = make_agent(server, tmp_path)

    code = await run_agent(agent)

    assert code == EXIT_OK
    assert agent.stats.leases_abandoned == 0
    assert [c["lease_id"] for c in server.of_type("complete")] == ["lease-1"]


async def test_another_jobs_end_does_not_stop_the_lease(server: FakeServer, tmp_path: Path) -> None:
    server.push_reply = lambda msg: job_finished_message("another-job")
    agent = make_agent(server, tmp_path)

    code = await run_agent(agent)

    assert code == EXIT_OK
    assert agent.stats.leases_abandoned == 0
    assert [c["lease_id"] for c in server.of_type("complete")] == ["lease-1"]
