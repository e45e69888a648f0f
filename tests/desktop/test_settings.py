"""The settings file: defaults, round trip, overrides and clear errors."""

from __future__ import annotations

import stat
import sys
import threading
from pathlib import Path

import pytest

from downpour_agent.desktop import settings as cfg
from downpour_agent.desktop.status import CreditBook


def test_a_missing_file_gives_the_defaults(config_file: Path) -> None:
    settings = cfg.load()

    assert settings == cfg.Settings()
    assert settings.mode == "idle"
    assert settings.idle_after_s == 180.0
    assert not settings.run_on_battery


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux location")
def test_the_file_lives_in_the_platform_config_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cfg.CONFIG_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", "/home/donor/.config")

    assert cfg.config_path() == Path("/home/donor/.config/downpour/agent.toml")


def test_saved_settings_read_back_equal_and_only_the_owner_can_read_them(
    config_file: Path,
) -> None:
    settings = cfg.Settings(
        server_url="http://server:8000",
        token="secret-token",
        mode="schedule",
        schedule=("22:00-07:00", "12:00-13:00"),
        cpu_share=0.5,
        threads=2,
        run_on_battery=True,
    )

    cfg.save(settings)

    assert cfg.load() == settings
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert 'mode = "schedule"' in config_file.read_text()


def test_flags_override_the_file_and_absent_flags_leave_it(config_file: Path) -> None:
    cfg.save(cfg.Settings(mode="always", cpu_share=0.5, threads=3))

    settings = cfg.with_overrides(cfg.load(), {"cpu_share": 0.25, "threads": None})

    assert settings.cpu_share == 0.25
    assert settings.threads == 3
    assert settings.mode == "always"


def test_the_cli_saves_its_flags_with_save(config_file: Path) -> None:
    from downpour_agent.cli import build_parser, settings_from

    args = build_parser().parse_args(
        ["join", "http://server:8000", "--token", "t", "--mode", "always", "--cpu-share", "0.5"]
        + ["--save"]
    )

    settings_from(args)

    saved = cfg.load()
    assert (saved.server_url, saved.token, saved.mode, saved.cpu_share) == (
        "http://server:8000",
        "t",
        "always",
        0.5,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('mode = "sometimes"', "mode must be one of always, idle, schedule"),
        ('mood = "idle"', "unknown setting 'mood'"),
        ("cpu_share = 1.5", "cpu_share must be a fraction in (0, 1]"),
        ('cpu_share = "half"', "cpu_share must be a number"),
        ('run_on_battery = "yes"', "run_on_battery must be true or false"),
        ("threads = 2.5", "threads must be a whole number"),
        ('schedule = ["22-07"]', "schedule range '22-07' is not \"HH:MM-HH:MM\""),
        ('mode = "schedule"', 'mode "schedule" needs at least one range'),
        ("idle_after_s = 0", "idle_after_s must be more than 0"),
        ("status_port = 70000", "status_port must be a TCP port"),
        ("mode = ", "not valid TOML"),
    ],
)
def test_a_bad_file_is_refused_naming_the_file_and_the_key(
    config_file: Path, text: str, message: str
) -> None:
    config_file.parent.mkdir(parents=True)
    config_file.write_text(text + "\n")

    with pytest.raises(cfg.SettingsError) as caught:
        cfg.load()

    assert str(caught.value).startswith(f"{config_file}: ")
    assert message in str(caught.value)


def test_the_join_command_reports_a_bad_file_and_exits_2(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from downpour_agent.cli import main

    config_file.parent.mkdir(parents=True)
    config_file.write_text("cpu_share = 2\n")

    assert main(["join", "http://127.0.0.1:9", "--token", "t"]) == 2
    assert "cpu_share must be a fraction" in capsys.readouterr().err


def test_a_schedule_may_be_given_as_one_comma_separated_flag() -> None:
    settings = cfg.Settings().replace(mode="schedule", schedule="22:00-07:00, 12:00-13:00")

    assert settings.schedule == ("22:00-07:00", "12:00-13:00")
    assert cfg.schedule_minutes(settings.schedule) == [(1320, 420), (720, 780)]


def test_the_credit_book_survives_a_restart_and_several_writers(tmp_path: Path) -> None:
    # Prepare: two agents on one machine writing the same book at once (the old code raced
    # on one shared temporary name and crashed an agent with FileNotFoundError).
    path = tmp_path / "state" / "credit.json"
    books = [CreditBook(path, save_interval_s=0.0) for _ in range(2)]
    errors: list[BaseException] = []

    def earn(book: CreditBook) -> None:
        try:
            for _ in range(300):
                book.add(0.5)
        except BaseException as exc:  # the assertion below names it
            errors.append(exc)

    # Execute
    threads = [threading.Thread(target=earn, args=(book,)) for book in books]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert: every write landed whole, and a new book reads the last one.
    assert errors == []
    assert CreditBook(path).total == 150.0
    assert [p.name for p in path.parent.iterdir()] == ["credit.json"]


def test_the_credit_book_logs_a_failed_write_instead_of_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the book's folder is a file, so no write can succeed.
    (tmp_path / "state").write_text("not a folder")
    book = CreditBook(tmp_path / "state" / "credit.json", save_interval_s=0.0)

    # Execute
    book.add(1.0)

    # Assert: training goes on; the donor's log says why the book was not saved.
    assert book.total == 1.0
    assert "not saved" in caplog.text
