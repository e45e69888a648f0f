"""The donor leaderboard names a donor only when they choose to be named."""

from __future__ import annotations

import pytest
from django.test import Client

from downpour.donors.models import Agent, AgentToken

pytestmark = pytest.mark.django_db


def logged_in(user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(user)
    return client


def donate(user, credit: float) -> None:  # type: ignore[no-untyped-def]
    token, _ = AgentToken.issue(user, "pc")
    Agent.objects.create(token=token, name=f"{user.username}-pc", credit=credit)


def test_a_donor_is_anonymous_on_the_leaderboard_by_default(alice, charlie) -> None:  # type: ignore[no-untyped-def]
    donate(charlie, 1234.0)

    page = logged_in(alice).get("/donor/").content.decode()

    assert "charlie" not in page
    assert "anonymous donor" in page


def test_a_donor_who_opts_in_is_shown_by_their_display_name(alice, charlie) -> None:  # type: ignore[no-untyped-def]
    donate(charlie, 1234.0)
    response = logged_in(charlie).post(
        "/donor/leaderboard/", {"show_on_leaderboard": "on", "display_name": "Chuck's GPU farm"}
    )
    assert response.status_code == 302

    page = logged_in(alice).get("/donor/").content.decode()

    assert "Chuck&#x27;s GPU farm" in page
    assert "charlie" not in page


def test_a_donor_who_opts_in_without_a_display_name_is_shown_by_username(alice, charlie) -> None:  # type: ignore[no-untyped-def]
    donate(charlie, 10.0)
    logged_in(charlie).post("/donor/leaderboard/", {"show_on_leaderboard": "on"})

    assert "charlie" in logged_in(alice).get("/donor/").content.decode()


def test_a_donor_can_opt_out_again(alice, charlie) -> None:  # type: ignore[no-untyped-def]
    donate(charlie, 10.0)
    logged_in(charlie).post("/donor/leaderboard/", {"show_on_leaderboard": "on"})
    logged_in(charlie).post("/donor/leaderboard/", {"display_name": "kept"})

    page = logged_in(alice).get("/donor/").content.decode()

    assert "charlie" not in page and "kept" not in page
    charlie.refresh_from_db()
    assert charlie.display_name == "kept" and not charlie.show_on_leaderboard
