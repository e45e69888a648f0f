"""Robust jobs warm up on trusted agents: claims, the job page, the console, the token command.

Alice's robust job needs a trusted agent (Sam, staff, runs one) before Charlie's untrusted
agent gets any of its units. Bob's job has no clipping. Real database and store (PostgreSQL
and Redis when they run).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from downpour.donors.models import Agent, AgentToken, hash_token
from downpour.paramstore import ParameterStore
from downpour.training import store as job_stores
from downpour.training.actions.claims import claim_work
from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.jobs import JobParams, start_job, submit_job
from downpour.training.actions.leases import return_lease
from downpour.training.actions.recovery import checkpoint_job, ensure_store_ready
from downpour.training.models import Job, WorkUnit
from downpour.training.queries import robust_summary
from downpour.training.store import job_store, storage

from .helpers import mlp_config, npz_upload, small_dataset

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _read_the_store_on_every_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-process cache is tested on its own below; elsewhere every claim reads.
    monkeypatch.setattr(job_stores, "WARMUP_TTL_S", 0.0)


@pytest.fixture
def sam(django_user_model):  # type: ignore[no-untyped-def]
    return django_user_model.objects.create_user("sam", is_staff=True)


@pytest.fixture
def untrusted(charlie):  # type: ignore[no-untyped-def]
    token, _ = AgentToken.issue(charlie, "pc")
    return Agent.objects.create(token=token, name="charlie-pc", samples_per_s=1000.0)


@pytest.fixture
def trusted(sam):  # type: ignore[no-untyped-def]
    token, _ = AgentToken.issue(sam, "platform")
    AgentToken.objects.filter(id=token.id).update(is_trusted=True)
    return Agent.objects.create(token=token, name="platform-1", samples_per_s=1000.0)


def started(owner: Any, name: str, robust: bool) -> Job:
    dataset = create_dataset(owner, name, npz_upload(**small_dataset()), n_shards=2)
    job = submit_job(
        owner,
        dataset,
        JobParams(
            name=name, model_json=mlp_config(), target_accuracy=0.9, robust_aggregation=robust
        ),
    )
    assert start_job(job)
    job.refresh_from_db()
    return job


def warm_up(store: ParameterStore, pushes: int | None = None) -> None:
    """Trusted pushes to every shard: the full warm-up unless ``pushes`` says fewer."""
    assert store.robust is not None
    for k in range(store.robust.warmup_trusted_pushes if pushes is None else pushes):
        for shard, specs in enumerate(store.layout.shards):
            grad = {v.name: np.full(v.shape, 0.01 * (k + 1), np.float32) for v in specs}
            store.push(shard, grad, store.versions()[shard], f"sam:{k}:{shard}", trusted=True)


def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --- claims -------------------------------------------------------------------------------


def test_an_untrusted_agent_gets_no_unit_of_a_robust_job_until_a_trusted_agent_warms_it_up(
    alice, untrusted, trusted
) -> None:  # type: ignore[no-untyped-def]
    job = started(alice, "robust", robust=True)

    refused = claim_work(untrusted)
    first = claim_work(trusted)
    warm_up(job_store(job))
    after = claim_work(untrusted)

    assert refused is None
    assert first is not None and first.unit.job_id == job.id
    assert after is not None and after.unit.job_id == job.id


def test_a_reissued_unit_of_a_robust_job_warming_up_waits_for_a_trusted_agent(
    alice, untrusted, trusted
) -> None:  # type: ignore[no-untyped-def]
    job = started(alice, "robust", robust=True)
    lease = claim_work(trusted)
    assert lease is not None and lease.unit.job_id == job.id
    return_lease(trusted, str(lease.id))
    assert WorkUnit.objects.get(id=lease.unit_id).status == WorkUnit.Status.PENDING

    assert claim_work(untrusted) is None
    again = claim_work(trusted)
    assert again is not None and again.unit_id == lease.unit_id


def test_untrusted_agents_get_other_jobs_while_a_robust_job_warms_up(alice, bob, untrusted) -> None:  # type: ignore[no-untyped-def]
    robust = started(alice, "robust", robust=True)
    plain = started(bob, "plain", robust=False)

    leases = []
    for _ in range(3):  # one lease at a time: an agent holds at most two
        lease = claim_work(untrusted)
        leases.append(lease)
        if lease is not None:
            return_lease(untrusted, str(lease.id))

    assert all(lease is not None and lease.unit.job_id == plain.id for lease in leases)
    assert not WorkUnit.objects.filter(job=robust).exists()


def test_a_trusted_agent_goes_to_the_robust_job_warming_up_first(alice, bob, trusted) -> None:  # type: ignore[no-untyped-def]
    # Bob's older job would win the fair-share tie; only the trusted agent can warm Alice's.
    plain = started(bob, "plain", robust=False)
    robust = started(alice, "robust", robust=True)

    first = claim_work(trusted)
    warm_up(job_store(robust))
    later = claim_work(trusted)

    assert first is not None and first.unit.job_id == robust.id
    assert later is not None and later.unit.job_id == plain.id


def test_staff_trusting_a_token_takes_effect_on_its_next_claim(alice, untrusted) -> None:  # type: ignore[no-untyped-def]
    job = started(alice, "robust", robust=True)
    assert claim_work(untrusted) is None

    AgentToken.objects.filter(id=untrusted.token_id).update(is_trusted=True)

    lease = claim_work(untrusted)
    assert lease is not None and lease.unit.job_id == job.id


def test_the_warm_up_reading_is_cached_and_stays_warm_until_a_restore(
    alice, untrusted, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # Prepare: a checkpoint taken during warm-up, then a warm store
    monkeypatch.setattr(job_stores, "WARMUP_TTL_S", 60.0)
    job = started(alice, "robust", robust=True)
    checkpoint_job(job)
    assert job_stores.warming_up(job)
    warm_up(job_store(job))

    # Execute / Assert: the cached reading holds until this process forgets it
    assert job_stores.warming_up(job), "read at most once per WARMUP_TTL_S"
    job_stores.forget_warmup(job.id)
    assert not job_stores.warming_up(job)
    assert claim_work(untrusted) is not None
    # Redis lost the job; the restore brings back the checkpoint taken during warm-up.
    storage().delete(str(job.id))
    ensure_store_ready(job)
    assert job_stores.warming_up(job)
    assert claim_work(untrusted) is None


def test_a_job_without_parameters_in_the_store_counts_as_warming_up(alice) -> None:  # type: ignore[no-untyped-def]
    job = started(alice, "robust", robust=True)
    storage().delete(str(job.id))

    assert job_stores.warming_up(job)
    assert not job_stores.warming_up(started(alice, "plain", robust=False))


# --- what people see ----------------------------------------------------------------------


def test_the_job_page_shows_the_warm_up_then_the_clipped_share(alice) -> None:  # type: ignore[no-untyped-def]
    job = started(alice, "robust", robust=True)
    store = job_store(job)
    warm_up(store, pushes=3)
    client = logged_in(alice)

    waiting = client.get(f"/jobs/{job.id}/").content.decode()
    warm_up(store)
    specs = store.layout.shards[0]
    far = {v.name: np.full(v.shape, 50.0, np.float32) for v in specs}
    assert store.push(0, far, store.versions()[0], "charlie:0:0").clipped
    metrics = client.get(f"/jobs/{job.id}/metrics.json").json()

    assert "waiting for trusted agents: 3/10 trusted pushes" in waiting
    # 2 shards x 10 trusted pushes (the 3 repeated push ids were duplicates), then one
    # clipped push: 1 of 21.
    assert metrics["robust"]["text"] == "robust: warm, 4.8% of pushes clipped"
    assert robust_summary(started(alice, "plain", robust=False)) is None


def test_the_console_lists_robust_jobs_waiting_for_a_trusted_agent(alice, sam, trusted) -> None:  # type: ignore[no-untyped-def]
    waiting = started(alice, "waits-for-sam", robust=True)
    warm = started(alice, "already-warm", robust=True)
    warm_up(job_store(warm))
    Agent.objects.filter(id=trusted.id).update(connected=True)

    page = logged_in(sam).get("/console/").content.decode()

    section = page.split("Robust jobs waiting for a trusted agent")[1].split("<h2>")[0]
    assert "1 trusted agent online" in section
    assert waiting.name in section and "0/10 trusted pushes" in section
    assert warm.name not in section


def test_the_job_form_turns_robust_aggregation_on_and_says_it_needs_a_trusted_agent(
    alice,
) -> None:  # type: ignore[no-untyped-def]
    page = logged_in(alice).get("/jobs/new/").content.decode()

    checkbox = page.split('name="robust_aggregation"')[1].split(">")[0]
    assert "checked" in checkbox
    assert "warms up on a trusted agent" in page


# --- create_agent_token -------------------------------------------------------------------


def test_create_agent_token_prints_a_trusted_token_that_is_stored_hashed(sam) -> None:  # type: ignore[no-untyped-def]
    out = io.StringIO()

    call_command(
        "create_agent_token", "--user", "sam", "--trusted", stdout=out, stderr=io.StringIO()
    )

    plain = out.getvalue().strip()
    token = AgentToken.objects.get(owner=sam)
    assert plain.startswith("dp_") and "\n" not in plain
    assert token.token_hash == hash_token(plain) and token.is_trusted
    assert plain not in {token.token_hash, token.prefix, token.name}


def test_create_agent_token_is_untrusted_unless_asked_and_needs_a_known_user(charlie) -> None:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    call_command("create_agent_token", "--user", "charlie", stdout=out, stderr=io.StringIO())
    assert not AgentToken.objects.get(token_hash=hash_token(out.getvalue().strip())).is_trusted

    with pytest.raises(CommandError, match="no user 'nobody'"):
        call_command("create_agent_token", "--user", "nobody", stderr=io.StringIO())
