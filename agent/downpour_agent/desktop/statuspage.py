"""The local status page, like Syncthing's GUI: HTTP on 127.0.0.1 only.

Every request must carry the per-install secret, either in the ``X-Downpour-Secret``
header (the CLI) or in the cookie that a one-time login URL sets (the browser), so
other users of the machine cannot drive the agent. The ``Host`` header must name the
loopback address (against DNS rebinding), and a request with an ``Origin`` or a
cross-site ``Sec-Fetch-Site`` from any other page is refused.

The server runs in a daemon thread; it reads :class:`.status.AgentStatus` and drives
the :class:`.governor.Governor` through its thread-safe flags.
"""

from __future__ import annotations

import hmac
import http.server
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from downpour_agent.desktop import settings as cfg
from downpour_agent.desktop.governor import Governor

SECRET_HEADER: Final = "X-Downpour-Secret"
COOKIE: Final = "downpour_agent"
LOGIN_CODE_TTL_S: Final = 120.0
_MAX_BODY: Final = 64 << 10


def secret_path() -> Path:
    return cfg.state_dir() / "status-secret"


def load_or_create_secret(path: Path | None = None) -> str:
    """The per-install secret, created on first use with mode 0600."""
    path = path or secret_path()
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)
    return secret


class StatusPage:
    """The page's server. ``port=0`` picks a free port (tests); :attr:`port` says which.

    Parameters
    ----------
    governor : Governor
        Its status is shown; its pause/resume/stop-after-unit are the buttons.
    save_settings : callable
        Persists settings the page changed (writes ``agent.toml``).
    """

    def __init__(
        self,
        governor: Governor,
        secret: str,
        port: int,
        save_settings: Callable[[cfg.Settings], None],
    ) -> None:
        self.governor = governor
        self.secret = secret
        self.save_settings = save_settings
        self._codes: dict[str, float] = {}
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"page": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> StatusPage:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="downpour-status", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def new_login_code(self) -> str:
        code = secrets.token_urlsafe(16)
        with self._lock:
            now = time.monotonic()
            self._codes = {c: t for c, t in self._codes.items() if t > now}
            self._codes[code] = now + LOGIN_CODE_TTL_S
        return code

    def use_login_code(self, code: str) -> bool:
        with self._lock:
            expires = self._codes.pop(code, None)
        return expires is not None and expires > time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        data = self.governor.status.to_dict()
        data["paused_by_donor"] = self.governor.paused_by_donor
        data["editable"] = sorted(cfg.EDITABLE)
        return data


class _Handler(http.server.BaseHTTPRequestHandler):
    page: StatusPage
    server_version = "downpour-agent"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # the agent's log is for the work, not for page polls

    # -- checks ----------------------------------------------------------------

    def _allowed_origins(self) -> set[str]:
        port = self.page.port
        return {f"http://127.0.0.1:{port}", f"http://localhost:{port}"}

    def _host_ok(self) -> bool:
        host = self.headers.get("Host", "")
        return f"http://{host}" in self._allowed_origins()

    def _origin_ok(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is not None and origin not in self._allowed_origins():
            return False
        return self.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")

    def _authenticated(self) -> bool:
        given = self.headers.get(SECRET_HEADER)
        if given is None:
            cookies = self.headers.get("Cookie", "")
            for part in cookies.split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE:
                    given = value
        return given is not None and hmac.compare_digest(given, self.page.secret)

    def _guard(self) -> bool:
        if not self._host_ok():
            self._send_json(421, {"error": "wrong Host: use http://127.0.0.1"})
            return False
        if not self._origin_ok():
            self._send_json(403, {"error": "requests from other web pages are refused"})
            return False
        return True

    # -- answers ---------------------------------------------------------------

    def _send(self, code: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "default-src 'self' 'unsafe-inline'")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, code: int, data: Any) -> None:
        self._send(code, json.dumps(data).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802
        if not self._guard():
            return
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/login":
            code = urllib.parse.parse_qs(url.query).get("code", [""])[0]
            if not self.page.use_login_code(code):
                self._send(403, LOGIN_FAILED.encode(), "text/html; charset=utf-8")
                return
            cookie = f"{COOKIE}={self.page.secret}; Path=/; HttpOnly; SameSite=Strict"
            self._send(303, b"", "text/plain", Location="/", Set_Cookie=cookie)
            return
        if not self._authenticated():
            self._send(403, LOGIN_FAILED.encode(), "text/html; charset=utf-8")
            return
        if url.path == "/":
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/api/status":
            self._send_json(200, self.page.snapshot())
        else:
            self._send_json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._guard():
            return
        if not self._authenticated():
            self._send_json(403, {"error": "the secret is missing or wrong"})
            return
        governor = self.page.governor
        path = urllib.parse.urlsplit(self.path).path
        if path == "/api/pause":
            governor.pause()
        elif path == "/api/resume":
            governor.resume()
            governor.stop_after_unit(False)
        elif path == "/api/stop-after-unit":
            governor.stop_after_unit()
        elif path == "/api/login-code":
            self._send_json(200, {"code": self.page.new_login_code()})
            return
        elif path == "/api/settings":
            error = self._change_settings()
            if error is not None:
                self._send_json(400, {"error": error})
                return
        else:
            self._send_json(404, {"error": "not found"})
            return
        self._send_json(200, self.page.snapshot())

    def _change_settings(self) -> str | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            return "too large"
        try:
            changes = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return "not JSON"
        if not isinstance(changes, dict):
            return "send a JSON object of settings"
        refused = sorted(set(changes) - cfg.EDITABLE)
        if refused:
            return f"{refused[0]} cannot be changed here"
        try:
            new = self.page.governor.settings.replace(**changes)
        except cfg.SettingsError as exc:
            return str(exc)
        self.page.save_settings(new)
        self.page.governor.apply_settings(new)
        return None


# -- the CLI's side ------------------------------------------------------------------


class AgentNotRunning(Exception):
    """Nothing answers on the status port."""


def call(
    path: str, *, method: str = "GET", body: Any = None, port: int | None = None
) -> dict[str, Any]:
    """Call the running agent's endpoint with the secret; returns the JSON answer.

    Raises
    ------
    AgentNotRunning
        When no agent listens on the port.
    RuntimeError
        When the agent answers with an error.
    """
    port = port or cfg.load().status_port
    try:
        secret = secret_path().read_text().strip()
    except FileNotFoundError:
        raise AgentNotRunning("the agent has not run yet (no status secret)") from None
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        method=method,
        headers={SECRET_HEADER: secret, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", str(exc))
        except ValueError:
            message = str(exc)
        raise RuntimeError(message) from None
    except (urllib.error.URLError, ConnectionError) as exc:
        raise AgentNotRunning(f"no agent answers on 127.0.0.1:{port} ({exc})") from None


def describe(status: dict[str, Any]) -> str:
    """A few human lines for ``downpour-agent status``."""
    state = status["state"] + (f": {status['reason']}" if status.get("reason") else "")
    lines = [f"state: {state}"]
    if status.get("job_id"):
        lines.append(
            f"job: {status['job_id']} (step {status['steps_done']}/{status['steps_total']})"
        )
    lines.append(f"speed: {status['samples_per_s']:.0f} samples/s")
    lines.append(f"credit: {status['credit_today']:.0f} today, {status['credit_total']:.0f} total")
    if status.get("stop_after_unit"):
        lines.append("stopping after this unit")
    return "\n".join(lines)


LOGIN_FAILED: Final = """<!doctype html><meta charset="utf-8"><title>Downpour agent</title>
<p>This page needs the agent's secret. Run <code>downpour-agent open</code> for a login link.</p>
"""

PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Downpour agent</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f4f6f8;color:#1d2733}
 header{background:#1d3557;color:#fff;padding:14px 24px;font-size:18px;font-weight:600}
 main{max-width:760px;margin:20px auto;padding:0 16px}
 section{background:#fff;border-radius:8px;padding:16px 20px;margin-bottom:16px;
  box-shadow:0 1px 2px #0002}
 h2{font-size:15px;margin:0 0 10px;color:#4a5868;text-transform:uppercase;letter-spacing:.04em}
 #state{font-size:22px;font-weight:600}
 .computing{color:#1a7f37}.paused{color:#b35900}.disconnected,.stopped{color:#b42318}
 #reason{color:#4a5868;margin-left:8px}
 dl{display:grid;grid-template-columns:max-content minmax(0,1fr);gap:4px 18px;margin:10px 0 0}
 dt{color:#4a5868} dd{margin:0;overflow-wrap:anywhere}
 button{font:inherit;padding:7px 16px;border-radius:6px;border:1px solid #1d3557;
  background:#fff;color:#1d3557;cursor:pointer;margin:0 8px 8px 0}
 button.primary{background:#1d3557;color:#fff}
 form label{display:grid;grid-template-columns:230px minmax(0,1fr);align-items:center;
  margin:6px 0}
 input,select{font:inherit;padding:4px 6px;max-width:100%;box-sizing:border-box}
 input[type=checkbox]{justify-self:start}
 #message{margin-left:10px}
 /* A phone: each setting's label above its field. */
 @media (max-width:520px){form label{grid-template-columns:minmax(0,1fr);gap:2px}}
</style></head>
<body><header>Downpour agent</header><main>
<section><h2>Now</h2>
 <div><span id="state">…</span><span id="reason"></span></div>
 <dl>
  <dt>Job</dt><dd id="job">none</dd>
  <dt>Speed</dt><dd id="speed">0 samples/s</dd>
  <dt>Credit today</dt><dd id="credit-today">0</dd>
  <dt>Credit in total</dt><dd id="credit-total">0</dd>
  <dt>Server</dt><dd id="server"></dd>
 </dl>
 <p>
  <button id="pause" class="primary">Pause</button>
  <button id="resume">Resume</button>
  <button id="stop-after-unit">Stop after this unit</button>
 </p>
</section>
<section><h2>Settings</h2>
<form id="settings">
 <label>Compute <select name="mode">
   <option value="always">always</option>
   <option value="idle">when the computer is idle</option>
   <option value="schedule">during these hours</option></select></label>
 <label>Idle after (seconds) <input name="idle_after_s" type="number" min="1" step="any"></label>
 <label>Hours (e.g. 22:00-07:00) <input name="schedule" type="text"></label>
 <label>CPU time (%) <input name="cpu_share" type="number" min="1" max="100"></label>
 <label>Threads (0: all cores but one) <input name="threads" type="number" min="0"></label>
 <label>Memory limit (MiB, 0: half) <input name="memory_limit_mb" type="number" min="0"></label>
 <label>Work on battery <input name="run_on_battery" type="checkbox"></label>
 <label>GPU (-1: none) <input name="gpu_device" type="number" min="-1"></label>
 <label>GPU memory (MiB, 0: no cap) <input name="gpu_memory_limit_mb" type="number" min="0">
 </label>
 <p><button class="primary" type="submit">Save</button><span id="message"></span></p>
</form></section>
</main>
<script>
const $ = (id) => document.getElementById(id);
const form = $("settings");
let formLoaded = false;
function show(s) {
  $("state").textContent = s.state + (s.stop_after_unit ? " (stopping after this unit)" : "");
  $("state").className = s.state;
  $("reason").textContent = s.reason ? "— " + s.reason : "";
  $("job").textContent = s.job_id ? s.job_id + " (step " + s.steps_done + " of "
    + s.steps_total + ")" : "none";
  $("speed").textContent = Math.round(s.samples_per_s) + " samples/s";
  $("credit-today").textContent = Math.round(s.credit_today);
  $("credit-total").textContent = Math.round(s.credit_total);
  $("server").textContent = s.server_url;
  if (!formLoaded && s.settings.mode) { fill(s.settings); formLoaded = true; }
}
function fill(v) {
  for (const el of form.elements) {
    if (!el.name) continue;
    const x = v[el.name];
    if (el.type === "checkbox") el.checked = !!x;
    else if (el.name === "cpu_share") el.value = Math.round(x * 100);
    else if (el.name === "schedule") el.value = x.join(", ");
    else el.value = x;
  }
}
async function api(path, body) {
  const r = await fetch(path, {method: body === undefined && path === "/api/status"
    ? "GET" : "POST", headers: {"Content-Type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error);
  return data;
}
async function refresh() { try { show(await api("/api/status")); } catch (e) {} }
for (const b of ["pause", "resume", "stop-after-unit"])
  $(b).onclick = async () => show(await api("/api/" + b, {}));
form.onsubmit = async (e) => {
  e.preventDefault();
  const v = {};
  for (const el of form.elements) {
    if (!el.name) continue;
    if (el.type === "checkbox") v[el.name] = el.checked;
    else if (el.name === "cpu_share") v[el.name] = Number(el.value) / 100;
    else if (el.name === "schedule")
      v[el.name] = el.value.split(",").map(s => s.trim()).filter(s => s);
    else if (el.type === "number") v[el.name] = Number(el.value);
    else v[el.name] = el.value;
  }
  try { show(await api("/api/settings", v)); $("message").textContent = "saved"; }
  catch (err) { $("message").textContent = err.message; }
};
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""
