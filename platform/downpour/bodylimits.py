"""Request bodies are bounded before anything buffers them.

One ASGI process holds every agent socket (and, embedded, the parameter store), so a body
must not cost memory before we know who sends it. The caps:

- anonymous requests, any route: ``ANONYMOUS_REQUEST_MAX_BYTES`` (login and signup forms);
- a logged-in user, most routes: ``REQUEST_MAX_BYTES``;
- a logged-in user, the upload routes: ``UPLOAD_REQUEST_MAX_BYTES`` (a dataset or a job's
  initial weights, plus the form around it).

Two layers enforce them. Under daphne, ``BoundedWebRequest`` checks ``Content-Length`` as
soon as the headers are in, counts a chunked body as it arrives, and answers 413 and closes
the connection before the body is read; daphne would otherwise queue the whole body for the
application in memory. A body over the anonymous cap is handed on only once its session has
been checked in a thread. For any ASGI server, ``BodyLimitMiddleware`` does the same checks
on the ``http.request`` messages before Django reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import CookieError, SimpleCookie
from importlib import import_module
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Routes whose forms take files (see ``downpour.portal.urls``).
UPLOAD_PATHS = frozenset({"/jobs/datasets/new/", "/jobs/new/"})
TOO_LARGE = b"Request body too large.\n"


def limit_with_session(path: str) -> int:
    """The cap for a logged-in user's request to ``path``."""
    if path in UPLOAD_PATHS:
        return int(settings.UPLOAD_REQUEST_MAX_BYTES)
    return int(settings.REQUEST_MAX_BYTES)


def session_key_from_cookie_header(header: str) -> str | None:
    cookie: SimpleCookie = SimpleCookie()
    try:
        cookie.load(header)
    except CookieError:
        return None
    morsel = cookie.get(settings.SESSION_COOKIE_NAME)
    return morsel.value if morsel is not None and morsel.value else None


def session_user_is_active(session_key: str) -> bool:
    """Whether ``session_key`` is a live session of an active user (blocking: DB access)."""
    from django.contrib.auth import SESSION_KEY, get_user_model

    engine = import_module(settings.SESSION_ENGINE)
    user_id = engine.SessionStore(session_key).get(SESSION_KEY)
    if user_id is None:
        return False
    return bool(get_user_model().objects.filter(pk=user_id, is_active=True).exists())


def _verified_session_sync(session_key: str) -> bool:
    from django.db import close_old_connections

    close_old_connections()
    try:
        return session_user_is_active(session_key)
    finally:
        close_old_connections()


class _Budget:
    """Decides whether a request may carry ``n`` body bytes, checking its session once."""

    def __init__(self, path: str, session_key: str | None) -> None:
        self.path = path
        self.session_key = session_key
        self.verified: bool | None = None

    def within_anonymous(self, n: int) -> bool:
        return n <= settings.ANONYMOUS_REQUEST_MAX_BYTES

    def within_session(self, n: int) -> bool:
        """Allowed if the session turns out to be real (not yet checked)."""
        return self.session_key is not None and n <= limit_with_session(self.path)


# -- ASGI ---------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """Refuses with 413 a request body over its cap, before the application reads it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        cookie = ""
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _respond(send, 400, b"Bad Content-Length.\n")
                    return
            elif name == b"cookie":
                cookie = value.decode("latin-1")
        budget = _Budget(scope.get("path", ""), session_key_from_cookie_header(cookie))

        async def allowed(n: int) -> bool:
            if budget.within_anonymous(n):
                return True
            if not budget.within_session(n):
                return False
            if budget.verified is None:
                from channels.db import database_sync_to_async

                assert budget.session_key is not None
                check = database_sync_to_async(session_user_is_active)
                budget.verified = bool(await check(budget.session_key))
            return budget.verified

        if declared is not None and not await allowed(declared):
            await _respond(send, 413, TOO_LARGE)
            return

        seen = 0
        over = False
        started = False

        async def bounded_receive() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request" and not over:
                seen += len(message.get("body", b""))
                if (declared is not None and seen > declared) or not await allowed(seen):
                    # Django stops reading (RequestAborted) and sends nothing; we answer.
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, bounded_receive, tracking_send)
        if over and not started:
            await _respond(send, 413, TOO_LARGE)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


# -- daphne -------------------------------------------------------------------------------


def install_in_daphne() -> None:
    """Make daphne build ``BoundedWebRequest`` for every HTTP request it parses.

    daphne's command line imports the application (``downpour.asgi``, which calls this)
    before it builds its HTTP factory, which reads ``daphne.server.HTTPFactory``.
    """
    import daphne.server
    from daphne.http_protocol import HTTPFactory, WebRequest
    from twisted.internet import threads

    class BoundedWebRequest(WebRequest):  # type: ignore[misc]
        _refused = False
        _needs_session_check = False
        _budget: _Budget | None = None
        _seen = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Twisted would parse a form body into ``args`` in memory (the whole multipart
            # body, several times over); daphne never reads ``args``.
            self._parsePOSTFormSubmission = False

        def gotLength(self, length: int | None) -> None:  # noqa: N802 - Twisted's name
            super().gotLength(length)
            path = bytes(getattr(self.channel, "_path", b"") or b"").split(b"?", 1)[0]
            cookies = self.requestHeaders.getRawHeaders(b"cookie") or []
            self._budget = _Budget(
                path.decode("latin-1"),
                session_key_from_cookie_header("; ".join(c.decode("latin-1") for c in cookies)),
            )
            self._seen = 0
            if length is not None:
                self._admit(length)

        def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
            if self._refused:
                return
            self._seen += len(data)
            if not self._admit(self._seen):
                return
            super().handleContentChunk(data)

        def _admit(self, n: int) -> bool:
            budget = self._budget
            assert budget is not None
            if budget.within_anonymous(n):
                return True
            if budget.within_session(n):
                self._needs_session_check = True
                return True
            self._refuse()
            return False

        def _refuse(self) -> None:
            self._refused = True
            log.info("refused a request body over its cap (%d+ bytes)", self._seen)
            transport = self.channel.transport
            if transport is not None:
                transport.write(
                    b"HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(TOO_LARGE), TOO_LARGE)
                )
            self.channel.loseConnection()

        def process(self) -> Any:
            if self._refused:
                return None
            budget = self._budget
            if self._needs_session_check and budget is not None and budget.session_key:
                # The body is on disk (Twisted spools it); check the session in a thread
                # before daphne hands the body to the application in memory.
                checked = threads.deferToThread(_verified_session_sync, budget.session_key)
                checked.addCallback(self._after_session_check)
                checked.addErrback(lambda failure: self._after_session_check(False))
                return checked
            return super().process()

        def _after_session_check(self, ok: bool) -> Any:
            if not ok:
                self._refuse()
                return None
            return WebRequest.process(self)

    class BoundedHTTPFactory(HTTPFactory):  # type: ignore[misc]
        def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted's name
            protocol = super().buildProtocol(addr)
            protocol.requestFactory = BoundedWebRequest
            return protocol

    daphne.server.HTTPFactory = BoundedHTTPFactory
