"""Accounts: password rules at signup and throttled logins."""

from __future__ import annotations

import secrets
import uuid

import pytest
from django.test import Client

from downpour.accounts.models import User

pytestmark = pytest.mark.django_db


def fresh_address() -> str:
    # The throttle's counts live in the shared cache (Redis in CI): one address per test.
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(256)}"


def signup(username: str, password: str) -> int:
    response = Client().post(
        "/signup/",
        {"username": username, "password1": password, "password2": password, "is_donor": "on"},
    )
    return response.status_code


def test_signup_refuses_a_one_letter_password() -> None:
    assert signup("erin", "a") == 200  # the form again, with the reason

    assert not User.objects.filter(username="erin").exists()


def test_signup_refuses_a_password_equal_to_the_username() -> None:
    assert signup("frank-the-donor", "frank-the-donor") == 200

    assert not User.objects.filter(username="frank-the-donor").exists()


def test_signup_accepts_a_reasonable_password() -> None:
    assert signup("grace", "correct horse battery staple") == 302

    assert User.objects.filter(username="grace").exists()


def login(client: Client, username: str, password: str, address: str) -> int:
    response = client.post(
        "/login/", {"username": username, "password": password}, REMOTE_ADDR=address
    )
    return response.status_code


def test_after_thirty_wrong_logins_the_right_password_is_refused_for_a_while() -> None:
    name = f"heidi-{uuid.uuid4().hex[:8]}"
    User.objects.create_user(name, password="heidi's real password")
    client, address = Client(), fresh_address()

    wrong = [login(client, name, f"guess-{i}", address) for i in range(30)]
    right = client.post(
        "/login/", {"username": name, "password": "heidi's real password"}, REMOTE_ADDR=address
    )

    assert set(wrong[:5]) == {200} and set(wrong[5:]) == {429}
    assert right.status_code == 429
    assert b"Too many failed logins" in right.content
    assert "_auth_user_id" not in client.session


def test_another_address_is_not_locked_out_by_someone_elses_guesses() -> None:
    name = f"ivan-{uuid.uuid4().hex[:8]}"
    User.objects.create_user(name, password="ivan's real password")
    guesser = Client()
    for i in range(10):
        login(guesser, name, f"guess-{i}", "10.9.9.9")

    assert login(Client(), name, "ivan's real password", fresh_address()) == 302


def test_one_address_guessing_across_many_accounts_is_cut_off() -> None:
    address, client = fresh_address(), Client()
    name = f"judy-{uuid.uuid4().hex[:8]}"
    User.objects.create_user(name, password="judy's real password")

    for _ in range(50):
        login(client, f"nobody-{uuid.uuid4().hex[:8]}", "x", address)

    assert login(client, name, "judy's real password", address) == 429


def test_a_successful_login_resets_the_count_for_that_user() -> None:
    name = f"ken-{uuid.uuid4().hex[:8]}"
    User.objects.create_user(name, password="ken's real password")
    address = fresh_address()
    for i in range(4):
        login(Client(), name, f"guess-{i}", address)

    assert login(Client(), name, "ken's real password", address) == 302
    assert [login(Client(), name, f"again-{i}", address) for i in range(4)] == [200] * 4
