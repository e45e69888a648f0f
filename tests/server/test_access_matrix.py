"""Every HTTP endpoint × every persona × GET/POST: nobody reads another owner's objects.

Alice (researcher) owns a dataset, a job and its evaluations; Bob is another researcher;
Charlie is a donor with a token; a stranger is not logged in. Alice's objects carry a
marker string that must never appear in a response to anyone but Alice.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from downpour.donors.models import Agent, AgentToken
from downpour.training.actions.datasets import create_dataset
from downpour.training.actions.jobs import JobParams, submit_job
from downpour.training.models import Evaluation

from .helpers import job_form, mlp_config, npz_upload, small_dataset

pytestmark = pytest.mark.django_db
MARKER = "alices-secret-marker"


def all_routes() -> set[str]:
    def walk(patterns: list[Any], prefix: str) -> set[str]:
        found: set[str] = set()
        for p in patterns:
            route = prefix + str(p.pattern)
            if isinstance(p, URLResolver):
                if not route.startswith("admin/"):
                    found |= walk(p.url_patterns, route)
            elif isinstance(p, URLPattern):
                found.add(route)
        return found

    return walk(get_resolver().url_patterns, "")


@pytest.fixture
def world(alice, bob, charlie):  # type: ignore[no-untyped-def]
    dataset = create_dataset(alice, MARKER + "-data", npz_upload(**small_dataset()))
    job = submit_job(
        alice,
        dataset,
        JobParams(name=MARKER + "-job", model_json=mlp_config(), target_accuracy=0.9),
    )
    Evaluation.objects.create(
        job=job, elapsed_s=1.0, samples=10, accuracy=0.123456, loss=1.0, versions=[0]
    )
    token, _ = AgentToken.issue(alice, MARKER + "-token")
    agent = Agent.objects.create(token=token, name=MARKER + "-agent")
    charlie_token, charlie_plain = AgentToken.issue(charlie, "charlie-pc")
    clients = {"stranger": Client()}
    for name, user in (("alice", alice), ("bob", bob), ("charlie", charlie)):
        clients[name] = Client()
        clients[name].force_login(user)
    return {
        "job": job,
        "dataset": dataset,
        "shard": dataset.shards.first(),
        "alice_token": token,
        "agent": agent,
        "charlie_plain": charlie_plain,
        "clients": clients,
    }


def concrete(route: str, world: dict[str, Any]) -> list[str]:
    """The URLs to probe for one route pattern, filled with Alice's object ids."""
    path = "/" + route
    path = path.replace("<uuid:job_id>", str(world["job"].id))
    path = path.replace("<uuid:token_id>", str(world["alice_token"].id))
    path = path.replace("<uuid:shard_id>", str(world["shard"].id))
    path = path.replace("<uuid:dataset_id>", str(world["dataset"].id))
    path = path.replace("<uuid:agent_id>", str(world["agent"].id))
    if "<str:kind>" in path:
        return [path.replace("<str:kind>", kind) for kind in ("keras", "weights", "other")]
    if "<str:action>" in path:
        actions = ("pause", "resume", "cancel", "delete", "ban", "unban", "revoke-token", "x")
        return [path.replace("<str:action>", action) for action in actions]
    return [path]


def test_the_matrix_covers_every_route(world) -> None:  # type: ignore[no-untyped-def]
    routes = all_routes()
    assert len(routes) >= 12
    for route in routes:
        for url in concrete(route, world):
            assert "<" not in url, f"route {route} has a converter the matrix does not fill"


@pytest.mark.parametrize("persona", ["alice", "bob", "charlie", "stranger"])
@pytest.mark.parametrize("method", ["get", "post"])
def test_nobody_but_alice_reads_alices_objects(world, persona: str, method: str) -> None:  # type: ignore[no-untyped-def]
    client: Client = world["clients"][persona]
    for route in sorted(all_routes()):
        for url in concrete(route, world):
            response = getattr(client, method)(url)
            body = b"".join(response.streaming_content) if response.streaming else response.content
            if persona != "alice":
                assert MARKER.encode() not in body, f"{persona} read Alice's data at {method} {url}"
                assert b"0.123456" not in body, f"{persona} read Alice's metrics at {url}"
                if str(world["job"].id) in url and response.status_code == 200:
                    pytest.fail(f"{persona} got 200 for Alice's job at {method} {url}")
            assert response.status_code < 500, f"{method} {url} as {persona}: server error"


def test_bob_cannot_submit_a_job_on_alices_dataset(world, bob) -> None:  # type: ignore[no-untyped-def]
    response = world["clients"]["bob"].post(
        "/jobs/new/",
        job_form("theft", str(world["dataset"].id), "{}"),
    )
    assert response.status_code == 200
    assert b"that dataset is not one of yours" in response.content


def test_a_donor_token_cannot_download_a_shard_without_a_live_lease(world) -> None:  # type: ignore[no-untyped-def]
    response = Client().get(
        f"/api/agent/shards/{world['shard'].id}/",
        HTTP_AUTHORIZATION=f"Bearer {world['charlie_plain']}",
    )
    assert response.status_code == 404


def test_the_admin_is_for_staff_only(world) -> None:  # type: ignore[no-untyped-def]
    for persona in ("alice", "bob", "charlie", "stranger"):
        response = world["clients"][persona].get("/admin/training/job/")
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
