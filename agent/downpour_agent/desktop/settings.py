"""The donor's settings: one TOML file, ``agent.toml`` in the platform's config dir.

``~/.config/downpour/agent.toml`` on Linux, ``~/Library/Application Support/downpour``
on macOS, ``%APPDATA%\\downpour`` on Windows (platformdirs). Command-line flags
override the file; the status page writes it back. The file may hold the agent token,
so it is written with mode 0600.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import platformdirs
import tomli_w

APP_NAME: Final = "downpour"
CONFIG_ENV: Final = "DOWNPOUR_CONFIG"
MODES: Final = ("always", "idle", "schedule")
_HOURS_RE: Final = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


class SettingsError(ValueError):
    """A setting has a value the agent cannot use; the message names the key."""


@dataclass(frozen=True)
class Settings:
    """Everything a donor can set. Each field is one key of ``agent.toml``.

    Times are in seconds, shares are fractions in ``(0, 1]``, memory is in MiB.
    """

    server_url: str = ""
    token: str = ""
    name: str = ""
    #: "always", "idle" (no input for ``idle_after_s``) or "schedule" (``schedule`` hours).
    mode: str = "idle"
    idle_after_s: float = 180.0
    #: Where no input idle time can be read: idle while other processes use under this share.
    busy_cpu_share: float = 0.25
    #: Hour ranges, local time, e.g. ``["22:00-07:00", "12:00-13:00"]``.
    schedule: tuple[str, ...] = ()
    #: Share of each thread's time spent computing (BOINC's "use at most X% of CPU time").
    cpu_share: float = 1.0
    #: TensorFlow threads; 0 means all cores but one.
    threads: int = 0
    #: Refuse leases whose estimated memory exceeds this; 0 means half the machine's RAM.
    memory_limit_mb: int = 0
    run_on_battery: bool = False
    #: -1 disables the GPU; otherwise the index among the GPUs TensorFlow sees.
    gpu_device: int = 0
    #: Cap on the GPU memory TensorFlow may take; 0 means no cap (memory growth only).
    gpu_memory_limit_mb: int = 0
    status_port: int = 8385

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied and validated."""
        return validate({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["schedule"] = list(self.schedule)
        return data


FIELDS: Final = {f.name: f for f in dataclasses.fields(Settings)}
#: Keys the status page may change; the server, token and port stay with the CLI.
EDITABLE: Final = frozenset(FIELDS) - {"server_url", "token", "status_port"}


def config_dir() -> Path:
    """The directory of ``agent.toml`` and the status page secret."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).parent
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False, roaming=True))


def state_dir() -> Path:
    """Where the status page secret and the credit book live (beside ``$DOWNPOUR_CONFIG``
    when that is set)."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).parent
    return Path(platformdirs.user_state_dir(APP_NAME, appauthor=False))


def config_path() -> Path:
    """``$DOWNPOUR_CONFIG`` if set, else ``agent.toml`` in :func:`config_dir`."""
    override = os.environ.get(CONFIG_ENV)
    return Path(override) if override else config_dir() / "agent.toml"


def load(path: Path | None = None) -> Settings:
    """Read ``path`` (default :func:`config_path`); a missing file gives the defaults.

    Raises
    ------
    SettingsError
        For invalid TOML, an unknown key or a bad value, naming the file and key.
    """
    path = path or config_path()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return Settings()
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    try:
        return validate(data)
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from None


def save(settings: Settings, path: Path | None = None) -> Path:
    """Write every setting to ``path`` atomically, readable by the owner only."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        tomli_w.dump(settings.to_dict(), fh)
    os.replace(tmp, path)
    return path


def validate(data: Mapping[str, Any]) -> Settings:
    """Check types and ranges of a settings mapping (from TOML, flags or the page).

    Raises
    ------
    SettingsError
        Naming the first bad key and what it should be.
    """
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]!r} (known: {', '.join(FIELDS)})")
    values: dict[str, Any] = {}
    for key, raw in data.items():
        default = FIELDS[key].default
        if key == "schedule":
            values[key] = _schedule(raw)
        elif isinstance(default, bool):
            if not isinstance(raw, bool):
                raise SettingsError(f"{key} must be true or false, not {raw!r}")
            values[key] = raw
        elif isinstance(default, int):
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise SettingsError(f"{key} must be a whole number, not {raw!r}")
            values[key] = raw
        elif isinstance(default, float):
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise SettingsError(f"{key} must be a number, not {raw!r}")
            values[key] = float(raw)
        else:
            if not isinstance(raw, str):
                raise SettingsError(f"{key} must be a string, not {raw!r}")
            values[key] = raw
    settings = Settings(**values)
    _check_ranges(settings)
    return settings


def _check_ranges(s: Settings) -> None:
    if s.mode not in MODES:
        raise SettingsError(f"mode must be one of {', '.join(MODES)}, not {s.mode!r}")
    if s.mode == "schedule" and not s.schedule:
        raise SettingsError('mode "schedule" needs at least one range in schedule')
    if not s.idle_after_s > 0:
        raise SettingsError(f"idle_after_s must be more than 0 seconds, not {s.idle_after_s}")
    for key in ("cpu_share", "busy_cpu_share"):
        value = getattr(s, key)
        if not 0 < value <= 1:
            raise SettingsError(f"{key} must be a fraction in (0, 1], not {value}")
    for key in ("threads", "memory_limit_mb", "gpu_memory_limit_mb"):
        if getattr(s, key) < 0:
            raise SettingsError(f"{key} must be 0 or more, not {getattr(s, key)}")
    if s.gpu_device < -1:
        raise SettingsError(f"gpu_device must be -1 (no GPU) or an index, not {s.gpu_device}")
    if not 1 <= s.status_port <= 65535:
        raise SettingsError(f"status_port must be a TCP port, not {s.status_port}")


def _schedule(raw: Any) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    if not isinstance(raw, list | tuple) or not all(isinstance(r, str) for r in raw):
        raise SettingsError(f'schedule must be a list of "HH:MM-HH:MM" ranges, not {raw!r}')
    for item in raw:
        if not _HOURS_RE.match(item):
            raise SettingsError(f'schedule range {item!r} is not "HH:MM-HH:MM" (24-hour)')
    return tuple(raw)


def schedule_minutes(ranges: tuple[str, ...]) -> list[tuple[int, int]]:
    """``["22:00-07:00"]`` -> ``[(1320, 420)]``: start and end, minutes after midnight."""
    out = []
    for item in ranges:
        m = _HOURS_RE.match(item)
        assert m is not None  # validated
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        out.append((h1 * 60 + m1, h2 * 60 + m2))
    return out


def with_overrides(settings: Settings, flags: Mapping[str, Any]) -> Settings:
    """``settings`` with every flag that was given (not None) put over it."""
    given = {key: value for key, value in flags.items() if value is not None}
    return settings.replace(**given) if given else settings
