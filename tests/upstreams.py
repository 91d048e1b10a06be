"""Real servers the forwarding backends talk to in tests, each on a loopback port.

* ``AiosmtpdUpstream``: aiosmtpd (a foreign SMTP implementation) in its own thread,
  with an authenticator over ``USERS``; it records every AUTH command and every
  authenticator call, so tests can count attempts.  Modes: ``"plain"``, ``"starttls"``
  (AUTH only after STARTTLS) and ``"implicit"`` (TLS from the first byte).
* ``AuthAPI`` + ``WebServer``: a twisted.web JSON auth API (200 / 401 / 403 / 500 /
  hang) that records each request; the server can be stopped (dropping its open
  connections, as a dying process would) and started again on the same port.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.tlsutil import server_ssl_context

USERS = {"alice": "correct horse", "b\u00f6b": "p\u00e4ss w\u00f6rd"}
USERS_BYTES = {k.encode(): v.encode() for k, v in USERS.items()}
BLOCKED = "blocked"  # the API answers 403 for this user, whatever the password
TEMPFAIL_REPLY = "454 4.7.0 Temporary authentication failure"


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """aiosmtpd authenticator checking ``USERS``; records each call; ``tempfail`` mode
    (it answers 454), ``broken`` mode (it raises, as when its own user database is down:
    aiosmtpd then answers ``500 Error: (ConnectionError) ...``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.commands: list[str] = []  # every AUTH command line's mechanism
        self.tempfail = False
        self.broken = False

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str,
                 auth_data: Any) -> AuthResult:
        self.calls.append((mechanism, auth_data.login))
        if self.tempfail:
            return AuthResult(success=False, handled=False, message=TEMPFAIL_REPLY)
        if self.broken:
            raise ConnectionError("user database unreachable")
        ok = USERS_BYTES.get(auth_data.login) == auth_data.password
        return AuthResult(success=ok, handled=False, auth_data=auth_data)


class AiosmtpdUpstream:
    """An aiosmtpd server on a fixed loopback port that can be stopped and started again.

    ``mode``: ``"plain"`` (AUTH without TLS), ``"starttls"`` (AUTH only after STARTTLS)
    or ``"implicit"`` (TLS from the first byte).  ``exclude`` hides mechanisms.
    """

    def __init__(self, mode: str = "plain", cert: Any = None, exclude: tuple[str, ...] = ()):
        self.port = free_port()
        self.mode = mode
        self.cert = cert
        self.exclude = exclude
        self.recorder = Recorder()
        self.controller: Controller | None = None

    def start(self) -> None:
        """Start listening (blocking; run it in a thread from inside a test)."""
        recorder = self.recorder

        class CountingSMTP(SMTP):
            async def smtp_AUTH(self, arg: str) -> None:
                recorder.commands.append(arg.split()[0].upper() if arg else "")
                await super().smtp_AUTH(arg)

        class CountingController(Controller):
            def factory(self) -> SMTP:
                return CountingSMTP(self.handler, **self.SMTP_kwargs)

        kwargs: dict[str, Any] = dict(authenticator=recorder, auth_exclude_mechanism=
                                      list(self.exclude), hostname="127.0.0.1",
                                      port=self.port, ready_timeout=5)
        if self.mode == "plain":
            kwargs.update(auth_require_tls=False)
        elif self.mode == "starttls":
            kwargs.update(tls_context=server_ssl_context(self.cert), require_starttls=True,
                          auth_require_tls=True)
        elif self.mode == "implicit":
            kwargs.update(ssl_context=server_ssl_context(self.cert), auth_require_tls=False)
        self.controller = CountingController(_Handler(), **kwargs)
        self.controller.start()

    def stop(self) -> None:
        """Stop listening (blocking; run it in a thread from inside a test)."""
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def reset(self) -> None:
        """Forget the recorded AUTH attempts."""
        self.recorder.calls.clear()
        self.recorder.commands.clear()
        self.recorder.tempfail = False
        self.recorder.broken = False


class _Handler:
    """Accepts nothing: the checker must never get as far as MAIL."""

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: Any) -> str:
        return "550 5.7.1 this upstream takes no mail in tests"


class AuthAPI(Resource):
    """A small auth API: POST JSON -> 200 / 401 / 403; ``mode`` "500" or "hang"."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []
        self.mode = "normal"
        self.hanging: list[Any] = []

    def render_POST(self, request: Any) -> bytes | int:
        raw = request.content.read()
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append({"path": request.path, "headers": headers, "raw": raw})
        if self.mode == "hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if self.mode == "500":
            request.setResponseCode(500)
            return b"internal error"
        try:
            body = json.loads(raw)
            assert headers.get("content-type", "").startswith("application/json")
            assert set(body) == {"username", "password", "mechanism", "remote_ip"}
        except (ValueError, AssertionError):
            request.setResponseCode(400)
            return b"bad request"
        if body["username"] == BLOCKED:
            request.setResponseCode(403)
            return b"forbidden"
        if USERS.get(body["username"]) == body["password"]:
            request.setResponseCode(200)
            return b'{"ok": true}'
        request.setResponseCode(401)
        return b'{"ok": false}'


class _CountingFactory(WrappingFactory):
    """A WrappingFactory (``protocols``: the open connections) that also counts every
    connection ever accepted in ``accepted``."""

    accepted = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.accepted += 1
        return super().buildProtocol(addr)


class WebServer:
    """A twisted.web Site on a fixed loopback port, stoppable (closing its open
    connections, as a dying process would) and startable again."""

    def __init__(self, resource: Resource, tls_options: Any = None) -> None:
        self.resource = resource
        self.tls_options = tls_options
        self.port: int = 0
        self.listener: Any = None
        self.site = Site(resource)
        self.factory = _CountingFactory(self.site)  # knows its open connections

    def start(self) -> None:
        """Listen on 127.0.0.1 (the same port as before after a stop)."""
        from twisted.internet import reactor
        if self.tls_options is not None:
            self.listener = reactor.listenSSL(self.port, self.factory, self.tls_options,
                                              interface="127.0.0.1")
        else:
            self.listener = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")
        self.port = self.listener.getHost().port

    async def stop(self) -> None:
        """Stop listening and drop every open connection."""
        if self.listener is not None:
            await self.listener.stopListening()
            self.listener = None
        for connection in list(self.factory.protocols):
            connection.transport.abortConnection()

    @property
    def connections(self) -> int:
        """How many connections were accepted so far."""
        return self.factory.accepted

    @property
    def url(self) -> str:
        """``http(s)://127.0.0.1:PORT/auth``."""
        scheme = "https" if self.tls_options is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/auth"


