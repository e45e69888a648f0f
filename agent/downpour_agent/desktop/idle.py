"""How long since the person last touched the keyboard or mouse, and how busy the
rest of the machine is.

One function per system's idle interface, each small because only the X11 one can be
tested here; :func:`input_idle_source` picks the first that answers. Where none
does, :class:`OtherLoad` gives the fallback: the share of CPU used by every process
but this one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

#: Seconds since the last keyboard or mouse input, or None when the source cannot say.
IdleSource = Callable[[], float | None]


class _XScreenSaverInfo(ctypes.Structure):
    _fields_ = [
        ("window", ctypes.c_ulong),
        ("state", ctypes.c_int),
        ("kind", ctypes.c_int),
        ("til_or_since", ctypes.c_ulong),
        ("idle", ctypes.c_ulong),
        ("event_mask", ctypes.c_ulong),
    ]


def _load(name: str, soname: str) -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library(name) or soname)


class X11Idle:
    """The X server's screensaver extension (libXss): milliseconds since the last input.

    Holds one display connection; :meth:`close` releases it. Raises ``OSError`` when
    libX11/libXss are missing, the display cannot be opened or lacks the extension.
    """

    def __init__(self, display: str | None = None) -> None:
        self._xlib = _load("X11", "libX11.so.6")
        self._xss = _load("Xss", "libXss.so.1")
        self._xlib.XOpenDisplay.restype = ctypes.c_void_p
        self._xlib.XOpenDisplay.argtypes = [ctypes.c_char_p]
        self._xlib.XDefaultRootWindow.restype = ctypes.c_ulong
        self._xlib.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        self._xlib.XCloseDisplay.argtypes = [ctypes.c_void_p]
        self._xlib.XFree.argtypes = [ctypes.c_void_p]
        self._xss.XScreenSaverQueryExtension.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_int),
        ]
        self._xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(_XScreenSaverInfo)
        self._xss.XScreenSaverQueryInfo.argtypes = [
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.POINTER(_XScreenSaverInfo),
        ]
        name = display if display is not None else os.environ.get("DISPLAY")
        if not name:
            raise OSError("no X display (DISPLAY is not set)")
        self._display = self._xlib.XOpenDisplay(name.encode())
        if not self._display:
            raise OSError(f"cannot open X display {name!r}")
        event_base, error_base = ctypes.c_int(), ctypes.c_int()
        if not self._xss.XScreenSaverQueryExtension(
            self._display, ctypes.byref(event_base), ctypes.byref(error_base)
        ):
            self.close()
            raise OSError(f"X display {name!r} has no screensaver extension")
        self._root = self._xlib.XDefaultRootWindow(self._display)
        self._info = self._xss.XScreenSaverAllocInfo()

    def __call__(self) -> float | None:
        if not self._display:
            return None
        if not self._xss.XScreenSaverQueryInfo(self._display, self._root, self._info):
            return None
        return float(self._info.contents.idle) / 1000.0

    def close(self) -> None:
        if getattr(self, "_info", None):
            self._xlib.XFree(self._info)
            self._info = None
        if self._display:
            self._xlib.XCloseDisplay(self._display)
            self._display = None


# -- the interfaces that cannot be tested here: one small function each ----------------


def gnome_wayland_idle_s() -> float | None:
    """GNOME on Wayland: Mutter's IdleMonitor over D-Bus (milliseconds)."""
    out = _run(
        "gdbus",
        "call",
        "--session",
        "--dest",
        "org.gnome.Mutter.IdleMonitor",
        "--object-path",
        "/org/gnome/Mutter/IdleMonitor/Core",
        "--method",
        "org.gnome.Mutter.IdleMonitor.GetIdletime",
    )
    match = re.search(r"uint64 (\d+)", out or "")
    return int(match.group(1)) / 1000.0 if match else None


def macos_idle_s() -> float | None:
    """macOS: ``HIDIdleTime`` of the IOHIDSystem registry entry (nanoseconds)."""
    out = _run("ioreg", "-c", "IOHIDSystem", "-d", "4")
    match = re.search(r'"HIDIdleTime" = (\d+)', out or "")
    return int(match.group(1)) / 1e9 if match else None


def windows_idle_s() -> float | None:
    """Windows: ``GetLastInputInfo`` against ``GetTickCount`` (milliseconds)."""

    class LastInputInfo(ctypes.Structure):
        _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint)]

    windll: Any = getattr(ctypes, "windll", None)
    if windll is None:
        return None
    info = LastInputInfo(ctypes.sizeof(LastInputInfo), 0)
    if not windll.user32.GetLastInputInfo(ctypes.byref(info)):
        return None
    elapsed_ms = int(windll.kernel32.GetTickCount() - info.dwTime) & 0xFFFFFFFF
    return elapsed_ms / 1000.0


def _run(*argv: str) -> str | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=2, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def input_idle_source() -> IdleSource | None:
    """The first of this system's idle interfaces that answers now, else None."""
    candidates: list[Callable[[], IdleSource]] = []
    if sys.platform == "win32":
        candidates.append(lambda: windows_idle_s)
    elif sys.platform == "darwin":
        candidates.append(lambda: macos_idle_s)
    else:
        if os.environ.get("DISPLAY"):
            candidates.append(X11Idle)
        if os.environ.get("WAYLAND_DISPLAY"):
            candidates.append(lambda: gnome_wayland_idle_s)
    for make in candidates:
        try:
            source = make()
        except OSError:
            continue
        if source() is not None:
            return source
    return None


class OtherLoad:
    """Share of the machine's CPU used by every process except this one, in ``[0, 1]``.

    Each call measures since the previous call (the first against the moment of
    construction); calls closer together than ``min_interval_s`` return the last value.
    """

    def __init__(self, min_interval_s: float = 0.5) -> None:
        self.min_interval_s = min_interval_s
        self._me = psutil.Process()
        self._cores = psutil.cpu_count() or 1
        self._last = self._sample()
        self._share = 0.0

    def _sample(self) -> tuple[float, float, float]:
        total = psutil.cpu_times()
        busy = sum(total) - total.idle - getattr(total, "iowait", 0.0)
        mine = self._me.cpu_times()
        return time.monotonic(), busy, mine.user + mine.system

    def __call__(self) -> float:
        now = time.monotonic()
        if now - self._last[0] < self.min_interval_s:
            return self._share
        sample = self._sample()
        wall = sample[0] - self._last[0]
        others = (sample[1] - self._last[1]) - (sample[2] - self._last[2])
        self._last = sample
        self._share = min(1.0, max(0.0, others / (wall * self._cores)))
        return self._share
