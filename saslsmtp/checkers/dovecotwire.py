"""The client side of Dovecot's auth client protocol (as documented by Dovecot), on one
connection; the policy around it (one shared connection, time limits, the penalty) is
``DovecotChecker`` in ``dovecot``.

* ``DovecotAuthClientProtocol`` is the wire: LF-terminated, TAB-separated lines with
  Dovecot's ``\\001`` escaping.  On connect it sends ``VERSION 1 2`` and ``CPID`` at once,
  then reads the server's ``VERSION``/``MECH``/``SPID``/``CUID``/``COOKIE``/``DONE``.  That
  order works with Dovecot 2.3 (whole handshake sent at once) and 2.4 (the server sends the
  rest only after our ``VERSION``).  ``authenticate()`` sends one ``AUTH`` line with a fresh
  id and returns a Deferred fired by the matching ``OK``/``FAIL``; any number of requests
  are in flight at once, matched by id.

Passwords only ever travel inside ``resp=``; they are never logged nor put in exceptions.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from saslsmtp.errors import TemporaryFailure

# the namespace operators filter on stays the one of the Dovecot backend
log = Logger(namespace="saslsmtp.checkers.dovecot")

AUTH_CLIENT_MAX_LINE_LENGTH = 16384
CLIENT_VERSION = (1, 2)
"""Minor 2: an empty ``resp=`` means an empty initial response (Dovecot's auth protocol)."""
MAX_REQUEST_ID = 2**32 - 1
TEMPORARY_FAIL_CODES = frozenset({"temp_fail", "invalid_base64"})
"""``FAIL`` codes that say nothing about the credentials (``invalid_base64`` is our bug)."""

# --------------------------------------------------------------------------
# Escaping (Dovecot's str_tabescape / str_tabunescape)
# --------------------------------------------------------------------------

_ESCAPES = {0x01: b"\x011", 0x00: b"\x010", 0x09: b"\x01t", 0x0D: b"\x01r", 0x0A: b"\x01n"}
_UNESCAPES = {ord("0"): 0x00, ord("1"): 0x01, ord("t"): 0x09, ord("r"): 0x0D, ord("n"): 0x0A}


#: How much of a line the server sent (that may be no Dovecot at all) a message repeats.
SHOWN_LIMIT = 60


def shown(text: str) -> str:
    """``text`` from the server as a log message may repeat it: printable ASCII as it is,
    anything else (terminal escapes, binary from a port that is not Dovecot) as
    ``\\xNN``, and at most ``SHOWN_LIMIT`` characters."""
    escaped = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in text[:SHOWN_LIMIT])
    return escaped + ("..." if len(text) > SHOWN_LIMIT else "")


def tab_escape(value: bytes | str) -> bytes:
    """Escape one field: ``\\001`` first, then NUL, TAB, CR and LF as ``\\001`` + a letter."""
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if not any(b in _ESCAPES for b in raw):
        return raw
    return b"".join(_ESCAPES.get(b, bytes((b,))) for b in raw)


def tab_unescape(field_: bytes) -> bytes:
    """Undo ``tab_escape``; an unknown escape letter stands for itself (as Dovecot does)."""
    if b"\x01" not in field_:
        return field_
    out = bytearray()
    i = 0
    while i < len(field_):
        b = field_[i]
        if b == 0x01 and i + 1 < len(field_):
            nxt = field_[i + 1]
            out.append(_UNESCAPES.get(nxt, nxt))
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def parse_params(fields: Sequence[bytes]) -> dict[str, bytes | None]:
    """``name=value`` fields -> {name: unescaped value}; bare flags -> {name: None}."""
    params: dict[str, bytes | None] = {}
    for f in fields:
        name, sep, value = f.partition(b"=")
        params[name.decode("latin-1")] = tab_unescape(value) if sep else None
    return params


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerReply:
    """The server's final answer to one ``AUTH``: ``OK`` or ``FAIL`` and its parameters."""

    command: str
    request_id: int
    params: Mapping[str, bytes | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True for ``OK``."""
        return self.command == "OK"

    @property
    def temporary(self) -> bool:
        """A ``FAIL`` that says nothing about the credentials (``code=temp_fail``, ``temp``)."""
        code = (self.params.get("code") or b"").decode("latin-1")
        return not self.ok and (code in TEMPORARY_FAIL_CODES or "temp" in self.params)


@dataclass(frozen=True)
class Handshake:
    """What the server announced before ``DONE``."""

    version: tuple[int, int]
    mechanisms: Mapping[str, tuple[str, ...]]
    spid: str = ""
    cuid: str = ""
    cookie: str = ""


class ProtocolError(TemporaryFailure):
    """The server said something the auth client protocol does not allow."""


@dataclass
class _Pending:
    deferred: Deferred
    unsent_response: bytes | None  # sent on the first CONT when there was no resp=
    lines_at_send: int


# --------------------------------------------------------------------------
# The wire
# --------------------------------------------------------------------------


class DovecotAuthClientProtocol(LineOnlyReceiver):
    """The client side of Dovecot's auth protocol on one connection.

    ``handshake`` fires with a ``Handshake`` at ``DONE`` (or fails with
    ``TemporaryFailure``); then ``authenticate()`` may be called any number of times,
    concurrently.  A lost connection fails every pending request with ``TemporaryFailure``.
    """

    delimiter = b"\n"
    MAX_LENGTH = AUTH_CLIENT_MAX_LINE_LENGTH

    def __init__(self, pid: int | None = None, *, clock: Any = None,
                 hung_after: float | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.clock = clock
        self.hung_after = hung_after
        self.handshake: Deferred[Handshake] = Deferred(self._cancel_handshake)
        self.server: Handshake | None = None
        self.lines_received = 0
        self.quiet_since = 0.0  # the last line, or the first request sent after a quiet spell
        self.connected_now = False
        self._version: tuple[int, int] | None = None
        self._mechanisms: dict[str, tuple[str, ...]] = {}
        self._info: dict[str, str] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._closed_reason: str | None = None

    # ---- state -----------------------------------------------------------

    @property
    def tcp_transport(self) -> ITCPTransport:
        """The TCP or UNIX transport; set by ``makeConnection`` before any call here."""
        return cast(ITCPTransport, self.transport)

    @property
    def usable(self) -> bool:
        """Connected, handshake done, not closing."""
        return (self.connected_now and self.server is not None and self._closed_reason is None
                and not getattr(self.transport, "disconnecting", False))

    # ---- connection events -------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_now = True
        major, minor = CLIENT_VERSION
        self.tcp_transport.write(b"VERSION\t%d\t%d\nCPID\t%d\n" % (major, minor, self.pid))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_now = False
        why = self._closed_reason or "connection to the Dovecot auth server lost"
        if not self.handshake.called:
            self.handshake.errback(TemporaryFailure(f"{why} during the handshake"))
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.deferred.errback(TemporaryFailure(why))

    def _fatal(self, why: str) -> None:
        """Protocol violation: remember why, drop the connection (the handshake or the
        pending requests fail with it, and their backend's outage log says it once); logged
        here only when nobody waits for this connection."""
        waiting = bool(self._pending) or not self.handshake.called
        (log.debug if waiting else log.warn)("Dovecot auth protocol error: {why}", why=why)
        self._closed_reason = f"Dovecot auth protocol error: {why}"
        if not self.handshake.called:
            self.handshake.errback(ProtocolError(self._closed_reason))
        self.tcp_transport.abortConnection()

    def _cancel_handshake(self, d: Deferred) -> None:
        self._closed_reason = "no complete handshake from the Dovecot auth server in time"
        d.errback(TemporaryFailure(self._closed_reason))
        self.tcp_transport.abortConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fatal(f"line longer than {self.MAX_LENGTH} bytes")

    # ---- incoming lines --------------------------------------------------------

    def _now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else 0.0

    def lineReceived(self, line: bytes) -> None:
        self.lines_received += 1
        self.quiet_since = self._now()
        if self._closed_reason is not None:  # dropping the connection: ignore the rest
            return
        fields = line.split(b"\t")
        command = fields[0].decode("latin-1")
        if self.server is None:
            self._handshake_line(command, fields[1:])
        else:
            self._reply_line(command, fields[1:])

    def _handshake_line(self, command: str, args: list[bytes]) -> None:
        if self.handshake.called:  # failed or cancelled: ignore the rest
            return
        if command == "VERSION":
            try:
                version = (int(args[0]), int(args[1]))
            except (IndexError, ValueError):
                return self._fatal("malformed VERSION line")
            if version[0] != CLIENT_VERSION[0]:
                return self._fatal(f"server speaks protocol version {version[0]}, "
                                   f"this client {CLIENT_VERSION[0]}")
            self._version = version
        elif self._version is None:
            self._fatal(f"{shown(command) if command else 'an empty line'} before VERSION")
        elif command == "MECH":
            if not args or not args[0]:
                return self._fatal("MECH without a name")
            self._mechanisms[args[0].decode("latin-1").upper()] = tuple(
                a.decode("latin-1") for a in args[1:])
        elif command == "SPID" and not self._mechanisms:
            # Postfix's rule: an auth-master or auth-userdb socket says SPID and no MECH.
            self._fatal("SPID before any MECH: this is not an auth-client socket "
                        "(auth-master or auth-userdb?)")
        elif command in ("SPID", "CUID", "COOKIE"):
            self._info[command] = args[0].decode("latin-1") if args else ""
        elif command == "DONE":
            self.server = Handshake(self._version, dict(self._mechanisms),
                                    spid=self._info.get("SPID", ""),
                                    cuid=self._info.get("CUID", ""),
                                    cookie=self._info.get("COOKIE", ""))
            self.handshake.callback(self.server)
        # anything else: unknown handshake lines are ignored (forward compatibility)

    def _reply_line(self, command: str, args: list[bytes]) -> None:
        if command not in ("OK", "FAIL", "CONT"):
            log.debug("ignoring Dovecot auth line {command}", command=shown(command))
            return
        try:
            request_id = int(args[0])
        except (IndexError, ValueError):
            return self._fatal(f"{shown(command)} without a valid request id")
        request = self._pending.get(request_id)
        if request is None:  # e.g. the answer to a request we cancelled
            log.debug("ignoring {command} for unknown request {id}", command=command,
                      id=request_id)
            return
        if command == "CONT":
            return self._continue(request_id, request, args[1:])
        del self._pending[request_id]
        request.deferred.callback(ServerReply(command, request_id, parse_params(args[1:])))

    def _continue(self, request_id: int, request: _Pending, args: list[bytes]) -> None:
        challenge = args[0] if args else b""
        if request.unsent_response is not None and challenge == b"":
            data, request.unsent_response = request.unsent_response, None
            self.tcp_transport.write(b"CONT\t%d\t%s\n" % (request_id, base64.b64encode(data)))
            return
        # PLAIN has no second round: give up on this request, keep the connection.
        log.warn("unexpected CONT from the Dovecot auth server for request {id}",
                 id=request_id)
        del self._pending[request_id]
        self.tcp_transport.write(b"CANCEL\t%d\n" % request_id)
        request.deferred.errback(ProtocolError("unexpected CONT from the Dovecot auth server"))

    # ---- requests ----------------------------------------------------------------

    def _allocate_id(self) -> int:
        for _ in range(len(self._pending) + 1):
            request_id = self._next_id
            self._next_id = 1 if self._next_id >= MAX_REQUEST_ID else self._next_id + 1
            if request_id not in self._pending:
                return request_id
        raise TemporaryFailure("no free request id")  # pragma: no cover - 2**32 in flight

    def authenticate(self, mechanism: str, params: Sequence[tuple[str, str | bytes | None]],
                     response: bytes | None, *, initial: bool = True) -> Deferred[ServerReply]:
        """Send ``AUTH``; the Deferred fires with the ``ServerReply`` (``OK`` or ``FAIL``).

        ``params`` are ``(name, value)`` pairs (value ``None`` for a flag), sent in order.
        ``response`` goes as ``resp=`` (always last) when ``initial``, else on the first
        empty ``CONT``.  Cancelling the Deferred sends ``CANCEL``; if nothing at all has come
        from the server since the request went out, the connection is then dropped as hung.
        """
        if not self.usable:
            raise TemporaryFailure("the Dovecot auth connection is not ready")
        request_id = self._allocate_id()
        fields = [b"AUTH", b"%d" % request_id, tab_escape(mechanism)]
        for name, value in params:
            fields.append(tab_escape(name) if value is None
                          else tab_escape(name) + b"=" + tab_escape(value))
        if initial and response is not None:
            fields.append(b"resp=" + base64.b64encode(response))
        deferred: Deferred[ServerReply] = Deferred(lambda d: self._cancel(request_id, d))
        if not self._pending:
            self.quiet_since = self._now()  # nothing was owed before: silence counts from now
        self._pending[request_id] = _Pending(deferred, None if initial else response,
                                             self.lines_received)
        self.tcp_transport.write(b"\t".join(fields) + b"\n")
        return deferred

    def _cancel(self, request_id: int, deferred: Deferred) -> None:
        """This request alone gives up: ``CANCEL`` it, keep the connection for the others,
        unless the server has been silent for ``hung_after`` while answers were owed."""
        request = self._pending.pop(request_id, None)
        if request is None or not self.connected_now:
            return
        self.tcp_transport.write(b"CANCEL\t%d\n" % request_id)
        silent = self._now() - self.quiet_since
        if (self.lines_received == request.lines_at_send and self.hung_after is not None
                and silent >= self.hung_after):
            log.warn("Dovecot auth server silent for {silent:.0f}s with requests waiting: "
                     "dropping the connection", silent=silent)
            self._closed_reason = "the Dovecot auth server stopped answering"
            self.tcp_transport.abortConnection()
